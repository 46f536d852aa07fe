"""Contract tests: the Purple Flea adapter against the sandbox escrow server over real HTTP.

Every route, status and error of contracts/purpleflea-escrow.md, in both dialects; a few sandbox
answers compared field by field with the exchanges recorded from the published server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Set
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from podsettle.adapters.ports import (
    Conflict,
    EscrowPending,
    EscrowStatus,
    Forbidden,
    GatewayError,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Unauthorized,
    Unavailable,
)
from podsettle.adapters.purpleflea import purple_flea
from podsettle.domain.money import to_money
from podsettle.domain.rules import split
from podsettle.sandbox.escrow_server import create_escrow_app
from podsettle.sandbox.http_server import BackgroundServer
from tests.escrow_sandbox_helpers import Sandbox, running_sandbox

# Recorded from the published server (a copy of contracts/purpleflea-escrow-examples.json).
EXAMPLES_FILE = Path(__file__).parents[1] / "data" / "purpleflea-escrow-examples.json"
DESCRIPTION = "RunPod job 7f3a (render tile 12)"
HALF = to_money("0.50")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with running_sandbox() as running:
        yield running


@pytest.fixture
def fresh() -> Iterator[Sandbox]:
    with running_sandbox() as running:
        yield running


def _conserved(sandbox: Sandbox) -> None:
    ledger = sandbox.ledger()
    assert ledger["conserved"] is True, ledger
    assert ledger["total"] == ledger["minted"]


async def _create(pf: Any, payee: str, amount: str = "0.50", **kwargs: Any) -> Any:
    return await pf.create(
        key=kwargs.pop("key", f"job-{time.monotonic_ns()}:fund"),
        payee=payee,
        amount=to_money(amount),
        description=DESCRIPTION,
        timeout_hours=kwargs.pop("timeout_hours", 2),
        **kwargs,
    )


# ---------------------------------------------------------------------------------------- v1


async def test_create_funds_an_escrow_with_the_expected_split(sandbox: Sandbox) -> None:
    payer, payer_key = sandbox.agent("10.00")
    worker, _ = sandbox.agent("0")
    async with sandbox.adapter(payer_key) as pf:
        receipt = await _create(pf, worker, "2.345678")
        assert receipt.escrow_id.startswith("esc_") and len(receipt.escrow_id) == 20
        expected = split(to_money("2.345678"))
        assert (receipt.amount, receipt.fee, receipt.net) == (expected.amount, expected.fee, expected.net)
        view = await pf.get(receipt.escrow_id)
    assert view.status is EscrowStatus.FUNDED
    assert (view.amount, view.fee, view.net) == (expected.amount, expected.fee, expected.net)
    assert (view.payer, view.payee) == (payer, worker)
    assert view.auto_release_at is not None
    assert sandbox.balance(payer) == "7.654322"
    _conserved(sandbox)


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        # The documented limits are checked before sending: refused with the service's code, no status.
        ({"amount": "0.05"}, None, "invalid_amount"),
        ({"description": "ab"}, None, "invalid_description"),
        ({"payee": "bob"}, None, "invalid_counterparty"),
        ({"payee": "self"}, 400, "self_escrow"),
        ({"payee": "ag_000000000000"}, 404, "counterparty_not_found"),
        ({"amount": "1000"}, 402, "insufficient_balance"),
    ],
)
async def test_create_refusals_are_rejected_and_move_nothing(
    sandbox: Sandbox, change: dict[str, str], status: int | None, code: str
) -> None:
    payer, payer_key = sandbox.agent("5.00")
    worker, _ = sandbox.agent("0")
    payee = {"self": payer}.get(change.get("payee", ""), change.get("payee", worker))
    async with sandbox.adapter(payer_key) as pf:
        with pytest.raises(Rejected) as caught:
            await pf.create(
                key="k",
                payee=payee,
                amount=to_money(change.get("amount", "0.50")),
                description=change.get("description", DESCRIPTION),
                timeout_hours=2,
            )
    assert (caught.value.status_code, caught.value.code) == (status, code)
    assert code in str(caught.value)
    assert sandbox.balance(payer) == "5.000000"
    _conserved(sandbox)


async def test_unknown_key_is_unauthorized_on_every_payer_route(sandbox: Sandbox) -> None:
    _, payer_key = sandbox.agent("5.00")
    worker, _ = sandbox.agent("0")
    async with sandbox.adapter(payer_key) as pf:
        receipt = await _create(pf, worker)
    async with sandbox.adapter("pf_live_not_a_key", worker_key="pf_live_also_not") as bad:
        with pytest.raises(Unauthorized):
            await _create(bad, worker)
        with pytest.raises(Unauthorized):
            await bad.release(receipt.escrow_id, key="r", expected=split(HALF))
        with pytest.raises(Unauthorized):
            await bad.complete(receipt.escrow_id)
        with pytest.raises(Unauthorized):
            await bad.dispute(receipt.escrow_id, reason="no")


async def test_complete_release_and_the_conflicts_after(sandbox: Sandbox) -> None:
    payer, payer_key = sandbox.agent("5.00")
    worker, worker_key = sandbox.agent("0")
    async with sandbox.adapter(payer_key, worker_key=worker_key) as pf:
        receipt = await _create(pf, worker)
        assert await pf.complete(receipt.escrow_id) is EscrowStatus.COMPLETED
        # Completing again answers 409; the read shows it is already completed.
        assert await pf.complete(receipt.escrow_id) is EscrowStatus.COMPLETED
        settlement = await pf.release(receipt.escrow_id, key="rel-1", expected=split(HALF, referred=False))
        assert settlement.status is EscrowStatus.RELEASED
        assert (settlement.to_payee, settlement.fee, settlement.referral_fee, settlement.returned) == (
            Decimal("0.495"),
            Decimal("0.005"),
            0,
            0,
        )
        # Released already: 409, read, and the same settlement comes back.
        again = await pf.release(receipt.escrow_id, key="rel-2", expected=split(HALF, referred=False))
        assert again == settlement
        with pytest.raises(Conflict) as caught:
            await pf.complete(receipt.escrow_id)
        assert caught.value.status == "released"
        with pytest.raises(Conflict) as refused:
            await pf.refund(receipt.escrow_id, key="ref", reason="late")
        assert refused.value.status == "released"
    assert sandbox.balance(worker) == "0.495000"
    assert sandbox.balance(payer) == "4.500000"
    _conserved(sandbox)


async def test_wrong_party_is_forbidden(sandbox: Sandbox) -> None:
    _, payer_key = sandbox.agent("5.00")
    worker, worker_key = sandbox.agent("0")
    _, stranger_key = sandbox.agent("0")
    async with sandbox.adapter(payer_key, worker_key=payer_key) as pf:
        receipt = await _create(pf, worker)
        with pytest.raises(Forbidden, match="Only the counterparty can mark the task complete"):
            await pf.complete(receipt.escrow_id)
    async with sandbox.adapter(worker_key) as as_worker:
        with pytest.raises(Forbidden, match="Only the escrow creator can release funds"):
            await as_worker.release(receipt.escrow_id, key="r", expected=split(HALF))
    async with sandbox.adapter(stranger_key) as stranger:
        with pytest.raises(Forbidden):
            await stranger.dispute(receipt.escrow_id, reason="not mine")


async def test_unknown_escrow_is_not_found(sandbox: Sandbox) -> None:
    _, payer_key = sandbox.agent("1.00")
    _, worker_key = sandbox.agent("0")
    async with sandbox.adapter(payer_key, worker_key=worker_key) as pf:
        for call in (
            pf.get("esc_0000000000000000"),
            pf.release("esc_0000000000000000", key="r", expected=split(HALF)),
            pf.refund("esc_0000000000000000", key="r", reason="x"),
            pf.complete("esc_0000000000000000"),
            pf.dispute("esc_0000000000000000", reason="x"),
        ):
            with pytest.raises(NotFound, match="Escrow not found"):
                await call


async def test_referral_share_goes_to_the_referrer(sandbox: Sandbox) -> None:
    referrer, _ = sandbox.agent("0")
    _, payer_key = sandbox.agent("10.00", referrer=referrer)
    worker, _ = sandbox.agent("0")
    amount = to_money("2.00")
    async with sandbox.adapter(payer_key) as pf:
        receipt = await _create(pf, worker, "2.00")
        settlement = await pf.release(receipt.escrow_id, key="r", expected=split(amount))
    assert settlement.fee == Decimal("0.02") and settlement.referral_fee == Decimal("0.003")
    assert sandbox.balance(referrer) == "0.003000"
    assert sandbox.balance(worker) == "1.980000"
    _conserved(sandbox)


async def test_explicit_referral_code_wins_over_the_creators_referrer(sandbox: Sandbox) -> None:
    own, _ = sandbox.agent("0")
    code_owner, _ = sandbox.agent("0")
    _, payer_key = sandbox.agent("10.00", referrer=own)
    worker, _ = sandbox.agent("0")
    async with sandbox.adapter(payer_key) as pf:
        receipt = await _create(pf, worker, "1.00", referral=sandbox.codes[code_owner])
        await pf.release(receipt.escrow_id, key="r", expected=split(to_money("1.00")))
    assert sandbox.balance(code_owner) == "0.001500"
    assert sandbox.balance(own) == "0.000000"


async def test_codes_are_the_casinos_form_and_an_agent_id_is_refused_before_sending(
    sandbox: Sandbox,
) -> None:
    code_owner, _ = sandbox.agent("0")
    _, payer_key = sandbox.agent("10.00")
    worker, _ = sandbox.agent("0")
    assert len(sandbox.codes[code_owner]) == 12 and sandbox.codes[code_owner].startswith("ref_")
    before = sandbox.ledger()
    async with sandbox.adapter(payer_key) as pf:
        with pytest.raises(Rejected, match=r"invalid_referral.*nothing was sent"):
            await _create(pf, worker, "1.00", referral=code_owner)  # an agent id, not its code
    assert sandbox.ledger() == before


async def test_an_unknown_code_is_ignored_as_the_service_does(sandbox: Sandbox) -> None:
    """A code that matches no agent pays no referrer, not even the creator's own (the published
    code looks at the creator's referrer only when no code is given), and says nothing."""
    own, _ = sandbox.agent("0")
    _, payer_key = sandbox.agent("10.00", referrer=own)
    worker, _ = sandbox.agent("0")
    async with sandbox.adapter(payer_key) as pf:
        receipt = await _create(pf, worker, "1.00", referral="ref_00000000")
        settlement = await pf.release(receipt.escrow_id, key="r", expected=split(to_money("1.00")))
    assert settlement.referral_fee == 0 and settlement.fee == Decimal("0.01")
    assert sandbox.balance(own) == "0.000000"
    _conserved(sandbox)


