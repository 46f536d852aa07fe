"""Several `podsettle batch` processes on one PostgreSQL store, next to one process on SQLite.

Each case settles the same batch of echo jobs (`--jobs`, 1,000 by default) through the command
line against one sandbox served by a process of its own (its rate limits lifted), each engine
process given the whole batch with the same batch id. Reported: jobs/s from the first process's
start to the last one's exit (interpreter start-up included, as a user sees it), for SQLite with one
process and PostgreSQL with 1, 2 and 4, as ratios to SQLite and to one PostgreSQL process; per case,
the longest gap between two consecutive events in the log (the longest stall of the whole batch) and
the CPU the engine processes used; then a line saying what limits the curve. Aims (issue 18): more
processes never slower than one, one process on PostgreSQL within 1.2x of SQLite.

    .venv/bin/python bench/processes_bench.py [--jobs 1000] [--processes 1 2 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import ROOT, figure, pick

SERVER = "host=127.0.0.1 port=5432 user=postgres"
SANDBOX = """
import json, sys
from podsettle.sandbox.app import Sandbox
from podsettle.support.logs import configure_logging
configure_logging("WARNING")
lifted = {route: 1_000_000 for route in ("create", "complete", "release", "dispute", "cancel")}
with Sandbox(escrow_options={"rate_limits": lifted}) as sandbox:
    payer, worker = sandbox.create_agent("1000000"), sandbox.create_agent("0")
    print(json.dumps({"url": sandbox.url, "runpod_url": sandbox.runpod_url, "payer": payer.agent_id,
                      "key": payer.api_key, "worker": worker.agent_id}), flush=True)
    sys.stdin.read()
