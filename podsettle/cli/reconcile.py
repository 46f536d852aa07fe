"""Operator tools behind `podsettle reconcile`: list what waits for an operator, and record an
operator's finding on an ATTENTION job (with the outcome it implies, in the same save, made through
a job writer like every other command)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from podsettle.application import Settlements
from podsettle.domain import EscrowJob, State, Step
from podsettle.domain.errors import IllegalTransition, InvalidInput
from podsettle.domain.money import ZERO
from podsettle.domain.rules import split
from podsettle.writer import run_command

OUTCOMES = "funded:ESCROW_ID, not-funded, released, refunded, refunded-less-fee, retry"


async def list_attention(
    settlements: Settlements, *, check_escrow: bool, engine_factory: Callable[..., Any]
) -> dict[str, Any]:
    attention = []
    for job in settlements.list_jobs(state=State.ATTENTION):
        summary = job.summary()
        attention.append(
            {
                **summary,
                "step": (job.attention or {}).get("step"),
                "reason": (job.attention or {}).get("reason"),
            }
        )
    differences: list[Any] = []
    if check_escrow:
        from podsettle.replay import reconcile

        async with engine_factory(store=settlements.store.url if settlements.store else None) as engine:
            report = await reconcile(settlements, engine.escrow)
        differences = [d.to_json() if hasattr(d, "to_json") else str(d) for d in report.differences]
    return {"attention": attention, "differences": differences}


async def resolve_job(
    settlements: Settlements, job_id: str, finding: str, outcome: str, operator: str
) -> dict[str, Any]:
    """Record the operator's finding on an ATTENTION job, and the outcome it implies, in one save
    made through a job writer (with the engine's race handling)."""
    retry = outcome == "retry"

    def resolve(job: EscrowJob) -> dict[str, Any]:
        # Decided on the copy the writer saves: a job another process moved meanwhile is judged
        # as it is now, and nothing is recorded before every check has passed.
        if job.state != State.ATTENTION or job.intent is None:
            raise IllegalTransition(job.id, job.state, "resolve", "only an ATTENTION job can be resolved")
        record = None if retry else _outcome(job, job.intent.step, outcome)
        job.resolve(finding, operator, retry=retry)
        if record is not None:
            record(job)
        summary: dict[str, Any] = job.summary()
        return summary

    resolved, _ = await run_command(settlements, settlements.get_job(job_id).id, resolve)
    summary: dict[str, Any] = resolved
    return summary


def _outcome(job: EscrowJob, step: Step, outcome: str) -> Callable[[EscrowJob], object]:
    kind, _, argument = outcome.partition(":")
    amount = job.budget if step in (Step.FUND, Step.RELEASE, Step.REFUND) else (job.bonus_amount or ZERO)
    parts = split(amount)
    referral = parts.referral_fee if job.referral else Decimal(0)
    if kind == "funded" and step in (Step.FUND, Step.BONUS_FUND):
        if not argument:
            raise InvalidInput("--outcome", "funded needs the escrow id: funded:esc_...")
        if step == Step.FUND:
            return lambda j: j.record_funded(argument, amount, parts.fee, parts.net)
        return lambda j: j.record_bonus_funded(argument, amount, parts.fee, parts.net)
    if kind == "not-funded" and step == Step.FUND:
        return lambda j: j.record_funding_rejected(f"operator: no escrow was created ({outcome})")
    if kind == "released" and step == Step.RELEASE:
        return lambda j: j.record_released(parts.net, parts.fee, referral)
    if kind == "released" and step == Step.BONUS_RELEASE:
        return lambda j: j.record_bonus_awarded(parts.net, parts.fee, referral)
    if kind in ("refunded", "refunded-less-fee") and step in (Step.REFUND, Step.RELEASE):
        kept = parts.fee if kind == "refunded-less-fee" else Decimal(0)
        returned = amount - kept
        if step == Step.RELEASE:
            return lambda j: j.record_refunded_by_service(returned, kept, "operator: the escrow was refunded")
        return lambda j: j.record_refunded(returned, kept)
    raise InvalidInput("--outcome", f"{outcome!r} does not fit a job stopped at {step}; one of {OUTCOMES}")
