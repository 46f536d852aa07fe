"""Single-job overhead: p50 and p99 latency of `engine.run_paid_job` with zero-latency in-process
gateways (`Engine.in_process`: the local ledger and RunPod handlers called directly), one job at a
time, against the same gateway calls made without the engine in the same run.

    .venv/bin/python bench/latency_bench.py [--jobs 500]

The baseline is what a job costs with no engine at all: escrow create, compute submit, wait, escrow
release on the same kind of gateways. The difference is the engine's own overhead: opening the job,
recording every intent, attempt and outcome (each a commit to the store), and the writer's hand-offs
between the event loop and its store thread. Measured on a SQLite file store (durable, the default)
and on the in-memory store (no commits), so that the cost of the commits shows apart.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from common import BareGateways, figure, percentile, pick, quiet_logging, ratio

ENDPOINT = "echo"
BUDGET = "0.25"


async def engine_latencies(store: str, jobs: int, warm: int) -> list[float]:
    from podsettle import Engine

    latencies: list[float] = []
    async with Engine.in_process(store) as engine:
        for n in range(warm + jobs):
            started = time.perf_counter()
            result = await engine.run_paid_job(ENDPOINT, {"n": n}, BUDGET)
            if n >= warm:
                latencies.append(time.perf_counter() - started)
            if not result.paid:
                raise SystemExit(f"job {n} was not paid: {result.status} ({result.reason})")
    return latencies


async def baseline_latencies(jobs: int, warm: int) -> list[float]:
    """The same calls on the same kind of gateways, without the engine."""
    latencies: list[float] = []
    async with BareGateways(BUDGET) as gateways:
        for n in range(warm + jobs):
            started = time.perf_counter()
            await gateways.job(ENDPOINT, {"n": n})
            if n >= warm:
                latencies.append(time.perf_counter() - started)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=pick(500, 100))
    parser.add_argument("--warm", type=int, default=20)
    args = parser.parse_args(argv)
    quiet_logging()
    base = asyncio.run(baseline_latencies(args.jobs, args.warm))
    memory = asyncio.run(engine_latencies("memory", args.jobs, args.warm))
    with tempfile.TemporaryDirectory(prefix="podsettle-latency-bench-") as tmp:
        durable = asyncio.run(engine_latencies(f"sqlite:///{Path(tmp) / 'events.db'}", args.jobs, args.warm))

    base_p50, base_p99 = percentile(base, 50) * 1000, percentile(base, 99) * 1000
    for label, values, store in (
        ("sqlite", durable, "SQLite file store"),
        ("memory", memory, "memory store"),
    ):
        p50, p99 = percentile(values, 50) * 1000, percentile(values, 99) * 1000
        figure(
            f"latency.{label}.p50",
            p50,
            "ms",
            ratio_to=ratio(p50, base_p50),
            baseline="gateways alone p50",
            note=f"run_paid_job, one at a time, {args.jobs} jobs, {store}",
        )
        figure(
            f"latency.{label}.p99", p99, "ms", ratio_to=ratio(p99, base_p99), baseline="gateways alone p99"
        )
    figure(
        "latency.gateways_only.p50", base_p50, "ms", note="escrow create, submit, wait, release; no engine"
    )
    figure("latency.gateways_only.p99", base_p99, "ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
