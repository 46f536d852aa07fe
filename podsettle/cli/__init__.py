"""The front end for people: the `podsettle` command line and its console output.

It sits at the top of the layers: it wires engines through `podsettle.bootstrap` and reads the
projections and the audit; nothing imports it.
"""

from podsettle.cli.commands import app, main

__all__ = ["app", "main"]
