"""`LedgerEscrow`: the escrow port directly on the local ledger, in process (no HTTP).

It can do everything the port asks for: create is idempotent by key, an escrow can be found by its
key, and a refund returns the money at once. The engine's benchmarks and fast fault simulations use
it; the ledger calls are short SQLite transactions, made synchronously inside the async methods.

Choices, so that the engine can rely on them:
- an escrow is a ledger hold (its id is the escrow id) whose meta records payee and referrer; the
  payee must have an account (else `Rejected`, 404), a referral code becomes the referrer's account;
- release posts `expected.net` to the payee and `expected.fee` as the fee; when `expected.amount`
  is less than the escrow, the rest goes back to the payer (a partial release); the referral share
  is 15% of the fee when the escrow has a referrer, else zero (whatever `expected.referral_fee` says);
- refund voids the hold: the whole amount back to the payer, no fee kept;
- a hold past its expiry (`timeout_hours`) is refunded the same way by `sweep()`; until then it
  still reads as funded and can still be refunded; a release then sweeps first and is refused with
  `Conflict(status="refunded")`, as the v1 service's release after its timeout sweep is.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from podsettle.adapters.ledger import (
    FEES_ACCOUNT,
    HoldExpired,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidPosting,
    Ledger,
    Posting,
    UnknownAccount,
    UnknownHold,
)
from podsettle.adapters.ports import (
    AmountMismatch,
    Conflict,
    EscrowCapabilities,
    EscrowReceipt,
    EscrowStatus,
    EscrowView,
    NotFound,
    Rejected,
    Settlement,
)
from podsettle.domain.money import ZERO, Money, fmt, to_money
from podsettle.domain.rules import FeeSplit, referral_fee, split
from podsettle.support.logs import get_logger

log = get_logger(__name__)

_STATUS = {
    "held": EscrowStatus.FUNDED,
    "posted": EscrowStatus.RELEASED,
    "voided": EscrowStatus.REFUNDED,
    "expired": EscrowStatus.REFUNDED,
}


class LedgerEscrow:
    """The escrow port on a `Ledger`, paying from one payer account."""

    capabilities = EscrowCapabilities(
        idempotent_create=True, lookup_by_key=True, cancel=True, partial_release=True
    )

    def __init__(
        self,
        ledger: Ledger,
        *,
        payer: str,
        fee_account: str = FEES_ACCOUNT,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.ledger = ledger
        self.payer = payer
        self.fee_account = fee_account
        self._clock = clock or ledger.now

    def __repr__(self) -> str:
        return f"LedgerEscrow(payer={self.payer!r}, ledger={self.ledger!r})"

    async def create(
        self,
        *,
        key: str,
        payee: str,
        amount: Money,
        description: str,
        timeout_hours: int,
        referral: str | None = None,
        metadata: dict[str, str] | None = None,
        send_within_s: float | None = None,
    ) -> EscrowReceipt:
        value = to_money(amount, "amount", allow_zero=False)
        if payee == self.payer:
            raise Rejected(
                "payee: cannot create an escrow with yourself", status_code=400, code="self_escrow"
            )
        if not isinstance(timeout_hours, int) or isinstance(timeout_hours, bool) or timeout_hours < 1:
            raise Rejected(
                f"timeout_hours: must be a whole number of hours >= 1, got {timeout_hours!r}",
                status_code=400,
                code="invalid_timeout",
            )
        meta = {"payee": payee, "description": description, **(metadata or {})}
        if referral:
            meta["referrer"] = referral
        with self.ledger.transaction() as tx:
            if not tx.has_account(payee):
                raise Rejected(
                    f"payee {payee!r} has no account", status_code=404, code="counterparty_not_found"
                )
            if referral:
                tx.open_account(referral)  # a referral code is the referrer's account here
            try:
                hold = tx.hold(
                    key=key,
                    payer=self.payer,
                    amount=value,
                    expires_at=self._clock() + timedelta(hours=timeout_hours),
                    meta=meta,
                )
            except InsufficientFunds as e:
                raise Rejected(str(e), status_code=402, code="insufficient_balance") from None
            except UnknownAccount as e:
                raise Rejected(str(e), status_code=404, code="creator_not_found") from None
            except IdempotencyConflict as e:
                raise Rejected(str(e), status_code=409, code="key_reused") from None
        expected = split(value)
        return EscrowReceipt(escrow_id=hold.hold_id, amount=value, fee=expected.fee, net=expected.net)

    async def release(self, escrow_id: str, *, key: str, expected: FeeSplit) -> Settlement:
        amount = to_money(expected.amount, "expected.amount", allow_zero=False)
        fee = to_money(expected.fee, "expected.fee")
        net = to_money(expected.net, "expected.net")
        if fee + net != amount:
            raise AmountMismatch(
                f"escrow {escrow_id}: expected fee {fmt(fee)} + net {fmt(net)} != amount {fmt(amount)}",
                reported={"escrow_id": escrow_id, "amount": fmt(amount), "fee": fmt(fee), "net": fmt(net)},
            )
        expired = False
        with self.ledger.transaction() as tx:
            try:
                hold = tx.get_hold(escrow_id)
            except UnknownHold:
                raise NotFound(f"escrow {escrow_id} does not exist") from None
            if amount > hold.amount:
                raise AmountMismatch(
                    f"escrow {escrow_id} holds {fmt(hold.amount)}, less than the {fmt(amount)} to release",
                    reported={"escrow_id": escrow_id, "amount": fmt(hold.amount)},
                )
            referrer = hold.meta.get("referrer")
            try:
                posting = tx.post(
                    escrow_id,
                    key=key,
                    payee=hold.meta["payee"],
                    net=net,
                    fee=fee,
                    fee_account=self.fee_account,
                    referrer=referrer,
                    referral_fee=referral_fee(fee) if referrer else ZERO,
                )
            except HoldExpired:
                expired = True
            except HoldNotOpen as e:
                previous = tx.settlement(escrow_id)
                if previous is not None and previous.status == "posted":
                    return _settlement(previous)
                raise Conflict(f"escrow {escrow_id} is {e.status}", status=_STATUS[e.status].value) from None
            except IdempotencyConflict as e:
                raise Conflict(str(e), status=_STATUS[hold.status].value) from None
            except (InvalidPosting, UnknownAccount) as e:
                raise Rejected(str(e), status_code=400, code="invalid_release") from None
            if not expired:
                log.debug("ledger_escrow.released", escrow_id=escrow_id, net=fmt(posting.net))
                return _settlement(posting)
        # Past its expiry the hold belongs to the sweep, as a v1 escrow past auto_release_at does:
        # the money goes back, and the release is refused like the service's 409.
        self.sweep()
        raise Conflict(f"escrow {escrow_id} expired before the release and was refunded", status="refunded")

    async def refund(
        self,
        escrow_id: str,
        *,
        key: str,
        reason: str,
        expected: FeeSplit | None = None,
        method: str | None = None,  # the ledger cancels: every method returns the whole amount at once
    ) -> Settlement:
        with self.ledger.transaction() as tx:
            try:
                posting = tx.void(escrow_id, key=key)
            except UnknownHold:
                raise NotFound(f"escrow {escrow_id} does not exist") from None
            except HoldNotOpen as e:
                previous = tx.settlement(escrow_id)
                if previous is not None and previous.status in ("voided", "expired"):
                    return _settlement(previous)
                raise Conflict(f"escrow {escrow_id} is {e.status}", status=_STATUS[e.status].value) from None
            except IdempotencyConflict as e:
                raise Conflict(str(e), status=_STATUS[tx.get_hold(escrow_id).status].value) from None
        log.debug("ledger_escrow.refunded", escrow_id=escrow_id, reason=reason)
        return _settlement(posting)

    async def get(self, escrow_id: str) -> EscrowView:
        try:
            hold = self.ledger.get_hold(escrow_id)
        except UnknownHold:
            raise NotFound(f"escrow {escrow_id} does not exist") from None
        return _view(hold.hold_id, hold.status, hold.amount, hold.payer, hold.meta, hold.expires_at)

    async def balance(self) -> Money | None:
        return self.ledger.balance(self.payer)

    async def health(self) -> None:
        """The ledger is in this process: always reachable."""

    async def find_by_key(self, key: str) -> EscrowView | None:
        hold = self.ledger.find_hold(key)
        if hold is None:
            return None
        return _view(hold.hold_id, hold.status, hold.amount, hold.payer, hold.meta, hold.expires_at)

    def sweep(self) -> list[str]:
        """Refund every escrow past its expiry; returns their ids."""
        return [p.hold_id for p in self.ledger.expire_holds(self._clock())]

    async def aclose(self) -> None:
        return None


def _view(
    escrow_id: str,
    status: str,
    amount: Money,
    payer: str,
    meta: dict[str, str],
    expires_at: datetime | None,
) -> EscrowView:
    expected = split(amount)
    return EscrowView(
        escrow_id=escrow_id,
        status=_STATUS[status],
        amount=amount,
        fee=expected.fee,
        net=expected.net,
        payer=payer,
        payee=meta.get("payee"),
        auto_release_at=expires_at,
    )


def _settlement(posting: Posting) -> Settlement:
    released = posting.status == "posted"
    return Settlement(
        escrow_id=posting.hold_id,
        status=EscrowStatus.RELEASED if released else EscrowStatus.REFUNDED,
        to_payee=posting.net,
        fee=posting.fee,
        referral_fee=posting.referral_fee,
        returned=posting.returned,
    )