@pytest.mark.parametrize(
    ("amount", "fee", "net", "share"),
    [("0.100450", "0.001004", "0.099446", "0"), ("0.101", "0.00101", "0.09999", "0.000151")],
)
async def test_v1_amounts_are_the_services_float_figures(
    sandbox: Sandbox, amount: str, fee: str, net: str, share: str
) -> None:
    code_owner, _ = sandbox.agent("0")
    payer, payer_key = sandbox.agent("10.00")
    worker, _ = sandbox.agent("0")
    referral = sandbox.codes[code_owner] if share != "0" else None
    async with sandbox.adapter(payer_key) as pf:
        receipt = await _create(pf, worker, amount, referral=referral)
        assert (receipt.fee, receipt.net, receipt.payer) == (Decimal(fee), Decimal(net), payer)
        settlement = await pf.release(
            receipt.escrow_id, key="r", expected=split(to_money(amount), dialect="v1")
        )
    assert (settlement.to_payee, settlement.fee, settlement.referral_fee) == (
        Decimal(net),
        Decimal(fee),
        Decimal(share),
    )
    assert Decimal(sandbox.balance(code_owner)) == Decimal(share)
    _conserved(sandbox)


async def test_verify_payer_tells_the_keys_agent_without_funding(sandbox: Sandbox) -> None:
    payer, payer_key = sandbox.agent("10.00")
    other, _ = sandbox.agent("0")
    before = sandbox.ledger()
    async with sandbox.adapter(payer_key) as pf:
        assert await pf.verify_payer(payer) is True
        assert await pf.verify_payer(other) is False  # exists: the balance check answers 402
        assert await pf.verify_payer("ag_nobody") is False  # 404 counterparty_not_found
    async with sandbox.adapter("pf_live_unknown") as pf:
        with pytest.raises(Unauthorized):
            await pf.verify_payer(payer)
    assert sandbox.ledger() == before


