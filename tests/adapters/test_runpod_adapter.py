"""The RunPod adapter against the emulator over real HTTP: every status and every failure mode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from itertools import count
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from podsettle.adapters.ports import ComputeGateway, NotFound, RateLimited, Rejected, RunStatus, Unavailable
from podsettle.adapters.runpod import (
    MAX_INPUT_BYTES,
    PollPolicy,
    RunPodCompute,
    SyncPolicy,
    body_size,
    request_body,
)
from podsettle.domain.digests import canonical_json
from podsettle.sandbox.http_server import BackgroundServer
from podsettle.sandbox.runpod_emulator import (
    EmulatorState,
    EndpointConfig,
    PolicyBounds,
    RouteLimit,
    create_runpod_app,
)
from tests import runpod_user_handlers as user

KEY = "rp-test-key-7f3a"
FAST_POLL = PollPolicy(initial_s=0.005, factor=2.0, max_s=0.05, jitter=0.2)
SHORT_BOUNDS = PolicyBounds(min_execution_timeout_ms=1, min_ttl_ms=1)
_ids = count()


class ShiftableClock:
    """Real monotonic time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture(scope="module")
def emulator() -> Iterator[BackgroundServer]:
    app = create_runpod_app(
        endpoints={
            "count": EndpointConfig(handler="tests.runpod_user_handlers:count", workers=2),
            "serial": EndpointConfig(handler="tests.runpod_user_handlers:tagged_sleep", workers=1),
            "async-double": EndpointConfig(handler="tests.runpod_user_handlers:async_double"),
            "tokens": EndpointConfig(
                handler="tests.runpod_user_handlers:tokens", return_aggregate_stream=True
            ),
            "async-tokens": EndpointConfig(
                handler="tests.runpod_user_handlers:async_tokens", return_aggregate_stream=True
            ),
            "broken-stream": EndpointConfig(handler="tests.runpod_user_handlers:broken_stream"),
            "error-object": EndpointConfig(handler="tests.runpod_user_handlers:error_object"),
            "error-text": EndpointConfig(handler="tests.runpod_user_handlers:error_text"),
            "not-json": EndpointConfig(handler="tests.runpod_user_handlers:not_json"),
            "short-retention": EndpointConfig(
                handler="podsettle.sandbox.handlers:echo", result_retention_s=0.05
            ),
        },
        seed=7,
        policy_bounds=SHORT_BOUNDS,
        webhook_retry_interval_s=0.02,
        webhook_timeout_s=2.0,
    )
    with BackgroundServer(app) as server:
        _APPS[server.port] = app
        yield server


_APPS: dict[int, Starlette] = {}


def state_of(server: BackgroundServer) -> EmulatorState:
    state: EmulatorState = _APPS[server.port].state.runpod
    return state


@pytest.fixture
async def compute(emulator: BackgroundServer) -> AsyncIterator[RunPodCompute]:
    async with RunPodCompute(KEY, base_url=f"{emulator.url}/v2", poll=FAST_POLL, seed=1) as client:
        yield client


def admin(server: BackgroundServer) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/v2", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)


def mount(server: BackgroundServer, handler: str, **options: Any) -> str:
    """A fresh endpoint (so faults set by one test never leak into another)."""
    endpoint_id = f"ep-{next(_ids)}"
    with admin(server) as client:
        response = client.put(f"/{endpoint_id}/_endpoint", json={"handler": handler, **options})
        assert response.status_code == 200, response.text
    return endpoint_id


ECHO = "podsettle.sandbox.handlers:echo"


async def until_running(compute: RunPodCompute, endpoint_id: str, run_id: str) -> None:
    for _ in range(2000):
        if (await compute.status(endpoint_id, run_id)).status is RunStatus.IN_PROGRESS:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{run_id} never started")


# ------------------------------------------------------------------------------------- statuses


async def test_the_adapter_is_a_compute_gateway(compute: RunPodCompute) -> None:
    assert isinstance(compute, ComputeGateway)


