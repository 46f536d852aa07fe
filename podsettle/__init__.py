"""podsettle: escrow settlement for RunPod serverless jobs, event-sourced.

    from podsettle import Engine

Importing this package is cheap: the names below load on first use, and the RunPod SDK, the
servers and the event store are imported only where they are used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "podsettle.bootstrap",
    "JobResult": "podsettle.engine",
    "BatchResult": "podsettle.engine",
    "Totals": "podsettle.engine",
    "BonusResult": "podsettle.engine",
    "batch_totals": "podsettle.engine",
    "Settlements": "podsettle.application",
    "JobRequest": "podsettle.requests",
    "Settings": "podsettle.settings",
    "ClaimLost": "podsettle.domain.errors",
    "JobNotFound": "podsettle.domain.errors",
    "Pod": "podsettle.bounties",
    "BountyResult": "podsettle.bounties",
    "BountyReport": "podsettle.domain.bounty",
    "BountyState": "podsettle.domain.bounty",
    "BudgetExceeded": "podsettle.bounties",
    "evaluated_by": "podsettle.domain.acceptance",
    "Evaluation": "podsettle.domain.escrow_job",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names, for type checkers and editors; at run time __getattr__ loads them
    from podsettle.application import Settlements as Settlements
    from podsettle.bootstrap import Engine as Engine
    from podsettle.bounties import BountyResult as BountyResult
    from podsettle.bounties import BudgetExceeded as BudgetExceeded
    from podsettle.bounties import Pod as Pod
    from podsettle.domain.acceptance import evaluated_by as evaluated_by
    from podsettle.domain.bounty import BountyReport as BountyReport
    from podsettle.domain.bounty import BountyState as BountyState
    from podsettle.domain.errors import ClaimLost as ClaimLost
    from podsettle.domain.errors import JobNotFound as JobNotFound
    from podsettle.domain.escrow_job import Evaluation as Evaluation
    from podsettle.engine import BatchResult as BatchResult
    from podsettle.engine import BonusResult as BonusResult
    from podsettle.engine import JobResult as JobResult
    from podsettle.engine import Totals as Totals
    from podsettle.engine import batch_totals as batch_totals
    from podsettle.requests import JobRequest as JobRequest
    from podsettle.settings import Settings as Settings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'podsettle' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
