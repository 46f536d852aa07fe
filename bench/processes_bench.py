"""Several `podsettle batch` processes on one PostgreSQL store, next to one process on SQLite.

Each case settles the same batch of echo jobs (`--jobs`, 1,000 by default) through the command
line against one sandbox served by a process of its own (its rate limits lifted), each engine
process given the whole batch with the same batch id. Reported: jobs/s from the first process's
start to the last one's exit (interpreter start-up included, as a user sees it), for SQLite with one
process and PostgreSQL with 1, 2 and 4, as ratios to SQLite and to one PostgreSQL process; per case,
the longest gap between two consecutive events in the log (the longest stall of the whole batch) and
the CPU the engine processes used. Next to each shared case of N > 1 processes, the same jobs split
into N files run by N processes in batches of their own (nothing shared, nothing to coordinate):
what this machine gives N processes at best, and what sharing one batch costs against it. Then
jobs that take time (`--slow-jobs` jobs of 0.1 s on the sandbox's "slow" endpoint, 8 in flight per
process, one batch shared by 1, 2 and 4 processes): what more processes give where each is bound by
its own concurrency rather than the machine's CPU. Last, the aims (issue 18: more processes never
slower than one, one process on PostgreSQL within 1.2x of SQLite) and a line saying what limits the
curve.

    .venv/bin/python bench/processes_bench.py [--jobs 1000] [--processes 1 2 4] [--slow-jobs 400]
"""

from __future__ import annotations

import argparse
import contextlib
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

from common import ROOT, compiled, engine_env, figure, pick, sandbox_process

SERVER = "host=127.0.0.1 port=5432 user=postgres"


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far, from /proc (0 without it)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every core, every process), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


ECHO = ["--endpoint", "echo"]
# Jobs of 0.1 s at 8 in flight per process: each process is bound by its own concurrency (about
# 80 jobs/s at most), not by the machine's CPU; the sandbox's "slow" endpoint never queues them.
SLOW = ["--endpoint", "slow", "--concurrency", "8"]
SLOW_INPUT = {"seconds": 0.1}
SERVICES: dict[str, float] = {}  # CPU seconds the sandbox and the whole machine used in the last case


