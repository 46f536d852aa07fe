"""Operator tools behind `podsettle reconcile`: list what waits for an operator or on a service,
record what the escrow service confirms (`--apply`), and record an operator's finding on an
ATTENTION job (with the outcome it implies, in the same save). Every change is made through a job
writer, like every other command."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from podsettle.adapters.ports import GatewayError
from podsettle.application import Settlements
from podsettle.domain import EscrowJob, State, Step
from podsettle.domain.errors import DomainError, IllegalTransition, InvalidInput
from podsettle.domain.money import ZERO, Money
from podsettle.domain.rules import FeeSplit, referral_fee, split
from podsettle.processor import RefundPending
from podsettle.writer import run_command

OUTCOMES = "funded:ESCROW_ID, not-funded, released, refunded, refunded-less-fee, retry"


async def list_attention(
    settlements: Settlements,
    *,
    check_escrow: bool,
    engine_factory: Callable[..., Any],
    apply: bool = False,
    now: Callable[[], datetime] | None = None,
) -> dict[str, Any]:
    """What waits for an operator (ATTENTION jobs; with `check_escrow`, every difference with the
    escrow service), and every job waiting on a service with its bound. With `apply`, what the
    service confirms (a release, a refund by its sweep) is recorded as the engine records it."""
    from podsettle.replay import reconcile, waiting_jobs

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
    differences: list[dict[str, Any]] = []
    applied: list[dict[str, Any]] = []
    if check_escrow:
        # The engine is not started: a listing must not drive (nor resume) any job.
        engine = engine_factory(store=settlements.store.url if settlements.store else None)
        try:
            report = await reconcile(settlements, engine.escrow, now=now)
            for difference in report.differences:
                if apply and difference.settles:
                    applied.append(await _apply(settlements, engine.processor, difference))
                else:
                    differences.append(difference.to_json())
        finally:
            await engine.aclose()
        waiting = report.waiting
    else:
        waiting = waiting_jobs(settlements, now=now)
    return {
        "attention": attention,
        "differences": differences,
        "applied": applied,
        "waiting": [w.to_json() for w in waiting],
    }


async def _apply(settlements: Settlements, processor: Any, difference: Any) -> dict[str, Any]:
    """Record what the service confirmed for one job, with the command the engine's recovery makes,
    through a job writer (`run_command`); a job another process moved meanwhile is left as it is."""
    job_id = UUID(difference.job_id)
    view = settlements.get_job(job_id).view()
    try:
        command = await processor.confirm(view)
    except (GatewayError, RefundPending) as error:
        return {**difference.to_json(), "recorded": None, "error": f"{type(error).__name__}: {error}"}
    if command is None:
        return {**difference.to_json(), "recorded": None, "error": "the service no longer confirms it"}

    def record(job: EscrowJob) -> str:
        if job.version != view.version:
            raise IllegalTransition(job.id, job.state, "reconcile", "the job changed meanwhile")
        command(job)
        return str(job.state)

    try:
        state, _ = await run_command(settlements, job_id, record)
    except DomainError as error:
        return {**difference.to_json(), "recorded": None, "error": str(error)}
    return {**difference.to_json(), "recorded": state, "error": None}


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
    # The service's figures: by the job's dialect's rule (the service's own arithmetic), and for a
    # release what the service reported when it funded the escrow.
    parts = split(amount, dialect=job.dialect)
    if step == Step.RELEASE and job.fee is not None and job.net is not None:
        parts = FeeSplit(amount, Money(job.fee), Money(job.net), referral_fee(Money(job.fee), job.dialect))
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