async def test_completed_with_output_is_a_success_with_every_status_field(compute: RunPodCompute) -> None:
    run_id = await compute.submit("echo", {"prompt": "hello"}, execution_timeout_ms=60_000, ttl_ms=600_000)
    outcome = await compute.wait("echo", run_id, timeout_s=10)
    assert outcome.succeeded and outcome.reason == "completed"
    state = outcome.state
    assert state.run_id == run_id and state.status is RunStatus.COMPLETED
    assert state.output == {"prompt": "hello"} and state.has_output
    assert state.delay_ms is not None and state.delay_ms >= 0
    assert state.execution_ms is not None and state.execution_ms >= 0
    assert state.worker_id and state.worker_id.startswith("echo-")
    assert state.error is None
    assert await compute.status("echo", run_id) == state


async def test_built_in_train_and_render_report_their_results(compute: RunPodCompute) -> None:
    train = await compute.submit("train", {"target": 0.8, "seed": 3})
    render = await compute.submit("render", {"frame": 4, "tile": [1, 2]})
    trained = await compute.wait("train", train, timeout_s=10)
    rendered = await compute.wait("render", render, timeout_s=10)
    assert trained.succeeded and abs(trained.state.output["accuracy"] - 0.8) <= 0.05
    assert rendered.succeeded and len(rendered.state.output["digest"]) == 64


async def test_failed_keeps_the_error_text(compute: RunPodCompute) -> None:
    run_id = await compute.submit("fail", {"message": "CUDA out of memory"})
    outcome = await compute.wait("fail", run_id, timeout_s=10)
    assert not outcome.succeeded
    assert outcome.state.status is RunStatus.FAILED
    assert outcome.reason == "failed: RuntimeError: CUDA out of memory"
    assert outcome.state.error is not None and "CUDA out of memory" in outcome.state.error
    assert "CUDA out of memory" in outcome.details["error"]


async def test_completed_without_output_is_a_failure(compute: RunPodCompute) -> None:
    run_id = await compute.submit("no-output", {})
    outcome = await compute.wait("no-output", run_id, timeout_s=10)
    assert outcome.state.status is RunStatus.COMPLETED and not outcome.state.has_output
    assert not outcome.succeeded and outcome.reason == "completed without output"


async def test_a_handler_returning_an_error_object_shows_up_as_completed_without_output(
    compute: RunPodCompute,
) -> None:
    run_id = await compute.submit("error-object", {})
    outcome = await compute.wait("error-object", run_id, timeout_s=10)
    assert outcome.state.status is RunStatus.COMPLETED
    assert not outcome.succeeded and outcome.reason == "completed without output"


async def test_a_handler_returning_an_error_text_fails_with_it(compute: RunPodCompute) -> None:
    run_id = await compute.submit("error-text", {})
    outcome = await compute.wait("error-text", run_id, timeout_s=10)
    assert outcome.state.status is RunStatus.FAILED
    assert outcome.reason == "failed: model weights not found"


async def test_an_output_that_is_not_json_fails_the_job(compute: RunPodCompute) -> None:
    outcome = await compute.wait("not-json", await compute.submit("not-json", {}), timeout_s=10)
    assert outcome.state.status is RunStatus.FAILED and "not JSON serializable" in outcome.reason


async def test_cancelled(compute: RunPodCompute) -> None:
    run_id = await compute.submit("sleep", {"seconds": 30})
    cancelled = await compute.cancel("sleep", run_id)
    assert cancelled.status is RunStatus.CANCELLED
    outcome = await compute.wait("sleep", run_id, timeout_s=10)
    assert not outcome.succeeded and outcome.reason == "cancelled"


