"""Lifecycle throughput: full paid lifecycles per second through the engine with in-process gateways
(`Engine.in_process`: the local ledger and RunPod handlers called directly, zero latency) on a durable
SQLite file store, next to raw sqlite3 writing the same events in the same run.

    .venv/bin/python bench/lifecycle_bench.py [--jobs 2000] [--concurrency 256]

A lifecycle is open, fund, start, complete and release (about a dozen events). The baseline takes the
rows the engine stored for the measured batch (the same bytes) and writes them with plain sqlite3 into
a fresh file with the same schema and journal mode, in as many commits as the engine made
(`engine.writer.stats.saves`): what the storage alone costs. A second reference runs the same gateway
calls without the engine. Aims (issues 5 and 8): at least 1,000 jobs/s and at least half the raw rate.
Also printed: the engine's longest event-loop stall.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import BareGateways, figure, pick, quiet_logging, ratio, stopwatch

ENDPOINT = "echo"
BUDGET = "0.25"


def max_rowid(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT MAX(rowid) FROM stored_events").fetchone()
    return int(row[0] or 0)


async def engine_run(store: Path, jobs: int, concurrency: int) -> dict[str, Any]:
    from podsettle import Engine

    engine = Engine.in_process(f"sqlite:///{store}")
    async with engine:
        warm = await engine.run_batch(ENDPOINT, [{"warm": n} for n in range(min(100, jobs))], BUDGET)
        if warm.totals.paid_jobs != len(warm.results):
            raise SystemExit(f"warm-up: {warm.totals.line()}")
        first_row = max_rowid(store)
        saves = engine.writer.stats.saves
        inputs = [{"n": n, "prompt": f"job {n}"} for n in range(jobs)]
        with stopwatch() as elapsed:
            batch = await engine.run_batch(ENDPOINT, inputs, BUDGET, concurrency=concurrency)
        seconds = elapsed()
        commits = engine.writer.stats.saves - saves
        last_row = max_rowid(store)
        stall = engine.stats.longest_stall_s
    if batch.totals.paid_jobs != jobs:
        raise SystemExit(f"not every job was paid: {batch.totals.line()}")
    return {"seconds": seconds, "commits": commits, "rows": (first_row, last_row), "stall_s": stall}


def raw_run(source: Path, target: Path, rows: tuple[int, int], commits: int) -> tuple[float, int]:
    """The same rows, in `commits` transactions, with plain sqlite3 (same schema, WAL, as the library)."""
    with sqlite3.connect(source) as conn:
        schema = [
            sql
            for (sql,) in conn.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'stored_events' AND sql IS NOT NULL"
            )
        ]
        data = conn.execute(
            "SELECT originator_id, originator_version, topic, state FROM stored_events "
            "WHERE rowid > ? AND rowid <= ? ORDER BY rowid",
            rows,
        ).fetchall()
    out = sqlite3.connect(target, isolation_level=None)
    out.execute("PRAGMA journal_mode = WAL")
    for statement in schema:
        out.execute(statement)
    per_commit = -(-len(data) // max(commits, 1))
    insert = "INSERT INTO stored_events VALUES (?, ?, ?, ?)"
    with stopwatch() as elapsed:
        for start in range(0, len(data), per_commit):
            out.execute("BEGIN")
            out.executemany(insert, data[start : start + per_commit])
            out.execute("COMMIT")
    out.close()
    return elapsed(), len(data)


async def gateways_run(jobs: int, concurrency: int) -> float:
    """The same calls to the same in-process gateways, without the engine (no events, no store)."""
    slots = asyncio.Semaphore(concurrency)
    async with BareGateways(BUDGET) as gateways:

        async def one(n: int) -> None:
            async with slots:
                await gateways.job(ENDPOINT, {"n": n, "prompt": f"job {n}"})

        with stopwatch() as elapsed:
            await asyncio.gather(*(one(n) for n in range(jobs)))
    return elapsed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=pick(2000, 500))
    parser.add_argument("--concurrency", type=int, default=256, help="run_batch's concurrency")
    args = parser.parse_args(argv)
    quiet_logging()
    with tempfile.TemporaryDirectory(prefix="podsettle-lifecycle-bench-") as tmp:
        folder = Path(tmp)
        store = folder / "events.db"
        engine = asyncio.run(engine_run(store, args.jobs, args.concurrency))
        raw_seconds, rows = raw_run(store, folder / "raw.db", engine["rows"], engine["commits"])
    gateway_seconds = asyncio.run(gateways_run(args.jobs, args.concurrency))

    rate = args.jobs / engine["seconds"]
    raw_rate = args.jobs / raw_seconds
    figure(
        "lifecycle.engine",
        rate,
        "jobs/s",
        ratio_to=ratio(rate, raw_rate),
        baseline="raw sqlite3, same rows and commits",
        note=f"{args.jobs} jobs, concurrency {args.concurrency}, SQLite file (WAL); aims: >= 1000 jobs/s "
        f"and ratio >= 0.5",
    )
    figure("lifecycle.raw_sqlite3", raw_rate, "jobs/s", note=f"{rows} rows in {engine['commits']} commits")
    figure("lifecycle.events_per_job", rows / args.jobs, "events")
    figure("lifecycle.jobs_per_commit", args.jobs / max(engine["commits"], 1), "jobs")
    figure(
        "lifecycle.gateways_only",
        args.jobs / gateway_seconds,
        "jobs/s",
        ratio_to=ratio(rate, args.jobs / gateway_seconds),
        baseline="engine / gateways alone",
        note="the same ledger and compute calls without the engine (no events, no store)",
    )
    figure("lifecycle.longest_stall", engine["stall_s"] * 1000, "ms", note="the engine's event loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
