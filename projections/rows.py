"""What the read models hold: one row per job, and totals that sum rows.

A job's row is read off the `EscrowJob` aggregate after each of its events (the aggregate's own apply
code decides the state and the money), plus the few facts only events carry (when the job was
funded). Totals are sums of rows, so an incremental update is "take the old row out, put the new
row in", and a rebuild gives exactly the same numbers: Decimal sums are exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from podsettle.domain import ZERO, EscrowJob, JobMoney, Status, fmt, status_of


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as the read model shows it. Amounts are what actually moved, zero until they did, under
    the names of `JobMoney` and of the totals."""

    job_id: str
    job_key: str
    batch_id: str | None
    endpoint_id: str
    payer: str
    payee: str
    state: str
    escrow_id: str | None
    budget: Decimal
    funded: Decimal  # every escrow funded for the job: its own and its bonus escrow
    to_workers: Decimal  # released to the worker, bonus included
    fees: Decimal  # commission the service kept: on the release, the refund and the bonus
    returned: Decimal  # back with the payer: a refund, or the remainder of a partial release
    still_held: Decimal  # in escrows not yet released or refunded
    referral_fees: Decimal  # the referrer's share of the fees
    bonus_gross: Decimal
    bonus_fees: Decimal
    bonus_net: Decimal
    execution_ms: int | None
    delay_ms: int | None
    worker_id: str | None
    intent: str | None
    awaiting_outcome: bool  # an intent was attempted and its outcome is not recorded yet
    opened_at: datetime
    funded_at: datetime | None
    version: int
    position: int  # notification id of the job's last event

    @property
    def funding_us(self) -> int | None:
        """Funding latency (Funded.timestamp - Opened.timestamp) in microseconds."""
        if self.funded_at is None:
            return None
        delta = self.funded_at - self.opened_at
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

    @property
    def status(self) -> Status:
        return status_of(self.state)

    @property
    def money(self) -> JobMoney:
        return JobMoney(
            self.funded,
            self.to_workers,
            self.fees,
            self.returned,
            self.still_held,
            self.referral_fees,
            self.bonus_gross,
            self.bonus_fees,
            self.bonus_net,
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Decimal):
                value = fmt(value)
            elif isinstance(value, datetime):
                value = value.isoformat()
            data[f.name] = value
            if f.name == "state":
                data["status"] = str(self.status)
        return data


def funded_at_after(event: object, previous: datetime | None) -> datetime | None:
    """When the job was funded: the timestamp of its (first) Funded event."""
    if previous is None and isinstance(event, EscrowJob.Funded):
        return event.timestamp
    return previous


def row_of(job: EscrowJob, position: int, funded_at: datetime | None) -> JobRow:
    """The row of `job` as it is after its event at log `position`."""
    money = job.money
    intent = job.intent
    return JobRow(
        job_id=str(job.id),
        job_key=job.job_key,
        batch_id=job.batch_id,
        endpoint_id=job.endpoint_id,
        payer=job.payer,
        payee=job.payee,
        state=str(job.state),
        escrow_id=job.escrow_id,
        budget=job.budget,
        funded=money.funded,
        to_workers=money.to_workers,
        fees=money.fees,
        returned=money.returned,
        still_held=money.still_held,
        referral_fees=money.referral_fees,
        bonus_gross=money.bonus_gross,
        bonus_fees=money.bonus_fees,
        bonus_net=money.bonus_net,
        execution_ms=job.execution_ms,
        delay_ms=job.delay_ms,
        worker_id=job.worker_id,
        intent=None if intent is None else str(intent.step),
        awaiting_outcome=job.awaiting_outcome,
        opened_at=job.created_on,
        funded_at=funded_at,
        version=job.version,
        position=position,
    )


# The job counts of the totals, by the status of their jobs (a job the escrow service is refunding
# on its own schedule is still on its way: it counts as in flight).
_COUNT_OF = {
    Status.PAID: "paid_jobs",
    Status.REFUNDED: "refunded_jobs",
    Status.REJECTED: "rejected_jobs",
    Status.ATTENTION: "attention_jobs",
    Status.REFUNDING: "in_flight_jobs",
    Status.IN_FLIGHT: "in_flight_jobs",
}
COUNTS = (
    "jobs",
    "paid_jobs",
    "refunded_jobs",
    "rejected_jobs",
    "attention_jobs",
    "in_flight_jobs",
    "timed_jobs",
    "execution_ms",
)
AMOUNTS: tuple[str, ...] = JobMoney._fields


