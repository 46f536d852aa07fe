"""Compute throughput: jobs per second through the RunPod adapter and the emulator over loopback HTTP,
with a zero-latency handler, and HTTP requests per job (polling efficiency).

    .venv/bin/python bench/compute_bench.py [--jobs 2000] [--concurrency 128] [--initial-poll 0.2]

Prints one line per figure: adapter jobs/s, requests per job, the same run's baseline (raw httpx
GETs to /health per second, the emulator's ceiling for one request) and the ratio between them,
then InProcessCompute jobs/s. The documented rate limits are switched off on both sides: they would
cap /run at 100 jobs/s and measure the limiter, not the code.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from multiprocessing.synchronize import Event
from typing import Any

import httpx

from podsettle.adapters.runpod import PollPolicy, RunPodCompute
from podsettle.sandbox.http_server import BackgroundServer
from podsettle.sandbox.inprocess_compute import InProcessCompute
from podsettle.sandbox.runpod_emulator import EndpointConfig, create_runpod_app


def zero(job: dict[str, Any]) -> dict[str, Any]:
    """A zero-latency handler."""
    return {"n": job["input"]["n"]}


async def _bounded(concurrency: int, count: int, one: Any) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    async def guarded(n: int) -> None:
        async with semaphore:
            await one(n)

    await asyncio.gather(*(guarded(n) for n in range(count)))


async def adapter_run(
    base_url: str, jobs: int, concurrency: int, initial_poll: float, connections: int
) -> tuple[float, float]:
    poll = PollPolicy(initial_s=initial_poll, max_s=max(initial_poll, 1.0))
    async with RunPodCompute(
        "bench-key", base_url=base_url, limits={}, poll=poll, seed=0, max_connections=connections
    ) as compute:
        failures = 0

        async def one(n: int) -> None:
            nonlocal failures
            run_id = await compute.submit("zero", {"n": n})
            outcome = await compute.wait("zero", run_id, timeout_s=60)
            failures += not outcome.succeeded

        started = time.perf_counter()
        await _bounded(concurrency, jobs, one)
        elapsed = time.perf_counter() - started
        if failures:
            raise SystemExit(f"{failures} of {jobs} jobs failed")
        return jobs / elapsed, compute.requests_sent / jobs


async def baseline_run(base_url: str, requests: int, concurrency: int, connections: int) -> float:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": "Bearer bench-key"}, limits=limits, timeout=30
    ) as client:

        async def one(n: int) -> None:
            (await client.get("/zero/health")).raise_for_status()

        started = time.perf_counter()
        await _bounded(concurrency, requests, one)
        return requests / (time.perf_counter() - started)


async def inprocess_run(jobs: int, concurrency: int) -> float:
    async with InProcessCompute({"zero": EndpointConfig(handler=zero, workers=8)}, seed=0) as compute:

        async def one(n: int) -> None:
            run_id = await compute.submit("zero", {"n": n})
            if not (await compute.wait("zero", run_id, timeout_s=60)).succeeded:
                raise SystemExit("an in-process job failed")

        started = time.perf_counter()
        await _bounded(concurrency, jobs, one)
        return jobs / (time.perf_counter() - started)


def serve(workers: int, ports: multiprocessing.Queue[int], stop: Event) -> None:
    """The emulator in its own process, as the sandbox runs: sharing the client's interpreter would
    measure GIL hand-offs between the two threads instead of either side."""
    app = create_runpod_app(endpoints={"zero": EndpointConfig(handler=zero, workers=workers)}, rate_limits={})
    with BackgroundServer(app) as server:
        ports.put(server.port)
        stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--initial-poll", type=float, default=PollPolicy().initial_s, help="seconds")
    parser.add_argument("--workers", type=int, default=8, help="emulator workers on the endpoint")
    parser.add_argument("--connections", type=int, default=16, help="httpx connection pool size")
    args = parser.parse_args(argv)

    context = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue[int] = context.Queue()
    stop = context.Event()
    emulator = context.Process(target=serve, args=(args.workers, ports, stop), daemon=True)
    emulator.start()
    try:
        base_url = f"http://127.0.0.1:{ports.get(timeout=60)}/v2"
        asyncio.run(
            adapter_run(base_url, min(200, args.jobs), args.concurrency, args.initial_poll, args.connections)
        )  # warm-up
        jobs_per_s, requests_per_job = asyncio.run(
            adapter_run(base_url, args.jobs, args.concurrency, args.initial_poll, args.connections)
        )
        baseline = asyncio.run(baseline_run(base_url, args.jobs * 2, args.concurrency, args.connections))
    finally:
        stop.set()
        emulator.join(10)
    inprocess = asyncio.run(inprocess_run(args.jobs * 5, args.concurrency))

    out = sys.stdout
    out.write(
        f"adapter+emulator: {jobs_per_s:.0f} jobs/s ({args.jobs} jobs, concurrency {args.concurrency})\n"
    )
    out.write(f"http requests per job: {requests_per_job:.2f} (initial poll {args.initial_poll:g} s)\n")
    out.write(
        f"baseline raw GET /health: {baseline:.0f} req/s; jobs/s x requests/job = "
        f"{jobs_per_s * requests_per_job / baseline:.2f} of the raw request rate\n"
    )
    out.write(f"inprocess compute: {inprocess:.0f} jobs/s ({args.jobs * 5} jobs)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
