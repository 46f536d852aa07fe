"""Reconciliation: what the log says about each escrow against what the escrow service reports.

The log is the truth of what the engine knows; the service is the truth of where the money is.
They can drift apart without anyone in the engine doing wrong: the service refunds an escrow on its
timeout sweep while the log still says funded, a response was lost after the escrow was created, an
operator released an escrow by hand. Every such difference is listed; nothing is changed here.

A difference the engine itself would record on its next look at the job (the escrow was released,
or refunded by the service's timeout sweep, while the job waits for that outcome) is marked with
what it `settles`: `podsettle reconcile --check-escrow --apply` records it through the engine's own
commands. Jobs that wait on a service are listed with the bound their log (or the service's expiry)
fixes, and whether it has passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.utils import get_topic

from podsettle.adapters.ports import EscrowGateway, EscrowStatus, EscrowView, GatewayError, NotFound
from podsettle.domain import EscrowJob, State, Step, fmt
from podsettle.replay.audit import SWEEP_PERIOD, waiting_on_service
from podsettle.support.logs import get_logger

log = get_logger(__name__)
DEFAULT_CONCURRENCY = 8
_PAGE = 200

# Where the money of a job's escrow should be, by the job's state in the log.
_HELD = frozenset({EscrowStatus.FUNDED, EscrowStatus.COMPLETED, EscrowStatus.DISPUTED})
_EXPECTED: dict[State, frozenset[EscrowStatus]] = {
    State.FUNDED: _HELD,
    State.RUNNING: _HELD,
    State.COMPLETED: _HELD,
    State.RELEASING: _HELD,
    State.FAILED: _HELD,
    State.REFUNDING: _HELD,
    State.RELEASED: frozenset({EscrowStatus.RELEASED}),
    State.REFUNDED: frozenset({EscrowStatus.REFUNDED}),
}
# The outcome the service's status settles for a job waiting on it (what the engine would record).
_SETTLES: dict[tuple[State, EscrowStatus], str] = {
    (State.RELEASING, EscrowStatus.RELEASED): "released",
    (State.RELEASING, EscrowStatus.REFUNDED): "refunded",  # the sweep came first
    (State.REFUNDING, EscrowStatus.REFUNDED): "refunded",
}


@dataclass(frozen=True)
class Difference:
    """One way the log and the escrow service disagree about a job's escrow."""

    job_id: str
    job_key: str
    escrow_id: str | None
    kind: str  # "status" | "amount" | "missing" | "unrecorded" | "unreadable"
    log: str  # what the log says
    service: str  # what the service says
    detail: str = ""
    settles: str | None = None  # "released" | "refunded": the outcome the engine would record

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_key": self.job_key,
            "escrow_id": self.escrow_id,
            "kind": self.kind,
            "log": self.log,
            "service": self.service,
            "detail": self.detail,
            "settles": self.settles,
        }

    def render(self) -> str:
        escrow = f" escrow {self.escrow_id}" if self.escrow_id else ""
        text = (
            f"job {self.job_key} ({self.job_id}){escrow}: {self.kind}: "
            f"log says {self.log}, service says {self.service}"
        )
        text += f" ({self.detail})" if self.detail else ""
        return text + (f"; the service settles it: {self.settles}" if self.settles else "")


@dataclass(frozen=True)
class Waiting:
    """A funded job waiting on a service, and the latest moment that wait may last."""

    job_id: str
    job_key: str
    state: str
    waiting_for: str  # "compute" | "release" | "refund"
    until: datetime
    past_bound: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_key": self.job_key,
            "state": self.state,
            "waiting_for": self.waiting_for,
            "until": self.until.isoformat(),
            "past_bound": self.past_bound,
        }


