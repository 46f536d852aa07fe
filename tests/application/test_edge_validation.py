"""Validation at the edge: a job that can never run is refused before anything is recorded or funded,
the bytes digested are the bytes RunPod receives, and a job whose deadline leaves no time to start is
not funded (the fee would be lost)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from podsettle.bootstrap import Engine
from podsettle.domain import InvalidInput

D = Decimal


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with Engine.in_process("memory", balance="100") as made:
        yield made


def payer_balance(engine: Engine) -> Decimal:
    ledger = engine.escrow.ledger  # type: ignore[attr-defined]
    accounts = {a.account_id: a.balance for a in ledger.conservation().accounts}
    balance: Decimal = accounts[engine.payer]
    return balance


@pytest.mark.parametrize(
    ("job_input", "field"),
    [
        ({"loss": float("nan")}, r"job_input\.loss: nan is not a JSON number"),
        ({"steps": [1, float("inf")]}, r"job_input\.steps\[1\]: inf is not a JSON number"),
        ({"cfg": {"scale": float("-inf")}}, r"job_input\.cfg\.scale"),
        ({"price": D("1.5")}, r"job_input\.price: a Decimal is not a JSON value"),
        ({"tags": {"a", "b"}}, r"job_input\.tags: a set is not a JSON value"),
        ({"text": "\ud800"}, r"job_input\.text: holds a lone surrogate"),
    ],
)
async def test_an_input_json_cannot_carry_is_refused_and_nothing_is_funded(
    engine: Engine, job_input: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput, match=field):
        await engine.run_paid_job("echo", job_input, budget="1.00")
    assert engine.app.list_jobs() == []
    assert payer_balance(engine) == D("100")


async def test_an_input_over_runpods_body_limit_is_refused_and_nothing_is_funded(engine: Engine) -> None:
    engine.compute.max_input_bytes = 4096  # type: ignore[attr-defined]
    with pytest.raises(InvalidInput, match=r"job_input: makes a \d+-byte RunPod request, over the 4096"):
        await engine.run_paid_job("echo", {"blob": "x" * 5000}, budget="1.00")
    # Under the limit on its own, over it with the policy envelope the start adds: refused too.
    with pytest.raises(InvalidInput, match="over the 4096-byte limit"):
        await engine.run_paid_job("echo", {"blob": "x" * (4096 - 40)}, budget="1.00")
    assert engine.app.list_jobs() == []
    assert payer_balance(engine) == D("100")
    paid = await engine.run_paid_job("echo", {"blob": "x" * 3000}, budget="1.00")
    assert paid.status == "paid"


async def test_a_batch_with_one_bad_input_records_nothing(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match=r"job_input\.v"):
        await engine.run_batch("echo", [{"v": 1}, {"v": float("nan")}], "0.50")
    assert engine.app.list_jobs() == []


async def test_purple_fleas_limits_are_checked_before_anything_is_recorded(tmp_path: Any) -> None:
    async with Engine.sandbox(f"sqlite:///{tmp_path / 'store.db'}", balance="100") as engine:
        with pytest.raises(
            InvalidInput, match=r"budget: 0\.050000 is below the escrow's minimum of 0\.100000"
        ):
            await engine.run_paid_job("echo", {"x": 1}, budget="0.05")
        engine.processor.config.description = "ab"
        with pytest.raises(InvalidInput, match="description: the escrow needs at least 3 characters"):
            await engine.run_paid_job("echo", {"x": 1}, budget="1.00")
        assert engine.app.list_jobs() == []


async def test_the_local_ledger_takes_micro_budgets_the_hosted_service_refuses(engine: Engine) -> None:
    """The minimum is the escrow gateway's, not a constant: micro-billing runs on the local ledger."""
    paid = await engine.run_paid_job("echo", {"x": 1}, budget="0.000500")
    assert paid.status == "paid"
    assert payer_balance(engine) == D("100") - D("0.000500")


class Recording:
    """The in-process compute, keeping what each submit was handed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sent: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def submit(self, endpoint_id: str, job_input: Any, **options: Any) -> str:
        self.sent.append(job_input)
        run_id: str = await self._inner.submit(endpoint_id, job_input, **options)
        return run_id


async def test_the_bytes_digested_are_the_bytes_sent(engine: Engine) -> None:
    recording = Recording(engine.processor.compute)
    engine.processor.compute = recording
    job_input = {"b": [1, 2.5, None, True], "a": "é ✓", "n": 10**30}
    result = await engine.run_paid_job("echo", job_input, budget="0.50")
    assert result.status == "paid" and result.output == job_input
    (sent,) = recording.sent
    assert isinstance(sent, bytes)
    view = await engine.writer.view(result.job_id)
    assert hashlib.sha256(sent).hexdigest() == view.input_digest
    assert sent == '{"a":"é ✓","b":[1,2.5,null,true],"n":1000000000000000000000000000000}'.encode()


async def test_a_job_too_close_to_its_deadline_at_funding_is_rejected_unfunded(engine: Engine) -> None:
    real_clock = engine.processor.clock
    # Queued (behind the escrow's create limit, say) until 2 s before its 60 s deadline.
    engine.processor.clock = lambda: real_clock() + timedelta(seconds=58)
    result = await engine.run_paid_job("echo", {"n": 1}, budget="1.00", timeout_s=60)
    assert result.status == "rejected" and result.escrow_id is None
    assert "deadline" in (result.reason or "") and "5 s a start needs" in (result.reason or "")
    assert payer_balance(engine) == D("100")


async def test_the_start_window_is_a_setting(engine: Engine) -> None:
    real_clock = engine.processor.clock
    engine.processor.clock = lambda: real_clock() + timedelta(seconds=40)
    engine.processor.config.min_start_window_s = 30.0
    refused = await engine.run_paid_job("echo", {"n": 1}, budget="1.00", timeout_s=60)
    assert refused.status == "rejected" and "30 s a start needs" in (refused.reason or "")
    engine.processor.config.min_start_window_s = 10.0
    paid = await engine.run_paid_job("echo", {"n": 2}, budget="1.00", timeout_s=60)
    assert paid.status == "paid"


async def test_a_batch_over_the_payers_balance_is_refused_before_anything_is_opened() -> None:
    """Issue 15: the batch's total is checked against the balance the escrow shows (the ledger's)."""
    async with Engine.in_process("memory", balance="10") as engine:
        with pytest.raises(
            InvalidInput, match=r"budget: the batch's 30 jobs need 15\.000000 USDC and the payer holds 10"
        ):
            await engine.run_batch("echo", [{"n": n} for n in range(30)], "0.50", batch_id="big")
        assert engine.app.list_jobs() == [] and payer_balance(engine) == D("10")
        done = await engine.run_batch("echo", [{"n": n} for n in range(12)], "0.50", batch_id="fits")
        assert done.totals.paid_jobs == 12
        # Resumed, the same batch counts only what it has not opened yet: nothing new to fund.
        again = await engine.run_batch("echo", [{"n": n} for n in range(12)], "0.50", batch_id="fits")
        assert again.totals.paid_jobs == 12 and payer_balance(engine) == D("4")
