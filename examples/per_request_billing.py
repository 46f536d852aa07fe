"""Per-request billing: every LLM call is a micro-escrow, paid per token it delivered.

    python examples/per_request_billing.py [STORE]     (default: a store in a new temporary folder)

The requesting agent funds one escrow per call with the call's budget. The worker streams tokens
(examples/workers/llm_worker.py, RunPod's generator shape); the engine reads them from `/stream` as
RunPod delivers them and releases min(budget, tokens x price) to the worker, rounded down to the
micro-USDC. The rest of the budget goes back to the agent in the same settlement.

The money is on the local two-phase ledger (`escrow="ledger"`): its smallest escrow is one
micro-USDC and it can release part of an escrow. The hosted Purple Flea escrow cannot carry this:
its escrows start at 0.10 USDC, it allows 20 creates a minute, and it releases an escrow whole
(README, "Per-request billing", says how a tab of calls could still settle through it).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from podsettle import Engine, JobResult

WORKER = Path(__file__).parent / "workers" / "llm_worker.py"
PRICE_PER_TOKEN = "0.000020"  # 20 micro-USDC a token
BUDGET_PER_CALL = "0.001000"  # what the agent puts in escrow per call: at most 50 tokens' worth
CALLS = [  # (prompt, tokens the "model" will stream)
    ("summarise the design doc", 12),
    ("translate hello world", 4),
    ("write a long story about escrow", 80),  # more than the budget buys: paid the budget
    ("yes or no", 1),
]


@dataclass
class Billing:
    """The recipe's outcome, for its test: the calls, the ledger as the sandbox reports it, the
    agents, and the store the engine wrote."""

    results: list[JobResult]
    ledger: dict[str, Any]
    payer: str
    worker: str
    store: str
    paid_ms: list[float]
    unpaid_ms: list[float]


async def main(store: str | None = None) -> Billing:
    store = store or f"sqlite:///{tempfile.mkdtemp(prefix='podsettle-billing-')}/billing.db"
    async with Engine.sandbox(
        store, endpoints={"llm": str(WORKER)}, streaming=["llm"], escrow="ledger"
    ) as engine:
        results, paid_ms, unpaid_ms = [], [], []
        for prompt, tokens in CALLS:
            call = {"prompt": prompt, "max_tokens": tokens}
            started = time.perf_counter()
            result = await engine.run_paid_job("llm", call, BUDGET_PER_CALL, price_per_item=PRICE_PER_TOKEN)
            paid_ms.append((time.perf_counter() - started) * 1000)
            results.append(result)
            # The same call without escrow: the difference is what settling it costs in time.
            started = time.perf_counter()
            await engine.run_unpaid("llm", call)
            unpaid_ms.append((time.perf_counter() - started) * 1000)
        ledger = engine.sandbox_server.ledger()  # GET /sandbox/ledger
        billing = Billing(results, ledger, engine.payer, engine.settings.payee, store, paid_ms, unpaid_ms)
    report(billing)
    return billing


def report(billing: Billing) -> None:
    print(f"{'tokens':>6} {'cost (to worker + fee)':>22} {'returned':>10} {'status':>8}")
    for r in billing.results:
        cost = r.money.to_workers + r.money.fees
        print(f"{r.items or 0:>6} {cost:>22} {r.money.returned:>10} {r.status:>8}")
    spent = sum((r.money.to_workers + r.money.fees for r in billing.results), Decimal(0))
    print(f"{len(billing.results)} calls, {spent} USDC spent, {spent / len(billing.results):f} per call")
    paid, unpaid = statistics.median(billing.paid_ms), statistics.median(billing.unpaid_ms)
    print(f"latency per call: {paid:.1f} ms paid, {unpaid:.1f} ms unpaid: {paid - unpaid:.1f} ms of settling")
    held = {a["account"]: a["balance"] for a in billing.ledger["accounts"]}
    print(f"ledger: payer {held[billing.payer]}, worker {held[billing.worker]}, fees {held['fees']}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