def _run(
    store: str, info: dict[str, str], work: list[tuple[Path, str]], extra: list[str] = ECHO
) -> tuple[float, float]:
    """Wall seconds of the case, one `podsettle batch` process per (jobs file, batch id) of `work`,
    and the CPU seconds its engine processes used (user + system); the sandbox's and the machine's
    CPU in the case go to SERVICES."""
    env = engine_env(store, info)
    sandbox_pid = int(info["pid"])
    services_before = {"sandbox": _cpu_s([sandbox_pid]), "machine": _machine_busy_s()}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    processes = len(work)
    started = time.perf_counter()
    # stderr to files, not pipes: the processes are waited for one by one, and one whose pipe filled
    # up meanwhile would stop (holding its claims, which the others then wait a lease for).
    with contextlib.ExitStack() as files:
        errors = [files.enter_context(tempfile.TemporaryFile("w+")) for _ in range(processes)]
        running = [
            subprocess.Popen(
                [sys.executable, "-m", "podsettle.cli", *_batch_args(jobs, batch, extra)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=error,
                text=True,
            )
            for error, (jobs, batch) in zip(errors, work, strict=True)
        ]
        for proc, error in zip(running, errors, strict=True):
            proc.wait(timeout=3600)
            if proc.returncode != 0:
                error.seek(0)
                raise SystemExit(f"podsettle batch failed ({proc.returncode}): {error.read()[-2000:]}")
    wall = time.perf_counter() - started
    SERVICES["sandbox"] = _cpu_s([sandbox_pid]) - services_before["sandbox"]
    SERVICES["machine"] = _machine_busy_s() - services_before["machine"]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _batch_args(jobs: Path, batch: str, extra: list[str]) -> list[str]:
    return ["batch", str(jobs), "--budget", "0.10", "--batch-id", batch, "--json", *extra]


def _split(jobs: Path, parts: int) -> list[Path]:
    """The jobs file cut into `parts` files, every `parts`-th line to each."""
    lines = jobs.read_text().splitlines(keepends=True)
    files = []
    for part in range(parts):
        path = jobs.with_name(f"{jobs.stem}-{part + 1}-of-{parts}.jsonl")
        path.write_text("".join(lines[part::parts]))
        files.append(path)
    return files


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


def _limit(
    cases: dict[int, tuple[float, float, float, float]],
    rates: dict[int, float],
    alone: dict[int, float],
    cores: int,
) -> str:
    """What limits the curve, from each case's CPU (its engines', the sandbox's and the whole
    machine's busy time; PostgreSQL and any other work are the rest) and from the independent
    processes (the same jobs split between batches of their own: nothing shared, nothing to
    coordinate), which show what this machine gives N processes at best."""
    if not cases:
        return "limit: no PostgreSQL case ran"
    most = max(cases)
    engines, wall, sandbox, machine = cases[most]
    busy = machine / (wall * cores) if wall else 0.0
    growth = ", ".join(f"{count}: {used[0]:.1f} s" for count, used in sorted(cases.items()))
    rest = max(machine - engines - sandbox, 0.0)
    ceiling = ""
    if most in alone and rates.get(1):
        ceiling = (
            f" {most} independent processes (each its own part of the jobs in a batch of its own: "
            f"nothing to coordinate) reach {alone[most] / rates[1]:.2f}x of one process here, and "
            f"{most} sharing one batch {rates[most] / alone[most]:.2f} of that: the rest of the gap "
            "is the machine's"
        )
    if busy >= 0.8:
        return (
            f"limit: CPU. With {most} processes the machine's {cores} cores were busy {busy:.0%} of the "
            f"time (engines {engines:.1f} s, sandbox {sandbox:.1f} s, PostgreSQL and other work "
            f"{rest:.1f} s in {wall:.1f} s). Engine CPU per case ({growth}) grows with the number of "
            "processes: each starts an interpreter and its imports, and reads the whole file and the "
            f"result of every job for its report.{ceiling}"
        )
    return (
        f"limit: waiting. With {most} processes the machine's {cores} cores were busy only {busy:.0%} "
        f"of the time (engine CPU per case: {growth}): the engines waited on PostgreSQL, whose "
        f"recorder serialises inserts with a table lock (one writer at a time), or on the services.{ceiling}"
    )


def _database(psycopg: Any, made: list[str]) -> str:
    """A new PostgreSQL database's store URL (dropped at the end)."""
    name = f"podsettle_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{SERVER} dbname=test", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    made.append(name)
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def _note(store: str, cpu: float, wall: float) -> str:
    return (
        f"longest stall {_longest_stall(store):.3f} s; engine CPU {cpu:.1f} s, sandbox "
        f"{SERVICES['sandbox']:.1f} s, whole machine busy {SERVICES['machine']:.1f} s in {wall:.1f} s "
        f"on {os.cpu_count()} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=pick(1000, 200))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--slow-jobs", type=int, default=pick(400, 80))
    options = parser.parse_args()
    import psycopg

    try:
        psycopg.connect(f"{SERVER} dbname=test", connect_timeout=2).close()
    except psycopg.Error as error:
        raise SystemExit(f"PostgreSQL is not reachable on 127.0.0.1:5432: {error}") from None
    compiled()
    made: list[str] = []
    try:
        with sandbox_process() as info, tempfile.TemporaryDirectory(prefix="podsettle-bench-") as folder:
            jobs = Path(folder) / "jobs.jsonl"
            jobs.write_text("".join(json.dumps({"n": n}) + "\n" for n in range(options.jobs)))
            sqlite_store = f"sqlite:///{Path(folder) / 'store.db'}"
            sqlite_s, cpu = _run(sqlite_store, info, [(jobs, "bench-sqlite")])
            sqlite_rate = options.jobs / sqlite_s
            figure("processes.sqlite_1", sqlite_rate, "jobs/s", note=_note(sqlite_store, cpu, sqlite_s))
            rates: dict[int, float] = {}
            alone: dict[int, float] = {}
            cpus: dict[int, tuple[float, float, float, float]] = {}
            for count in options.processes:
                store = _database(psycopg, made)
                wall, cpu = _run(store, info, [(jobs, f"bench-pg-{count}")] * count)
                rate = options.jobs / wall
                rates[count] = rate
                cpus[count] = (cpu, wall, SERVICES["sandbox"], SERVICES["machine"])
                figure(
                    f"processes.postgres_{count}",
                    rate,
                    "jobs/s",
                    ratio_to=rate / sqlite_rate,
                    baseline="sqlite_1",
                    note=_note(store, cpu, wall),
                )
                if count == 1 or 1 not in rates:
                    continue
                figure(
                    f"processes.postgres_{count}_vs_1",
                    rate / rates[1],
                    "x",
                    note="aim: at least 1 (more processes never slower than one)",
                )
                # The same jobs split between `count` batches, one per process: what this machine
                # gives that many processes when they share nothing.
                store = _database(psycopg, made)
                parts = [(part, f"bench-alone-{n}") for n, part in enumerate(_split(jobs, count))]
                wall, cpu = _run(store, info, parts)
                alone[count] = options.jobs / wall
                figure(
                    f"processes.independent_{count}_vs_1",
                    alone[count] / rates[1],
                    "x",
                    note=f"{count} processes, each its own part of the jobs in a batch of its own; "
                    + _note(store, cpu, wall),
                )
                figure(
                    f"processes.postgres_{count}_vs_independent",
                    rate / alone[count],
                    "x",
                    note="one batch shared by the processes against the same jobs split between them "
                    "(what sharing costs)",
                )
            # Processes bound by their own concurrency (jobs that take time), not by the machine.
            slow_jobs = Path(folder) / "slow.jsonl"
            slow_jobs.write_text((json.dumps(SLOW_INPUT) + "\n") * options.slow_jobs)
            slow: dict[int, float] = {}
            for count in options.processes:
                store = _database(psycopg, made)
                wall, cpu = _run(store, info, [(slow_jobs, f"bench-slow-{count}")] * count, SLOW)
                slow[count] = options.slow_jobs / wall
                if count == 1:
                    figure("processes.slow_1", slow[1], "jobs/s", note=_note(store, cpu, wall))
                    continue
                figure(
                    f"processes.slow_{count}_vs_1",
                    slow[count] / slow[1],
                    "x",
                    note=f"{options.slow_jobs} jobs of 0.1 s, 8 in flight per process, one batch shared; "
                    "aim: at least 1; " + _note(store, cpu, wall),
                )
            if 1 in rates:
                print(
                    f"# aim: PostgreSQL 1 process within 1.2x of SQLite: SQLite/PostgreSQL = "
                    f"{sqlite_rate / rates[1]:.2f}x ({'met' if sqlite_rate / rates[1] <= 1.2 else 'not met'})"
                )
            print("# " + _limit(cpus, rates, alone, os.cpu_count() or 1))
    finally:
        with psycopg.connect(f"{SERVER} dbname=test", autocommit=True) as conn:
            for name in made:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
