"""InProcessCompute: the emulator's endpoints and faults without HTTP, fast and deterministic."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from podsettle.adapters.ports import ComputeGateway, NotFound, RateLimited, Rejected, RunStatus, Unavailable
from podsettle.sandbox.inprocess_compute import InProcessCompute
from podsettle.sandbox.runpod_worker import EndpointConfig, Faults, PolicyBounds
from tests import runpod_user_handlers as user

SHORT = PolicyBounds(min_execution_timeout_ms=1, min_ttl_ms=1)


class ShiftableClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
async def compute() -> AsyncIterator[InProcessCompute]:
    endpoints = {
        "count": EndpointConfig(handler="tests.runpod_user_handlers:count"),
        "tokens": EndpointConfig(
            handler="tests.runpod_user_handlers:async_tokens", return_aggregate_stream=True
        ),
        "sync-tokens": EndpointConfig(handler=user.tokens),
    }
    async with InProcessCompute(endpoints, seed=1, policy_bounds=SHORT) as gateway:
        yield gateway


async def test_it_is_a_compute_gateway(compute: InProcessCompute) -> None:
    assert isinstance(compute, ComputeGateway)


async def test_success_and_every_status_field(compute: InProcessCompute) -> None:
    run_id = await compute.submit("echo", {"prompt": "hi"})
    outcome = await compute.wait("echo", run_id, timeout_s=5)
    assert outcome.succeeded and outcome.reason == "completed"
    state = outcome.state
    assert state.output == {"prompt": "hi"} and state.worker_id and state.worker_id.startswith("echo-w")
    assert state.delay_ms is not None and state.execution_ms is not None
    assert await compute.status("echo", run_id) == state


@pytest.mark.parametrize(
    ("endpoint_id", "job_input", "status", "reason"),
    [
        ("fail", {"message": "no GPU"}, RunStatus.FAILED, "failed: RuntimeError: no GPU"),
        ("no-output", {}, RunStatus.COMPLETED, "completed without output"),
        ("echo", {}, RunStatus.COMPLETED, "completed without output"),  # an empty dict is no output
    ],
)
async def test_failures_are_classified(
    compute: InProcessCompute, endpoint_id: str, job_input: dict[str, Any], status: RunStatus, reason: str
) -> None:
    outcome = await compute.wait(endpoint_id, await compute.submit(endpoint_id, job_input), timeout_s=5)
    assert (outcome.state.status, outcome.succeeded, outcome.reason) == (status, False, reason)


async def test_cancel_timeout_and_retry(compute: InProcessCompute) -> None:
    slow = await compute.submit("sleep", {"seconds": 30})
    assert (await compute.cancel("sleep", slow)).status is RunStatus.CANCELLED
    assert (await compute.wait("sleep", slow, timeout_s=5)).reason == "cancelled"
    timed = await compute.submit("sleep", {"seconds": 30}, execution_timeout_ms=20)
    outcome = await compute.wait("sleep", timed, timeout_s=5)
    assert outcome.state.status is RunStatus.TIMED_OUT
    assert (await compute.retry("sleep", timed)).status is RunStatus.IN_QUEUE
    with pytest.raises(Rejected, match="only FAILED or TIMED_OUT"):
        await compute.retry("sleep", slow)


async def test_ttl_expiry_is_not_found() -> None:
    clock = ShiftableClock()
    async with InProcessCompute(clock=clock, policy_bounds=SHORT) as compute:
        run_id = await compute.submit("sleep", {"seconds": 30}, ttl_ms=10_000)
        clock.offset += 11
        outcome = await compute.wait("sleep", run_id, timeout_s=5)
        assert outcome.reason.startswith("not found (404)")
        with pytest.raises(NotFound):
            await compute.status("sleep", run_id)


async def test_stuck_jobs_hit_the_deadline_and_purge_removes_them(compute: InProcessCompute) -> None:
    compute.set_faults("echo", stuck_rate=1.0)
    run_id = await compute.submit("echo", {"a": 1})
    outcome = await compute.wait("echo", run_id, timeout_s=0.05)
    assert outcome.reason == "deadline passed" and outcome.state.status is RunStatus.IN_QUEUE
    assert (await compute.health("echo"))["jobs"]["inQueue"] == 1
    assert await compute.purge_queue("echo") == 1


async def test_a_job_executed_twice_runs_the_handler_twice(compute: InProcessCompute) -> None:
    compute.set_faults("count", duplicate_rate=1.0)
    run_id = await compute.submit("count", {"tag": "dup"})
    assert (await compute.wait("count", run_id, timeout_s=5)).succeeded
    job = compute.state.endpoints["count"].jobs[run_id]
    for _ in range(1000):
        if job.completions == 2:
            break
        await asyncio.sleep(0)
    assert job.executions == 2 and user.EXECUTIONS[run_id] == 2


async def test_http_faults_surface_as_the_adapters_errors(compute: InProcessCompute) -> None:
    compute.set_faults("echo", http_429_next=1, http_5xx_next=1, drop_next=1)
    with pytest.raises(RateLimited):
        await compute.submit("echo", {"a": 1})
    with pytest.raises(Unavailable, match="502"):
        await compute.submit("echo", {"a": 1})
    with pytest.raises(Unavailable, match="may have been queued"):
        await compute.submit("echo", {"a": 1})
    assert len(compute.state.endpoints["echo"].jobs) == 1  # only the dropped one was queued
    assert compute.calls["run"] == 3


async def test_generators_and_callables_as_handlers(compute: InProcessCompute) -> None:
    a = await compute.wait("tokens", await compute.submit("tokens", {"text": "x y"}), timeout_s=5)
    b_id = await compute.submit("sync-tokens", {"text": "x y"})
    b = await compute.wait("sync-tokens", b_id, timeout_s=5)
    assert a.state.output == ["X", "Y"]  # return_aggregate_stream: the parts are the output
    # Without it, as on RunPod: COMPLETED with output [], the parts only on /stream.
    assert (b.state.status, b.state.has_output, b.state.output) == (RunStatus.COMPLETED, True, [])
    job = compute.state.endpoints["sync-tokens"].jobs[b_id]
    assert compute.state.endpoints["sync-tokens"].take_stream(job) == [{"output": "x"}, {"output": "y"}]


async def test_webhooks_go_to_the_sink(compute: InProcessCompute) -> None:
    received: list[tuple[str, dict[str, Any]]] = []

    async def sink(url: str, payload: dict[str, Any]) -> None:
        received.append((url, payload))

    async with InProcessCompute(webhook_sink=sink) as gateway:
        run_id = await gateway.submit("echo", {"a": 1}, webhook="https://hooks.test/x")
        await gateway.wait("echo", run_id, timeout_s=5)
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0)
    assert received == [("https://hooks.test/x", {**received[0][1]})]
    assert received[0][1]["id"] == run_id and received[0][1]["output"] == {"a": 1}


async def test_bad_input_is_rejected(compute: InProcessCompute) -> None:
    with pytest.raises(Rejected, match="over the 10485760-byte limit"):
        await compute.submit("echo", {"blob": "x" * (10 * 1024 * 1024 + 1)})
    with pytest.raises(Rejected, match="not JSON serializable"):
        await compute.submit("echo", {"x": object()})
    with pytest.raises(NotFound, match="endpoint nowhere does not exist"):
        await compute.submit("nowhere", {})
    with pytest.raises(Rejected, match=r"policy\.ttl"):
        await compute.submit("echo", {"a": 1}, ttl_ms=10**12)


async def test_the_handler_gets_its_own_copy_of_the_input(compute: InProcessCompute) -> None:
    job_input = {"nested": {"n": 1}}
    outcome = await compute.wait("echo", await compute.submit("echo", job_input), timeout_s=5)
    assert outcome.state.output == job_input and outcome.state.output is not job_input


async def _run_seeded(seed: int) -> list[tuple[str, str, str]]:
    endpoints = {
        "faulty": EndpointConfig(handler="podsettle.sandbox.handlers:echo", faults=Faults(failure_rate=0.3))
    }
    async with InProcessCompute(endpoints, seed=seed) as compute:
        compute.set_faults("faulty", no_output_rate=0.2, drop_rate=0.1)
        results = []
        for n in range(40):
            endpoint_id = "flaky" if n % 2 else "faulty"
            try:
                run_id = await compute.submit(endpoint_id, {"n": n})
            except Unavailable:
                results.append((endpoint_id, "dropped", ""))
                continue
            outcome = await compute.wait(endpoint_id, run_id, timeout_s=5)
            results.append((run_id, outcome.state.status.value, outcome.reason.split(":")[0]))
    return results


async def test_a_seed_replays_ids_faults_and_flaky_draws() -> None:
    first, again, other = await _run_seeded(42), await _run_seeded(42), await _run_seeded(43)
    assert first == again
    assert first != other
    reasons = {reason for _, _, reason in first}
    assert {"completed", "failed", "completed without output"} <= reasons


async def test_thousands_of_concurrent_jobs_all_complete() -> None:
    async with InProcessCompute({"fast": EndpointConfig(handler=user.count, workers=8)}) as compute:
        run_ids = await asyncio.gather(*(compute.submit("fast", {"tag": "bulk"}) for _ in range(3000)))
        outcomes = await asyncio.gather(*(compute.wait("fast", r, timeout_s=30) for r in run_ids))
        assert len(set(run_ids)) == 3000 and all(o.succeeded for o in outcomes)
        assert (await compute.health("fast"))["jobs"]["completed"] == 3000


def test_one_gateway_serves_callers_on_successive_event_loops() -> None:
    compute = InProcessCompute(seed=3)

    async def one(n: int) -> bool:
        run_id = await compute.submit("echo", {"n": n})
        return (await compute.wait("echo", run_id, timeout_s=5)).succeeded

    assert asyncio.run(one(1))
    assert asyncio.run(one(2))  # the first loop is closed; workers start again on this one
    asyncio.run(compute.aclose())


def test_importing_the_compute_adapters_stays_light() -> None:
    code = (
        "import sys, podsettle.sandbox.inprocess_compute, podsettle.adapters.runpod;"
        "print(','.join(m for m in ('runpod', 'starlette', 'uvicorn', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


async def test_an_output_that_json_cannot_carry_fails_the_job() -> None:
    def nan(job: dict[str, Any]) -> dict[str, float]:
        return {"loss": float("nan")}

    async with InProcessCompute({"nan": EndpointConfig(handler=nan)}) as compute:
        outcome = await compute.wait("nan", await compute.submit("nan", {"a": 1}), timeout_s=5)
    assert outcome.state.status is RunStatus.FAILED and "not JSON serializable" in outcome.reason