"""


def _engine_env(store: str, info: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODSETTLE_", "PF_", "RUNPOD_"))}
    return {
        **env,
        "PODSETTLE_STORE": store,
        "PODSETTLE_ESCROW_URL": info["url"],
        "PF_API_KEY": info["key"],
        "PODSETTLE_PAYER": info["payer"],
        "PODSETTLE_PAYEE": info["worker"],
        "RUNPOD_API_KEY": "sandbox-key",
        "RUNPOD_ENDPOINT_BASE_URL": info["runpod_url"],
        "PODSETTLE_ESCROW_RATE_LIMITS": "create=1000000,release=1000000,cancel=1000000,dispute=1000000",
        "PODSETTLE_LOG_LEVEL": "WARNING",
    }


def _run(store: str, info: dict[str, str], jobs: Path, processes: int, batch: str) -> tuple[float, float]:
    """Wall seconds of the case, and the CPU seconds its engine processes used (user + system)."""
    env = _engine_env(store, info)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    args = ["batch", str(jobs), "--endpoint", "echo", "--budget", "0.10", "--batch-id", batch, "--json"]
    started = time.perf_counter()
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "podsettle.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for proc in running:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"podsettle batch failed ({proc.returncode}): {err[-2000:]}")
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _longest_stall(store: str) -> float:
    from podsettle.application import Settlements

    app = Settlements(store)
    try:
        times = []
        for note in app.recorder.select_notifications(1, 10_000_000):
            event: Any = app.mapper.to_domain_event(note)
            times.append(event.timestamp)
        times.sort()
        return max(((b - a).total_seconds() for a, b in itertools.pairwise(times)), default=0.0)
    finally:
        app.close()


def _limit(cpus: dict[int, tuple[float, float]], cores: int) -> str:
    """What limits the curve, from the CPU each case's engine processes used: when they use most of
    the machine's cores (PostgreSQL and the sandbox run on the same cores), more processes only
    share the same CPU; when they do not, the store (its table lock per insert) is what they wait on."""
    if not cpus:
        return "limit: no PostgreSQL case ran"
    most = max(cpus)
    cpu, wall = cpus[most]
    share = cpu / (wall * cores)
    per_job = {count: used for count, (used, _) in sorted(cpus.items())}
    growth = ", ".join(f"{count}: {used:.1f} s" for count, used in per_job.items())
    load = os.getloadavg()[0]
    if load >= cores:
        return (
            f"limit: CPU. The machine's load average is {load:.1f} on {cores} cores (other work, "
            f"PostgreSQL, the sandbox and the engines); engine CPU per case ({growth}) grows with the "
            "number of processes (each starts an interpreter, compares the whole batch with the store "
            "and reads every job's result), so more processes only share the same busy cores"
        )
    if share >= 0.6:
        return (
            f"limit: CPU. With {most} processes the engines alone use {share:.0%} of {cores} cores' time "
            f"(PostgreSQL and the sandbox share them); engine CPU per case ({growth}) grows with the "
            "number of processes (each starts an interpreter, opens/compares the whole batch and "
            "reads every job's result), so on this machine more processes cannot go faster"
        )
    return (
        f"limit: the store. With {most} processes the engines use {share:.0%} of {cores} cores' time "
        f"(engine CPU per case: {growth}): they wait on PostgreSQL, whose recorder serialises "
        "inserts with a table lock (one writer at a time); fewer, larger saves lift it"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=pick(1000, 200))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    options = parser.parse_args()
    import psycopg

    try:
        psycopg.connect(f"{SERVER} dbname=test", connect_timeout=2).close()
    except psycopg.Error as error:
        raise SystemExit(f"PostgreSQL is not reachable on 127.0.0.1:5432: {error}") from None
    sandbox = subprocess.Popen(
        [sys.executable, "-c", SANDBOX], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert sandbox.stdout is not None
    info = json.loads(sandbox.stdout.readline())
    made: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="podsettle-bench-") as folder:
            jobs = Path(folder) / "jobs.jsonl"
            jobs.write_text("".join(json.dumps({"n": n}) + "\n" for n in range(options.jobs)))
            sqlite_store = f"sqlite:///{Path(folder) / 'store.db'}"
            sqlite_s, cpu = _run(sqlite_store, info, jobs, 1, "bench-sqlite")
            sqlite_rate = options.jobs / sqlite_s
            figure(
                "processes.sqlite_1",
                sqlite_rate,
                "jobs/s",
                note=f"longest stall {_longest_stall(sqlite_store):.3f} s; engine CPU {cpu:.1f} s "
                f"in {sqlite_s:.1f} s on {os.cpu_count()} cores",
            )
            rates: dict[int, float] = {}
            cpus: dict[int, tuple[float, float]] = {}
            for count in options.processes:
                name = f"podsettle_bench_{uuid.uuid4().hex[:10]}"
                with psycopg.connect(f"{SERVER} dbname=test", autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {name}")
                made.append(name)
                store = f"postgresql://postgres@127.0.0.1:5432/{name}"
                wall, cpu = _run(store, info, jobs, count, f"bench-pg-{count}")
                rate = options.jobs / wall
                rates[count], cpus[count] = rate, (cpu, wall)
                figure(
                    f"processes.postgres_{count}",
                    rate,
                    "jobs/s",
                    ratio_to=rate / sqlite_rate,
                    baseline="sqlite_1",
                    note=f"longest stall {_longest_stall(store):.3f} s; engine CPU {cpu:.1f} s "
                    f"in {wall:.1f} s on {os.cpu_count()} cores",
                )
                if count != 1 and 1 in rates:
                    figure(
                        f"processes.postgres_{count}_vs_1",
                        rate / rates[1],
                        "x",
                        note="aim: at least 1 (more processes never slower than one)",
                    )
            if 1 in rates:
                print(
                    f"# aim: PostgreSQL 1 process within 1.2x of SQLite: SQLite/PostgreSQL = "
                    f"{sqlite_rate / rates[1]:.2f}x ({'met' if sqlite_rate / rates[1] <= 1.2 else 'not met'})"
                )
            print("# " + _limit(cpus, os.cpu_count() or 1))
    finally:
        sandbox.communicate("", timeout=30)
        with psycopg.connect(f"{SERVER} dbname=test", autocommit=True) as conn:
            for name in made:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