async def test_execution_timeout_gives_timed_out(compute: RunPodCompute) -> None:
    run_id = await compute.submit("sleep", {"seconds": 30}, execution_timeout_ms=50)
    outcome = await compute.wait("sleep", run_id, timeout_s=10)
    assert outcome.state.status is RunStatus.TIMED_OUT
    assert not outcome.succeeded and outcome.reason.startswith(
        "timed out: execution exceeded executionTimeout"
    )


async def test_retry_reruns_a_failed_job_under_the_same_id(compute: RunPodCompute) -> None:
    run_id = await compute.submit("fail", {})
    assert not (await compute.wait("fail", run_id, timeout_s=10)).succeeded
    retried = await compute.retry("fail", run_id)
    assert retried.run_id == run_id and retried.status is RunStatus.IN_QUEUE
    assert (await compute.wait("fail", run_id, timeout_s=10)).state.status is RunStatus.FAILED
    assert (await compute.health("fail"))["jobs"]["retried"] >= 1
    done = await compute.submit("echo", {"x": 1})
    await compute.wait("echo", done, timeout_s=10)
    with pytest.raises(Rejected, match="only FAILED or TIMED_OUT"):
        await compute.retry("echo", done)


async def test_health_and_purge_queue(compute: RunPodCompute, emulator: BackgroundServer) -> None:
    endpoint_id = mount(emulator, "podsettle.sandbox.handlers:sleep", workers=1)
    first = await compute.submit(endpoint_id, {"seconds": 30})
    queued = [await compute.submit(endpoint_id, {"seconds": 30}) for _ in range(3)]
    await until_running(compute, endpoint_id, first)
    health = await compute.health(endpoint_id)
    assert health["jobs"]["inQueue"] == 3 and health["jobs"]["inProgress"] == 1
    assert health["workers"] == {
        "idle": 0,
        "running": 1,
        "initializing": 0,
        "ready": 0,
        "throttled": 0,
        "unhealthy": 0,
    }
    assert await compute.purge_queue(endpoint_id) == 3
    assert [(await compute.status(endpoint_id, r)).status for r in queued] == [RunStatus.CANCELLED] * 3
    assert (await compute.status(endpoint_id, first)).status is RunStatus.IN_PROGRESS
    await compute.cancel(endpoint_id, first)


async def test_low_priority_jobs_wait_behind_the_others(
    compute: RunPodCompute, emulator: BackgroundServer
) -> None:
    blocker = await compute.submit("serial", {"tag": "blocker", "seconds": 0.2})
    await until_running(compute, "serial", blocker)
    low = await compute.submit("serial", {"tag": "low"}, low_priority=True)
    high = await compute.submit("serial", {"tag": "high"})
    for run_id in (blocker, low, high):
        assert (await compute.wait("serial", run_id, timeout_s=10)).succeeded
    order = [tag for tag in user.ORDER if tag in ("low", "high")]
    assert order[-2:] == ["high", "low"]


# ------------------------------------------------------------------------------------- user handlers


async def test_user_handlers_mounted_by_module_and_function(compute: RunPodCompute) -> None:
    run_id = await compute.submit("count", {"tag": "mounted"})
    outcome = await compute.wait("count", run_id, timeout_s=10)
    assert outcome.succeeded and outcome.state.output == {"executions": 1, "input": {"tag": "mounted"}}
    assert user.EXECUTIONS[run_id] == 1
    doubled = await compute.wait(
        "async-double", await compute.submit("async-double", {"value": 21}), timeout_s=10
    )
    assert doubled.state.output == {"value": 42}


async def test_generator_handlers_stream_and_aggregate(
    compute: RunPodCompute, emulator: BackgroundServer
) -> None:
    sync_id = await compute.submit("tokens", {"text": "a b c"})
    async_id = await compute.submit("async-tokens", {"text": "a b"})
    assert (await compute.wait("tokens", sync_id, timeout_s=10)).state.output == ["a", "b", "c"]
    assert (await compute.wait("async-tokens", async_id, timeout_s=10)).state.output == ["A", "B"]
    with admin(emulator) as client:
        first = client.get(f"/tokens/stream/{sync_id}").json()
        again = client.get(f"/tokens/stream/{sync_id}").json()
    assert first == {"status": "COMPLETED", "stream": [{"output": "a"}, {"output": "b"}, {"output": "c"}]}
    assert again == {"status": "COMPLETED", "stream": []}
    broken = await compute.wait("broken-stream", await compute.submit("broken-stream", {}), timeout_s=10)
    assert broken.state.status is RunStatus.FAILED and "the stream broke" in broken.reason


