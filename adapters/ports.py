"""The ports: what the engine needs from an escrow service and from a compute service.

Each port is a small async protocol with typed results and a typed exception tree, so that the
engine can act on what happened without knowing which adapter it talks to. Differences between
services live in the adapters, described to the engine by capability flags.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from podsettle.domain.money import QUANTUM, Money
from podsettle.domain.rules import FeeSplit

SMALLEST_AMOUNT = Money(QUANTUM)  # one micro-USDC: what the local ledger accepts

# ---------------------------------------------------------------------------------------- errors


class GatewayError(Exception):
    """Base of every error a gateway raises. Messages never contain an API key."""

    retryable: bool = False


class Rejected(GatewayError):
    """The service refused the request and nothing happened (400, 402, 404 on create)."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        self.status_code = status_code
        self.code = code
        super().__init__(message)


class Unauthorized(GatewayError):
    """The key is missing or unknown (401). A configuration problem: retrying does not help."""


class Forbidden(GatewayError):
    """The key belongs to the wrong party for this call (403)."""


class NotFound(GatewayError):
    """The escrow or job does not exist (any more)."""


class Conflict(GatewayError):
    """The escrow is not in a status that allows the call (409); `status` is what a read found."""

    def __init__(self, message: str, *, status: str | None = None) -> None:
        self.status = status
        super().__init__(message)


