"""podsettle: escrow settlement for RunPod serverless jobs, event-sourced.

Importing this package is cheap: the RunPod SDK, servers and other heavy modules are imported only
where they are used.
"""

from __future__ import annotations

from podsettle.application import JobSpec, Settlements
from podsettle.domain.errors import ClaimLost, JobNotFound

__all__ = ["ClaimLost", "JobNotFound", "JobSpec", "Settlements"]
__version__ = "0.1.0"
