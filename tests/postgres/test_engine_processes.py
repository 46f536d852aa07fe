"""Several `podsettle batch` processes (real OS processes) settle one batch on one PostgreSQL store,
against one sandbox served by a process of its own: each is given the whole batch with the same
batch id, and they split it by claims (the `Attempted` event, decided by the store's optimistic
concurrency). Every job is settled once, no intent is executed twice, the totals add up; and when
one process is SIGKILLed mid-batch, another takes over its claims after the lease."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from eventsourcing.utils import get_topic

from podsettle.application import Settlements
from podsettle.domain import EscrowJob, State

JOBS = 72
ROOT = Path(__file__).resolve().parents[2]
BATCH = "shared-batch"
LEASE_S = 65.0  # the shortest the engine accepts; a killed process of this machine is not waited for


class SandboxProcess:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.postgres.sandbox_process"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.info: dict[str, str] = json.loads(self.proc.stdout.readline())

    def held(self) -> Decimal:
        return Decimal(httpx.get(f"{self.info['url']}/sandbox/ledger", timeout=10).json()["held"])

    def finish(self) -> dict[str, Any]:
        out, _ = self.proc.communicate("", timeout=30)
        data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return data

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def sandbox() -> Any:
    made = SandboxProcess()
    yield made
    made.kill()


def _engine_env(store: str, sandbox: SandboxProcess, lease_s: float = 65.0) -> dict[str, str]:
    """The environment of an engine process. A claim's lease must outlast its longest attempt (a
    start waits for RunPod's synchronous answer while the job queues): with a lease of 1 s, live
    processes took over each other's start attempts and submitted those jobs twice."""
    info = sandbox.info
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODSETTLE_", "PF_", "RUNPOD_"))}
    return {
        **env,
        "PODSETTLE_STORE": store,
        "PODSETTLE_ESCROW_URL": info["url"],
        "PODSETTLE_ESCROW_DIALECT": "v1",
        "PF_API_KEY": info["payer_key"],
        "PODSETTLE_PAYER": info["payer"],
        "PODSETTLE_PAYEE": info["worker"],
        "RUNPOD_API_KEY": "sandbox-key",
        "RUNPOD_ENDPOINT_BASE_URL": info["runpod_url"],
        "PODSETTLE_ESCROW_RATE_LIMITS": "create=100000,release=100000,cancel=100000,dispute=100000",
        "PODSETTLE_CLAIM_LEASE_S": str(lease_s),
        "PODSETTLE_LOG_LEVEL": "WARNING",
    }


def _batch(env: dict[str, str], jobs: Path) -> subprocess.Popen[str]:
    # Few jobs in flight per process: one process alone takes several seconds, so a process started
    # later on a loaded machine still finds work (the tests check that they shared it).
    args = [
        "batch",
        str(jobs),
        "--endpoint",
        "sleep",
        "--budget",
        "0.50",
        "--batch-id",
        BATCH,
        "--concurrency",
        "4",
    ]
    # Its output goes to files, not pipes: the processes are waited for one by one, and one whose
    # pipe filled up meanwhile (64 KiB of log lines) would stop, holding its claims.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 (`_finish` closes)
    proc = subprocess.Popen(
        [sys.executable, "-m", "podsettle.cli", *args, "--concurrency", "4", "--json"],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=err,
        text=True,
    )
    OUTPUTS[proc.pid] = (out, err)
    return proc


