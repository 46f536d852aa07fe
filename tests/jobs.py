"""Building EscrowJob aggregates at each point of their lifecycle, and the requests that open them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import count

from podsettle.domain import EscrowJob, Step
from podsettle.domain.digests import canonical_json, digest, digest_bytes
from podsettle.domain.money import Money
from podsettle.domain.rules import split
from podsettle.requests import JobRequest

DEADLINE = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
_keys = count()
BUDGET = Decimal("0.50")
SPLIT = split(BUDGET)  # fee 0.005, net 0.495, referral 0.00075


def opened(*, budget: object = "0.50", bonus_pool: object = None, key: str | None = None) -> EscrowJob:
    return EscrowJob.open(
        job_key=key or f"job-{next(_keys)}",
        endpoint_id="echo",
        input_digest=digest({"prompt": "hello"}),
        payer="ag_payer",
        payee="ag_worker",
        budget=budget,
        deadline=DEADLINE + timedelta(hours=1),
        batch_id="batch-1",
        referral="ref_code",
        bonus_pool=bonus_pool,
    )


def funded(**kwargs: object) -> EscrowJob:
    job = opened(**kwargs)  # type: ignore[arg-type]
    job.record_attempt(Step.FUND, "test")
    parts = split(job.budget)
    job.record_funded("esc_0001", job.budget, parts.fee, parts.net)
    return job


def running(**kwargs: object) -> EscrowJob:
    job = funded(**kwargs)
    job.record_attempt(Step.START, "test")
    job.record_started("rp-1")
    return job


def releasing(**kwargs: object) -> EscrowJob:
    job = running(**kwargs)
    job.record_completed(digest({"ok": True}), 1200, 30, "worker-9", {"accuracy": "0.92"})
    return job


def released(**kwargs: object) -> EscrowJob:
    job = releasing(**kwargs)
    job.record_attempt(Step.RELEASE, "test")
    parts = split(job.budget)
    job.record_released(parts.net, parts.fee, parts.referral_fee)
    return job


def refunding(**kwargs: object) -> EscrowJob:
    job = running(**kwargs)
    job.record_failed("run", "FAILED", "CUDA out of memory")
    return job


def refunded(**kwargs: object) -> EscrowJob:
    job = refunding(**kwargs)
    job.record_attempt(Step.REFUND, "test")
    job.record_refunded(job.budget, "0")
    return job


def event_names(job: EscrowJob) -> list[str]:
    return [type(e).__name__ for e in job.collect_events()]


def request(
    key: str, *, batch: str | None = None, budget: str = "0.50", payee: str = "ag_worker"
) -> JobRequest:
    """A validated request for an echo job whose input names its key."""
    data = canonical_json({"key": key})
    return JobRequest(
        job_key=key,
        endpoint_id="echo",
        input_bytes=data,
        input_digest=digest_bytes(data),
        payer="ag_payer",
        payee=payee,
        budget=Money(Decimal(budget)),
        deadline=DEADLINE,
        batch_id=batch,
    )
