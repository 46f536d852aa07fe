"""The engine on the v1 service's own figures, its recorded refund path, and its payer.

Through the sandbox over real HTTP (the production adapter; the sandbox computes v1 amounts in the
service's float arithmetic): budgets whose v1 figures differ from exact half-up end paid with the
service's figures recorded; a refund follows the path recorded when the job opened, whichever engine
carries it out; a payer that is not the key's agent is refused before anything is recorded or funded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from podsettle.adapters.purpleflea import purple_flea
from podsettle.application import Settlements
from podsettle.bootstrap import Engine
from podsettle.domain import State
from podsettle.engine import EngineCore
from podsettle.processor import ProcessorConfig

D = Decimal


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine.sandbox(f"sqlite:///{tmp_path / 'store.db'}", dialect="v1", balance="100") as made:
        yield made


def balance(engine: Engine, agent: str) -> Decimal:
    accounts = {a["account"]: D(a["balance"]) for a in engine.sandbox_server.ledger()["accounts"]}
    return accounts[agent]


async def test_a_budget_whose_v1_fee_is_not_half_up_ends_paid_with_the_services_figures(
    engine: Engine,
) -> None:
    result = await engine.run_paid_job("echo", {"prompt": "x"}, budget="0.100450")
    assert result.paid, result.attention
    funding = result.view.funding
    assert funding is not None and (funding.fee, funding.net) == (D("0.001004"), D("0.099446"))
    assert result.view.dialect == "v1"
    assert (result.money.to_workers, result.money.fees) == (D("0.099446"), D("0.001004"))
    assert balance(engine, engine.settings.payee or "") == D("0.099446")  # the log agrees with the service


async def test_a_referred_budget_ends_paid_with_the_share_the_service_paid(engine: Engine) -> None:
    referrer = engine.sandbox_server.create_agent("0")
    assert referrer.referral_code is not None
    result = await engine.run_paid_job("echo", {"p": 1}, budget="0.101", referral=referrer.referral_code)
    assert result.paid, result.attention
    assert result.money.referral_fees == D("0.000151")  # exact half-up would expect 0.000152
    assert balance(engine, referrer.agent_id) == D("0.000151")
    assert result.warnings == []


async def test_a_code_the_service_ignored_is_a_warning_not_attention(engine: Engine) -> None:
    result = await engine.run_paid_job("echo", {"p": 2}, budget="0.50", referral="ref_00000000")
    assert result.paid and result.money.referral_fees == 0
    assert result.warnings and "ref_00000000" in result.warnings[0]
    assert result.to_json()["warnings"] == result.warnings


async def test_an_agent_id_as_referral_is_refused_before_anything_is_recorded(engine: Engine) -> None:
    from podsettle.domain import InvalidInput

    with pytest.raises(InvalidInput, match="referral"):
        await engine.run_paid_job("echo", {"p": 3}, budget="0.50", referral=engine.payer)


async def test_a_refund_follows_the_path_recorded_when_the_job_opened(tmp_path: Path) -> None:
    """Opened by an engine whose method is the timeout sweep; carried out by one whose default is a
    dispute: no dispute is made, the sweep's refund is recorded."""
    store = f"sqlite:///{tmp_path / 'store.db'}"
    async with Engine.sandbox(store, dialect="v1", balance="100") as first:
        server = first.sandbox_server
        timeout_escrow = purple_flea(
            server.url, payer_key=first.escrow._payer_key.get_secret_value(), refund_method="timeout"
        )
        opener = EngineCore(
            Settlements(store),
            timeout_escrow,
            first.compute,
            payer=first.payer,
            settings=first.settings.model_copy(update={"refund_method": "timeout"}),
            processor=ProcessorConfig(pending_refund_poll_s=0.05, refund_wait_s=0.0),
            recover_on_start=False,
        )
        async with opener:
            result = await opener.run_paid_job("fail", {"p": 1}, budget="0.50")
        assert result.view.refund_method == "timeout" and result.state == "REFUNDING"
        escrow_id = result.escrow_id
        assert escrow_id is not None
        # The second engine's adapter disputes by default (the sandbox engine's choice).
        assert first.escrow.refund_method == "dispute"  # type: ignore[attr-defined]
        waiting = await first.wait(result.job_id)
        assert waiting.state == "REFUNDING"
        assert (await first.escrow.get(escrow_id)).status.value == "funded"  # not disputed
        async with httpx.AsyncClient(base_url=server.url) as admin:  # past the escrow's timeout
            assert (await admin.post("/sandbox/clock", json={"advance_s": 3 * 3600})).status_code == 200
            await admin.post("/sandbox/sweep")
        assert (await first.escrow.get(escrow_id)).status.value == "refunded"
        refunded = await first.wait(result.job_id)
        assert refunded.state == State.REFUNDED
        assert refunded.money.returned == D("0.495") and refunded.money.fees == D("0.005")
