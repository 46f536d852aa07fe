"""Stopping a batch (SIGINT, SIGTERM) and living through an outage, as a person at a terminal meets
them: the process is the real command line, the services a sandbox over loopback."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from typer.testing import CliRunner

from podsettle.application import Settlements
from podsettle.cli import app
from podsettle.cli.stopping import ESCROW, OutageWatch
from podsettle.domain import State
from podsettle.sandbox.app import Sandbox

runner = CliRunner()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    limits = {"create": 10_000, "complete": 10_000, "release": 10_000, "dispute": 10_000}
    with Sandbox(escrow_options={"dispute_review": "refund", "rate_limits": limits}) as served:
        yield served


@pytest.fixture
def env(sandbox: Sandbox, tmp_path: Path) -> dict[str, str]:
    payer = sandbox.create_agent("50")
    worker = sandbox.create_agent("0")
    return {
        "PODSETTLE_STORE": f"sqlite:///{tmp_path / 'store.db'}",
        "PODSETTLE_ESCROW_URL": sandbox.url,
        "PF_API_KEY": payer.api_key,
        "PODSETTLE_PAYER": payer.agent_id,
        "PODSETTLE_PAYEE": worker.agent_id,
        "RUNPOD_API_KEY": "sandbox-key",
        "RUNPOD_ENDPOINT_BASE_URL": sandbox.runpod_url,
        "PODSETTLE_ESCROW_RATE_LIMITS": "create=10000,release=10000,dispute=10000",
        "PODSETTLE_JOB_TIMEOUT_S": "60",
        "PODSETTLE_REFUND_WAIT_S": "10",
        "PODSETTLE_REFUND_POLL_S": "0.05",
    }


def invoke(env: dict[str, str], *args: str) -> Any:
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def account(sandbox: Sandbox, agent: str) -> dict[str, str]:
    (found,) = [a for a in sandbox.ledger()["accounts"] if a["account"] == agent]
    return found


def released(env: dict[str, str]) -> int:
    if not Path(env["PODSETTLE_STORE"].removeprefix("sqlite:///")).exists():
        return 0
    listed = invoke(env, "jobs", "--state", "released", "--json")
    return len(json.loads(listed.stdout)) if listed.exit_code == 0 else 0


def stop_batch(
    env: dict[str, str],
    jobs: Path,
    *options: str,
    when: Callable[[], bool],
    sig: signal.Signals = signal.SIGTERM,
    after_s: float = 0.0,
) -> tuple[int, str, str]:
    """Run `podsettle batch JOBS OPTIONS` in a process of its own, send it `sig` once `when()` holds
    (and `after_s` more seconds passed), and wait for it: its exit code, stdout and stderr."""
    child = subprocess.Popen(
        [sys.executable, "-m", "podsettle.cli", "batch", str(jobs), *options],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not when():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.1)
        time.sleep(after_s)
        child.send_signal(sig)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return child.returncode, out, err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_batch_says_what_is_done_and_left_and_resume_finishes_it(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(f'{{"seconds": 0.4, "n": {n}}}\n' for n in range(12)))
    returncode, out, err = stop_batch(
        env, jobs, "--endpoint", "sleep", "--budget", "0.50", "--concurrency", "2",
        when=lambda: released(env) >= 2, sig=sig,
    )  # fmt: skip
    assert returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and not any(line.startswith("{") for line in lines), err
    stopped = next(line for line in lines if line.startswith("podsettle: stopped by"))
    assert stopped.startswith(f"podsettle: stopped by {sig.name}: ") and "of 12 job(s) finished" in stopped
    finished = int(stopped.split(": ")[2].split()[0])
    assert 2 <= finished < 12
    assert f"{12 - finished} left" in stopped
    assert lines[-1] == "podsettle: to finish them: podsettle resume"
    assert out == ""  # no totals of a batch that did not end

    # What was saved is consistent: the released jobs paid the worker exactly what the log says.
    so_far = json.loads(invoke(env, "totals", "--json").stdout)
    assert so_far["jobs"] == 12
    assert Decimal(account(sandbox, env["PODSETTLE_PAYEE"])["balance"]) == Decimal(so_far["to_workers"])

    resumed = invoke(env, "resume", "--json")
    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr)
    totals = json.loads(invoke(env, "totals", "--json").stdout)
    assert totals["paid_jobs"] == 12
    assert account(sandbox, env["PODSETTLE_PAYER"])["held"] == "0.000000"
    assert Decimal(account(sandbox, env["PODSETTLE_PAYEE"])["balance"]) == Decimal(totals["to_workers"])
    assert Decimal(totals["funded"]) == Decimal("6.000000")
    assert invoke(env, "replay").exit_code == 0
    assert sandbox.ledger()["conserved"] is True


def test_a_batch_stopped_before_its_last_chunk_is_opened_is_finished_by_running_it_again(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(f'{{"seconds": 0.4, "n": {n}}}\n' for n in range(12)))
    returncode, _, err = stop_batch(
        env, jobs, "--endpoint", "sleep", "--budget", "0.50", "--concurrency", "2", "--chunk-size", "2",
        when=lambda: released(env) >= 2, sig=signal.SIGINT,
    )  # fmt: skip
    assert returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    stopped = next(line for line in lines if line.startswith("podsettle: stopped by SIGINT"))
    finished = int(stopped.split(": ")[2].split()[0])
    assert 2 <= finished < 12 and f"{12 - finished} left" in stopped
    # Only whole chunks were opened, a few ahead of the jobs running: `resume` knows only those.
    opened = json.loads(invoke(env, "totals", "--json").stdout)["jobs"]
    assert opened % 2 == 0 and finished <= opened < 12
    assert lines[-1].startswith(f"podsettle: {12 - opened} of them are not opened yet; ")
    again = shlex.split(lines[-1].split("run it again with its id: ")[1])
    assert again[:3] == ["podsettle", "batch", str(jobs)] and "--batch-id" in again

    finished_run = invoke(env, *again[1:])
    assert finished_run.exit_code == 0, finished_run.stderr
    totals = json.loads(invoke(env, "totals", "--json").stdout)
    assert (totals["jobs"], totals["paid_jobs"]) == (12, 12)
    assert Decimal(totals["funded"]) == Decimal("6.000000")  # each job escrowed once
    assert Decimal(account(sandbox, env["PODSETTLE_PAYEE"])["balance"]) == Decimal(totals["to_workers"])
    assert account(sandbox, env["PODSETTLE_PAYER"])["held"] == "0.000000"


def test_a_stop_during_an_escrow_create_waits_for_its_answer_so_nothing_is_left_unknown(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    """The published service cannot be asked whether a create happened: a create cut off by a stop
    would leave its job for an operator. A stop lets the calls that move money finish and records
    their outcomes first; then `resume` pays every job and nothing waits for an operator."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(f'{{"n": {n}}}\n' for n in range(3)))
    # Every create (the payer check's included) answers after 2 s; the work is done at once.
    fault = {"route": "create", "mode": "delay", "delay_s": 2, "count": 10}
    httpx.post(f"{sandbox.url}/sandbox/faults", json=fault, timeout=10).raise_for_status()
    store = Path(env["PODSETTLE_STORE"].removeprefix("sqlite:///"))

    def all_opened() -> bool:
        return store.exists() and json.loads(invoke(env, "totals", "--json").stdout)["jobs"] == 3

    try:
        # Stopped 0.5 s after: the first job's create is on its way (it answers 2 s after it was sent).
        returncode, _, err = stop_batch(
            env, jobs, "--endpoint", "echo", "--budget", "0.50", "--concurrency", "1",
            when=all_opened, after_s=0.5,
        )  # fmt: skip
    finally:
        httpx.delete(f"{sandbox.url}/sandbox/faults", timeout=10)
    assert returncode == 143, err
    assert "podsettle: stopped by SIGTERM" in err
    waiting = json.loads(invoke(env, "jobs", "--state", "attention", "--json").stdout)
    assert waiting == []
    # The create that finished during the stop recorded its job funded, and claimed nothing next:
    # nobody here would start it, and an engine elsewhere would wait the claim's lease for it.
    watcher = Settlements(env["PODSETTLE_STORE"])
    try:
        funded = [watcher.get_job(i) for i in watcher.job_ids() if watcher.get_job(i).state == State.FUNDED]
    finally:
        watcher.close()
    assert len(funded) == 1 and funded[0].intent is not None and funded[0].intent.attempts == 0

    resumed = invoke(env, "resume", "--json")
    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr)
    totals = json.loads(invoke(env, "totals", "--json").stdout)
    assert (totals["jobs"], totals["paid_jobs"]) == (3, 3)
    assert account(sandbox, env["PODSETTLE_PAYER"])["held"] == "0.000000"
    assert invoke(env, "replay").exit_code == 0


