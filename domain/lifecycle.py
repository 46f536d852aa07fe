"""The job lifecycle's words, in one place: its states, which of them end it, when a job rests,
and the status a caller is told for each state.

Everything that asks "is this job done?" or "what do I tell the caller?" (the engine, the writer, the
processor, the read models, the audit, the command line) asks here, so that the answer cannot differ
between them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class State(StrEnum):
    """Where a job is in the lifecycle table of DESIGN.md (the aggregate's `state`)."""

    OPENED = "OPENED"
    FUNDING = "FUNDING"
    FUNDED = "FUNDED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    RELEASING = "RELEASING"
    RELEASED = "RELEASED"
    FAILED = "FAILED"
    REFUNDING = "REFUNDING"
    REFUNDED = "REFUNDED"
    REJECTED = "REJECTED"
    ATTENTION = "ATTENTION"


# States after which the job's escrow moves no more (a released job may still pay its bonus).
TERMINAL = frozenset({State.RELEASED, State.REFUNDED, State.REJECTED})


def rests(state: str, intent: Any) -> bool:
    """Nothing more happens to the job without an operator or a new command: it waits in ATTENTION,
    or it reached a terminal state with no intent left open (a released job's bonus is an intent)."""
    return state == State.ATTENTION or (state in TERMINAL and intent is None)


class Status(StrEnum):
    """What a caller is told about a job: the words of every result and every total."""

    PAID = "paid"
    REFUNDED = "refunded"
    REJECTED = "rejected"  # the escrow service refused the escrow: nothing was funded
    ATTENTION = "attention"  # an operator must look
    REFUNDING = "refunding"  # the escrow service returns the money on its own schedule
    IN_FLIGHT = "in_flight"

    @property
    def settled(self) -> bool:
        """The job's money has its final place (paid, refunded, or never taken)."""
        return self in (Status.PAID, Status.REFUNDED, Status.REJECTED)


_STATUS_OF: dict[str, Status] = {
    State.RELEASED: Status.PAID,
    State.REFUNDED: Status.REFUNDED,
    State.REJECTED: Status.REJECTED,
    State.ATTENTION: Status.ATTENTION,
    State.REFUNDING: Status.REFUNDING,
}


def status_of(state: str) -> Status:
    """The caller's status of a job in `state` (every other state is on its way: in flight)."""
    return _STATUS_OF.get(state, Status.IN_FLIGHT)