async def test_v1_refund_by_dispute_is_pending_until_the_review_refunds(sandbox: Sandbox) -> None:
    payer, payer_key = sandbox.agent("5.00")
    worker, _ = sandbox.agent("0")
    async with sandbox.adapter(payer_key, refund_method="dispute") as pf:  # only when asked for
        assert pf.capabilities.cancel is False
        receipt = await _create(pf, worker)
        with pytest.raises(EscrowPending) as pending:
            await pf.refund(receipt.escrow_id, key="ref", reason="RunPod job FAILED: CUDA out of memory")
        assert pending.value.status == "disputed"
        assert (await pf.get(receipt.escrow_id)).status is EscrowStatus.DISPUTED
        with pytest.raises(EscrowPending):  # asked again: still under review, no second dispute
            await pf.refund(receipt.escrow_id, key="ref", reason="again")
        with pytest.raises(Conflict) as caught:
            await pf.release(receipt.escrow_id, key="rel", expected=split(HALF))
        assert caught.value.status == "disputed"
        resolved = sandbox.http.post(
            f"/sandbox/disputes/{receipt.escrow_id}/resolve", json={"outcome": "refund"}
        )
        assert resolved.json()["status"] == "refunded"
        settlement = await pf.refund(receipt.escrow_id, key="ref", reason="again")
    assert settlement.status is EscrowStatus.REFUNDED
    assert (settlement.returned, settlement.fee, settlement.to_payee) == (
        Decimal("0.495"),
        Decimal("0.005"),
        0,
    )
    assert sandbox.balance(payer) == "4.995000"
    _conserved(sandbox)


