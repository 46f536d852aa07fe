"""The fee rule of each escrow dialect.

v1's figures are checked against a table that node computed with the published service's own
expressions (tests/data/v1-amounts: the table and the script that wrote it), never against this
module: every half-micro budget from 0.10 to 5, edges, and seeded budgets up to 100,000.
"""

from __future__ import annotations

import csv
import gzip
import io
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

import pytest

from podsettle.domain.money import QUANTUM, Money, to_money
from podsettle.domain.rules import commission, is_referral_code, net_of, referral_fee, split

TABLE = Path(__file__).parents[1] / "data" / "v1-amounts" / "v1-amounts.csv.gz"
HALF_MICRO_BUDGETS = 49_000  # 0.10005, 0.10015, ..., 4.99995: the table's first rows


def _money(micros: str) -> Money:
    return Money((Decimal(int(micros)) * QUANTUM).quantize(QUANTUM))


def _rows() -> list[tuple[Money, Money, Money, Money]]:
    with gzip.open(TABLE, "rt", encoding="ascii") as raw:
        reader = csv.reader(io.StringIO(raw.read()))
        next(reader)
        return [(_money(b), _money(c), _money(n), _money(r)) for b, c, n, r in reader]


ROWS = _rows()


def test_the_table_covers_every_half_micro_budget_from_010_to_5() -> None:
    budgets = [row[0] for row in ROWS[:HALF_MICRO_BUDGETS]]
    assert budgets[0] == Decimal("0.10005") and budgets[-1] == Decimal("4.99995")
    assert all(b - a == Decimal("0.0001") for a, b in pairwise(budgets))
    assert len(ROWS) > HALF_MICRO_BUDGETS + 1000  # and the edges and seeded budgets after them


def test_v1_figures_are_the_services_for_every_budget_in_the_table() -> None:
    wrong = [
        (budget, fee, net, share)
        for budget, fee, net, share in ROWS
        if (
            commission(budget, "v1"),
            net_of(budget, commission(budget, "v1"), "v1"),
            referral_fee(commission(budget, "v1"), "v1"),
        )
        != (fee, net, share)
    ]
    assert wrong == []
    # And split() puts them together: the service's figures, fee + net the whole budget.
    for budget, fee, net, share in ROWS[::97]:
        parts = split(budget, dialect="v1")
        assert (parts.amount, parts.fee, parts.net, parts.referral_fee) == (budget, fee, net, share)
        assert fee + net == budget


def test_the_seed_rule_is_exact_half_up_and_differs_where_the_issue_measured() -> None:
    differ = sum(1 for budget, fee, *_ in ROWS[:HALF_MICRO_BUDGETS] if commission(budget, "seed") != fee)
    assert differ == 18_961  # the issue's count on the published server
    for dialect in ("seed", None):
        parts = split(to_money("0.100450"), dialect=dialect)
        assert (parts.fee, parts.net) == (Decimal("0.001005"), Decimal("0.099445"))


@pytest.mark.parametrize(
    ("budget", "fee", "net", "share"),
    [
        ("0.100450", "0.001004", "0.099446", "0.000151"),  # the issue's create
        ("0.101", "0.001010", "0.099990", "0.000151"),  # the issue's referral share
        ("0.5", "0.005", "0.495", "0.00075"),
    ],
)
def test_v1_figures_the_issue_names(budget: str, fee: str, net: str, share: str) -> None:
    parts = split(to_money(budget), dialect="v1")
    assert (parts.amount, parts.fee, parts.net, parts.referral_fee) == tuple(
        Decimal(x) for x in (budget, fee, net, share)
    )


def test_unreferred_split_has_no_share() -> None:
    assert split(to_money("0.101"), referred=False, dialect="v1").referral_fee == 0


@pytest.mark.parametrize(
    ("code", "ok"),
    [
        ("ref_0a1b2c3d", True),
        ("ref_0A1B2C3D", False),  # the casino writes lowercase hex
        ("ref_0a1b2c3", False),
        ("ref_0a1b2c3d4", False),
        ("ag_0a1b2c3d4e5f", False),  # an agent id is not a code: the service ignores it
        ("", False),
    ],
)
def test_referral_codes_have_the_casinos_form(code: str, ok: bool) -> None:
    assert is_referral_code(code) is ok
