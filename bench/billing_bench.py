"""Per-request billing: metered LLM calls settled per second on the local ledger, next to the same
calls unpaid, in one run.

    .venv/bin/python bench/billing_bench.py [--calls 200] [--concurrency 8] [--tokens 16] [--rounds 2]

Both sides run the same streaming worker file (examples/workers/llm_worker.py) on the embedded
sandbox's RunPod over loopback HTTP, read from `/stream`. Paid: `run_paid_job(..., price_per_item=)`
on `Engine.sandbox(escrow="ledger")` (a micro-escrow per call, released per token, the rest
returned, every event in a SQLite store). Unpaid: `run_unpaid`, the same gateway call without an
escrow or a store. Rounds alternate unpaid and paid; the figures are the medians. Prints:
- paid calls/s (ratio vs the unpaid calls/s of the same run);
- the engine's overhead per call: median latency paid minus unpaid, one call at a time;
- the cost of one call (to the worker + fee) at the bench's price and budget.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

from common import ROOT, figure, median, pick, quiet_logging, ratio

from podsettle import Engine

WORKER = ROOT / "examples" / "workers" / "llm_worker.py"
PRICE, BUDGET = "0.000020", "0.001000"


async def _rate(calls: int, concurrency: int, one: Callable[[int], Awaitable[object]]) -> float:
    slots = asyncio.Semaphore(concurrency)

    async def bounded(n: int) -> None:
        async with slots:
            await one(n)

    started = time.perf_counter()
    await asyncio.gather(*(bounded(n) for n in range(calls)))
    return calls / (time.perf_counter() - started)


async def _latencies(calls: int, one: Callable[[int], Awaitable[object]]) -> list[float]:
    taken = []
    for n in range(calls):
        started = time.perf_counter()
        await one(n)
        taken.append((time.perf_counter() - started) * 1000)
    return taken


async def run(calls: int, concurrency: int, tokens: int, rounds: int, folder: Path) -> None:
    store = f"sqlite:///{folder / 'billing.db'}"
    async with Engine.sandbox(
        store, endpoints={"llm": str(WORKER)}, streaming=["llm"], escrow="ledger", concurrency=concurrency
    ) as engine:
        call = {"prompt": "bench the billing path", "max_tokens": tokens}
        costs: list[Decimal] = []

        async def paid(n: int) -> None:
            result = await engine.run_paid_job("llm", call, BUDGET, price_per_item=PRICE)
            if not result.paid:
                raise RuntimeError(f"call {n} was not paid: {result.status} ({result.reason})")
            costs.append(result.money.to_workers + result.money.fees)

        async def unpaid(n: int) -> None:
            await engine.run_unpaid("llm", call)

        await unpaid(0)  # the worker file is imported and the connections opened before timing
        await paid(0)
        unpaid_rates, paid_rates = [], []
        for _ in range(rounds):
            unpaid_rates.append(await _rate(calls, concurrency, unpaid))
            paid_rates.append(await _rate(calls, concurrency, paid))
        sequential = max(10, calls // 10)
        unpaid_ms = median(await _latencies(sequential, unpaid))
        paid_ms = median(await _latencies(sequential, paid))
    unpaid_rate, paid_rate = median(unpaid_rates), median(paid_rates)
    shape = f"{tokens} tokens a call, {concurrency} at once"
    figure("billing.unpaid_calls_per_s", unpaid_rate, "calls/s", note=shape)
    figure(
        "billing.paid_calls_per_s",
        paid_rate,
        "calls/s",
        ratio_to=ratio(paid_rate, unpaid_rate),
        baseline="unpaid calls/s",
        note="a micro-escrow per call on the local ledger, released per token, the rest returned",
    )
    figure(
        "billing.overhead_ms_per_call",
        paid_ms - unpaid_ms,
        "ms",
        ratio_to=ratio(paid_ms, unpaid_ms),
        baseline=f"unpaid latency {unpaid_ms:.1f} ms",
        note="median latency, one call at a time",
    )
    figure("billing.cost_per_call", float(median([float(c) for c in costs])), "USDC", note=f"{PRICE} a token")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=pick(200, 40))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=pick(2, 1))
    args = parser.parse_args(argv)
    quiet_logging()
    with tempfile.TemporaryDirectory(prefix="podsettle-billing-") as folder:
        asyncio.run(run(args.calls, args.concurrency, args.tokens, args.rounds, Path(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
