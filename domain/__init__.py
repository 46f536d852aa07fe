"""The pure model: money, fee and bonus rules, and the EscrowJob aggregate. No I/O, no clock reads."""

from podsettle.domain.errors import (
    ConflictingOutcome,
    DomainError,
    IllegalTransition,
    InvalidAmount,
    InvalidInput,
)
from podsettle.domain.escrow_job import TERMINAL, EscrowJob, Intent, State, Step, job_id_for
from podsettle.domain.money import ZERO, Money, fmt, to_money

__all__ = [
    "TERMINAL",
    "ZERO",
    "ConflictingOutcome",
    "DomainError",
    "EscrowJob",
    "IllegalTransition",
    "Intent",
    "InvalidAmount",
    "InvalidInput",
    "Money",
    "State",
    "Step",
    "fmt",
    "job_id_for",
    "to_money",
]
