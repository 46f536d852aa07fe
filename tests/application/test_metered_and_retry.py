"""Two engine features the product page's recipes need (examples/): a metered job, paid by what it
delivered (`price_per_item`: min(budget, items x price) through a partial release, the rest back to
the payer, rechecked by the audit), and `retry`, which runs a refunded job again as a new paid job
linked to the first."""

from __future__ import annotations

from decimal import Decimal as D
from typing import Any

import pytest

from podsettle import Engine
from podsettle.adapters.ledger import Ledger
from podsettle.adapters.ports import EscrowCapabilities
from podsettle.domain import EscrowJob, InvalidInput
from podsettle.domain.errors import ConflictingOutcome, IllegalTransition
from podsettle.domain.money import Money
from podsettle.domain.rules import metered_payout
from podsettle.engine import retry_key
from podsettle.replay import audit
from podsettle.requests import build_request
from tests.jobs import DEADLINE


def tokens(job: dict[str, Any]) -> list[dict[str, str]]:
    """A handler whose output is a list of parts, as a streaming endpoint's is."""
    return [{"token": word} for word in job["input"]["text"].split()]


def not_a_list(job: dict[str, Any]) -> dict[str, str]:
    return {"text": job["input"]["text"]}


ENDPOINTS = {"llm": tokens, "blob": not_a_list}


def balances(engine: Engine) -> dict[str, D]:
    ledger: Ledger = engine.escrow.ledger  # type: ignore[attr-defined]
    return {account: ledger.balance(account) for account in (engine.payer, engine.settings.payee, "fees")}


# ---------------------------------------------------------------------------------------- metered


def test_the_metered_payout_is_items_times_price_capped_by_the_budget_and_rounded_down() -> None:
    assert metered_payout(Money(D("1.000000")), Money(D("0.100000")), 3) == D("0.300000")
    assert metered_payout(Money(D("1.000000")), Money(D("0.100000")), 25) == D("1.000000")
    assert metered_payout(Money(D("0.000050")), Money(D("0.000001")), 0) == D("0.000000")
    with pytest.raises(InvalidInput):
        metered_payout(Money(D("1")), Money(D("0.1")), -1)


async def test_a_metered_job_is_paid_for_the_items_it_delivered_and_the_rest_goes_back() -> None:
    async with Engine.in_process("memory", endpoints=ENDPOINTS) as engine:
        before = balances(engine)
        result = await engine.run_paid_job(
            "llm", {"text": "one two three"}, "1.00", price_per_item="0.10", job_key="call-1"
        )
        after = balances(engine)
        report = audit(engine.app)
    assert result.paid and result.items == 3
    # 3 x 0.10 = 0.30 earned: 1% fee 0.003, 0.297 to the worker, the other 0.70 back to the payer.
    assert result.money.to_workers == D("0.297000")
    assert result.money.fees == D("0.003000")
    assert result.money.returned == D("0.700000")
    assert result.money.still_held == 0
    assert after[engine.payer] - before[engine.payer] == D("-0.300000")
    assert after[engine.settings.payee] - before[engine.settings.payee] == D("0.297000")
    assert after["fees"] - before["fees"] == D("0.003000")
    assert report.ok, report.render()


async def test_a_metered_job_that_delivers_more_than_its_budget_buys_is_paid_the_budget() -> None:
    async with Engine.in_process("memory", endpoints=ENDPOINTS) as engine:
        result = await engine.run_paid_job(
            "llm", {"text": "a b c d e f"}, "0.000040", price_per_item="0.000010"
        )
    assert result.paid and result.items == 6
    assert result.money.to_workers + result.money.fees == D("0.000040")
    assert result.money.returned == 0


async def test_a_metered_job_that_delivers_nothing_or_no_list_is_refunded() -> None:
    async with Engine.in_process("memory", endpoints=ENDPOINTS) as engine:
        empty = await engine.run_paid_job("llm", {"text": ""}, "0.50", price_per_item="0.01")
        blob = await engine.run_paid_job("blob", {"text": "x"}, "0.50", price_per_item="0.01")
        report = audit(engine.app)
    # An empty list never passes acceptance; a list always earns at least one micro-USDC per item.
    assert empty.status == "refunded" and "empty" in (empty.reason or "")
    assert blob.status == "refunded" and "must be a list" in (blob.reason or "")
    assert empty.money.returned == D("0.500000") and blob.money.to_workers == 0
    assert report.ok, report.render()


def test_an_escrow_that_releases_only_whole_escrows_refuses_a_metered_job_before_it_is_recorded() -> None:
    whole_only = EscrowCapabilities(idempotent_create=False, lookup_by_key=False, cancel=False)
    with pytest.raises(InvalidInput) as refused:
        build_request(
            job_key="k",
            endpoint_id="llm",
            job_input={"text": "hi"},
            budget="0.50",
            payer="ag_payer",
            payee="ag_worker",
            now=DEADLINE,
            timeout_s=60,
            price_per_item="0.01",
            body_and_limit=lambda size, **_: (size, 10_000),
            escrow=whole_only,
        )
    assert refused.value.field == "price_per_item"