class RateLimited(GatewayError):
    """429: back off for `retry_after` seconds. Nothing happened."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class Unavailable(GatewayError):
    """A read or a call that moves no money failed in a way worth retrying (timeout, 5xx)."""

    retryable = True


class OutcomeUnknown(GatewayError):
    """A money-moving call may or may not have taken effect (timeout, dropped connection, 5xx,
    or a success status with a body that cannot be trusted). Never retried blindly."""


class BadResponse(GatewayError):
    """A response that does not match the contract (HTML, truncated JSON, missing or wrong fields)."""


class AmountMismatch(GatewayError):
    """The service reports amounts that differ from what the engine expects: money moved, but not
    as agreed. The engine parks the job for an operator."""

    def __init__(self, message: str, *, reported: dict[str, str]) -> None:
        self.reported = reported
        super().__init__(message)


# ---------------------------------------------------------------------------------------- escrow


class EscrowStatus(StrEnum):
    FUNDED = "funded"
    COMPLETED = "completed"
    RELEASED = "released"
    DISPUTED = "disputed"
    REFUNDED = "refunded"


# How long past its wait a RunPod /runsync answer may take to arrive before the call is given up
# (an engine sharing the store must not take over a start while its runsync may still answer).
RUNSYNC_READ_MARGIN_S = 10.0


@dataclass(frozen=True)
class EscrowCapabilities:
    idempotent_create: bool  # create with the same key twice gives the same escrow
    lookup_by_key: bool  # an escrow can be found by the key it was created with
    cancel: bool  # the payer can get the money back at once
    # A release may pay out less than the escrow holds, the rest back to the payer (metered jobs).
    partial_release: bool = False
    # What the service refuses to create, so that the engine refuses such a job before recording it.
    min_amount: Money = SMALLEST_AMOUNT
    min_description_chars: int = 0
    # Referrals are the service's own codes (`ref_` and 8 hex digits), checked before anything is sent.
    referral_codes: bool = False


@dataclass(frozen=True)
class EscrowReceipt:
    """A created, funded escrow."""

    escrow_id: str
    amount: Money
    fee: Money
    net: Money
    payer: str | None = None  # the agent the service charged (v1's `creator_id`), when it says


@dataclass(frozen=True)
class EscrowView:
    """An escrow as the service reports it now."""

    escrow_id: str
    status: EscrowStatus
    amount: Money
    fee: Money
    net: Money
    payer: str | None = None
    payee: str | None = None
    auto_release_at: datetime | None = None


@dataclass(frozen=True)
class Settlement:
    """Money that left the escrow: to the payee on release, back to the payer on refund."""

    escrow_id: str
    status: EscrowStatus  # RELEASED or REFUNDED
    to_payee: Money
    fee: Money
    referral_fee: Money
    returned: Money


class EscrowPending(GatewayError):
    """A refund was asked for but the service has not returned the money yet (v1: dispute or wait
    for the timeout sweep). Ask again later with `get`."""

    retryable = True

    def __init__(self, message: str, *, escrow_id: str, status: str) -> None:
        self.escrow_id = escrow_id
        self.status = status
        super().__init__(message)


@runtime_checkable
class EscrowGateway(Protocol):
    capabilities: EscrowCapabilities

    async def create(
        self,
        *,
        key: str,
        payee: str,
        amount: Money,
        description: str,
        timeout_hours: int,
        referral: str | None = None,
        metadata: dict[str, str] | None = None,
        send_within_s: float | None = None,
    ) -> EscrowReceipt:
        """Create and fund an escrow. Checks the reported fee and net against the fee rules.

        With `send_within_s`, a request that could not be sent within that many seconds (queued
        behind the service's rate limit) is not sent at all: `Rejected` with code `start_window`.
        """
        ...

    async def release(self, escrow_id: str, *, key: str, expected: FeeSplit) -> Settlement: ...

    async def refund(
        self,
        escrow_id: str,
        *,
        key: str,
        reason: str,
        expected: FeeSplit | None = None,
        method: str | None = None,
    ) -> Settlement:
        """Return the money to the payer; raises `EscrowPending` while the service has not yet.
        `expected` is the escrow's split as the engine recorded it, for services that report no amounts;
        `method` the job's recorded refund method (a service without a cancel route follows it)."""
        ...

    async def get(self, escrow_id: str) -> EscrowView: ...

    async def balance(self) -> Money | None:
        """The payer's balance where the service shows it; None where it does not (Purple Flea)."""
        ...

    async def health(self) -> None:
        """Raises `Unavailable` when the service cannot be reached."""
        ...

    async def find_by_key(self, key: str) -> EscrowView | None:
        """Only when `capabilities.lookup_by_key`; otherwise raises NotImplementedError."""
        ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------------------------------- compute


class RunStatus(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.TIMED_OUT)


@dataclass(frozen=True)
class RunState:
    """A RunPod job's status object.

    A status outside the six known ones (RunPod's docs also name `RUNNING`) is read as IN_PROGRESS,
    the job still running, with the service's word kept in `reported`."""

    run_id: str
    status: RunStatus
    output: Any = None
    has_output: bool = False
    error: str | None = None
    delay_ms: int | None = None
    execution_ms: int | None = None
    worker_id: str | None = None
    reported: str | None = None

    @property
    def delivered(self) -> bool:
        """The run brought something to pay for: an output that is present and is not the empty
        aggregate `[]` (what a generator handler without `return_aggregate_stream` ends with: its
        parts were only on `/stream`)."""
        return self.has_output and self.output != []


# Called by `wait()` with each new progress value a running job reports (RunPod shows a handler's
# `progress_update` payload as the `output` of an IN_PROGRESS status).
ProgressCallback = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class RunOutcome:
    """A terminal run classified for the engine: success only for COMPLETED with output that was
    delivered (`RunState.delivered`)."""

    state: RunState
    succeeded: bool
    reason: str  # why it failed, precisely; "completed" on success
    details: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class ComputeGateway(Protocol):
    async def submit(
        self,
        endpoint_id: str,
        job_input: bytes | dict[str, Any],
        *,
        execution_timeout_ms: int | None = None,
        ttl_ms: int | None = None,
        webhook: str | None = None,
        low_priority: bool = False,
    ) -> str:
        """Queue a job; returns RunPod's job id. `job_input` is the input's canonical JSON bytes, sent
        exactly as given (the bytes its digest was taken over), or a dict to encode. An adapter may
        submit through `/runsync` with a bounded wait (the id then comes back at most that wait
        later) and answer the following `wait()` from what that call brought back."""
        ...

    def body_and_limit(self, input_size: int, *, execution_timeout_ms: int, ttl_ms: int) -> tuple[int, int]:
        """The size of the request body an input of `input_size` bytes makes with this policy, and
        the largest body this gateway may send (pure: the engine refuses a job it could never
        submit before anything is recorded or funded)."""
        ...

    async def status(self, endpoint_id: str, run_id: str) -> RunState: ...

    async def wait(
        self,
        endpoint_id: str,
        run_id: str,
        *,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
    ) -> RunOutcome:
        """Poll (capped exponential backoff with jitter) until terminal or `timeout_s` passed; on
        timeout the outcome is a failure with reason 'deadline passed' and the last state seen.
        `on_progress` is awaited with each progress value the running job reports, once per value
        (a value seen again is not reported again), never once per poll."""
        ...

    async def cancel(self, endpoint_id: str, run_id: str) -> RunState: ...

    async def retry(self, endpoint_id: str, run_id: str) -> RunState: ...

    async def health(self, endpoint_id: str) -> dict[str, Any]: ...

    async def purge_queue(self, endpoint_id: str) -> int: ...

    async def aclose(self) -> None: ...
