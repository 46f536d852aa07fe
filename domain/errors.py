"""Domain errors. Each message names what was wrong: the field, or the job, its state and the command."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the domain raises."""


class InvalidInput(DomainError, ValueError):
    """A value given to the domain is not acceptable; `field` names which one."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class InvalidAmount(InvalidInput):
    """An amount that is not a valid USDC amount."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.value = value
        shown = repr(value) if not isinstance(value, str) else f"'{value}'"
        if len(shown) > 40:
            shown = shown[:37] + "..."
        super().__init__(field, f"{shown} {reason}")


class IllegalTransition(DomainError):
    """A command that the job's current state does not allow."""

    def __init__(self, job_id: object, state: str, command: str, detail: str = "") -> None:
        self.job_id = job_id
        self.state = state
        self.command = command
        message = f"job {job_id}: cannot {command} in state {state}"
        super().__init__(f"{message}: {detail}" if detail else message)


class ConflictingOutcome(IllegalTransition):
    """An outcome that contradicts the one already recorded (the same outcome again is a no-op)."""


class JobNotFound(DomainError, LookupError):
    def __init__(self, job_id: object) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: not found")


class ClaimLost(DomainError):
    """Another processor recorded an attempt for this intent first."""

    def __init__(self, job_id: object, step: object) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: another processor claimed {step} first")