async def test_v1_refund_by_timeout_waits_for_the_sweep(fresh: Sandbox) -> None:
    payer, payer_key = fresh.agent("5.00")
    worker, _ = fresh.agent("0")
    async with fresh.adapter(payer_key, refund_method="timeout") as pf:
        receipt = await _create(pf, worker, "1.00", timeout_hours=1)
        with pytest.raises(EscrowPending) as pending:
            await pf.refund(receipt.escrow_id, key="ref", reason="failed")
        assert pending.value.status == "funded"
        assert fresh.http.post("/sandbox/sweep").json() == {"refunded": []}
        fresh.http.post("/sandbox/clock", json={"advance_s": 3601})
        assert fresh.http.post("/sandbox/sweep").json() == {"refunded": [receipt.escrow_id]}
        settlement = await pf.refund(receipt.escrow_id, key="ref", reason="failed")
        assert (settlement.returned, settlement.fee) == (Decimal("0.99"), Decimal("0.01"))
        # The race of the contract: the sweep refunded first, so release answers 409.
        with pytest.raises(Conflict) as caught:
            await pf.release(receipt.escrow_id, key="rel", expected=split(to_money("1.00")))
        assert caught.value.status == "refunded"
    assert fresh.balance(payer) == "4.990000"
    _conserved(fresh)


async def test_the_sweep_runs_by_itself_on_the_injected_clock() -> None:
    with running_sandbox(sweep_interval_s=300) as box:
        _, payer_key = box.agent("5.00")
        worker, worker_key = box.agent("0")
        async with box.adapter(payer_key, worker_key=worker_key) as pf:
            funded = await _create(pf, worker, "1.00", timeout_hours=1)
            completed = await _create(pf, worker, "1.00", timeout_hours=1)
            await pf.complete(completed.escrow_id)
            kept = await _create(pf, worker, "1.00", timeout_hours=5)
            box.http.post("/sandbox/clock", json={"advance_s": 7200})
            assert (await pf.get(funded.escrow_id)).status is EscrowStatus.REFUNDED
            assert (await pf.get(completed.escrow_id)).status is EscrowStatus.REFUNDED
            assert (await pf.get(kept.escrow_id)).status is EscrowStatus.FUNDED
        _conserved(box)


async def test_server_rate_limit_answers_429_and_the_adapter_raises_rate_limited() -> None:
    with running_sandbox(rate_limits={"create": 2, "dispute": 1}) as box:
        _, payer_key = box.agent("5.00")
        worker, _ = box.agent("0")
        async with box.adapter(payer_key) as pf:
            await _create(pf, worker)
            await _create(pf, worker)
            with pytest.raises(RateLimited) as caught:
                await _create(pf, worker)
            assert caught.value.retry_after > 0 and caught.value.retryable
        response = box.http.post(
            "/escrow/create",
            json={"amount_usd": 0.5, "description": DESCRIPTION, "counterparty_agent_id": worker},
            headers={"Authorization": f"Bearer {payer_key}"},
        )
        assert response.status_code == 429
        assert response.json()["error"] == "rate_limited"
        assert response.json()["message"] == "Too many requests. Limit: 2 per 60s"
        assert "retry-after" not in response.headers  # as the published server: the adapter's own wait
        assert box.ledger()["held"] == "1.000000"


async def test_client_side_limiter_keeps_under_the_limit() -> None:
    with running_sandbox(rate_limits={"create": 3}) as box:
        _, payer_key = box.agent("5.00")
        worker, _ = box.agent("0")
        pf = box.adapter(payer_key, rate_limits={"create": 3}, rate_limit_period_s=0.4)
        async with pf:
            started = time.monotonic()
            await asyncio.gather(*(_create(pf, worker) for _ in range(3)))
            # The server allows 3 a minute: a fourth would be a 429, so the client limiter must
            # hold it for its own window; it does, and then the server refuses it (the
            # server's window is longer). What matters: it was held, not sent at once.
            with pytest.raises(RateLimited):
                await _create(pf, worker)
            assert time.monotonic() - started >= 0.4  # a lower bound: no load makes it shorter


async def test_a_create_that_cannot_be_sent_in_time_is_not_sent_at_all() -> None:
    """A job queued behind the create limit past its start window is refused before anything is
    sent (before, it was funded late, refused at start, and refunded minus the fee)."""
    with running_sandbox(rate_limits={"create": 20}) as box:
        payer, payer_key = box.agent("5.00")
        worker, _ = box.agent("0")
        async with box.adapter(payer_key, rate_limits={"create": 1}, rate_limit_period_s=60) as pf:
            await _create(pf, worker)
            started = time.monotonic()
            with pytest.raises(Rejected) as refused:
                await pf.create(
                    key="late",
                    payee=worker,
                    amount=to_money("0.50"),
                    description="a late job",
                    timeout_hours=1,
                    send_within_s=2.0,
                )
            assert refused.value.code == "start_window"
            assert time.monotonic() - started < 1.0  # refused at once, not after a wait
        assert box.ledger()["held"] == "0.500000"  # only the first escrow
        assert box.balance(payer) == "4.500000"