OUTPUTS: dict[int, tuple[IO[str], IO[str]]] = {}


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for a batch process; what it wrote to stdout and stderr."""
    proc.wait(timeout)
    written = []
    for file in OUTPUTS.pop(proc.pid):
        file.seek(0)
        written.append(file.read())
        file.close()
    return written[0], written[1]


def _claims_of(app: Settlements, pid: int, step: str) -> int:
    """How many jobs have, as their last event, an attempt at `step` the process `pid` made (its
    open claims; a processor id names its process as `.../pid-N/...`)."""
    last: dict[Any, Any] = {}
    for note in app.recorder.select_notifications(1, 100_000):
        last[note.originator_id] = note
    attempted = get_topic(EscrowJob.Attempted)
    claims = [app.mapper.to_domain_event(note) for note in last.values() if note.topic == attempted]
    return sum(1 for claim in claims if f"/pid-{pid}/" in claim.processor and claim.step == step)


def _attempts(app: Settlements) -> list[Any]:
    topic = get_topic(EscrowJob.Attempted)
    return [
        app.mapper.to_domain_event(n) for n in app.recorder.select_notifications(1, 100_000, topics=[topic])
    ]


def _check_batch(
    store: str, sandbox: SandboxProcess, outputs: list[str], *, killed: bool = False
) -> tuple[list[Any], Counter[Any]]:
    """The batch as the store and the escrow service have it once every process is done. After a
    kill, a job whose escrow create the kill cut off may wait for an operator (ATTENTION, DESIGN.md's
    recovery rule): it is the only job allowed not to rest paid or refunded."""
    final_sandbox = sandbox.finish()
    app = Settlements(store)
    final = app.list_jobs(batch_id=BATCH)
    assert len(final) == JOBS
    parked = [job for job in final if job.state == State.ATTENTION]
    for job in final:
        assert job.violations(quiescent=True) == [], (job.id, job.violations(quiescent=True))
        if killed and job in parked:
            assert job.attention is not None and job.attention["step"] == "fund", job.summary()
            continue
        assert job.state in (State.RELEASED, State.REFUNDED), job.summary()
    escrows = final_sandbox["escrows"]
    assert set(escrows.values()) == {1}, f"a job was escrowed twice: {escrows}"
    assert JOBS - len(parked) <= len(escrows) <= JOBS
    ledger = final_sandbox["ledger"]
    assert ledger["conserved"] is True
    if not parked:
        assert Decimal(ledger["held"]) == 0
    # Totals: what each finishing process reported, the read model of the store, and the worker's
    # balance at the escrow service agree.
    paid = sum(1 for job in final if job.state == State.RELEASED)
    to_workers = sum((job.money.to_workers for job in final), Decimal(0))
    for out in outputs:
        totals = json.loads(out)["totals"]
        assert (totals["jobs"], totals["paid_jobs"]) == (JOBS, paid)
        assert Decimal(totals["to_workers"]) == to_workers
    views = subprocess.run(
        [sys.executable, "-m", "podsettle.cli", "totals", "--batch", BATCH, "--store", store, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    read = json.loads(views.stdout)
    assert (read["jobs"], read["paid_jobs"], Decimal(read["to_workers"])) == (JOBS, paid, to_workers)
    worker = next(a for a in ledger["accounts"] if a["account"] == sandbox.info["worker"])
    assert Decimal(worker["balance"]) == to_workers
    attempts = _attempts(app)
    app.close()
    return attempts, Counter((a.originator_id, a.step) for a in attempts)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_engine_processes_settle_one_batch_each_intent_once(
    processes: int, pg_database: Callable[[], str], sandbox: SandboxProcess, tmp_path: Path
) -> None:
    store = pg_database()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"seconds": 1.5, "n": n}) + "\n" for n in range(JOBS)))
    env = _engine_env(store, sandbox)
    running = [_batch(env, jobs) for _ in range(processes)]
    outputs = []
    for proc in running:
        out, err = _finish(proc, timeout=240)
        assert proc.returncode == 0, err
        outputs.append(out)
    attempts, per_intent = _check_batch(store, sandbox, outputs)
    assert set(per_intent.values()) == {1}, [k for k, v in per_intent.items() if v > 1]
    # The processes shared the work: more than one of them executed intents (the jobs last long
    # enough for a process started late on a loaded machine to find work left).
    assert len({a.processor for a in attempts}) > 1


@pytest.mark.slow
def test_a_killed_process_claims_are_taken_over_after_the_lease(
    pg_database: Callable[[], str], sandbox: SandboxProcess, tmp_path: Path
) -> None:
    store = pg_database()
    jobs = tmp_path / "jobs.jsonl"
    # Runs of 0.3 s: within the runsync wait, so that a start claim lasts the whole run.
    jobs.write_text("".join(json.dumps({"seconds": 0.3, "n": n}) + "\n" for n in range(JOBS)))
    env = _engine_env(store, sandbox, lease_s=LEASE_S)
    victim = _batch(env, jobs)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sandbox.held() == 0:
        time.sleep(0.05)
    survivor = _batch(env, jobs)
    time.sleep(0.8)
    # Kill it while it holds a start claim: its attempt to start a job is the last event of that
    # job (a start is redone by whoever takes it over, a second attempt; a create or a release may
    # be confirmed at the service instead). Seen held, it is stopped (SIGSTOP) and looked at again,
    # so that the claim cannot end between the look and the kill; it runs freely otherwise.
    watcher = Settlements(store)
    deadline = time.monotonic() + 60
    held = 0
    while time.monotonic() < deadline:
        if _claims_of(watcher, victim.pid, "start"):
            victim.send_signal(signal.SIGSTOP)
            held = _claims_of(watcher, victim.pid, "start")
            if held:
                break
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert held, "the first process never held a start claim to be killed on"
    watcher.close()
    victim.wait(10)
    assert victim.returncode == -signal.SIGKILL
    out, err = _finish(survivor, timeout=240)
    assert survivor.returncode in (0, 1), err  # 1: a job waits for an operator
    attempts, _ = _check_batch(store, sandbox, [out], killed=True)
    by_intent: dict[Any, list[Any]] = {}
    for attempt in attempts:
        by_intent.setdefault((attempt.originator_id, attempt.step), []).append(attempt)
    processors = {a.processor for a in attempts}
    assert len(processors) == 2, processors
    taken_over = {k: v for k, v in by_intent.items() if len(v) > 1}
    assert taken_over, "the kill left no claim to take over: it tested nothing"
    # An intent attempted twice was abandoned by the killed process and taken over by the other.
    for tries in taken_over.values():
        assert len(tries) == 2 and tries[0].processor != tries[1].processor, tries
        assert tries[0].attempt + 1 == tries[1].attempt
