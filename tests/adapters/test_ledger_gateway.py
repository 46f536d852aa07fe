"""LedgerEscrow: the escrow port on the local ledger, in process."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from podsettle.adapters.ledger import FEES_ACCOUNT, Ledger
from podsettle.adapters.ledger_gateway import LedgerEscrow
from podsettle.adapters.ports import (
    AmountMismatch,
    Conflict,
    EscrowGateway,
    EscrowStatus,
    NotFound,
    Rejected,
)
from podsettle.domain.money import Money, to_money
from podsettle.domain.rules import split


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(clock: FakeClock) -> Iterator[Ledger]:
    book = Ledger(clock=clock)
    for account in ("ag_payer", "ag_worker"):
        book.open_account(account)
    book.mint("ag_payer", "10", key="mint")
    yield book
    book.close()


@pytest.fixture
def escrow(ledger: Ledger) -> LedgerEscrow:
    return LedgerEscrow(ledger, payer="ag_payer")


def M(text: str) -> Money:
    return to_money(text)


async def fund(
    escrow: LedgerEscrow, key: str = "job:fund", amount: str = "1.00", referral: str | None = None
) -> str:
    receipt = await escrow.create(
        key=key,
        payee="ag_worker",
        amount=M(amount),
        description="RunPod job",
        timeout_hours=2,
        referral=referral,
    )
    return receipt.escrow_id


def conserved(ledger: Ledger) -> None:
    report = ledger.conservation()
    assert report.conserved and report.minted == M("10"), report


async def test_it_is_an_escrow_gateway_that_can_do_everything(escrow: LedgerEscrow) -> None:
    assert isinstance(escrow, EscrowGateway)
    caps = escrow.capabilities
    assert caps.idempotent_create and caps.lookup_by_key and caps.cancel


async def test_create_is_idempotent_by_key_and_found_by_key(escrow: LedgerEscrow, ledger: Ledger) -> None:
    receipt = await escrow.create(
        key="job:fund", payee="ag_worker", amount=M("1"), description="RunPod job", timeout_hours=2
    )
    again = await escrow.create(
        key="job:fund", payee="ag_worker", amount=M("1"), description="RunPod job", timeout_hours=2
    )
    assert again == receipt
    assert (receipt.fee, receipt.net) == (M("0.01"), M("0.99"))
    assert ledger.balance("ag_payer") == M("9")
    with pytest.raises(Rejected) as caught:
        await fund(escrow, amount="2")
    assert (caught.value.status_code, caught.value.code) == (409, "key_reused")
    found = await escrow.find_by_key("job:fund")
    assert found is not None and found.escrow_id == receipt.escrow_id
    assert (found.status, found.payee, found.amount) == (EscrowStatus.FUNDED, "ag_worker", M("1"))
    assert await escrow.find_by_key("job2:fund") is None
    conserved(ledger)


async def test_create_refusals(escrow: LedgerEscrow, ledger: Ledger) -> None:
    for payee, amount, status in (("ag_nobody", "1", 404), ("ag_payer", "1", 400), ("ag_worker", "11", 402)):
        with pytest.raises(Rejected) as caught:
            await escrow.create(
                key=f"k-{payee}-{amount}", payee=payee, amount=M(amount), description="x", timeout_hours=1
            )
        assert caught.value.status_code == status
    with pytest.raises(Rejected, match="timeout_hours"):
        await escrow.create(key="k", payee="ag_worker", amount=M("1"), description="x", timeout_hours=0)
    assert ledger.balance("ag_payer") == M("10")


async def test_release_with_referral_and_repeat(escrow: LedgerEscrow, ledger: Ledger) -> None:
    escrow_id = await fund(escrow, referral="ag_referrer")
    settlement = await escrow.release(escrow_id, key="job:release", expected=split(M("1")))
    assert (settlement.to_payee, settlement.fee, settlement.referral_fee, settlement.returned) == (
        M("0.99"),
        M("0.01"),
        M("0.0015"),
        M("0"),
    )
    assert await escrow.release(escrow_id, key="job:release", expected=split(M("1"))) == settlement
    assert await escrow.release(escrow_id, key="other-key", expected=split(M("1"))) == settlement
    assert ledger.balance("ag_referrer") == M("0.0015")
    assert ledger.balance(FEES_ACCOUNT) == M("0.0085")
    assert (await escrow.get(escrow_id)).status is EscrowStatus.RELEASED
    with pytest.raises(Conflict) as caught:
        await escrow.refund(escrow_id, key="job:refund", reason="late")
    assert caught.value.status == "released"
    conserved(ledger)


async def test_partial_release_returns_the_rest(escrow: LedgerEscrow, ledger: Ledger) -> None:
    escrow_id = await fund(escrow, amount="2.00")
    settlement = await escrow.release(escrow_id, key="r", expected=split(M("0.50"), referred=False))
    assert (settlement.to_payee, settlement.fee, settlement.returned) == (M("0.495"), M("0.005"), M("1.5"))
    assert ledger.balance("ag_payer") == M("9.5")
    with pytest.raises(AmountMismatch):
        await escrow.release(await fund(escrow, key="j2"), key="r2", expected=split(M("3")))
    bad = split(M("1"))
    with pytest.raises(AmountMismatch):
        await escrow.release(escrow_id, key="r3", expected=type(bad)(M("1"), M("0.02"), M("0.99"), M("0")))
    conserved(ledger)


async def test_refund_gives_everything_back(escrow: LedgerEscrow, ledger: Ledger) -> None:
    escrow_id = await fund(escrow)
    settlement = await escrow.refund(escrow_id, key="job:refund", reason="FAILED")
    assert (settlement.status, settlement.returned, settlement.fee) == (EscrowStatus.REFUNDED, M("1"), M("0"))
    assert await escrow.refund(escrow_id, key="another", reason="again") == settlement
    with pytest.raises(Conflict) as caught:
        await escrow.release(escrow_id, key="job:release", expected=split(M("1")))
    assert caught.value.status == "refunded"
    assert ledger.balance("ag_payer") == M("10")
    conserved(ledger)


async def test_expiry_refunds_and_refuses_a_late_release(
    escrow: LedgerEscrow, ledger: Ledger, clock: FakeClock
) -> None:
    late = await fund(escrow, key="late")
    swept = await fund(escrow, key="swept")
    clock.now += timedelta(hours=3)
    assert (await escrow.get(late)).status is EscrowStatus.FUNDED  # the sweep has not run yet
    with pytest.raises(Conflict) as caught:
        await escrow.release(late, key="r", expected=split(M("1")))
    assert caught.value.status == "refunded"
    assert (await escrow.get(late)).status is EscrowStatus.REFUNDED
    assert (await escrow.get(swept)).status is EscrowStatus.REFUNDED  # swept along
    refund = await escrow.refund(swept, key="ref", reason="x")
    assert refund.returned == M("1")
    assert ledger.balance("ag_payer") == Decimal("10")
    assert escrow.sweep() == []
    conserved(ledger)


async def test_unknown_escrows(escrow: LedgerEscrow) -> None:
    with pytest.raises(NotFound):
        await escrow.get("hold_missing")
    with pytest.raises(NotFound):
        await escrow.release("hold_missing", key="r", expected=split(M("1")))
    with pytest.raises(NotFound):
        await escrow.refund("hold_missing", key="r", reason="x")
    await escrow.aclose()