def test_mounting_a_handler_that_does_not_exist_is_refused(emulator: BackgroundServer) -> None:
    with admin(emulator) as client:
        response = client.put("/nope/_endpoint", json={"handler": "tests.runpod_user_handlers:missing"})
    assert response.status_code == 400 and "has no attribute 'missing'" in response.json()["error"]


# ------------------------------------------------------------------------------------- ttl and retention


async def test_ttl_expiring_makes_the_job_disappear() -> None:
    clock = ShiftableClock()
    app = create_runpod_app(seed=3, clock=clock, policy_bounds=SHORT_BOUNDS)
    with BackgroundServer(app) as server:
        async with RunPodCompute(KEY, base_url=f"{server.url}/v2", poll=FAST_POLL) as compute:
            run_id = await compute.submit("sleep", {"seconds": 30}, ttl_ms=20_000)
            await until_running(compute, "sleep", run_id)
            clock.offset += 21.0  # the ttl passes mid-run
            outcome = await compute.wait("sleep", run_id, timeout_s=10)
            assert not outcome.succeeded
            assert outcome.reason.startswith("not found (404)")
            assert outcome.details["status"] == "NOT_FOUND"
            with pytest.raises(NotFound, match="404"):
                await compute.status("sleep", run_id)
            assert (await compute.health("sleep"))["jobs"]["inProgress"] == 0


async def test_results_are_gone_after_the_retention_time(compute: RunPodCompute) -> None:
    run_id = await compute.submit("short-retention", {"a": 1})
    assert (await compute.wait("short-retention", run_id, timeout_s=10)).succeeded
    await asyncio.sleep(0.1)
    with pytest.raises(NotFound):
        await compute.status("short-retention", run_id)


async def test_a_policy_outside_the_documented_bounds_is_rejected(compute: RunPodCompute) -> None:
    with pytest.raises(Rejected, match=r"policy.ttl must be between") as caught:
        await compute.submit("echo", {}, ttl_ms=8 * 24 * 3600 * 1000)
    assert caught.value.status_code == 400


# ------------------------------------------------------------------------------------- webhooks


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[BackgroundServer, list[tuple[str, dict[str, Any]]]]]:
    calls: list[tuple[str, dict[str, Any]]] = []
    failures_left: dict[str, int] = {}

    async def hook(request: Request) -> Response:
        name = request.path_params["name"]
        calls.append((name, await request.json()))
        if name == "down":
            return Response("no", status_code=503)
        if name == "flaky":
            left = failures_left.setdefault(request.query_params["job"], 2)
            if left:
                failures_left[request.query_params["job"]] = left - 1
                return Response("busy", status_code=500)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/hooks/{name}", hook, methods=["POST"])])
    with BackgroundServer(app) as server:
        yield server, calls


async def _attempts(state: EmulatorState, run_id: str, expected: int) -> list[Any]:
    for _ in range(1000):
        attempts = [a for a in state.webhook_attempts if a.job_id == run_id]
        if len(attempts) >= expected:
            return attempts
        await asyncio.sleep(0.01)
    return [a for a in state.webhook_attempts if a.job_id == run_id]