def test_a_stop_while_creates_are_refused_leaves_nothing_for_an_operator(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    """The service answers every create with a 429 (nothing done) and the batch is stopped while its
    jobs retry: each refused attempt is recorded as having done nothing, so `resume` makes new
    attempts and pays the jobs, instead of asking the published service about creates it cannot
    tell of (and parking the jobs for an operator)."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(f'{{"n": {n}}}\n' for n in range(2)))
    # The first create is the payer check's (it must pass); the jobs' are refused after it.
    httpx.post(
        f"{sandbox.url}/sandbox/faults", json={"route": "create", "mode": "delay", "delay_s": 0}, timeout=10
    ).raise_for_status()
    refused = {"route": "create", "mode": "rate_limit", "count": 10_000}
    httpx.post(f"{sandbox.url}/sandbox/faults", json=refused, timeout=10).raise_for_status()
    store = Path(env["PODSETTLE_STORE"].removeprefix("sqlite:///"))

    def refused_twice() -> bool:  # both jobs were refused at least twice
        if not store.exists():
            return False
        watcher = Settlements(env["PODSETTLE_STORE"])
        try:
            intents = [watcher.get_job(i).intent for i in watcher.job_ids()]
        finally:
            watcher.close()
        return len(intents) == 2 and all(i is not None and i.attempts >= 2 for i in intents)

    try:
        returncode, _, err = stop_batch(
            env, jobs, "--endpoint", "echo", "--budget", "0.50", when=refused_twice
        )
    finally:
        httpx.delete(f"{sandbox.url}/sandbox/faults", timeout=10)
    assert returncode == 143, err

    resumed = invoke(env, "resume", "--json")
    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr)
    assert sorted(r["status"] for r in json.loads(resumed.stdout)) == ["paid", "paid"]
    assert json.loads(invoke(env, "jobs", "--state", "attention", "--json").stdout) == []
    assert account(sandbox, env["PODSETTLE_PAYER"])["held"] == "0.000000"
    assert invoke(env, "replay").exit_code == 0


def test_a_job_waiting_for_a_create_slot_has_claimed_nothing_when_the_batch_stops(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    """Two creates a minute (the payer check takes one): the second job waits for its slot before it
    claims its create, so a stop during the wait leaves it unattempted, and `resume` funds it."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(f'{{"n": {n}}}\n' for n in range(2)))
    slow = {
        **env,
        "PODSETTLE_ESCROW_RATE_LIMITS": "create=2,release=10000,dispute=10000",
        "PODSETTLE_JOB_TIMEOUT_S": "600",
    }
    # Stopped once the first job is paid, while the second waits for its slot.
    returncode, _, err = stop_batch(
        slow, jobs, "--endpoint", "echo", "--budget", "0.50", when=lambda: released(env) >= 1, after_s=0.5
    )
    assert returncode == 143, err
    watcher = Settlements(env["PODSETTLE_STORE"])
    try:
        waiting = [watcher.get_job(i) for i in watcher.job_ids() if watcher.get_job(i).state == State.FUNDING]
    finally:
        watcher.close()
    assert len(waiting) == 1 and waiting[0].intent is not None and waiting[0].intent.attempts == 0

    resumed = invoke(env, "resume", "--json")
    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr)
    assert [r["status"] for r in json.loads(resumed.stdout)] == ["paid"]
    assert account(sandbox, env["PODSETTLE_PAYER"])["held"] == "0.000000"


