"""Guards around starting a run: the input that runs is the input that was agreed, a result that
arrives past the deadline is refused as on any other path, and an input whose save failed is never
handed out."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from podsettle import Engine, Settlements
from podsettle.adapters.ports import EscrowCapabilities, RunOutcome
from podsettle.domain import ConflictingOutcome
from podsettle.requests import JobRequest, build_request
from podsettle.writer import JobWriter


async def test_an_input_that_does_not_match_its_digest_is_never_submitted() -> None:
    async with Engine.in_process("memory") as engine:
        agreed = engine.writer.job_input

        async def swapped(job_key: str) -> dict[str, Any] | None:
            payload = await agreed(job_key)
            return None if payload is None else {**payload, "prompt": "something else"}

        engine.writer.job_input = swapped  # type: ignore[method-assign]
        result = await engine.run_paid_job("echo", {"prompt": "agreed"}, "0.25")
        assert result.status == "refunded" and "digest" in (result.reason or "")
        assert result.runpod_job_id is None
        assert engine.compute.calls["run"] == 0  # type: ignore[attr-defined]


class FinishedBySubmit:
    """In-process compute that, like a runsync answer, brings the run's end with its id; and the
    engine's clock passes the job's deadline while the submission is under way."""

    def __init__(self, compute: Any, late: list[bool]) -> None:
        self._compute = compute
        self._late = late
        self._finished: dict[str, RunOutcome] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compute, name)

    async def submit(self, endpoint_id: str, job_input: dict[str, Any], **options: Any) -> str:
        run_id: str = await self._compute.submit(endpoint_id, job_input, **options)
        self._finished[run_id] = await self._compute.wait(endpoint_id, run_id, timeout_s=5)
        self._late.append(True)
        return run_id

    def take_finished(self, endpoint_id: str, run_id: str) -> RunOutcome | None:
        return self._finished.pop(run_id, None)


async def test_a_result_brought_by_the_submission_after_the_deadline_is_refused() -> None:
    late: list[bool] = []
    async with Engine.in_process("memory") as engine:
        engine.processor.compute = FinishedBySubmit(engine.processor.compute, late)
        on_time = await engine.run_paid_job("echo", {"n": 1}, "0.25", timeout_s=60)
        assert on_time.status == "paid"  # the same path, before the deadline: paid in one save
        late.clear()
        real_clock = engine.processor.clock
        engine.processor.clock = lambda: real_clock() + (timedelta(hours=1) if late else timedelta(0))
        result = await engine.run_paid_job("echo", {"n": 2}, "0.25", timeout_s=60)
    assert result.status == "refunded" and "deadline" in (result.reason or "")


async def test_an_input_is_handed_out_only_once_its_job_is_saved(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'events.db'}"
    deadline = datetime.now(UTC) + timedelta(hours=1)

    def spec(payload: dict[str, Any]) -> JobRequest:
        return build_request(
            job_key="order-17",
            endpoint_id="echo",
            job_input=payload,
            budget="0.25",
            payer="ag_payer",
            payee="ag_worker",
            now=deadline - timedelta(hours=1),
            timeout_s=3600,
            body_and_limit=lambda size, **_: (size, 10_000_000),
            escrow=EscrowCapabilities(idempotent_create=True, lookup_by_key=True, cancel=True),
        )

    first = JobWriter(Settlements(store))
    await first.open([spec({"prompt": "A"})])
    await first.aclose()

    # Another engine, cold, is asked to open the same key with another input: the save fails. While
    # it runs, a processor of that engine asks for the job's input.
    app = Settlements(store)
    saving, release = threading.Event(), threading.Event()
    save_all = app.save_all

    def slow_save(aggregates: Any) -> None:
        saving.set()
        release.wait(5)
        save_all(aggregates)

    app.save_all = slow_save  # type: ignore[method-assign]
    second = JobWriter(app)
    opening = asyncio.ensure_future(second.open([spec({"prompt": "B"})]))
    await asyncio.to_thread(saving.wait, 5)
    asking = asyncio.ensure_future(second.job_input("order-17"))
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(ConflictingOutcome):
        await opening
    assert await asking == {"prompt": "A"}
    await second.aclose()