async def test_webhook_is_posted_with_the_status_payload(
    compute: RunPodCompute, emulator: BackgroundServer, receiver: tuple[BackgroundServer, list[Any]]
) -> None:
    server, calls = receiver
    run_id = await compute.submit("echo", {"hook": 1}, webhook=f"{server.url}/hooks/ok")
    attempts = await _attempts(state_of(emulator), run_id, 1)
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 200)]
    assert ("ok", {**attempts[0].payload}) in calls
    assert attempts[0].payload["status"] == "COMPLETED" and attempts[0].payload["output"] == {"hook": 1}


async def test_webhook_is_retried_twice_then_given_up(
    compute: RunPodCompute, emulator: BackgroundServer, receiver: tuple[BackgroundServer, list[Any]]
) -> None:
    server, _ = receiver
    down = await compute.submit("fail", {}, webhook=f"{server.url}/hooks/down")
    attempts = await _attempts(state_of(emulator), down, 3)
    await asyncio.sleep(0.1)  # a fourth attempt would come 0.02 s after the third
    attempts = [a for a in state_of(emulator).webhook_attempts if a.job_id == down]
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 503), (2, 503), (3, 503)]
    assert attempts[0].payload["status"] == "FAILED"


async def test_webhook_succeeding_on_the_last_retry(
    compute: RunPodCompute, emulator: BackgroundServer, receiver: tuple[BackgroundServer, list[Any]]
) -> None:
    server, _ = receiver
    run_id = await compute.submit("echo", {}, webhook=f"{server.url}/hooks/flaky?job=j1")
    attempts = await _attempts(state_of(emulator), run_id, 3)
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 500), (3, 200)]


async def test_a_lost_webhook_is_reconciled_through_status(
    compute: RunPodCompute, emulator: BackgroundServer, receiver: tuple[BackgroundServer, list[Any]]
) -> None:
    server, _ = receiver
    endpoint_id = mount(emulator, ECHO, faults={"webhook_drop_rate": 1.0})
    run_id = await compute.submit(endpoint_id, {"a": 1}, webhook=f"{server.url}/hooks/ok")
    assert (await compute.wait(endpoint_id, run_id, timeout_s=10)).succeeded
    await asyncio.sleep(0.05)
    assert not [a for a in state_of(emulator).webhook_attempts if a.job_id == run_id]


# ------------------------------------------------------------------------------------- injected faults


async def test_429_bursts_are_absorbed_with_backoff(
    compute: RunPodCompute, emulator: BackgroundServer
) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"http_429_next": 3, "retry_after_s": 0.01})
    sent = compute.requests_sent
    run_id = await compute.submit(endpoint_id, {"a": 1})
    assert compute.requests_sent - sent == 4
    assert (await compute.wait(endpoint_id, run_id, timeout_s=10)).succeeded


async def test_too_many_429s_raise_rate_limited(emulator: BackgroundServer) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"http_429_next": 10, "retry_after_s": 0.01})
    async with RunPodCompute(KEY, base_url=f"{emulator.url}/v2", max_rate_limit_retries=2) as compute:
        with pytest.raises(RateLimited, match="429") as caught:
            await compute.submit(endpoint_id, {})
        assert caught.value.retryable and caught.value.retry_after == pytest.approx(0.01)
        assert compute.requests_sent == 3


async def test_the_documented_rate_limits_answer_429_and_the_adapter_waits() -> None:
    app = create_runpod_app(rate_limits={"run": RouteLimit(3, 10)}, rate_limit_window_s=1.0)
    with BackgroundServer(app) as server:
        async with httpx.AsyncClient(
            base_url=f"{server.url}/v2", headers={"Authorization": "Bearer k"}
        ) as client:
            codes = [(await client.post("/echo/run", json={"input": {}})).status_code for _ in range(4)]
            refused = await client.post("/echo/run", json={"input": {}})
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        assert "rate limit exceeded" in refused.json()["error"] and float(refused.headers["retry-after"]) > 0
        async with RunPodCompute(KEY, base_url=f"{server.url}/v2", limits={}) as compute:
            run_ids = [await compute.submit("echo", {"n": n}) for n in range(5)]
        assert len(set(run_ids)) == 5
        assert compute.requests_sent > 5  # some were answered 429 and sent again after waiting


