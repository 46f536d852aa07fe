"""Submitting through /runsync keeps the engine's crash and cancel guarantees.

The production wiring submits RunPod jobs with `/runsync?wait=1000`: the run's id is known only
when that answer comes. So (1) an engine that dies while a runsync is in flight leaves a start it
cannot confirm, and the next engine submits the job again (compute may run twice; the escrow is
funded and released once), and (2) a job cannot be cancelled on RunPod until its id is back: the
engine refuses the cancel while the runsync is in flight, and cancels and refunds once it is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from podsettle import Settlements
from podsettle.bootstrap import Engine
from podsettle.domain import IllegalTransition, State
from podsettle.replay import audit
from podsettle.sandbox.app import Agent, Sandbox
from podsettle.sandbox.runpod_emulator import EmulatorState
from podsettle.sandbox.runpod_worker import EndpointConfig, Faults
from podsettle.settings import Settings

UNLIMITED = {name: 100_000 for name in ("create", "complete", "release", "dispute", "cancel")}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    endpoints = {
        "slow": EndpointConfig(
            handler="podsettle.sandbox.handlers:echo", faults=Faults(latency_ms=700), workers=4
        )
    }
    with Sandbox(
        endpoints=endpoints,
        escrow_options={"rate_limits": UNLIMITED, "dispute_review": "refund"},
        runpod_options={"rate_limits": {}},
    ) as running:
        yield running


def emulator(sandbox: Sandbox) -> EmulatorState:
    state: EmulatorState = sandbox.app.runpod.state.runpod
    return state


def settings(sandbox: Sandbox, store: Path, payer: Agent, worker: Agent) -> Settings:
    return Settings(
        store=f"sqlite:///{store}",
        escrow_url=sandbox.url,
        escrow_dialect="seed",
        pf_api_key=payer.api_key,
        runpod_api_key="sandbox-key",
        runpod_base_url=sandbox.runpod_url,
        payer=payer.agent_id,
        payee=worker.agent_id,
        escrow_rate_limits=UNLIMITED,
    )


async def until(condition: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_an_engine_dying_during_a_runsync_is_followed_by_a_resubmission_and_one_payment(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    payer, worker = sandbox.create_agent("100"), sandbox.create_agent("0")
    config = settings(sandbox, tmp_path / "store.db", payer, worker)
    runs = emulator(sandbox).endpoints["slow"]

    first = Engine.from_env(config)
    await first.start()
    job_id = await first.submit("slow", {"frame": 1}, budget="0.50")

    async def runsync_in_flight() -> bool:
        view = await first.job(job_id)
        return view.state == str(State.FUNDED) and bool(runs.in_progress)

    await until(runsync_in_flight, "the runsync to be running")
    assert emulator(sandbox).requests["runsync"] == 1
    # The engine dies: the start is attempted, its outcome never recorded. (An engine of this
    # process that is gone: its claims are not waited for, whatever the lease.)
    first.abandon()
    await first.compute.aclose()
    await first.escrow.aclose()

    async with Engine.from_env(config) as second:
        result = await second.wait(job_id)

    assert result.status == "paid" and result.output == {"frame": 1}
    assert emulator(sandbox).requests["runsync"] == 2 and len(runs.jobs) == 2  # compute ran twice
    assert result.runpod_job_id in runs.jobs
    stats = sandbox.app.escrow.state.escrow.stats()
    assert (stats["total_created"], stats["total_released"]) == (1, 1)  # money moved once
    ledger = sandbox.ledger()
    assert ledger["conserved"]
    balances = {a["account"]: Decimal(a["balance"]) for a in ledger["accounts"]}
    assert balances[worker.agent_id] == Decimal("0.495")
    assert balances[payer.agent_id] == Decimal("99.5")
    app = Settlements(config.store)
    try:
        report = audit(app)
    finally:
        app.close()
    assert report.ok


async def test_a_job_cannot_be_cancelled_until_its_runsync_answered_then_it_refunds(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    payer, worker = sandbox.create_agent("100"), sandbox.create_agent("0")
    runs = emulator(sandbox).endpoints["sleep"]
    async with Engine.from_env(settings(sandbox, tmp_path / "store.db", payer, worker)) as engine:
        job_id = await engine.submit("sleep", {"seconds": 30}, budget="1")

        async def runsync_in_flight() -> bool:
            view = await engine.job(job_id)
            return view.state == str(State.FUNDED) and bool(runs.in_progress)

        await until(runsync_in_flight, "the runsync to be running")
        # RunPod's id for the run is not known yet: there is nothing to cancel on RunPod.
        with pytest.raises(IllegalTransition, match="cancel"):
            await engine.cancel(job_id, "too early")

        async def running() -> bool:
            return (await engine.job(job_id)).state == str(State.RUNNING)

        await until(running, "the runsync to answer with the run's id", timeout_s=5)
        result = await engine.cancel(job_id, "changed my mind")

    assert result.status == "refunded" and result.reason == "changed my mind"
    assert result.runpod_job_id is not None
    assert runs.jobs[result.runpod_job_id].status.value == "CANCELLED"
    balances = {a["account"]: Decimal(a["balance"]) for a in sandbox.ledger()["accounts"]}
    assert balances[payer.agent_id] == Decimal("100")  # seed's cancel returns everything


async def test_a_run_that_ends_inside_its_runsync_is_recorded_started_and_ended_in_one_save(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    payer, worker = sandbox.create_agent("100"), sandbox.create_agent("0")
    config = settings(sandbox, tmp_path / "store.db", payer, worker)
    saved: list[list[str]] = []
    async with Engine.from_env(config) as engine:
        save_all = engine.app.save_all

        def recording(aggregates: Any) -> None:
            pending = [type(e).__name__ for a in aggregates for e in a._pending_events]
            saved.append(pending)
            save_all(aggregates)

        engine.app.save_all = recording  # type: ignore[method-assign]
        result = await engine.run_paid_job("echo", {"n": 1}, budget="0.50")

    assert result.status == "paid" and result.output == {"n": 1}
    assert emulator(sandbox).requests["runsync"] == 1
    # Started never stands alone in the log: no restart can find the job "running" with its result
    # lost (RunPod keeps a runsync result one minute only).
    together = [names for names in saved if "Started" in names]
    assert len(together) == 1
    assert together[0][:3] == ["Started", "Completed", "ReleaseRequested"]


async def test_the_operator_can_choose_run_over_runsync(sandbox: Sandbox, tmp_path: Path) -> None:
    payer, worker = sandbox.create_agent("100"), sandbox.create_agent("0")
    config = settings(sandbox, tmp_path / "store.db", payer, worker).model_copy(
        update={"runpod_runsync_ms": 0}
    )
    async with Engine.from_env(config) as engine:
        result = await engine.run_paid_job("echo", {"n": 2}, budget="0.50")
    assert result.status == "paid" and result.output == {"n": 2}
    assert emulator(sandbox).requests["runsync"] == 0 and emulator(sandbox).requests["run"] == 1
