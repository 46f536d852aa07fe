"""Money parsing and the escrow service's fee rules."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podsettle.domain import InvalidAmount, to_money
from podsettle.domain.money import MAX_AMOUNT, fmt
from podsettle.domain.rules import commission, referral_fee, split


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.10", "0.100000"),
        ("0.50", "0.500000"),
        ("1", "1.000000"),
        (1, "1.000000"),
        (Decimal("2.5"), "2.500000"),
        ("999999.999999", "999999.999999"),
        ("  3.25 ", "3.250000"),
        ("0", "0.000000"),
        ("-0", "0.000000"),
        ("1e2", "100.000000"),
    ],
)
def test_parses_valid_amounts_exactly(value: object, expected: str) -> None:
    money = to_money(value)
    assert isinstance(money, Decimal)
    assert fmt(money) == expected
    assert money.as_tuple().exponent == -6


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-0.01", "is negative"),
        (-1, "is negative"),
        ("NaN", "is not a number"),
        ("sNaN", "is not a number"),
        ("Infinity", "is infinite"),
        ("-inf", "is infinite"),
        ("0.0000001", "more than 6 decimal places"),
        ("1.1234567", "more than 6 decimal places"),
        ("", "is empty"),
        ("   ", "is empty"),
        ("12abc", "is not a number"),
        ("1e12", "larger than the maximum"),
        (10**15, "larger than the maximum"),
        (0.5, "not a float"),
        (True, "not bool"),
        (None, "not NoneType"),
        ([1], "not list"),
    ],
)
def test_rejects_bad_amounts_naming_the_field(value: object, reason: str) -> None:
    with pytest.raises(InvalidAmount) as caught:
        to_money(value, "budget")
    assert caught.value.field == "budget"
    assert str(caught.value).startswith("budget: ")
    assert reason in str(caught.value)


def test_zero_can_be_refused() -> None:
    with pytest.raises(InvalidAmount, match="greater than zero"):
        to_money("0.000000", "budget", allow_zero=False)


def test_largest_amount_is_accepted() -> None:
    assert to_money(MAX_AMOUNT) == MAX_AMOUNT


@pytest.mark.parametrize(
    ("amount", "fee"),
    [
        ("0.10", "0.001000"),
        ("0.50", "0.005000"),
        ("0.25", "0.002500"),
        ("1", "0.010000"),
        ("999999.999999", "10000.000000"),
        # Half-way cases: the 1% lands exactly on ...5 in the 7th place. Half up and half even differ.
        ("0.00005", "0.000001"),  # half even would give 0.000000
        ("0.00025", "0.000003"),  # half even would give 0.000002
        ("1.23445", "0.012345"),  # half even would give 0.012344
        ("0.00015", "0.000002"),  # both give 0.000002
        ("0.000049", "0.000000"),
        ("0.000051", "0.000001"),
        ("123.456789", "1.234568"),
    ],
)
def test_commission_is_one_percent_rounded_half_up(amount: str, fee: str) -> None:
    money = to_money(amount)
    assert fmt(commission(money)) == fee
    parts = split(money)
    assert parts.fee + parts.net == money


@pytest.mark.parametrize(
    ("fee", "share"),
    [("0.005000", "0.000750"), ("0.010000", "0.001500"), ("0.000003", "0.000000"), ("0.000010", "0.000002")],
)
def test_referral_share_is_fifteen_percent_of_the_fee(fee: str, share: str) -> None:
    assert fmt(referral_fee(to_money(fee))) == share


def test_split_without_referrer_has_no_referral_share() -> None:
    assert split(to_money("1"), referred=False).referral_fee == 0


@given(st.decimals(min_value=0, max_value=10**8, places=6, allow_nan=False, allow_infinity=False))
def test_split_conserves_every_amount(amount: Decimal) -> None:
    money = to_money(amount)
    parts = split(money)
    assert parts.fee + parts.net == money
    assert 0 <= parts.referral_fee <= parts.fee <= money
    assert parts.fee.as_tuple().exponent == -6