async def test_after_a_402_a_create_refused_here_takes_no_rate_limit_slot() -> None:
    """After the service refused a create for the payer's balance, creates of as much are refused
    here without being sent: the engine reserves no create slot for them, so a batch short of money
    ends its remaining jobs at once instead of one per slot (20 a minute)."""
    with running_sandbox(rate_limits={"create": 20}) as box:
        _, payer_key = box.agent("0.70")
        worker, _ = box.agent("0")
        async with box.adapter(payer_key, rate_limits={"create": 2}, rate_limit_period_s=60) as pf:
            await _create(pf, worker)  # 0.50 of 0.70: one slot of two used
            with pytest.raises(Rejected) as refused:
                await _create(pf, worker)  # the service's 402: the second slot
            assert refused.value.status_code == 402
            started = time.monotonic()
            for n in range(5):
                assert await pf.reserve("create", f"short-{n}", 5.0, amount=to_money("0.50")) is True
                with pytest.raises(Rejected):
                    await _create(pf, worker, key=f"short-{n}")  # refused here, nothing sent
            assert time.monotonic() - started < 1.0  # no slot was waited for
            # A smaller create may fit: it waits for a slot like any other (none comes in 0.2 s).
            assert await pf.reserve("create", "small", 0.2, amount=to_money("0.10")) is False
        assert box.ledger()["held"] == "0.500000"


async def test_a_reserved_create_slot_belongs_to_its_key() -> None:
    """A create slot the engine reserved before claiming is its job's: another job's create, refused
    here for the payer's balance, does not spend it, and the job's own create then goes at once."""
    with running_sandbox(rate_limits={"create": 20}) as box:
        _, payer_key = box.agent("0.70")
        worker, _ = box.agent("0")
        async with box.adapter(payer_key, rate_limits={"create": 3}, rate_limit_period_s=60) as pf:
            await _create(pf, worker)  # 0.50 of 0.70
            with pytest.raises(Rejected):
                await _create(pf, worker)  # the service's 402 for 0.50
            assert await pf.reserve("create", "small", 1.0, amount=to_money("0.10")) is True  # the last slot
            assert await pf.reserve("create", "big", 1.0, amount=to_money("0.50")) is True  # refused: no slot
            with pytest.raises(Rejected):
                await _create(pf, worker, key="big")
            started = time.monotonic()
            await _create(pf, worker, "0.10", key="small")  # its reserved slot: no wait
            assert time.monotonic() - started < 1.0
        assert box.ledger()["held"] == "0.600000"


async def test_faults_error_before_and_drop_after_on_create(fresh: Sandbox) -> None:
    _, payer_key = fresh.agent("5.00")
    worker, _ = fresh.agent("0")
    async with fresh.adapter(payer_key) as pf:
        fresh.fault("create", "error_before")
        with pytest.raises(OutcomeUnknown):
            await _create(pf, worker)
        assert fresh.ledger()["held"] == "0.000000"  # a 500 before the work: nothing happened
        fresh.fault("create", "drop_after")
        with pytest.raises(OutcomeUnknown):
            await _create(pf, worker)
        assert fresh.ledger()["held"] == "0.500000"  # the response was lost, the money moved
        fresh.fault("create", "drop_after", close=True)
        with pytest.raises(OutcomeUnknown, match="response dropped"):
            await _create(pf, worker)
        assert fresh.ledger()["held"] == "1.000000"
        fresh.fault("create", "rate_limit")
        with pytest.raises(RateLimited):
            await _create(pf, worker)
        assert fresh.ledger()["held"] == "1.000000"
        assert fresh.http.get("/sandbox/faults").json() == {"faults": {}}
    _conserved(fresh)


async def test_a_slow_create_times_out_as_outcome_unknown_and_still_happens(fresh: Sandbox) -> None:
    _, payer_key = fresh.agent("5.00")
    worker, _ = fresh.agent("0")
    fresh.fault("create", "delay", delay_s=0.5)
    async with fresh.adapter(payer_key, timeout=0.15) as pf:
        with pytest.raises(OutcomeUnknown, match="SocketTimeoutError"):
            await _create(pf, worker)
    deadline = time.monotonic() + 5
    while fresh.ledger()["held"] != "0.500000":
        assert time.monotonic() < deadline, "the delayed create never happened"
        await asyncio.sleep(0.05)


async def test_a_lost_release_answer_is_confirmed_by_releasing_again(fresh: Sandbox) -> None:
    _, payer_key = fresh.agent("5.00")
    worker, _ = fresh.agent("0")
    async with fresh.adapter(payer_key) as pf:
        receipt = await _create(pf, worker)
        fresh.fault("release", "drop_after")
        with pytest.raises(OutcomeUnknown):
            await pf.release(receipt.escrow_id, key="r", expected=split(HALF))
        settlement = await pf.release(receipt.escrow_id, key="r", expected=split(HALF))
        assert settlement.status is EscrowStatus.RELEASED and settlement.to_payee == Decimal("0.495")
        fresh.fault("get", "error_before")
        with pytest.raises(Unavailable):
            await pf.get(receipt.escrow_id)
        assert (await pf.get(receipt.escrow_id)).status is EscrowStatus.RELEASED
    assert fresh.balance(worker) == "0.495000"
    _conserved(fresh)


