"""A real crash: `podsettle batch` runs as its own OS process against the sandbox over HTTP, is
killed with SIGKILL mid-batch, started again with the same batch id, and finishes the batch. Money
is conserved, no job has two escrows, none is settled twice, and every job rests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from podsettle.application import Settlements
from podsettle.domain import State
from podsettle.sandbox.app import Sandbox

JOBS = 30


def _cli(env: dict[str, str], args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "podsettle.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dialect", ["v1", "seed"])
def test_a_killed_engine_process_finishes_its_batch_after_a_restart(tmp_path: Path, dialect: str) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"seconds": 0.25, "n": n}) + "\n" for n in range(JOBS)))
    with Sandbox(
        escrow_options={"rate_limits": {"create": 10_000, "release": 10_000, "cancel": 10_000}}
    ) as sandbox:
        payer = sandbox.create_agent("100")
        worker = sandbox.create_agent("0")
        env = {
            **os.environ,
            "PODSETTLE_STORE": store,
            "PODSETTLE_ESCROW_URL": sandbox.url,
            "PODSETTLE_ESCROW_DIALECT": dialect,
            "PF_API_KEY": payer.api_key,
            "PODSETTLE_PAYER": payer.agent_id,
            "PODSETTLE_PAYEE": worker.agent_id,
            "RUNPOD_API_KEY": "sandbox-key",
            "RUNPOD_ENDPOINT_BASE_URL": sandbox.runpod_url,
            "PODSETTLE_LOG_LEVEL": "WARNING",
            "PODSETTLE_ESCROW_RATE_LIMITS": "create=10000,release=10000,cancel=10000,dispute=10000",
        }
        args = [
            "batch",
            str(jobs),
            "--endpoint",
            "sleep",
            "--budget",
            "0.50",
            "--batch-id",
            "kill-1",
            "--concurrency",
            "6",
            "--json",
        ]
        first = _cli(env, args)
        # Kill it once some jobs are funded and others are still to come.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            held = sandbox.ledger()["held"]
            if held not in ("0.000000", "0"):
                break
            time.sleep(0.05)
        time.sleep(0.6)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert first.returncode == -signal.SIGKILL
        mid = Settlements(store)
        states = Counter(str(job.state) for job in mid.list_jobs())
        assert sum(states.values()) == JOBS, "the batch is opened whole before any job runs"
        assert states["RELEASED"] < JOBS, f"the kill came too late to test anything: {states}"

        second = _cli(env, args)
        out, err = second.communicate(timeout=120)
        assert second.returncode in (0, 1), err
        totals = json.loads(out)["totals"]
        ledger = sandbox.ledger()
        state = sandbox.app.escrow.state.escrow  # the escrow sandbox's state
        with state.ledger.transaction() as tx:
            rows = tx.execute("SELECT description FROM sandbox_escrows").fetchall()
        descriptions = Counter(row[0] for row in rows)

    app = Settlements(store)
    final = app.list_jobs(batch_id="kill-1")
    assert len(final) == JOBS
    for job in final:
        assert job.violations(quiescent=True) == [], (job.id, job.violations(quiescent=True))
        assert job.state in (State.RELEASED, State.REFUNDED, State.REJECTED, State.ATTENTION), job.summary()
    assert ledger["conserved"] is True
    assert all(count == 1 for count in descriptions.values()), f"a job was escrowed twice: {descriptions}"
    paid = sum(1 for job in final if job.state == State.RELEASED)
    assert totals["paid_jobs"] == paid
    parked = [job for job in final if job.state == State.ATTENTION]
    # Only a create whose answer the kill cut off can be ambiguous, and only without an idempotency key.
    for job in parked:
        assert job.attention is not None and job.attention["step"] == "fund"
    if not parked:
        # What the totals call still held is what the escrow service's ledger holds.
        assert Decimal(totals["still_held"]) == Decimal(ledger["held"])