def test_an_outage_is_one_line_when_it_starts_and_one_when_it_ends(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(f'{{"n": {n}}}\n' for n in range(4)))
    # The escrow service fails the next 12 releases before doing anything (a 5xx): the jobs retry.
    # (Not creates: the payer check before the batch takes a create slot, and would fail first.)
    fault = {"route": "release", "mode": "error_before", "count": 12}
    httpx.post(f"{sandbox.url}/sandbox/faults", json=fault, timeout=10).raise_for_status()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "podsettle.cli", "batch", str(jobs), "--endpoint", "echo",
             "--budget", "0.50", "--json"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        httpx.delete(f"{sandbox.url}/sandbox/faults", timeout=10)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, done.stderr  # not one per retry, and no JSON lines
    assert lines[0].startswith(f"podsettle: {ESCROW} is not answering (")
    assert lines[1].startswith(f"podsettle: {ESCROW} answers again (after ") and "retries)" in lines[1]
    assert json.loads(done.stdout)["totals"]["paid_jobs"] == 4
    in_store = json.loads(invoke(env, "totals", "--json").stdout)
    assert (in_store["jobs"], in_store["paid_jobs"]) == (4, 4)  # each job once

    # With PODSETTLE_LOG_LEVEL set, the engine's JSON warning lines are there as well.
    httpx.post(f"{sandbox.url}/sandbox/faults", json={**fault, "count": 2}, timeout=10).raise_for_status()
    try:
        logged = subprocess.run(
            [sys.executable, "-m", "podsettle.cli", "run", "--endpoint", "echo", "--input", '{"n": 9}',
             "--budget", "0.50"],
            env={**os.environ, **env, "PODSETTLE_LOG_LEVEL": "WARNING"}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
    finally:
        httpx.delete(f"{sandbox.url}/sandbox/faults", timeout=10)
    assert logged.returncode == 0, logged.stderr
    warnings = [json.loads(line) for line in logged.stderr.splitlines() if line.startswith("{")]
    assert [w["event"] for w in warnings].count("escrow.bad_response") == 2  # one per failed call
    assert sum("is not answering" in line for line in logged.stderr.splitlines()) == 1


def test_the_watch_prints_changes_only() -> None:
    printed: list[str] = []
    now = [100.0]
    watch = OutageWatch(show_level=40, echo=printed.append, clock=lambda: now[0])
    retry = {"event": "effect.retry", "step": "fund", "error": "cannot reach the service"}
    for _ in range(50):
        with pytest.raises(structlog.DropEvent):
            watch(None, "warning", dict(retry))
    start = {"event": "effect.retry", "step": "start", "error": "503"}
    with pytest.raises(structlog.DropEvent):
        watch(None, "warning", dict(start))
    now[0] = 130.0
    with pytest.raises(structlog.DropEvent):
        watch(None, "info", {"event": "escrow.funded"})
    assert printed == [
        "podsettle: the escrow service is not answering (cannot reach the service); the jobs wait and retry",
        "podsettle: RunPod is not answering (503); the jobs wait and retry",
        "podsettle: the escrow service answers again (after 30 s, 50 retries)",
    ]
    assert watch(None, "error", {"event": "engine.failed"}) == {"event": "engine.failed"}
