"""Fee and bonus rules of the escrow service and the product page."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal, InvalidOperation

from podsettle.domain.errors import InvalidInput
from podsettle.domain.money import QUANTUM, ZERO, Money, quantize, to_money

COMMISSION_RATE = Decimal("0.01")
REFERRAL_SHARE = Decimal("0.15")
BONUS_THRESHOLD = Decimal("1.10")


@dataclass(frozen=True)
class FeeSplit:
    """How an escrowed amount divides: the commission the service keeps and the payee's net."""

    amount: Money
    fee: Money
    net: Money
    referral_fee: Money


def commission(amount: Money) -> Money:
    """1% of the amount, rounded half up to 6 places (the escrow service's `round(amount * 0.01, 6)`)."""
    return quantize(amount * COMMISSION_RATE)


def referral_fee(fee: Money) -> Money:
    """The referrer's 15% share of the commission, rounded half up to 6 places."""
    return quantize(fee * REFERRAL_SHARE)


def split(amount: Money, *, referred: bool = True) -> FeeSplit:
    """The split of an escrow: fee + net == amount exactly; the referral share comes out of the fee."""
    fee = commission(amount)
    return FeeSplit(
        amount=amount,
        fee=fee,
        net=Money(amount - fee),
        referral_fee=referral_fee(fee) if referred else ZERO,
    )


def to_metric(value: object, field: str) -> Decimal:
    """A quality metric (accuracy, score, ...) as an exact finite Decimal."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise InvalidInput(
            field, f"must be a number given as str, int or Decimal, not {type(value).__name__}"
        )
    try:
        metric = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise InvalidInput(field, f"{value!r} is not a number") from None
    if not metric.is_finite():
        raise InvalidInput(field, f"{value!r} is not a finite number")
    return metric


@dataclass(frozen=True)
class BonusDecision:
    amount: Money
    reason: str

    @property
    def granted(self) -> bool:
        return self.amount > 0


def bonus(
    baseline: Decimal, achieved: Decimal, pool: Money, threshold: Decimal = BONUS_THRESHOLD
) -> BonusDecision:
    """The product page's performance bonus.

    Only when achieved >= threshold x baseline (threshold 1.10 by default); then
    min(pool x (achieved - baseline) / baseline, pool), rounded *down* to 6 places so that a
    bonus never exceeds its terms.
    """
    if baseline <= 0:
        raise InvalidInput("base_metric", f"must be greater than zero, got {baseline}")
    if achieved < 0:
        raise InvalidInput("achieved_metric", f"must not be negative, got {achieved}")
    if threshold < 1:
        raise InvalidInput("threshold", f"must be at least 1, got {threshold}")
    to_money(pool, "pool")
    if achieved < baseline * threshold:
        return BonusDecision(ZERO, "below threshold")
    raw = min(pool * (achieved - baseline) / baseline, pool)
    amount = Money(raw.quantize(QUANTUM, rounding=ROUND_DOWN))
    return BonusDecision(amount, "capped at the pool" if amount == pool else "above threshold")


def metered_payout(budget: Money, price_per_item: Money, items: int) -> Money:
    """What a metered job earns for `items` delivered: min(budget, items x price), rounded *down* to
    6 places (a whole micro-USDC never paid for a fraction of one); the rest of the budget goes back
    to the payer."""
    if isinstance(items, bool) or not isinstance(items, int) or items < 0:
        raise InvalidInput("items", f"must be a whole number >= 0, got {items!r}")
    earned = Money((price_per_item * items).quantize(QUANTUM, rounding=ROUND_DOWN))
    return min(budget, earned)
