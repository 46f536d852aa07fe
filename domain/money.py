"""Money: USDC amounts as `Decimal` quantized to 6 places.

Every amount that enters the engine goes through `to_money`, which names the field it was reading
when it refuses a value. Binary floating-point values are refused: they cannot hold 0.10 exactly,
and money that once passed through binary floating point may already be wrong.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import NewType

from podsettle.domain.errors import InvalidAmount

Money = NewType("Money", Decimal)

PLACES = 6
QUANTUM = Decimal(1).scaleb(-PLACES)  # 0.000001
ZERO = Money(Decimal(0).quantize(QUANTUM))
# Larger than any escrow a single job should hold; guards against a misplaced exponent or a
# unit confusion (micro-USDC sent as USDC) long before the escrow service would notice.
MAX_AMOUNT = Money(Decimal("1000000000").quantize(QUANTUM))


def to_money(value: object, field: str = "amount", *, allow_zero: bool = True) -> Money:
    """Parse a str, int or Decimal into Money, or raise `InvalidAmount` naming `field`."""
    kind = type(value)
    if kind is Decimal:
        amount = value
    elif isinstance(value, str):
        text = str(value).strip()
        if not text:
            raise InvalidAmount(field, value, "is empty")
        try:
            amount = Decimal(text)
        except InvalidOperation:
            raise InvalidAmount(field, value, "is not a number") from None
    elif isinstance(value, bool) or not isinstance(value, int | Decimal):
        kind_name = "a float" if isinstance(value, float) else kind.__name__  # float-ok: refusing it
        raise InvalidAmount(field, value, f"must be a string, an integer or a Decimal, not {kind_name}")
    else:
        amount = Decimal(value)
    assert isinstance(amount, Decimal)
    if amount.is_finite() and 0 < amount <= MAX_AMOUNT:
        # The common case: a positive amount in range; it only has to have at most 6 places.
        quantized = amount.quantize(QUANTUM)
        if quantized == amount:
            return Money(quantized)
    if amount.is_nan():
        raise InvalidAmount(field, value, "is not a number")
    if amount.is_infinite():
        raise InvalidAmount(field, value, "is infinite")
    if amount.is_signed() and amount != 0:
        raise InvalidAmount(field, value, "is negative")
    if amount > MAX_AMOUNT:
        raise InvalidAmount(field, value, f"is larger than the maximum of {MAX_AMOUNT.normalize():f} USDC")
    quantized = amount.quantize(QUANTUM)
    if quantized != amount:
        raise InvalidAmount(field, value, f"has more than {PLACES} decimal places")
    if not allow_zero and quantized == 0:
        raise InvalidAmount(field, value, "must be greater than zero")
    # copy_abs() turns a parsed "-0" into 0 so that equal amounts also print the same.
    return Money(quantized.copy_abs())


def quantize(value: Decimal) -> Money:
    """Round an exact intermediate result (a product or a ratio) to 6 places, half up."""
    return Money(value.quantize(QUANTUM, rounding=ROUND_HALF_UP))


def fmt(amount: Decimal) -> str:
    """The canonical text of an amount: always 6 places, as in JSON output."""
    return f"{amount.quantize(QUANTUM):f}"
