"""examples/render_farm.py, run as a user runs it: every tile ends paid; a tile the spot workers
failed was refunded and paid on its second attempt on the reliable endpoint, each attempt with its
own escrow and fee; each worker's ledger balance is what its tiles earned, and the audit passes."""

from __future__ import annotations

from decimal import Decimal as D
from itertools import pairwise
from pathlib import Path

from podsettle import Settlements
from podsettle.replay import audit
from tests.examples.recipes import balances, recipe


async def test_failed_tiles_are_refunded_and_paid_on_the_second_endpoint(tmp_path: Path) -> None:
    farm_recipe = recipe("render_farm")
    farm = await farm_recipe.main(f"sqlite:///{tmp_path / 'render.db'}")

    budget = D(farm_recipe.BUDGET_PER_TILE)
    assert len(farm.tiles) == farm_recipe.FRAMES * farm_recipe.TILES_PER_FRAME
    retried = [attempts for attempts in farm.tiles if len(attempts) > 1]
    assert retried and len(retried) < len(farm.tiles)  # the seeded spot workers fail some tiles
    for attempts in farm.tiles:
        assert attempts[-1].paid and len(attempts) <= farm_recipe.MAX_ATTEMPTS
        assert all(a.status == "refunded" for a in attempts[:-1])
        for before, after in pairwise(attempts):
            assert after.retry_of == before.job_key and after.endpoint_id == farm_recipe.FALLBACK
            assert after.escrow_id != before.escrow_id and after.batch_id == before.batch_id

    t = farm.totals
    attempts_made = sum(len(a) for a in farm.tiles)
    assert (t.jobs, t.paid_jobs, t.refunded_jobs) == (attempts_made, len(farm.tiles), len(retried))
    # Each attempt funded its own escrow and paid its own 1% fee, refunded ones too (v1 keeps it).
    assert t.funded == attempts_made * budget and t.fees == attempts_made * D("0.002")
    assert t.to_workers == len(farm.tiles) * D("0.198") and t.still_held == 0
    assert t.funded == t.to_workers + t.fees + t.returned

    accounts = balances(farm.ledger)
    spot, reliable = farm.workers["render-spot"], farm.workers[farm_recipe.FALLBACK]
    assert spot != reliable
    assert accounts[spot] == farm.payouts[spot] == (len(farm.tiles) - len(retried)) * D("0.198")
    assert accounts[reliable] == farm.payouts[reliable] == len(retried) * D("0.198")
    assert accounts[farm.payer] == D("1000") - t.to_workers - t.fees
    assert accounts["fees"] == t.fees
    assert farm.ledger["conserved"] and D(farm.ledger["held"]) == 0

    app = Settlements(farm.store)
    try:
        report = audit(app)
    finally:
        app.close()
    assert report.ok and report.jobs == attempts_made, report.render()
