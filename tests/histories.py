"""Realistic event logs for the read-side tests: jobs driven through the lifecycle with the
aggregate's own commands, their saves interleaved as concurrent jobs would be; and `act`, the
library's "get, call one method, save" for tests that build a history one command at a time."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar
from uuid import UUID

from podsettle import Settlements
from podsettle.domain import EscrowJob, Step, rules
from podsettle.domain.digests import digest
from podsettle.domain.money import Money
from podsettle.domain.rules import split
from tests.jobs import DEADLINE

OUTCOMES = (
    "released",
    "released_partial",
    "bonus",
    "refunded",
    "refunded_fee_kept",
    "by_service",
    "rejected",
    "cancelled",
    "attention_resolved",
    "attention_left",
    "opened_only",
)
BUDGETS = ("0.10", "0.50", "1", "2.345678", "12.5")
Command = Callable[[EscrowJob], object]
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    key: str
    outcome: str
    budget: str = "0.50"
    batch: str | None = "batch-1"
    payee: str = "ag_worker"
    endpoint: str = "echo"
    execution_ms: int = 1200
    delay_ms: int = 30


def act(app: Settlements, job_id: UUID | str, command: Callable[[EscrowJob], T]) -> T:
    """Get the job, call `command` on it (one or more of its methods, saved together), save it;
    the command's result. No race handling: tests that race use the job writer."""
    job = app.get_job(job_id)
    result = command(job)
    app.save(job)
    return result


def open_job(plan: Plan) -> EscrowJob:
    return EscrowJob.open(
        job_key=plan.key,
        endpoint_id=plan.endpoint,
        input_digest=digest({"key": plan.key}),
        payer="ag_payer",
        payee=plan.payee,
        budget=plan.budget,
        deadline=DEADLINE,
        batch_id=plan.batch,
        referral="ref_code",
        bonus_pool="5" if plan.outcome == "bonus" else None,
    )


def steps(plan: Plan) -> list[list[Command]]:
    """The job's saves after it was opened: each inner list is one save's commands."""
    parts = split(Decimal(plan.budget))  # type: ignore[arg-type]
    budget = Decimal(plan.budget)

    def fund(job: EscrowJob) -> None:
        job.record_funded(f"esc-{plan.key}", budget, parts.fee, parts.net)

    def complete(job: EscrowJob) -> None:
        job.record_completed(
            digest({"out": plan.key}), plan.execution_ms, plan.delay_ms, "worker-1", {"accuracy": "0.93"}
        )

    def attempt(step: Step) -> Command:
        return lambda job: job.record_attempt(step, "proc-1")

    funded = [
        [attempt(Step.FUND)],
        [fund],
        [attempt(Step.START)],
        [lambda j: j.record_started(f"rp-{plan.key}")],
    ]
    release = [
        [attempt(Step.RELEASE)],
        [lambda j: j.record_released(parts.net, parts.fee, parts.referral_fee)],
    ]
    outcome = plan.outcome
    if outcome == "opened_only":
        return []
    if outcome == "rejected":
        return [[attempt(Step.FUND)], [lambda j: j.record_funding_rejected("insufficient balance", 402)]]
    if outcome in ("released", "bonus"):
        saves = [*funded, [complete], *release]
        if outcome == "bonus":
            granted = rules.bonus(Decimal("0.80"), Decimal("0.9640"), Money(Decimal(5)))
            bonus = split(granted.amount)
            saves += [
                [lambda j: j.request_bonus(Decimal("0.80"), Decimal("0.9640"), "5", Decimal("1.10"))],
                [attempt(Step.BONUS_FUND)],
                [lambda j: j.record_bonus_funded(f"bonus-{plan.key}", bonus.amount, bonus.fee, bonus.net)],
                [attempt(Step.BONUS_RELEASE)],
                [lambda j: j.record_bonus_awarded(bonus.net, bonus.fee, bonus.referral_fee)],
            ]
        return saves
    if outcome == "released_partial":
        back = Decimal("0.05") if parts.net > Decimal("0.05") else Decimal(0)
        return [
            *funded,
            [complete],
            [attempt(Step.RELEASE)],
            [lambda j: j.record_released(parts.net - back, parts.fee, parts.referral_fee, back)],
        ]
    if outcome in ("refunded", "refunded_fee_kept"):
        kept = parts.fee if outcome == "refunded_fee_kept" else Decimal(0)
        return [
            *funded,
            [lambda j: j.record_failed("run", "FAILED", "CUDA out of memory")],
            [attempt(Step.REFUND)],
            [lambda j: j.record_refunded(budget - kept, kept)],
        ]
    if outcome == "by_service":
        return [
            *funded,
            [complete],
            [attempt(Step.RELEASE)],
            [lambda j: j.record_refunded_by_service(parts.net, parts.fee, "escrow timed out")],
        ]
    if outcome == "cancelled":
        return [
            [attempt(Step.FUND)],
            [fund],
            [lambda j: j.request_cancel("operator cancelled")],
            [attempt(Step.REFUND)],
            [lambda j: j.record_refunded(budget, 0)],
        ]
    if outcome == "attention_resolved":
        return [
            [attempt(Step.FUND)],
            [lambda j: j.raise_attention(Step.FUND, "lost response", {"status": "timeout"})],
            [lambda j: j.resolve("escrow found funded", "operator-1"), fund],
            [attempt(Step.START)],
            [lambda j: j.record_started(f"rp-{plan.key}")],
            [complete],
            *release,
        ]
    if outcome == "attention_left":
        return [
            *funded,
            [complete],
            [attempt(Step.RELEASE)],
            [lambda j: j.raise_attention(Step.RELEASE, "release outcome unknown", {"status": "502"})],
        ]
    raise ValueError(outcome)


