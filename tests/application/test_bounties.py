"""Training bounties on the engine: the reservation, the race, a claim paid once (a forced tie),
402/429 at claim time retried until the deadline then ATTENTION, and the payer's budget."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from podsettle import BountyReport, BountyState, BudgetExceeded, Engine, Pod
from podsettle.adapters.ports import RateLimited, Rejected
from podsettle.bootstrap import in_process_engine
from podsettle.domain.bounty import Bounty
from podsettle.replay.audit import audit
from podsettle.settings import Settings

D = Decimal


class FaultyEscrow:
    """The engine's escrow, with the next `count` creates refused as `error` says."""

    def __init__(self, inner: Any, error: Exception, count: int, on_call: Any = None) -> None:
        self.inner, self.error, self.count, self.on_call = inner, error, count, on_call
        self.creates = 0

    async def create(self, **kwargs: Any) -> Any:
        self.creates += 1
        if self.on_call is not None:
            self.on_call()
        if self.count > 0:
            self.count -= 1
            raise self.error
        return await self.inner.create(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def engine_with(
    escrow_fault: tuple[Exception, int] | None = None,
    on_escrow: Any = None,
    store: str = "memory",
    **options: Any,
) -> Engine:
    engine = in_process_engine(store, **options)
    if escrow_fault is not None:
        faulty = FaultyEscrow(engine.escrow, *escrow_fault, on_call=on_escrow)
        engine.escrow = engine.bounties.escrow = faulty
    return engine


async def entered(engine: Engine, bounty_id: Any, *run_ids: str) -> None:
    """Pods in the race without running them (their reports are given to `claim_bounty`)."""

    def enter(bounty: Bounty) -> None:
        for run_id in run_ids:
            bounty.enter(f"pod-{run_id}", run_id, "ag_worker")

    await engine.bounties.execute(bounty_id, enter)


def ledger_of(engine: Engine) -> Any:
    return engine.escrow.ledger


async def test_the_first_pod_to_reach_the_target_is_paid_and_the_others_are_not() -> None:
    async with engine_with() as engine:
        bounty_id = await engine.post_bounty("train", "5", target="0.9", deadline_s=60, bounty_key="b-race")
        result = await engine.race_bounty(
            bounty_id,
            [Pod("low", {"target": 0.5, "seed": 1}), Pod("high", {"target": 0.97, "seed": 2})],
        )
        assert result.paid and result.winner is not None and result.winner.pod == "high"
        assert D(result.winner.value) >= D("0.9") and len(result.losers) == 1
        assert (result.to_payee, result.fee) == (D("4.95"), D("0.05"))
        ledger = ledger_of(engine)
        assert ledger.balance("ag_worker") == D("4.95")  # one payout: the loser earned nothing
        assert ledger.balance("ag_payer") == D("1000000") - D("5")
        assert audit(engine.app).ok


async def test_nobody_reaching_the_target_expires_the_bounty_and_moves_no_money() -> None:
    async with engine_with() as engine:
        bounty_id = await engine.post_bounty("train", "5", target="0.99", deadline_s=60)
        result = await engine.race_bounty(bounty_id, [Pod("a", {"target": 0.5}), Pod("b", {"target": 0.6})])
        assert result.state == BountyState.EXPIRED and result.reason == "no pod reached the target"
        assert ledger_of(engine).balance("ag_payer") == D("1000000")
        assert audit(engine.app).ok


async def test_a_tie_goes_to_the_earliest_report_then_the_smaller_runpod_id_and_pays_once() -> None:
    async with engine_with() as engine:
        bounty_id = await engine.post_bounty("train", "2", target="0.9", deadline_s=60)
        await entered(engine, bounty_id, "run-b", "run-a", "run-c")
        at = datetime.now(UTC)
        tie = [
            BountyReport("run-b", "pod-run-b", "ag_worker", D("0.95"), at),
            BountyReport("run-a", "pod-run-a", "ag_worker", D("0.91"), at),
            BountyReport("run-c", "pod-run-c", "ag_worker", D("0.99"), at + timedelta(microseconds=1)),
        ]
        # Both tied pods claim at once, and the later one claims again afterwards.
        first, second = await asyncio.gather(
            engine.claim_bounty(bounty_id, tie), engine.claim_bounty(bounty_id, tie[:1])
        )
        again = await engine.claim_bounty(bounty_id, [tie[2]])
        for result in (first, second, again):
            assert result.paid and result.winner is not None and result.winner.runpod_job_id == "run-a"
        assert ledger_of(engine).balance("ag_worker") == D("1.98")  # paid once, not twice
        report = audit(engine.app)
        assert report.ok, report.render()


@pytest.mark.parametrize(
    "error", [Rejected("insufficient balance", status_code=402), RateLimited("slow down", retry_after=0.01)]
)
async def test_402_or_429_at_claim_time_is_retried_until_it_pays(error: Exception) -> None:
    async with engine_with(escrow_fault=(error, 2)) as engine:
        bounty_id = await engine.post_bounty("train", "3", target="0.9", deadline_s=60)
        result = await engine.race_bounty(bounty_id, [Pod("a", {"target": 0.97})])
        assert result.paid and engine.escrow.creates == 3
        assert ledger_of(engine).balance("ag_worker") == D("2.97")
        assert audit(engine.app).ok


async def test_past_the_deadline_the_claim_waits_in_attention_with_its_reservation() -> None:
    now = [datetime.now(UTC)]

    def advance() -> None:
        now[0] += timedelta(seconds=20)  # each refused create takes the clock past part of the deadline

    settings = Settings(store="memory", payer="ag_payer", payee="ag_worker", payer_budget="10")
    async with engine_with(
        escrow_fault=(Rejected("insufficient balance", status_code=402), 1000),
        on_escrow=advance,
        clock=lambda: now[0],
        settings=settings,
    ) as engine:
        bounty_id = await engine.post_bounty("train", "6", target="0.9", deadline_s=60)
        await entered(engine, bounty_id, "run-a")
        result = await engine.claim_bounty(
            bounty_id, [BountyReport("run-a", "p", "ag_worker", D("0.95"), now[0])]
        )
        assert result.state == BountyState.ATTENTION and result.reason is not None
        assert "past the deadline" in result.reason and "402" in result.reason
        assert 3 <= engine.escrow.creates <= 5
        assert ledger_of(engine).balance("ag_worker") == D("0")
        # Still reserved: a job that would spend it is refused.
        with pytest.raises(BudgetExceeded):
            await engine.submit("echo", {"x": 1}, "5")
        assert audit(engine.app, quiescent=True).ok


async def test_a_reserved_bounty_is_unavailable_to_other_jobs_until_it_expires() -> None:
    settings = Settings(store="memory", payer="ag_payer", payee="ag_worker", payer_budget="10")
    async with engine_with(settings=settings) as engine:
        bounty_id = await engine.post_bounty("train", "8", target="0.99", deadline_s=60, bounty_key="b-res")
        with pytest.raises(BudgetExceeded, match=r"8\.000000 of the payer's budget of 10\.000000"):
            await engine.run_paid_job("echo", {"x": 1}, "3", job_key="too-much")
        with pytest.raises(BudgetExceeded):
            await engine.post_bounty("train", "3", target="0.9", deadline_s=60)
        assert [j async for j in _jobs(engine)] == []  # nothing of the refused job was recorded
        paid = await engine.run_paid_job("echo", {"x": 1}, "2", job_key="fits")
        assert paid.paid
        # The same key again is not new spending.
        assert (await engine.run_paid_job("echo", {"x": 1}, "2", job_key="fits")).paid
        expired = await engine.race_bounty(bounty_id, [Pod("a", {"target": 0.5})])
        assert expired.state == BountyState.EXPIRED
        assert (await engine.run_paid_job("echo", {"x": 2}, "7", job_key="after")).paid
        assert await engine.budget.committed() == D("9")  # both budgets, spent; the bounty given back
        assert audit(engine.app).ok


async def _jobs(engine: Engine) -> Any:
    for job_id in await engine.writer.call(lambda: list(engine.app.job_ids())):
        if (await engine.job(job_id)).job_key == "too-much":
            yield job_id


def test_the_audit_flags_a_bounty_paid_twice() -> None:
    bounty = Bounty.post(
        bounty_key="b",
        payer="ag_payer",
        endpoint_id="train",
        amount="1",
        metric="accuracy",
        target="0.9",
        deadline=datetime.now(UTC) + timedelta(minutes=1),
    )
    bounty.enter("a", "run-a", "ag_worker")
    bounty.claim_with([BountyReport("run-a", "a", "ag_worker", D("0.95"), datetime.now(UTC))])
    bounty.record_attempt(bounty.step)  # type: ignore[arg-type]
    bounty.record_funded("esc_1", "1", "0.01", "0.99")
    bounty.record_paid("0.99", "0.01", "0")
    bounty.trigger_event(Bounty.Paid, escrow_id="esc_1", to_payee=D("0.99"), fee=D("0.01"), referral_fee=D(0))
    assert "bounty Paid recorded 2 times" in bounty.violations()


def test_the_store_audit_replays_bounties_and_reports_a_double_payment() -> None:
    from podsettle import Settlements

    app = Settlements("memory")
    bounty = Bounty.post(
        bounty_key="b2",
        payer="ag_payer",
        endpoint_id="train",
        amount="1",
        metric="accuracy",
        target="0.9",
        deadline=datetime.now(UTC) + timedelta(minutes=1),
    )
    bounty.enter("a", "run-a", "ag_worker")
    bounty.claim_with([BountyReport("run-a", "a", "ag_worker", D("0.95"), datetime.now(UTC))])
    bounty.record_attempt(bounty.step)  # type: ignore[arg-type]
    bounty.record_funded("esc_1", "1", "0.01", "0.99")
    bounty.record_paid("0.99", "0.01", "0")
    app.save(bounty)
    assert audit(app).ok
    bounty.trigger_event(Bounty.Paid, escrow_id="esc_1", to_payee=D("0.99"), fee=D("0.01"), referral_fee=D(0))
    app.save(bounty)
    rules = [finding.rule for finding in audit(app).findings]
    assert rules == ["bounty Paid recorded 2 times"]
