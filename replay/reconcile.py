"""Reconciliation: what the log says about each escrow against what the escrow service reports.

The log is the truth of what the engine knows; the service is the truth of where the money is.
They can drift apart without anyone in the engine doing wrong: the service refunds an escrow on its
timeout sweep while the log still says funded, a response was lost after the escrow was created, an
operator released an escrow by hand. Every such difference is listed; nothing is changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.utils import get_topic

from podsettle.adapters.ports import EscrowGateway, EscrowStatus, EscrowView, GatewayError, NotFound
from podsettle.domain import EscrowJob, State, Step, fmt
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

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_key": self.job_key,
            "escrow_id": self.escrow_id,
            "kind": self.kind,
            "log": self.log,
            "service": self.service,
            "detail": self.detail,
        }

    def render(self) -> str:
        escrow = f" escrow {self.escrow_id}" if self.escrow_id else ""
        text = (
            f"job {self.job_key} ({self.job_id}){escrow}: {self.kind}: "
            f"log says {self.log}, service says {self.service}"
        )
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass
class ReconcileReport:
    jobs: int = 0
    escrows_checked: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "jobs": self.jobs,
            "escrows_checked": self.escrows_checked,
            "differences": [d.to_json() for d in self.differences],
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


async def reconcile(
    app: Application[Any], gateway: EscrowGateway, *, concurrency: int = DEFAULT_CONCURRENCY
) -> ReconcileReport:
    """Compare every job's escrow (and bonus escrow) in `app`'s log with `gateway.get`."""
    report = ReconcileReport()
    limit = asyncio.Semaphore(concurrency)
    batch: list[EscrowJob] = []

    async def check_batch() -> None:
        results = await asyncio.gather(*(_check(job, gateway, limit) for job in batch))
        for checked, differences in results:
            report.escrows_checked += checked
            report.differences.extend(differences)
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
) -> tuple[int, list[Difference]]:
    found: list[Difference] = []
    checked = 0

    def differ(kind: str, escrow_id: str | None, says: str, service: str, detail: str = "") -> None:
        found.append(Difference(str(job.id), job.job_key, escrow_id, kind, says, service, detail))

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
        return checked, found

    view = await read(job.escrow_id)
    if view is not None:
        expected = _EXPECTED.get(job.state)
        if expected is not None and view.status not in expected:
            differ(
                "status",
                job.escrow_id,
                _where(job.state),
                str(view.status),
                f"job is {job.state}"
                + (f", {job.intent.step} in flight" if job.awaiting_outcome and job.intent else ""),
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
    return checked, found


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
