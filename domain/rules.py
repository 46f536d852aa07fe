"""Fee and bonus rules of the escrow service and the product page.

The fee rule belongs to the escrow dialect a job was opened under (`EscrowJob.dialect`):

- `"v1"`, the published service: it computes in JavaScript on binary floats,
  `commission = parseFloat((amount * 0.01).toFixed(6))`, `net = parseFloat((amount - commission).toFixed(6))`,
  and the referrer's share `parseFloat((commission * 0.15).toFixed(6))`. For 0.10045 the float product is
  0.00100449999..., so the service takes 0.001004 where exact half-up gives 0.001005. This module
  reproduces those figures exactly (tests/data/v1-amounts holds a table node computed) and returns
  them as Money; the floats stay inside `_js_fixed6`'s callers.
- `"seed"` (and jobs recorded before the dialect was, `None`): exact decimal arithmetic rounded half up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache
from typing import Final

from podsettle.domain.errors import InvalidInput
from podsettle.domain.money import QUANTUM, ZERO, Money, quantize, to_money

COMMISSION_RATE = Decimal("0.01")
REFERRAL_SHARE = Decimal("0.15")
BONUS_THRESHOLD = Decimal("1.10")
# The dialects whose fee rule differs; any other name (and None, for jobs recorded before the dialect
# was) takes the exact half-up rule.
V1: Final = "v1"
SEED: Final = "seed"
DIALECTS: Final = (V1, SEED)
# A Purple Flea referral code as the casino generates it at registration: `ref_` and 4 random bytes in
# lowercase hex. The escrow service matches `referral_code` against these codes only (an agent id or
# any other text is silently ignored, and no referrer is paid).
REFERRAL_CODE = re.compile(r"ref_[0-9a-f]{8}")
# How long the engine funds an escrow: past the job's deadline by this margin (the escrow may not
# auto-refund while the job can still succeed, and the engine needs time to release after it ends),
# in whole hours, at least 1, at most MAX_ESCROW_HOURS (the service's limit).
ESCROW_MARGIN_S: Final = 3600
MAX_ESCROW_HOURS: Final = 720


def escrow_timeout_hours(deadline: datetime, now: datetime) -> int:
    """The `timeout_hours` of an escrow created at `now` for a job due by `deadline`."""
    seconds = (deadline - now).total_seconds() + ESCROW_MARGIN_S
    return min(MAX_ESCROW_HOURS, max(1, math.ceil(seconds / 3600)))


def latest_escrow_expiry(deadline: datetime, created_by: datetime) -> datetime:
    """The latest moment an escrow of `escrow_timeout_hours`, created at or before `created_by` for a
    job due by `deadline`, can expire (the audit's bound on a refund the service's sweep makes)."""
    hour = timedelta(hours=1)
    past_deadline = deadline + timedelta(seconds=ESCROW_MARGIN_S) + hour  # whole hours round up
    return min(max(created_by + hour, past_deadline), created_by + MAX_ESCROW_HOURS * hour)


@dataclass(frozen=True)
class FeeSplit:
    """How an escrowed amount divides: the commission the service keeps and the payee's net."""

    amount: Money
    fee: Money
    net: Money
    referral_fee: Money


def commission(amount: Money, dialect: str | None = None) -> Money:
    """1% of the amount to 6 places by the dialect's rule (v1: the service's float arithmetic;
    otherwise exact, rounded half up)."""
    if dialect == V1:
        return _js_fixed6(float(amount) * _JS_COMMISSION_RATE)  # float-ok: the service's own arithmetic
    return quantize(amount * COMMISSION_RATE)


def referral_fee(fee: Money, dialect: str | None = None) -> Money:
    """The referrer's 15% share of the commission to 6 places, by the dialect's rule."""
    if dialect == V1:
        return _js_fixed6(float(fee) * _JS_REFERRAL_RATE)  # float-ok: the service's own arithmetic
    return quantize(fee * REFERRAL_SHARE)


def net_of(amount: Money, fee: Money, dialect: str | None = None) -> Money:
    """What the payee gets: amount - fee (v1 subtracts in floats and rounds with toFixed(6), which
    gives the exact difference for every amount the engine accepts; computed the service's way all
    the same, so that a difference would show in the tests against node's figures)."""
    if dialect == V1:
        return _js_fixed6(float(amount) - float(fee))  # float-ok: the service's own arithmetic
    return Money(amount - fee)


@lru_cache(maxsize=4096)
def split(amount: Money, *, referred: bool = True, dialect: str | None = None) -> FeeSplit:
    """The split of an escrow by the dialect's rule; the referral share comes out of the fee.
    (Kept for repeated amounts: the audit checks every job's split, and a batch's budgets repeat.)"""
    fee = commission(amount, dialect)
    return FeeSplit(
        amount=amount,
        fee=fee,
        net=net_of(amount, fee, dialect),
        referral_fee=referral_fee(fee, dialect) if referred else ZERO,
    )


def is_referral_code(code: str) -> bool:
    """`code` has the form of a Purple Flea referral code (`ref_` and 8 lowercase hex digits)."""
    return REFERRAL_CODE.fullmatch(code) is not None


# The service's rates as the JavaScript literals 0.01 and 0.15: IEEE-754 doubles, the same in Python.
_JS_COMMISSION_RATE: Final = 0.01  # float-ok: the service multiplies by this double
_JS_REFERRAL_RATE: Final = 0.15  # float-ok: the service multiplies by this double


def _js_fixed6(value: float) -> Money:  # float-ok: reads a double the service computed, returns Money
    """JavaScript's `parseFloat(value.toFixed(6))` for a non-negative double, as Money.

    `toFixed(6)` picks the integer n nearest to value x 10^6 computed on the double's *exact* binary
    value, the larger n on a tie: exact half-up rounding of `Decimal(value)`, which is that exact value.
    `parseFloat` then gives the double nearest to those 6 decimals, which prints back as the same
    6 decimals: so the Money is the 6-decimal text itself. (Python's float is the same IEEE-754 double
    as JavaScript's Number, and its `*` and `-` round the same way.)
    """
    if not value >= 0 or value >= 1e21:  # toFixed switches to exponent notation there; NaN fails too
        raise ValueError(f"{value!r} is outside the amounts the escrow service computes with")
    return Money(Decimal(value).quantize(QUANTUM, rounding=ROUND_HALF_UP))


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