async def test_conflict_without_a_readable_status(fresh: Sandbox) -> None:
    _, payer_key = fresh.agent("5.00")
    worker, _ = fresh.agent("0")
    async with fresh.adapter(payer_key) as pf:
        receipt = await _create(pf, worker)
        await pf.dispute(receipt.escrow_id, reason="x")
        fresh.fault("get", "error_before")
        with pytest.raises(Conflict) as caught:
            await pf.release(receipt.escrow_id, key="r", expected=split(HALF))
        assert caught.value.status is None


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "escrow.db")
    with running_sandbox(ledger_path=path) as first:
        payer, payer_key = first.agent("5.00")
        worker, _ = first.agent("0")
        async with first.adapter(payer_key) as pf:
            receipt = await _create(pf, worker)
            due = await _create(pf, worker, timeout_hours=1)
        first.http.post("/sandbox/clock", json={"advance_s": 3700})
    with running_sandbox(ledger_path=path) as second:
        assert second.http.post("/sandbox/sweep").json() == {"refunded": [due.escrow_id]}
        async with second.adapter(payer_key) as pf:
            assert (await pf.get(receipt.escrow_id)).status is EscrowStatus.FUNDED
            settlement = await pf.release(receipt.escrow_id, key="r", expected=split(HALF))
            assert settlement.to_payee == Decimal("0.495")
            other = await _create(pf, worker)
            assert other.escrow_id != receipt.escrow_id
        assert second.balance(payer) == "3.995000"  # 5 - 0.5 - 0.5 - 0.5 + (0.5 - 0.005)
        _conserved(second)


# ---------------------------------------------------------------------------------------- seed


async def test_seed_dialect_create_release_cancel(sandbox: Sandbox) -> None:
    payer, payer_key = sandbox.agent("5.00")
    worker, _ = sandbox.agent("0")
    async with sandbox.adapter(payer_key, dialect="seed", payer_id=payer) as pf:
        assert pf.capabilities.cancel and not pf.capabilities.idempotent_create
        released = await _create(pf, worker, metadata={"job": "7f3a"})
        assert (released.fee, released.net) == (Decimal("0.005"), Decimal("0.495"))
        cancelled = await _create(pf, worker, "1.25")
        settlement = await pf.release(released.escrow_id, key="r", expected=split(HALF, referred=False))
        assert settlement.to_payee == Decimal("0.495") and settlement.fee == Decimal("0.005")
        assert (
            await pf.release(released.escrow_id, key="r", expected=split(HALF, referred=False)) == settlement
        )
        refund = await pf.refund(cancelled.escrow_id, key="c", reason="failed")
        assert (refund.status, refund.returned, refund.fee) == (EscrowStatus.REFUNDED, Decimal("1.25"), 0)
        assert await pf.refund(cancelled.escrow_id, key="c", reason="failed") == refund
        with pytest.raises(Conflict) as caught:
            await pf.refund(released.escrow_id, key="c", reason="late")
        assert caught.value.status == "released"
        with pytest.raises(Conflict) as caught:
            await pf.release(cancelled.escrow_id, key="r", expected=split(to_money("1.25")))
        assert caught.value.status == "refunded"
        with pytest.raises(NotImplementedError):
            await pf.get(released.escrow_id)
    assert sandbox.balance(payer) == "4.500000"
    assert sandbox.balance(worker) == "0.495000"
    _conserved(sandbox)


async def test_seed_refusals(sandbox: Sandbox) -> None:
    payer, payer_key = sandbox.agent("1.00")
    worker, worker_key = sandbox.agent("0")
    async with sandbox.adapter(payer_key, dialect="seed", payer_id=payer) as pf:
        with pytest.raises(Rejected) as caught:
            await _create(pf, worker, "2.00")
        assert caught.value.status_code == 402
        with pytest.raises(Rejected, match="payee_wallet must be in ag_xxx format"):
            await _create(pf, "worker")
        receipt = await _create(pf, worker)
        with pytest.raises(NotFound):
            await pf.release("esc_0000000000000000", key="r", expected=split(HALF))
        with pytest.raises(GatewayError, match="expect"):
            await pf.refund("esc_0000000000000000", key="r", reason="x")
        pf.expect("esc_0000000000000000", HALF)
        with pytest.raises(NotFound):
            await pf.refund("esc_0000000000000000", key="r", reason="x")
    async with sandbox.adapter(worker_key, dialect="seed", payer_id=payer) as impostor:
        with pytest.raises(Forbidden):
            await _create(impostor, worker)
        with pytest.raises(Forbidden):
            await impostor.release(receipt.escrow_id, key="r", expected=split(HALF))
        impostor.expect(receipt.escrow_id, HALF)
        with pytest.raises(Forbidden):
            await impostor.refund(receipt.escrow_id, key="r", reason="x")


async def test_neither_dialect_looks_up_by_key(sandbox: Sandbox) -> None:
    _, payer_key = sandbox.agent("0")
    for pf in (sandbox.adapter(payer_key), sandbox.adapter(payer_key, dialect="seed", payer_id="ag_x")):
        async with pf:
            assert pf.capabilities.lookup_by_key is False
            with pytest.raises(NotImplementedError):
                await pf.find_by_key("job:fund")


