"""examples/lora_marketplace.py, run as a user runs it: the adapter that scores at or above the
threshold is released to the trainer, the other refunded; each was scored by its own paid evaluator
job, funded by the same buyer; the sandbox's ledger (payer, each worker, fees) and the audit agree."""

from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path

from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.cli import app as cli
from podsettle.replay import audit
from tests.examples.recipes import balances, recipe


async def test_the_adapter_is_paid_only_when_its_evaluator_scores_it_at_the_threshold(tmp_path: Path) -> None:
    lora = recipe("lora_marketplace")
    market = await lora.main(f"sqlite:///{tmp_path / 'lora.db'}")

    threshold, training, evaluation = D(lora.THRESHOLD), D(lora.TRAINING_BUDGET), D(lora.EVALUATION_BUDGET)
    passed, failed = market.fine_tunes  # the recipe's candidates, in order
    assert passed.paid and passed.evaluation.passed and D(passed.evaluation.score) >= threshold
    assert failed.status == "refunded" and not failed.evaluation.passed
    assert D(failed.evaluation.score) < threshold and failed.reason.endswith(f"threshold {lora.THRESHOLD}")
    # One evaluator per candidate, the job named by the verdict, paid by the same buyer.
    assert [str(e.job_id) for e in market.evaluators] == [
        job.evaluation.evaluator_job_id for job in market.fine_tunes
    ]
    assert all(e.paid and e.endpoint_id == "eval" and e.payer == market.payer for e in market.evaluators)
    assert [e.job_key for e in market.evaluators] == [f"{job.job_key}:eval" for job in market.fine_tunes]

    t = market.totals
    assert (t.jobs, t.paid_jobs, t.refunded_jobs) == (4, 3, 1)
    # Every escrow paid its 1% fee (the refunded one too: the v1 escrow keeps it).
    assert t.funded == 2 * training + 2 * evaluation and t.fees == D("0.044") and t.still_held == 0
    assert t.to_workers == D("1.98") + 2 * D("0.198") and t.returned == D("1.98")

    accounts = balances(market.ledger)
    trainer, evaluator = market.workers["train"], market.workers["eval"]
    assert trainer != evaluator
    assert accounts[trainer] == passed.money.to_workers == D("1.98")
    assert accounts[evaluator] == sum(e.money.to_workers for e in market.evaluators) == D("0.396")
    assert accounts["fees"] == t.fees
    assert accounts[market.payer] == D("1000") - t.to_workers - t.fees == D("997.58")
    assert market.ledger["conserved"] and D(market.ledger["held"]) == 0

    app = Settlements(market.store)
    try:
        job = app.find_job(passed.job_key)
        assert job.counts.get("Evaluated") == 1 and job.evaluation == passed.evaluation
        report = audit(app)
    finally:
        app.close()
    assert report.ok and report.jobs == 4, report.render()

    # The verdict is in the job's timeline as `podsettle status` shows it.
    shown = CliRunner().invoke(cli, ["status", str(failed.job_id), "--store", market.store])
    assert shown.exit_code == 0, shown.output
    assert "evaluation" in shown.output and failed.evaluation.evaluator_job_id in shown.output
    assert f"refunded: score {failed.evaluation.score} is below the threshold" in shown.output