def _completed_metered_job() -> EscrowJob:
    job = EscrowJob.open(
        job_key="metered",
        endpoint_id="llm",
        input_digest="0" * 64,
        payer="ag_payer",
        payee="ag_worker",
        budget=Money(D("1.000000")),
        deadline=DEADLINE,
        price_per_item=Money(D("0.100000")),
    )
    job.record_funded("esc_1", "1.000000", "0.010000", "0.990000")
    job.record_started("run-1")
    job.record_completed("a" * 64, items=3)
    return job


def test_the_aggregate_refuses_a_metered_completion_without_its_count_or_that_earns_nothing() -> None:
    job = EscrowJob.open(
        job_key="metered",
        endpoint_id="llm",
        input_digest="0" * 64,
        payer="ag_payer",
        payee="ag_worker",
        budget=Money(D("1.000000")),
        deadline=DEADLINE,
        price_per_item=Money(D("0.100000")),
    )
    job.record_funded("esc_1", "1.000000", "0.010000", "0.990000")
    job.record_started("run-1")
    with pytest.raises(InvalidInput):
        job.record_completed("a" * 64)
    with pytest.raises(ConflictingOutcome):
        job.record_completed("a" * 64, items=0)
    job.record_completed("a" * 64, items=3)
    assert job.metering == (3, D("0.300000")) and job.view().payout == D("0.300000")


def test_the_audit_finds_a_metered_release_that_paid_other_than_what_was_earned() -> None:
    sound = _completed_metered_job()
    sound.record_released("0.297000", "0.003000", "0", "0.700000")
    assert sound.violations(quiescent=True) == []

    whole = _completed_metered_job()
    # The whole escrow paid out (the split adds up, so only the pricing rule can catch it).
    whole.trigger_event(
        EscrowJob.Released, to_payee=D("0.99"), fee=D("0.01"), referral_fee=D(0), returned=D(0)
    )
    assert any("the job earned" in v for v in whole.violations())

    inflated = _completed_metered_job()
    inflated.trigger_event(EscrowJob.Metered, items=3, payout=D("0.500000"))
    assert any("metered payout" in v for v in inflated.violations())


# ---------------------------------------------------------------------------------------- retry


def test_retry_keys_count_the_attempts() -> None:
    assert retry_key("tile-3") == "tile-3:r2"
    assert retry_key("tile-3:r2") == "tile-3:r3"
    assert retry_key("a:r9") == "a:r10"


async def test_a_refunded_job_runs_again_on_another_endpoint_as_a_new_paid_job_linked_to_it() -> None:
    async with Engine.in_process("memory", endpoints=ENDPOINTS) as engine:
        before = balances(engine)
        first = await engine.run_paid_job("fail", {"text": "x y"}, "0.50", job_key="tile-7")
        second = await engine.retry(first.job_id, "echo")
        again = await engine.retry(first.job_id, "echo")  # the same retry, not a second payment
        after = balances(engine)
        report = audit(engine.app)
    assert first.status == "refunded"
    assert second.paid and second.job_key == "tile-7:r2" and second.retry_of == "tile-7"
    assert second.endpoint_id == "echo" and second.budget == first.budget
    assert again.job_id == second.job_id
    # Each attempt had its own escrow: the first was returned whole (the ledger cancels), the
    # second paid once.
    assert second.escrow_id != first.escrow_id
    assert after[engine.payer] - before[engine.payer] == D("-0.500000")
    assert after[engine.settings.payee] - before[engine.settings.payee] == D("0.495000")
    assert report.ok, report.render()


async def test_a_retry_keeps_the_pricing_and_chains_its_attempts() -> None:
    async with Engine.in_process("memory", endpoints=ENDPOINTS) as engine:
        first = await engine.run_paid_job("blob", {"text": "a b"}, "1.00", price_per_item="0.10", job_key="c")
        second = await engine.retry(first.job_id)  # the same endpoint: refunded again
        third = await engine.retry(second.job_id, "llm")
    assert (first.status, second.status, third.status) == ("refunded", "refunded", "paid")
    assert third.job_key == "c:r3" and third.retry_of == "c:r2"
    assert third.items == 2 and third.money.to_workers + third.money.fees == D("0.200000")


async def test_only_a_refunded_or_rejected_job_is_retried() -> None:
    async with Engine.in_process("memory", endpoints=ENDPOINTS) as engine:
        paid = await engine.run_paid_job("echo", {"text": "x"}, "0.50")
        with pytest.raises(IllegalTransition):
            await engine.retry(paid.job_id, "echo")


async def test_a_retry_on_another_endpoint_pays_that_endpoints_worker() -> None:
    async with Engine.in_process("memory", endpoints=ENDPOINTS) as engine:
        ledger: Ledger = engine.escrow.ledger  # type: ignore[attr-defined]
        ledger.open_account("ag_other")
        engine.settings.payees["echo"] = "ag_other"
        first = await engine.run_paid_job("fail", {"text": "x"}, "0.50")
        second = await engine.retry(first.job_id, "echo")
        assert ledger.balance("ag_other") == D("0.495000")
    assert first.payee == engine.settings.payee and second.payee == "ag_other"