# ---------------------------------------------------------------------------------------- onboarding


def test_register_and_faucet(fresh: Sandbox) -> None:
    registered = fresh.http.post("/api/v1/auth/register", json={})
    assert registered.status_code == 201
    agent = registered.json()
    assert agent["agent_id"].startswith("ag_") and agent["api_key"]
    assert fresh.balance(agent["agent_id"]) == "0.000000"
    claim = fresh.http.post("/faucet/claim", json={"agent_casino_id": agent["agent_id"]})
    assert claim.status_code == 200 and claim.json()["amount_usd"] == 1
    assert fresh.balance(agent["agent_id"]) == "1.000000"
    again = fresh.http.post("/faucet/claim", json={"agent_casino_id": agent["agent_id"]})
    assert (again.status_code, again.json()["error"]) == (409, "already_claimed")
    unknown = fresh.http.post("/faucet/claim", json={"agent_casino_id": "ag_000000000000"})
    assert unknown.status_code == 404
    other = fresh.http.post("/api/v1/auth/register", json={}).json()
    same_ip = fresh.http.post("/faucet/claim", json={"agent_casino_id": other["agent_id"]})
    assert (same_ip.status_code, same_ip.json()["error"]) == (429, "rate_limited")
    bad = fresh.http.post("/faucet/claim", json={"agent_casino_id": 7})
    assert bad.status_code == 400
    _conserved(fresh)


def test_admin_routes_validate_their_input(sandbox: Sandbox) -> None:
    assert sandbox.http.post("/sandbox/agents", json={"balance": True}).status_code == 400
    assert sandbox.http.post("/sandbox/agents", json={"balance": "1.0000001"}).status_code == 400
    assert sandbox.http.post("/sandbox/agents", json={"balance": "-1"}).status_code == 400
    assert (
        sandbox.http.post("/sandbox/agents", json={"balance": "1", "referrer": "ag_nobody"}).status_code
        == 404
    )
    bad_fault = sandbox.http.post("/sandbox/faults", json={"route": "create", "mode": "explode"})
    assert bad_fault.status_code == 400 and "mode" in bad_fault.json()["message"]
    assert sandbox.http.post("/sandbox/clock", json={"advance_s": -5}).status_code == 400
    assert sandbox.http.post("/sandbox/agents", content=b"{not json").status_code == 400


# ---------------------------------------------------------------------------------------- recorded


def _exchanges() -> dict[str, dict[str, Any]]:
    data = json.loads(EXAMPLES_FILE.read_text())
    return {e["case"]: e for e in data["exchanges"]}


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, Any]]:
    return _exchanges()


def test_sandbox_answers_like_the_published_server(recorded: dict[str, dict[str, Any]]) -> None:
    """Replays the recorded exchanges against a sandbox whose agents have the recorded balances
    (ag_payer 99 after an earlier escrow, as in the recording), comparing status and body."""
    with running_sandbox() as box:
        payer, payer_key = box.agent("99.00")
        worker, worker_key = box.agent("0")
        keys = {"payer": payer_key, "worker": worker_key, None: None}
        ids = {"ag_payer": payer, "ag_worker": worker}
        escrow_ids: dict[str, str] = {}

        def replay(case: str) -> tuple[httpx.Response, dict[str, Any]]:
            exchange = recorded[case]
            request = exchange["request"]
            path = request["path"]
            for recorded_id, real_id in escrow_ids.items():
                path = path.replace(recorded_id, real_id)
            body = request["json"]
            if body and "counterparty_agent_id" in body:
                body = {**body, "counterparty_agent_id": ids.get(body["counterparty_agent_id"], "bob")}
            key = keys[request["auth"]]
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = box.http.request(request["method"], path, json=body, headers=headers)
            assert response.status_code == exchange["status"], (case, response.text)
            return response, exchange["response"]

        def same(got: dict[str, Any], want: dict[str, Any], *, skip: Set[str] = frozenset()) -> None:
            assert set(got) == set(want), set(got) ^ set(want)
            for name, value in want.items():
                if name in skip:
                    continue
                if name in ("creator_id", "counterparty_id"):
                    value = ids[value]
                assert got[name] == value, (name, got[name], value)

        volatile = {"escrow_id", "auto_release_at", "created_at", "completed_at", "released_at", "next_steps"}
        for case in ("create without key", "create under minimum", "create with self", "create over balance"):
            response, want = replay(case)
            same(response.json(), want)
        response, want = replay("create bad counterparty")
        same(response.json(), want)
        response, want = replay("create")
        got = response.json()
        same(got, want, skip=volatile)
        escrow_ids[want["escrow_id"]] = got["escrow_id"]
        assert '"amount_usd":0.5,"commission_usd":0.005,"net_to_counterparty":0.495' in response.text
        for case in ("complete by creator", "complete by counterparty", "release by counterparty"):
            response, want = replay(case)
            same(
                response.json(),
                want,
                skip=volatile | {"message", "next_step"} if response.is_success else set(),
            )
        response, want = replay("get as participant")
        got = response.json()
        same(got, want, skip=volatile | {"events"})
        assert [e["event"] for e in got["events"]] == ["created", "completed"]
        assert got["events"][0]["note"] == want["events"][0]["note"]
        response, want = replay("release")
        same(response.json(), want, skip={"escrow_id"})
        response, want = replay("release again")
        same(response.json(), want)
        response, want = replay("get public")
        same(response.json(), want, skip=volatile)
        for case in ("get unknown", "unknown route"):
            response, want = replay(case)
            same(response.json(), want)
        response, want = replay("create for dispute")
        escrow_ids[want["escrow_id"]] = response.json()["escrow_id"]
        response, want = replay("dispute")
        same(response.json(), want, skip={"escrow_id"})
        response, want = replay("release disputed")
        same(response.json(), want)
        response, want = replay("stats")
        got = response.json()
        same(
            got,
            want,
            skip={
                "total_created",
                "total_released",
                "total_disputed",
                "total_volume_usd",
                "total_commission_usd",
            },
        )
        assert (got["total_created"], got["total_released"], got["total_disputed"]) == (2, 1, 1)
        assert response.text.count("0.75") == 1  # volume 0.5 + 0.25, written as a number