@dataclass(slots=True)
class Totals:
    """Sums over jobs (a batch's, a payee's, an endpoint's, or all of them), in the words of every
    totals output: the engine's batch result, the read model's totals, and the command line.

    jobs = paid_jobs + refunded_jobs + rejected_jobs + attention_jobs + in_flight_jobs, and the money
    adds up: funded = to_workers + fees + returned + still_held, each the sum of the jobs' own
    (`JobMoney`); `timed_jobs` counts the jobs that report an execution time.
    """

    jobs: int = 0
    paid_jobs: int = 0
    refunded_jobs: int = 0
    rejected_jobs: int = 0
    attention_jobs: int = 0
    in_flight_jobs: int = 0
    timed_jobs: int = 0
    execution_ms: int = 0
    funded: Decimal = field(default=ZERO)
    to_workers: Decimal = field(default=ZERO)
    fees: Decimal = field(default=ZERO)
    returned: Decimal = field(default=ZERO)
    still_held: Decimal = field(default=ZERO)
    referral_fees: Decimal = field(default=ZERO)
    bonus_gross: Decimal = field(default=ZERO)
    bonus_fees: Decimal = field(default=ZERO)
    bonus_net: Decimal = field(default=ZERO)

    def add_job(self, status: Status, money: JobMoney, execution_ms: int | None, sign: int = 1) -> None:
        """Count one job in (sign 1) or out (sign -1)."""
        self.jobs += sign
        name = _COUNT_OF[status]
        setattr(self, name, getattr(self, name) + sign)
        if execution_ms is not None:
            self.execution_ms += sign * execution_ms
            self.timed_jobs += sign
        if sign > 0:
            self.funded += money.funded
            self.to_workers += money.to_workers
            self.fees += money.fees
            self.returned += money.returned
            self.still_held += money.still_held
            self.referral_fees += money.referral_fees
            self.bonus_gross += money.bonus_gross
            self.bonus_fees += money.bonus_fees
            self.bonus_net += money.bonus_net
        else:
            self.funded -= money.funded
            self.to_workers -= money.to_workers
            self.fees -= money.fees
            self.returned -= money.returned
            self.still_held -= money.still_held
            self.referral_fees -= money.referral_fees
            self.bonus_gross -= money.bonus_gross
            self.bonus_fees -= money.bonus_fees
            self.bonus_net -= money.bonus_net

    def add(self, row: JobRow, sign: int = 1) -> None:
        self.add_job(row.status, row.money, row.execution_ms, sign)

    @classmethod
    def of_rows(cls, rows: Iterable[JobRow]) -> Totals:
        totals = cls()
        for row in rows:
            totals.add(row)
        return totals

    @property
    def spent(self) -> Decimal:
        """Money that left the payer for good: paid to workers (bonuses included) and fees."""
        return self.to_workers + self.fees

    @property
    def balanced(self) -> bool:
        """funded = to_workers + fees + returned + still_held."""
        return self.funded == self.to_workers + self.fees + self.returned + self.still_held

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in (*COUNTS, *AMOUNTS))

    def line(self) -> str:
        """The totals in one sentence, for people."""
        return (
            f"{self.paid_jobs} paid, {self.refunded_jobs} refunded"
            + (f", {self.rejected_jobs} rejected" if self.rejected_jobs else "")
            + (f", {self.attention_jobs} need attention" if self.attention_jobs else "")
            + (f", {self.in_flight_jobs} in flight" if self.in_flight_jobs else "")
            + f". Spent {fmt(self.spent)} USDC (to workers {fmt(self.to_workers)}, fees {fmt(self.fees)})"
            + (f"; {fmt(self.still_held)} USDC still held" if self.still_held else "")
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in COUNTS}
        data.update({name: fmt(getattr(self, name)) for name in AMOUNTS})
        data["spent"] = fmt(self.spent)
        return data