async def test_5xx_on_reads_is_unavailable_and_wait_rides_it_out(
    compute: RunPodCompute, emulator: BackgroundServer
) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"http_routes": ["status"]})
    run_id = await compute.submit(endpoint_id, {"a": 1})
    with admin(emulator) as client:
        client.post(f"/{endpoint_id}/_faults", json={"http_5xx_next": 1})
    with pytest.raises(Unavailable, match="HTTP 502 Bad Gateway") as caught:
        await compute.status(endpoint_id, run_id)
    assert caught.value.retryable
    with admin(emulator) as client:
        client.post(f"/{endpoint_id}/_faults", json={"http_5xx_next": 3})
    assert (await compute.wait(endpoint_id, run_id, timeout_s=10)).succeeded


async def test_5xx_on_submit_is_unavailable(compute: RunPodCompute, emulator: BackgroundServer) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"http_5xx_next": 1})
    with pytest.raises(Unavailable, match="502"):
        await compute.submit(endpoint_id, {})
    assert not state_of(emulator).endpoints[endpoint_id].jobs  # nothing was queued


async def test_a_dropped_submit_response_still_queued_the_job(
    compute: RunPodCompute, emulator: BackgroundServer
) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"drop_next": 1})
    with pytest.raises(Unavailable, match="may have been queued"):
        await compute.submit(endpoint_id, {"a": 1})
    jobs = state_of(emulator).endpoints[endpoint_id].jobs
    assert len(jobs) == 1  # the job runs although the client never learned its id
    resubmitted = await compute.submit(endpoint_id, {"a": 1})
    assert (await compute.wait(endpoint_id, resubmitted, timeout_s=10)).succeeded


async def test_dropped_status_responses_are_unavailable_and_wait_rides_them_out(
    compute: RunPodCompute, emulator: BackgroundServer
) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"http_routes": ["status"]})
    run_id = await compute.submit(endpoint_id, {"a": 1})
    with admin(emulator) as client:
        client.post(f"/{endpoint_id}/_faults", json={"drop_next": 1})
    with pytest.raises(Unavailable, match="response dropped"):
        await compute.status(endpoint_id, run_id)
    with admin(emulator) as client:
        client.post(f"/{endpoint_id}/_faults", json={"drop_next": 2})
    assert (await compute.wait(endpoint_id, run_id, timeout_s=10)).succeeded


async def test_a_job_executed_twice(compute: RunPodCompute, emulator: BackgroundServer) -> None:
    endpoint_id = mount(emulator, "tests.runpod_user_handlers:count", faults={"duplicate_rate": 1.0})
    run_id = await compute.submit(endpoint_id, {"tag": "twice"})
    first = await compute.wait(endpoint_id, run_id, timeout_s=10)
    assert first.succeeded
    with admin(emulator) as client:
        for _ in range(1000):
            internals = client.get(f"/{endpoint_id}/_jobs/{run_id}").json()
            if internals["completions"] == 2:
                break
            await asyncio.sleep(0.005)
    assert internals["executions"] == 2 and internals["plan"]["duplicate"] is True
    assert user.EXECUTIONS[run_id] == 2
    assert (await compute.status(endpoint_id, run_id)).output["executions"] == 2


async def test_completed_without_output_injected_on_a_running_server(
    compute: RunPodCompute, emulator: BackgroundServer
) -> None:
    endpoint_id = mount(emulator, ECHO)
    with admin(emulator) as client:
        faults = client.post(f"/{endpoint_id}/_faults", json={"no_output_rate": 1.0}).json()
    assert faults["no_output_rate"] == 1.0
    outcome = await compute.wait(endpoint_id, await compute.submit(endpoint_id, {"a": 1}), timeout_s=10)
    assert outcome.state.status is RunStatus.COMPLETED and outcome.reason == "completed without output"
    with admin(emulator) as client:
        assert client.delete(f"/{endpoint_id}/_faults").json()["no_output_rate"] == 0.0
    assert (
        await compute.wait(endpoint_id, await compute.submit(endpoint_id, {"a": 1}), timeout_s=10)
    ).succeeded


