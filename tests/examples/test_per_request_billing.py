"""examples/per_request_billing.py, run as a user runs it: each call is paid min(budget, tokens x
price) out of its own escrow, the rest returned, and the sandbox's ledger and the audit agree."""

from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path

from podsettle import Settlements
from podsettle.replay import audit
from tests.examples.recipes import balances, recipe


async def test_each_call_is_paid_for_the_tokens_it_streamed_and_the_rest_goes_back(tmp_path: Path) -> None:
    billing = recipe("per_request_billing")
    outcome = await billing.main(f"sqlite:///{tmp_path / 'billing.db'}")

    price, budget = D(billing.PRICE_PER_TOKEN), D(billing.BUDGET_PER_CALL)
    assert [r.items for r in outcome.results] == [tokens for _, tokens in billing.CALLS]
    for result, (_, tokens) in zip(outcome.results, billing.CALLS, strict=True):
        earned = min(budget, tokens * price)
        assert result.paid
        assert result.money.to_workers + result.money.fees == earned
        assert result.money.returned == budget - earned and result.money.still_held == 0
    # 12 + 4 + 50 (the budget's cap) + 1 tokens' worth, at 0.00002 each.
    spent = sum(r.money.to_workers + r.money.fees for r in outcome.results)
    assert spent == D("0.001340")

    accounts = balances(outcome.ledger)
    assert accounts[outcome.payer] == D("1000") - spent
    assert accounts[outcome.worker] == sum(r.money.to_workers for r in outcome.results)
    assert accounts["fees"] == sum(r.money.fees for r in outcome.results) > 0
    assert outcome.ledger["conserved"] and D(outcome.ledger["held"]) == 0

    app = Settlements(outcome.store)
    try:
        report = audit(app)
    finally:
        app.close()
    assert report.ok and report.jobs == len(billing.CALLS), report.render()
