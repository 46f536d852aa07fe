"""The product page's performance bonus rule."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from podsettle.domain import InvalidInput, to_money
from podsettle.domain.rules import bonus, to_metric


def d(text: str) -> Decimal:
    return Decimal(text)


@pytest.mark.parametrize(
    ("baseline", "achieved", "pool", "amount", "reason"),
    [
        ("0.80", "0.85", "5", "0.000000", "below threshold"),  # +6.25%: under 10%
        ("0.80", "0.879", "5", "0.000000", "below threshold"),  # just under 1.10 x
        ("0.80", "0.88", "5", "0.500000", "above threshold"),  # exactly 1.10 x: 10% of the pool
        ("0.80", "0.92", "5", "0.750000", "above threshold"),  # +15%
        ("0.50", "1.50", "5", "5.000000", "capped at the pool"),  # +200%, capped
        ("0.30", "0.40", "1", "0.333333", "above threshold"),  # 1/3 rounds down, never above terms
    ],
)
def test_bonus_rule(baseline: str, achieved: str, pool: str, amount: str, reason: str) -> None:
    decision = bonus(d(baseline), d(achieved), to_money(pool))
    assert decision.amount == d(amount)
    assert decision.reason == reason
    assert decision.granted == (decision.amount > 0)


def test_threshold_is_configurable() -> None:
    assert bonus(d("1"), d("1.05"), to_money("10"), threshold=d("1.05")).amount == d("0.5")
    assert not bonus(d("1"), d("1.19"), to_money("10"), threshold=d("1.20")).granted


@pytest.mark.parametrize(
    ("baseline", "achieved", "threshold", "field"),
    [
        ("0", "1", "1.1", "base_metric"),
        ("-1", "1", "1.1", "base_metric"),
        ("1", "-1", "1.1", "achieved_metric"),
        ("1", "2", "0.9", "threshold"),
    ],
)
def test_bad_bonus_terms_name_the_field(baseline: str, achieved: str, threshold: str, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        bonus(d(baseline), d(achieved), to_money("1"), threshold=d(threshold))
    assert caught.value.field == field


@pytest.mark.parametrize("value", ["abc", "nan", "inf", 0.5, None, True])
def test_metrics_must_be_exact_finite_numbers(value: object) -> None:
    with pytest.raises(InvalidInput, match="achieved_metric"):
        to_metric(value, "achieved_metric")


metric = st.decimals(min_value=d("0.001"), max_value=1000, places=4, allow_nan=False, allow_infinity=False)


@given(metric, metric, st.decimals(min_value=0, max_value=10**6, places=6))
def test_bonus_is_never_above_its_pool_nor_given_below_threshold(
    base: Decimal, achieved: Decimal, pool: Decimal
) -> None:
    decision = bonus(base, achieved, to_money(pool))
    assert 0 <= decision.amount <= pool
    if achieved < base * d("1.10"):
        assert decision.amount == 0