async def test_injected_worker_failure(compute: RunPodCompute, emulator: BackgroundServer) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"failure_rate": 1.0})
    outcome = await compute.wait(endpoint_id, await compute.submit(endpoint_id, {}), timeout_s=10)
    assert outcome.state.status is RunStatus.FAILED and "injected failure" in outcome.reason


async def test_stuck_in_queue_hits_the_deadline(compute: RunPodCompute, emulator: BackgroundServer) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"stuck_rate": 1.0})
    run_id = await compute.submit(endpoint_id, {})
    outcome = await compute.wait(endpoint_id, run_id, timeout_s=0.2)
    assert not outcome.succeeded and outcome.reason == "deadline passed"
    assert outcome.state.status is RunStatus.IN_QUEUE and outcome.details["seen"] == "true"
    assert await compute.purge_queue(endpoint_id) == 1


async def test_injected_latency_shows_in_execution_time(
    compute: RunPodCompute, emulator: BackgroundServer
) -> None:
    endpoint_id = mount(emulator, ECHO, faults={"latency_ms": 30, "latency_jitter_ms": 10})
    outcome = await compute.wait(endpoint_id, await compute.submit(endpoint_id, {"a": 1}), timeout_s=10)
    assert outcome.succeeded and outcome.state.execution_ms is not None and outcome.state.execution_ms >= 30


def test_unknown_faults_are_refused(emulator: BackgroundServer) -> None:
    with admin(emulator) as client:
        response = client.post("/echo/_faults", json={"explode": 1})
        bad_rate = client.post("/echo/_faults", json={"failure_rate": 2})
    assert response.status_code == 400 and "explode" in response.json()["error"]
    assert bad_rate.status_code == 400


def test_the_same_seed_replays_the_same_ids_and_faults() -> None:
    def run(seed: int) -> list[tuple[str, str]]:
        app = create_runpod_app(seed=seed, endpoints={"e": EndpointConfig(handler=ECHO)})
        app.state.runpod.set_faults("e", failure_rate=0.5, stuck_rate=0.2)
        runtime = app.state.runpod.endpoints["e"]
        results = []
        for n in range(20):
            plan = runtime._plan()
            results.append((runtime.new_id(), f"{n}:{plan.fail}:{plan.stuck}"))
        return results

    assert run(11) == run(11)
    assert run(11) != run(12)


# ------------------------------------------------------------------------------------- the wire itself


def test_auth_body_limits_and_bad_bodies(emulator: BackgroundServer) -> None:
    base = f"{emulator.url}/v2"
    assert httpx.post(f"{base}/echo/run", json={"input": {}}).status_code == 401
    assert httpx.get(f"{base}/echo/health", headers={"Authorization": "Bearer"}).status_code == 401
    assert httpx.get(f"{base}/echo/health", headers={"Authorization": "Token abc"}).status_code == 401
    with admin(emulator) as client:
        assert client.post("/nowhere/run", json={"input": {}}).status_code == 404
        assert client.post("/echo/run", content=b"{nope").status_code == 400
        assert client.post("/echo/run", json={"prompt": 1}).status_code == 400
        too_big = client.post("/echo/run", content=b'{"input": "' + b"x" * (10 * 1024 * 1024) + b'"}')
        assert too_big.status_code == 413
        assert client.get("/echo/status/unknown-u1").status_code == 404


def test_runsync_returns_the_status_object(emulator: BackgroundServer) -> None:
    with admin(emulator) as client:
        body = client.post("/echo/runsync", json={"input": {"q": 1}}).json()
        pending = client.post("/sleep/runsync?wait=1000", json={"input": {"seconds": 5}}).json()
    assert body["status"] == "COMPLETED" and body["output"] == {"q": 1} and body["workerId"]
    assert pending["status"] in ("IN_QUEUE", "IN_PROGRESS")