@dataclass
class ReconcileReport:
    jobs: int = 0
    escrows_checked: int = 0
    differences: list[Difference] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def past_bound(self) -> list[Waiting]:
        return [job for job in self.waiting if job.past_bound]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "jobs": self.jobs,
            "escrows_checked": self.escrows_checked,
            "differences": [d.to_json() for d in self.differences],
            "waiting": [w.to_json() for w in self.waiting],
        }

    def render(self) -> str:
        head = (
            f"podsettle reconcile: {'OK' if self.ok else 'DIFFERENCES FOUND'}: {self.jobs} jobs, "
            f"{self.escrows_checked} escrows checked, {len(self.differences)} difference(s)"
        )
        return "\n".join([head, *(f"  {d.render()}" for d in self.differences)]) + "\n"


def _jobs(app: Application[Any]) -> Iterator[UUID]:
    """Every job id, in log order, from the Opened events (a page at a time)."""
    topic = get_topic(EscrowJob.Opened)
    start = 1
    while True:
        page = app.recorder.select_notifications(start, _PAGE, topics=[topic])
        if not page:
            return
        for notification in page:
            originator = notification.originator_id
            yield originator if isinstance(originator, UUID) else UUID(str(originator))
        start = page[-1].id + 1


def funded_at(app: Application[Any], job: EscrowJob) -> datetime | None:
    """When the log recorded the job's escrow funded (its Funded event's time)."""
    for event in app.repository.event_store.get(job.id):
        if isinstance(event, EscrowJob.Funded):
            stamp: datetime = event.timestamp
            return stamp
    return None


def waiting(
    app: Application[Any], job: EscrowJob, now: datetime, expires: datetime | None = None
) -> Waiting | None:
    """The job's wait on a service and its bound: the log's (`waiting_on_service`), or for a release
    or a refund the escrow's own expiry when the service reported it (`expires`), plus the sweep."""
    if job.funded_amount is None:
        return None
    found = waiting_on_service(job, funded_at(app, job))
    if found is None:
        return None
    what, until = found
    if expires is not None and what != "compute":
        until = expires + SWEEP_PERIOD
    return Waiting(str(job.id), job.job_key, str(job.state), what, until, now > until)


def waiting_jobs(app: Application[Any], *, now: Callable[[], datetime] | None = None) -> list[Waiting]:
    """Every funded job that waits on a service, with its bound from the log alone."""
    moment = (now or (lambda: datetime.now(UTC)))()
    found = []
    for job_id in _jobs(app):
        job: EscrowJob = app.repository.get(job_id)
        wait = waiting(app, job, moment)
        if wait is not None:
            found.append(wait)
    return found


async def reconcile(
    app: Application[Any],
    gateway: EscrowGateway,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    now: Callable[[], datetime] | None = None,
) -> ReconcileReport:
    """Compare every job's escrow (and bonus escrow) in `app`'s log with `gateway.get`; list the jobs
    that wait on a service with their bound (against `now`, by default the wall clock)."""
    report = ReconcileReport()
    limit = asyncio.Semaphore(concurrency)
    batch: list[EscrowJob] = []
    moment = (now or (lambda: datetime.now(UTC)))()

    async def check_batch() -> None:
        results = await asyncio.gather(*(_check(job, gateway, limit) for job in batch))
        for job, (checked, differences, expires) in zip(batch, results, strict=True):
            report.escrows_checked += checked
            report.differences.extend(differences)
            wait = waiting(app, job, moment, expires)
            if wait is not None and not any(d.settles for d in differences):
                report.waiting.append(wait)
        batch.clear()

    for job_id in _jobs(app):
        job: EscrowJob = app.repository.get(job_id)
        report.jobs += 1
        batch.append(job)
        if len(batch) >= _PAGE:
            await check_batch()
    if batch:
        await check_batch()
    log.info(
        "reconciled", jobs=report.jobs, escrows=report.escrows_checked, differences=len(report.differences)
    )
    return report