def test_sandbox_timeout_sweep_matches_the_recorded_refund(recorded: dict[str, dict[str, Any]]) -> None:
    exchange = recorded[next(c for c in recorded if c.startswith("timeout sweep refunded"))]
    want = exchange["response"]
    with running_sandbox() as box:
        payer, payer_key = box.agent("98.25")
        worker, _ = box.agent("0")
        auth = {"Authorization": f"Bearer {payer_key}"}
        created = box.http.post(
            "/escrow/create",
            json={
                "amount_usd": 1,
                "description": want["description"],
                "counterparty_agent_id": worker,
                "timeout_hours": 1,
            },
            headers=auth,
        ).json()
        assert box.balance(payer) == "97.250000"
        box.http.post("/sandbox/clock", json={"advance_s": 3600})
        box.http.post("/sandbox/sweep")
        got = box.http.get(f"/escrow/{created['escrow_id']}", headers=auth).json()
        for name in (
            "status",
            "amount_usd",
            "commission_usd",
            "net_to_counterparty",
            "timeout_hours",
            "completed_at",
            "disputed_at",
        ):
            assert got[name] == want[name], name
        assert [e["event"] for e in got["events"]] == ["created", "refunded"]
        assert got["events"][1]["note"] == want["events"][1]["note"]
        assert got["events"][1]["actor_id"] is None and got["released_at"] is not None
        assert box.balance(payer) == "98.240000"
        release = box.http.post(f"/escrow/release/{created['escrow_id']}", headers=auth)
        assert release.status_code == 409
        assert release.json()["message"] == "Cannot release escrow in status 'refunded'"


def test_health_and_every_route_is_under_the_agreed_prefixes() -> None:
    app = create_escrow_app()
    prefixes = ("/escrow", "/api", "/sandbox", "/faucet", "/health")
    assert all(route.path.startswith(prefixes) for route in app.routes)  # type: ignore[attr-defined]
    with BackgroundServer(app) as server:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    app.state.escrow.ledger.close()


async def test_the_sandbox_works_when_an_outer_app_routes_to_it() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    inner = create_escrow_app(rate_limits={"create": 100})
    outer = Starlette(routes=[Mount("/", app=inner)])
    with BackgroundServer(outer) as server:
        async with httpx.AsyncClient(base_url=server.url) as admin:
            agents = [(await admin.post("/sandbox/agents", json={"balance": "1"})).json() for _ in range(2)]
            async with purple_flea(server.url, payer_key=agents[0]["api_key"]) as pf:
                receipt = await _create(pf, agents[1]["agent_id"])
                assert (await pf.get(receipt.escrow_id)).status is EscrowStatus.FUNDED
            assert (await admin.get("/sandbox/ledger")).json()["held"] == "0.500000"
    inner.state.escrow.ledger.close()


async def test_after_a_402_the_next_creates_of_as_much_are_not_each_sent_to_be_refused() -> None:
    """Issue 15: after a 402 the remaining jobs of a batch are not each sent to be refused."""
    with running_sandbox() as box:
        payer, payer_key = box.agent("1.00")
        worker, _ = box.agent("0")
        async with box.adapter(payer_key) as pf:
            with pytest.raises(Rejected) as refused:
                await _create(pf, worker, "5.00")
            assert refused.value.status_code == 402
            sent = box.http.get("/sandbox/ledger").json()
            with pytest.raises(Rejected, match="nothing was sent") as local:
                await _create(pf, worker, "5.00")
            assert local.value.code == "insufficient_balance" and local.value.status_code is None
            assert box.http.get("/sandbox/ledger").json() == sent
            small = await _create(pf, worker, "0.50")  # less than what was refused: still tried, and fits
        assert small.amount == to_money("0.50") and box.balance(payer) == "0.500000"