def drive_history(app: Settlements, plan: Plan, *, upto: int | None = None) -> EscrowJob:
    """Open one job and make its saves (all, or the first `upto`), one save each."""
    job = open_job(plan)
    app.save(job)
    for save in steps(plan)[:upto]:
        for command in save:
            command(job)
        app.save(job)
    return job


def random_plans(rng: random.Random, n: int, *, prefix: str = "job") -> list[Plan]:
    return [
        Plan(
            key=f"{prefix}-{i}",
            outcome=rng.choice(OUTCOMES),
            budget=rng.choice(BUDGETS),
            batch=rng.choice(["batch-a", "batch-b", None]),
            payee=rng.choice(["ag_worker", "ag_other"]),
            endpoint=rng.choice(["echo", "train"]),
            execution_ms=rng.randint(10, 90_000),
            delay_ms=rng.randint(0, 5_000),
        )
        for i in range(n)
    ]


def run(
    app: Settlements,
    plans: Sequence[Plan],
    order: Sequence[int] | None = None,
    *,
    group: int = 1,
    on_save: Callable[[int], object] | None = None,
) -> None:
    """Open the jobs, then perform their saves interleaved: `order` lists job indexes (each use takes
    that job's next save; exhausted jobs are skipped), `group` saves go into one `app.save`.
    `on_save(n)` is called after the n-th save (to catch a read model up in the middle of it)."""
    saves = 0

    def save(*jobs: EscrowJob) -> None:
        nonlocal saves
        app.save(*jobs)
        saves += 1
        if on_save is not None:
            on_save(saves)

    jobs = [open_job(plan) for plan in plans]
    pending = [steps(plan) for plan in plans]
    for start in range(0, len(jobs), 50):
        save(*jobs[start : start + 50])
    sequence = list(order or [])
    sequence += [i for i, saves in enumerate(pending) for _ in saves]  # then whatever is left, in order
    batch: dict[int, EscrowJob] = {}
    for index in sequence:
        if index >= len(jobs) or not pending[index]:
            continue
        if index in batch:
            save(*batch.values())
            batch.clear()
        for command in pending[index].pop(0):
            command(jobs[index])
        batch[index] = jobs[index]
        if len(batch) >= group:
            save(*batch.values())
            batch.clear()
    if batch:
        save(*batch.values())


def history(
    app: Settlements,
    n: int,
    *,
    seed: int = 1,
    group: int = 1,
    on_save: Callable[[int], object] | None = None,
) -> list[Plan]:
    """`n` random jobs with randomly interleaved saves."""
    rng = random.Random(seed)
    plans = random_plans(rng, n, prefix=f"s{seed}")
    order = [i for i, plan in enumerate(plans) for _ in steps(plan)]
    rng.shuffle(order)
    run(app, plans, order, group=group, on_save=on_save)
    return plans