async def _check(
    job: EscrowJob, gateway: EscrowGateway, limit: asyncio.Semaphore
) -> tuple[int, list[Difference], datetime | None]:
    """The job's differences, and its escrow's expiry as the service reports it."""
    found: list[Difference] = []
    checked = 0
    expires: datetime | None = None

    def differ(
        kind: str,
        escrow_id: str | None,
        says: str,
        service: str,
        detail: str = "",
        settles: str | None = None,
    ) -> None:
        found.append(Difference(str(job.id), job.job_key, escrow_id, kind, says, service, detail, settles))

    async def read(escrow_id: str) -> EscrowView | None:
        nonlocal checked
        checked += 1
        async with limit:
            try:
                return await gateway.get(escrow_id)
            except NotFound:
                differ("missing", escrow_id, f"{job.state} with this escrow", "no such escrow")
            except GatewayError as error:
                differ(
                    "unreadable", escrow_id, str(job.state), "an error", f"{type(error).__name__}: {error}"
                )
        return None

    if job.escrow_id is None:
        intent = job.intent
        if (
            intent is not None
            and intent.step == Step.FUND
            and intent.attempts > 0
            and gateway.capabilities.lookup_by_key
        ):
            checked += 1
            async with limit:
                try:
                    view = await gateway.find_by_key(intent.key)
                except GatewayError as error:
                    differ(
                        "unreadable",
                        None,
                        "funding attempted",
                        "an error",
                        f"{type(error).__name__}: {error}",
                    )
                    view = None
            if view is not None:
                differ(
                    "unrecorded",
                    view.escrow_id,
                    "not funded (funding attempted, outcome unknown)",
                    f"{view.status} escrow of {fmt(view.amount)}",
                )
        return checked, found, expires

    view = await read(job.escrow_id)
    if view is not None:
        expires = view.auto_release_at
        expected = _EXPECTED.get(job.state)
        if expected is not None and view.status not in expected:
            differ(
                "status",
                job.escrow_id,
                _where(job.state),
                str(view.status),
                f"job is {job.state}"
                + (f", {job.intent.step} in flight" if job.awaiting_outcome and job.intent else ""),
                _SETTLES.get((job.state, view.status)),
            )
        elif expected is None and job.state == State.ATTENTION:
            differ(
                "status",
                job.escrow_id,
                "unknown (the job waits for an operator)",
                str(view.status),
                f"parked at {(job.attention or {}).get('step', '?')}: the service's status settles it",
            )
        _amounts(job, view, differ)
        if view.payer is not None and view.payer != job.payer:
            # The service charged another agent than the log's payer: not the escrow this job funded.
            differ("creator", job.escrow_id, f"funded by {job.payer}", f"created by {view.payer}")

    if job.bonus_escrow_id is not None:
        bonus = await read(job.bonus_escrow_id)
        if bonus is not None:
            wanted = {EscrowStatus.RELEASED} if job.bonus_awarded is not None else _HELD
            if bonus.status not in wanted:
                differ(
                    "status",
                    job.bonus_escrow_id,
                    "bonus released" if job.bonus_awarded is not None else "bonus funded, not released",
                    str(bonus.status),
                )
            if job.bonus_funded is not None and bonus.amount != job.bonus_funded.amount:
                differ(
                    "amount",
                    job.bonus_escrow_id,
                    f"bonus escrow of {fmt(job.bonus_funded.amount)}",
                    f"{fmt(bonus.amount)}",
                )
    return checked, found, expires


def _where(state: State) -> str:
    if state == State.RELEASED:
        return "released"
    if state == State.REFUNDED:
        return "refunded"
    return f"funded ({state})"


def _amounts(job: EscrowJob, view: EscrowView, differ: Any) -> None:
    recorded: dict[str, Decimal | None] = {"amount": job.funded_amount, "fee": job.fee, "net": job.net}
    for name, value in recorded.items():
        reported = getattr(view, name)
        if value is not None and reported != value:
            differ("amount", job.escrow_id, f"{name} {fmt(value)}", f"{name} {fmt(reported)}")
