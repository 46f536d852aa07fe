"""LoRA marketplace: a fine-tuning job is paid only if a second, evaluator job scores its adapter at
or above a threshold.

    python examples/lora_marketplace.py [STORE]     (default: a store in a new temporary folder)

Two endpoints, each paying its own worker: the sandbox's built-in `train` (the fine-tuning run; its
output reports an `accuracy`) and `eval` (examples/workers/evaluator_worker.py, which returns a
`score`). `acceptance=evaluated_by("eval", ...)` gates the fine-tuning job's release:

- when the run completes, the engine opens the evaluator as its own paid job: the buyer (the same
  payer) funds it with its own escrow and fee, and it shows in the totals. Its key is the
  fine-tuning job's key plus `:eval`, so an engine that restarts mid-evaluation waits on the same
  evaluator rather than paying for a second one;
- the evaluator's id, score, the threshold and the decision are recorded on the fine-tuning job
  (an `Evaluated` event, in `podsettle status`); at or above the threshold the fine-tuning escrow
  is released to the trainer, below it refunded to the buyer (the Purple Flea escrow keeps its 1%);
- an evaluator that fails (no score) is refunded, and so is the fine-tuning job: no score, no pay.
  The evaluator is paid for a score either way: it did its work.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podsettle import Engine, JobResult, Totals, batch_totals, evaluated_by

EVALUATOR = Path(__file__).parent / "workers" / "evaluator_worker.py"
TRAINING_BUDGET = "2.00"  # USDC to the trainer if the adapter passes
EVALUATION_BUDGET = "0.20"  # USDC to the evaluator, per candidate, paid by the buyer as well
THRESHOLD = "0.85"  # the held-out score an adapter must reach
# Two candidates: the `train` handler lands near each input's target accuracy.
CANDIDATES = {
    "lora-support-bot": {"target": 0.93, "seed": 2, "epochs": 4},
    "lora-legal-summaries": {"target": 0.80, "seed": 5, "epochs": 2},
}


@dataclass
class Market:
    """The recipe's outcome, for its test."""

    fine_tunes: list[JobResult]
    evaluators: list[JobResult]
    totals: Totals  # both kinds of job, as the buyer pays them
    workers: dict[str, str]  # endpoint -> its worker agent
    ledger: dict[str, Any]
    payer: str
    store: str


async def main(store: str | None = None) -> Market:
    store = store or f"sqlite:///{tempfile.mkdtemp(prefix='podsettle-lora-')}/lora.db"
    endpoints = {"eval": str(EVALUATOR)}
    async with Engine.sandbox(store, endpoints=endpoints, payees=["train", "eval"]) as engine:
        gate = evaluated_by("eval", EVALUATION_BUDGET, THRESHOLD, metric="score")
        fine_tunes = await asyncio.gather(
            *(
                engine.run_paid_job("train", job_input, TRAINING_BUDGET, acceptance=gate, job_key=name)
                for name, job_input in CANDIDATES.items()
            )
        )
        evaluators = [
            await engine.job(job.evaluation.evaluator_job_id)
            for job in fine_tunes
            if job.evaluation is not None
        ]
        market = Market(
            list(fine_tunes),
            evaluators,
            batch_totals([*fine_tunes, *evaluators]),
            dict(engine.settings.payees),
            engine.sandbox_server.ledger(),  # GET /sandbox/ledger
            engine.payer,
            store,
        )
    report(market)
    return market


def report(market: Market) -> None:
    for job in market.fine_tunes:
        verdict = job.evaluation
        if verdict is None:
            print(f"{job.job_key}: {job.status} before any evaluation ({job.reason})")
            continue
        decision = "released" if verdict.passed else "refunded"
        print(
            f"{job.job_key}: score {verdict.score} vs {verdict.threshold} -> {decision}; "
            f"trainer got {job.money.to_workers}, buyer got back {job.money.returned}"
        )
    balances = {a["account"]: a["balance"] for a in market.ledger["accounts"]}
    print(f"buyer {market.payer} (pays both kinds of job): {balances[market.payer]} USDC")
    for endpoint, worker in market.workers.items():
        print(f"worker {worker} ({endpoint}): {balances.get(worker, '0')} USDC")
    print(f"escrow fees: {balances.get('fees', '0')} USDC")
    t = market.totals
    print(
        f"{t.jobs} jobs opened ({len(market.fine_tunes)} fine-tunes, {len(market.evaluators)} "
        f"evaluations): funded {t.funded}, to workers {t.to_workers}, fees {t.fees}, returned {t.returned}"
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