async def test_submit_through_runsync_brings_a_short_job_back_in_one_request(
    emulator: BackgroundServer,
) -> None:
    async with RunPodCompute(
        KEY, base_url=f"{emulator.url}/v2", poll=FAST_POLL, seed=1, sync=SyncPolicy(wait_ms=2000)
    ) as compute:
        before = state_of(emulator).requests["runsync"]
        run_id = await compute.submit("echo", {"frame": 7}, execution_timeout_ms=60_000)
        outcome = await compute.wait("echo", run_id, timeout_s=10)
        assert compute.requests_sent == 1 and compute.runsync_finished == 1
    assert state_of(emulator).requests["runsync"] == before + 1
    assert outcome.succeeded and outcome.state.output == {"frame": 7}
    assert outcome.state.worker_id and outcome.state.execution_ms is not None


async def test_a_runsync_that_outlasts_its_wait_is_followed_by_status_polls(
    emulator: BackgroundServer,
) -> None:
    async with RunPodCompute(
        KEY, base_url=f"{emulator.url}/v2", poll=FAST_POLL, seed=1, sync=SyncPolicy(wait_ms=1000)
    ) as compute:
        started = time.monotonic()
        run_id = await compute.submit("sleep", {"seconds": 1.4})
        assert 0.9 < time.monotonic() - started < 1.4  # answered at the end of its wait, with the id
        assert (await compute.status("sleep", run_id)).status is RunStatus.IN_PROGRESS
        outcome = await compute.wait("sleep", run_id, timeout_s=10)
        assert compute.runsync_finished == 0 and compute.requests_sent > 2
    assert outcome.succeeded


async def test_a_runsync_job_can_be_cancelled_once_its_id_is_back(emulator: BackgroundServer) -> None:
    async with RunPodCompute(
        KEY, base_url=f"{emulator.url}/v2", poll=FAST_POLL, seed=1, sync=SyncPolicy(wait_ms=1000)
    ) as compute:
        run_id = await compute.submit("sleep", {"seconds": 30})
        assert (await compute.cancel("sleep", run_id)).status is RunStatus.CANCELLED
        outcome = await compute.wait("sleep", run_id, timeout_s=5)
    assert not outcome.succeeded and outcome.reason == "cancelled"


async def test_input_over_10_mb_is_rejected_before_sending(compute: RunPodCompute) -> None:
    with pytest.raises(Rejected, match=r"^body is \d+ bytes, over the 10485760-byte limit") as caught:
        await compute.submit("echo", {"blob": "x" * (10 * 1024 * 1024)})
    assert caught.value.code == "input_too_large"
    # The whole body counts: an input under the limit whose policy envelope takes it over.
    data = b'{"blob":"' + b"x" * (10 * 1024 * 1024 - 40) + b'"}'
    assert len(data) < MAX_INPUT_BYTES < body_size(len(data), execution_timeout_ms=60_000, ttl_ms=600_000)
    with pytest.raises(Rejected, match="over the 10485760-byte limit of /run"):
        await compute.submit("echo", data, execution_timeout_ms=60_000, ttl_ms=600_000)
    assert compute.requests_sent == 0


async def test_canonical_input_bytes_are_sent_as_they_are(compute: RunPodCompute) -> None:
    data = canonical_json({"b": [1, 2.5], "a": "é"})
    run_id = await compute.submit("echo", data)
    outcome = await compute.wait("echo", run_id, timeout_s=10)
    assert outcome.succeeded and outcome.state.output == {"a": "é", "b": [1, 2.5]}
    sent = request_body(data, ttl_ms=10_000)
    assert sent.startswith(b'{"input":' + data + b",") and len(sent) == body_size(len(data), ttl_ms=10_000)
