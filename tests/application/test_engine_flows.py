"""The product page's three flows: per-job escrow, batch settlement with totals, and the performance
bonus. Each runs on the engine with in-process gateways (the ledger and handlers run directly) and
against the sandbox over real HTTP in both escrow dialects (the production adapters)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from podsettle.bootstrap import Engine
from podsettle.domain import ConflictingOutcome, IllegalTransition, InvalidInput, State
from podsettle.domain import acceptance as checks

D = Decimal


@pytest.fixture(params=["in-process", "http-v1", "http-seed"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    if request.param == "in-process":
        made = Engine.in_process(store, balance="100")
    else:
        made = Engine.sandbox(store, dialect=request.param.removeprefix("http-"), balance="100")
    async with made as engine:
        yield engine


def balances(engine: Engine) -> dict[str, Decimal]:
    """The payer's and the worker's balances as the escrow service has them."""
    if engine.sandbox_server is not None:
        accounts = {a["account"]: D(a["balance"]) for a in engine.sandbox_server.ledger()["accounts"]}
    else:
        ledger = engine.escrow.ledger  # type: ignore[attr-defined]
        accounts = {a.account_id: a.balance for a in ledger.conservation().accounts}
    return {"payer": accounts[engine.payer], "worker": accounts[engine.settings.payee or ""]}


def kept_on_refund(engine: Engine, budget: Decimal) -> Decimal:
    """v1 has no cancel: its refunds (dispute review, timeout sweep) keep the 1% commission."""
    return D(0) if engine.escrow.capabilities.cancel else (budget / 100).quantize(D("0.000001"))


async def test_a_successful_job_pays_the_worker(engine: Engine) -> None:
    result = await engine.run_paid_job("echo", {"prompt": "hello"}, budget="0.50")
    assert result.status == "paid" and result.paid
    assert result.output == {"prompt": "hello"}
    assert (result.money.to_workers, result.money.fees) == (D("0.495"), D("0.005"))
    assert (result.money.funded, result.money.returned, result.money.still_held) == (D("0.5"), 0, 0)
    assert result.escrow_id and result.runpod_job_id
    assert balances(engine)["worker"] == D("0.495")
    assert balances(engine)["payer"] == D("99.5")
    assert result.to_json()["to_workers"] == "0.495000"


@pytest.mark.parametrize(
    ("endpoint", "job_input", "reason"),
    [
        ("fail", {}, "always fails"),
        ("no-output", {}, "without output"),
    ],
)
async def test_a_failed_job_refunds_the_payer(
    engine: Engine, endpoint: str, job_input: dict, reason: str
) -> None:
    result = await engine.run_paid_job(endpoint, job_input, budget="0.50")
    assert result.status == "refunded"
    assert reason in (result.reason or "")
    kept = kept_on_refund(engine, D("0.5"))
    assert result.money.returned == D("0.5") - kept and result.money.to_workers == 0
    assert result.money.fees == kept
    assert balances(engine)["worker"] == 0
    assert balances(engine)["payer"] == D("100") - kept


async def test_acceptance_checks_gate_the_release(engine: Engine) -> None:
    schema = {"type": "object", "required": ["accuracy"], "properties": {"accuracy": {"type": "number"}}}
    wrong_shape = await engine.run_paid_job(
        "echo", {"text": "no accuracy"}, acceptance=checks.json_schema(schema)
    )
    assert wrong_shape.status == "refunded" and "schema" in (wrong_shape.reason or "")
    too_low = await engine.run_paid_job(
        "train", {"target": 0.5, "seed": 3}, acceptance=checks.metric_at_least("accuracy", "0.99")
    )
    assert too_low.status == "refunded" and "below the required" in (too_low.reason or "")
    good = await engine.run_paid_job(
        "train", {"target": 0.9, "seed": 3}, acceptance=checks.metric_at_least("accuracy", "0.5")
    )
    assert good.status == "paid"
    engine.register_check("has-ok", lambda output: output.get("ok") is True)
    assert (await engine.run_paid_job("echo", {"ok": True}, acceptance=checks.custom("has-ok"))).paid
    assert not (await engine.run_paid_job("echo", {"ok": False}, acceptance=checks.custom("has-ok"))).paid


async def test_a_budget_above_the_balance_is_rejected_and_moves_nothing(engine: Engine) -> None:
    result = await engine.run_paid_job("echo", {"x": 1}, budget="500")
    assert result.status == "rejected"
    assert "insufficient" in (result.reason or "") or "holds" in (result.reason or "")
    assert result.escrow_id is None and balances(engine)["payer"] == D("100")


async def test_the_same_job_key_never_pays_twice(engine: Engine) -> None:
    first = await engine.run_paid_job("echo", {"n": 1}, budget="1", job_key="order-17")
    again = await engine.run_paid_job("echo", {"n": 1}, budget="1", job_key="order-17")
    assert first.job_id == again.job_id and again.status == "paid"
    assert balances(engine)["worker"] == D("0.99")


async def test_a_key_reused_for_a_different_job_is_refused(engine: Engine) -> None:
    await engine.run_paid_job("echo", {"n": 1}, budget="1", job_key="order-18")
    with pytest.raises(ConflictingOutcome, match="opened a different job"):
        await engine.run_paid_job("echo", {"n": 1}, budget="2", job_key="order-18")
    assert balances(engine)["worker"] == D("0.99")


async def test_bad_input_is_refused_before_anything_is_recorded(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match="budget"):
        await engine.run_paid_job("echo", {"x": 1}, budget="-1")
    with pytest.raises(InvalidInput, match="budget"):
        await engine.run_paid_job("echo", {"x": 1}, budget=0.5)
    with pytest.raises(InvalidInput, match="job_input"):
        await engine.run_paid_job("echo", ["not", "an", "object"], budget="1")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"acceptance\.kind"):
        await engine.run_paid_job("echo", {"x": 1}, acceptance={"kind": "vibes"})
    assert engine.app.list_jobs() == []


async def test_batch_settlement_with_totals(engine: Engine) -> None:
    jobs = [{"value": i, "fail_rate": 0.5} for i in range(24)]
    seen: list[str] = []
    batch = await engine.run_batch(
        "flaky", jobs, per_job_budget="0.25", concurrency=8, on_result=lambda r: seen.append(r.status)
    )
    totals = batch.totals
    assert totals.jobs == 24 and len(seen) == 24
    assert totals.paid_jobs + totals.refunded_jobs == 24 and totals.paid_jobs > 0 and totals.refunded_jobs > 0
    assert totals.to_workers == D("0.2475") * totals.paid_jobs
    paid = [r.money for r in batch.results if r.paid]
    assert sum((m.to_workers + m.fees for m in paid), D(0)) == D("0.25") * totals.paid_jobs
    assert totals.funded == D("0.25") * 24 and totals.still_held == 0 and totals.balanced
    assert totals.spent == totals.to_workers + totals.fees
    assert f"{totals.paid_jobs} paid, {totals.refunded_jobs} refunded" in totals.line()
    assert balances(engine)["worker"] == totals.to_workers
    assert {r.batch_id for r in batch.results} == {batch.batch_id}
    assert [j.id for j in engine.app.list_jobs(batch_id=batch.batch_id)] == [r.job_id for r in batch.results]
    assert batch.to_json()["totals"]["spent"] == f"{totals.spent:.6f}"


async def test_performance_bonus(engine: Engine) -> None:
    job = await engine.run_paid_job("train", {"target": 0.9, "seed": 1}, budget="1", bonus_pool="5")
    below = await engine.award_bonus(job.job_id, 0.80, 0.85, pool="5")
    assert below.status == "none" and below.bonus_gross == 0 and below.reason == "below threshold"
    bonus = await engine.award_bonus(job.job_id, 0.80, 0.92, pool="5")
    assert bonus.status == "awarded" and bonus.bonus_gross == D("0.75")
    assert bonus.bonus_net == D("0.7425") and bonus.bonus_fees == D("0.0075")
    again = await engine.award_bonus(job.job_id, 0.80, 0.92, pool="5")
    assert again.bonus_gross == bonus.bonus_gross and again.escrow_id == bonus.escrow_id
    assert balances(engine)["worker"] == D("0.99") + D("0.7425")  # paid once


async def test_bonus_is_capped_at_the_pool(engine: Engine) -> None:
    job = await engine.run_paid_job("echo", {"x": 1}, budget="1")
    bonus = await engine.award_bonus(job.job_id, 0.5, 2.0, pool="3")
    assert bonus.bonus_gross == D("3") and bonus.reason == "capped at the pool"


async def test_no_bonus_on_an_unpaid_job(engine: Engine) -> None:
    job = await engine.run_paid_job("fail", {}, budget="1")
    with pytest.raises(IllegalTransition, match="a bonus is paid only on a released job"):
        await engine.award_bonus(job.job_id, 0.5, 2.0, pool="3")


async def test_cancelling_a_running_job_refunds(engine: Engine) -> None:
    job_id = await engine.submit("sleep", {"seconds": 30}, budget="1")
    for _ in range(200):
        if (await engine.job(job_id)).state == State.RUNNING:
            break
        await asyncio.sleep(0.01)
    result = await engine.cancel(job_id, "changed my mind")
    assert result.status == "refunded" and result.reason == "changed my mind"
    assert balances(engine)["payer"] == D("100") - kept_on_refund(engine, D("1"))


async def test_a_job_past_its_deadline_is_cancelled_and_refunded(engine: Engine) -> None:
    result = await engine.run_paid_job("sleep", {"seconds": 30}, budget="1", timeout_s=5.5)
    assert result.status == "refunded" and "deadline" in (result.reason or "")
