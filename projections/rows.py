"""What the read models hold: one row per job, and tallies that sum rows.

A job's row is read off the `EscrowJob` aggregate after each of its events (the aggregate's own apply
code decides the state), plus the few facts only events carry (when the job was funded). Tallies are
sums of rows, so an incremental update is "take the old row out, put the new row in", and a rebuild
gives exactly the same numbers: Decimal sums are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from podsettle.domain import ZERO, EscrowJob, State, fmt

SETTLED = frozenset({State.RELEASED, State.REFUNDED, State.REJECTED, State.ATTENTION})


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as the read model shows it. Amounts are what actually moved, zero until they did."""

    job_id: str
    job_key: str
    batch_id: str | None
    endpoint_id: str
    payer: str
    payee: str
    state: str
    escrow_id: str | None
    budget: Decimal
    funded: Decimal  # held in the job's escrow
    fee: Decimal  # commission the service kept on the release
    to_payee: Decimal  # released to the worker
    referral_fee: Decimal  # the referrer's share, of the release and the bonus fees
    returned: Decimal  # back with the payer: a refund, or the remainder of a partial release
    fee_kept: Decimal  # commission the service kept on a refund
    bonus: Decimal  # bonus paid to the worker
    bonus_fee: Decimal  # commission on the bonus escrow
    execution_ms: int | None
    delay_ms: int | None
    worker_id: str | None
    intent: str | None
    in_flight: bool  # an intent was attempted and its outcome is not recorded yet
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
    def fees(self) -> Decimal:
        """Every commission the escrow service kept for this job."""
        return self.fee + self.fee_kept + self.bonus_fee

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Decimal):
                value = fmt(value)
            elif isinstance(value, datetime):
                value = value.isoformat()
            data[f.name] = value
        return data


def funded_at_after(event: object, previous: datetime | None) -> datetime | None:
    """When the job was funded: the timestamp of its (first) Funded event."""
    if previous is None and isinstance(event, EscrowJob.Funded):
        return event.timestamp
    return previous


def row_of(job: EscrowJob, position: int, funded_at: datetime | None) -> JobRow:
    """The row of `job` as it is after its event at log `position`."""
    released = job.released
    refunded = job.refunded
    bonus = job.bonus_awarded
    returned: Decimal = ZERO
    if refunded is not None:
        returned += refunded[0]
    if released is not None:
        returned += released[3]
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
        funded=job.funded_amount if job.funded_amount is not None else ZERO,
        fee=released[1] if released is not None else ZERO,
        to_payee=released[0] if released is not None else ZERO,
        referral_fee=(released[2] if released is not None else ZERO)
        + (bonus[3] if bonus is not None else ZERO),
        returned=returned,
        fee_kept=refunded[1] if refunded is not None else ZERO,
        bonus=bonus[1] if bonus is not None else ZERO,
        bonus_fee=bonus[2] if bonus is not None else ZERO,
        execution_ms=job.execution_ms,
        delay_ms=job.delay_ms,
        worker_id=job.worker_id,
        intent=None if intent is None else str(intent.step),
        in_flight=intent is not None and intent.attempts > 0,
        opened_at=job.created_on,
        funded_at=funded_at,
        version=job.version,
        position=position,
    )


COUNTS = ("jobs", "paid", "refunded_jobs", "rejected", "attention", "in_flight", "execution_ms", "runs")
AMOUNTS = ("funded", "released", "fees", "referral", "refunded", "bonuses")


@dataclass(slots=True)
class Tally:
    """Sums over jobs (a batch's, a payee's, an endpoint's, or all of them).

    jobs = paid + refunded_jobs + rejected + attention + in_flight, where in_flight counts the jobs
    still on their way (not yet released, refunded, rejected or parked for an operator).
    """

    jobs: int = 0
    paid: int = 0
    refunded_jobs: int = 0
    rejected: int = 0
    attention: int = 0
    in_flight: int = 0
    execution_ms: int = 0
    runs: int = 0  # jobs that report an execution time
    funded: Decimal = field(default=ZERO)
    released: Decimal = field(default=ZERO)
    fees: Decimal = field(default=ZERO)
    referral: Decimal = field(default=ZERO)
    refunded: Decimal = field(default=ZERO)
    bonuses: Decimal = field(default=ZERO)

    def add(self, row: JobRow, sign: int = 1) -> None:
        state = row.state
        self.jobs += sign
        if state == State.RELEASED:
            self.paid += sign
        elif state == State.REFUNDED:
            self.refunded_jobs += sign
        elif state == State.REJECTED:
            self.rejected += sign
        elif state == State.ATTENTION:
            self.attention += sign
        else:
            self.in_flight += sign
        if row.execution_ms is not None:
            self.execution_ms += sign * row.execution_ms
            self.runs += sign
        if sign > 0:
            self.funded += row.funded
            self.released += row.to_payee
            self.fees += row.fees
            self.referral += row.referral_fee
            self.refunded += row.returned
            self.bonuses += row.bonus
        else:
            self.funded -= row.funded
            self.released -= row.to_payee
            self.fees -= row.fees
            self.referral -= row.referral_fee
            self.refunded -= row.returned
            self.bonuses -= row.bonus

    @property
    def spent(self) -> Decimal:
        """Money that left the payer for good: paid to workers (jobs and bonuses) and fees."""
        return self.released + self.bonuses + self.fees

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in (*COUNTS, *AMOUNTS))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in COUNTS}
        data.update({name: fmt(getattr(self, name)) for name in AMOUNTS})
        data["spent"] = fmt(self.spent)
        return data
