"""The training bounty recipe, run as written: the winner is paid once, the losers nothing, and
the recipe's store passes the audit."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from podsettle import BountyState, Settlements
from podsettle.replay.audit import audit
from tests.examples.conftest import load_recipe


async def test_the_recipe_pays_the_winner_once_and_its_store_passes_the_audit(tmp_path: Path) -> None:
    recipe = load_recipe("training_bounty")
    outcome = await recipe.main(str(tmp_path / "bounty.db"))
    result = outcome["result"]
    assert result.state == BountyState.PAID and result.winner.pod == "pod-b"
    assert Decimal(result.winner.value) >= Decimal("0.9") and len(result.losers) == 2

    ledger = outcome["ledger"]
    balances = {a["account"]: Decimal(a["balance"]) for a in ledger["accounts"]}
    assert ledger["conserved"] and Decimal(ledger["held"]) == 0
    assert balances.pop("fees") == Decimal("0.05")  # the one payout escrow's 1%
    assert balances.pop(result.winner.payee) == Decimal("4.95")
    assert list(balances.values()) == [Decimal("995")]  # the payer: the bounty, nothing for the losers

    report = audit(Settlements(outcome["store"]))
    assert report.ok, report.render()
    assert report.events >= 6  # Posted, Entered x3, Claimed, the payout's attempts and outcomes
