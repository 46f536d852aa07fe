"""`python -m podsettle.cli`: the same command line as the `podsettle` script."""

from podsettle.cli.commands import main

main()
