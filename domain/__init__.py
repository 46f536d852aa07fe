"""The pure model: money, fee and bonus rules, and the EscrowJob aggregate. No I/O, no clock reads."""

from podsettle.domain.errors import (
    ConflictingOutcome,
    DomainError,
    IllegalTransition,
    InvalidAmount,
    InvalidInput,
)
from podsettle.domain.escrow_job import EscrowJob, Intent, JobMoney, JobView, Step, job_id_for, job_json
from podsettle.domain.lifecycle import TERMINAL, State, Status, rests, status_of
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
    "JobMoney",
    "JobView",
    "Money",
    "State",
    "Status",
    "Step",
    "fmt",
    "job_id_for",
    "job_json",
    "rests",
    "status_of",
    "to_money",
]
