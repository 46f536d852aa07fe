"""Responses that break the contract become clear, typed errors; the API key never shows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
import structlog

from podsettle.adapters.http import Answer, Request
from podsettle.adapters.ports import (
    RUNSYNC_READ_MARGIN_S,
    BadResponse,
    Forbidden,
    GatewayError,
    NotFound,
    RateLimited,
    Rejected,
    RunState,
    RunStatus,
    Unauthorized,
    Unavailable,
)
from podsettle.adapters.runpod import (
    DEFAULT_BASE_URL,
    DEFAULT_CLIENT_LIMITS,
    ClientLimit,
    PollPolicy,
    RunPodCompute,
    SyncPolicy,
    classify_run,
)
from podsettle.settings import Settings
from tests.conftest import FakeClock

KEY = "rpa_SECRET_KEY_0123456789"
RUN_ID = "job-1-u1"
FAST = PollPolicy(initial_s=0.001, factor=2.0, max_s=0.004, jitter=0.1)

Reply = Callable[[Request], Answer]


def client(reply: Reply, **options: Any) -> RunPodCompute:
    return RunPodCompute(KEY, base_url="https://runpod.test/v2", replier=reply, poll=FAST, **options)


def json_reply(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Reply:
    def reply(request: Request) -> Answer:
        return Answer.of(status_code, json=body, headers=headers)

    return reply


def assert_no_key(error: BaseException) -> None:
    assert KEY not in str(error) and KEY not in repr(error)


@pytest.fixture
def sequence() -> Iterator[Callable[[list[Answer]], Reply]]:
    def make(responses: list[Answer]) -> Reply:
        remaining = list(responses)

        def reply(request: Request) -> Answer:
            return remaining.pop(0) if len(remaining) > 1 else remaining[0]

        return reply

    yield make


# ------------------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (Answer.of(200, text="<html>gateway</html>", headers={"content-type": "text/html"}), "not JSON"),
        (Answer.of(200, content=b'{"id": "job-1-u1", "stat'), "not JSON"),
        (Answer.of(200, content=b""), "not JSON"),
        (Answer.of(200, json={"id": RUN_ID, "status": "<b>ok</b>"}), "'<b>ok</b>' is not a job status"),
        (Answer.of(200, json={"status": "COMPLETED", "output": 1}), r"id: Field required"),
        (Answer.of(200, json={"id": "", "status": "COMPLETED"}), r"id: String should have at least 1"),
        (Answer.of(200, json={"id": 7, "status": "COMPLETED"}), r"id: Input should be a valid string"),
        (Answer.of(200, json={"id": RUN_ID}), r"status: Field required"),
        (Answer.of(200, json={"id": "someone-else", "status": "COMPLETED"}), "not 'job-1-u1'"),
        (Answer.of(200, json=[1, 2]), "does not match the contract"),
        (Answer.of(200, json={"id": RUN_ID, "status": "COMPLETED", "delayTime": "soon"}), "delayTime"),
    ],
)
async def test_bad_status_bodies_are_bad_responses(response: Answer, message: str) -> None:
    async with client(lambda request: response) as compute:
        with pytest.raises(BadResponse, match=message) as caught:
            await compute.status("echo", RUN_ID)
    assert str(caught.value).startswith(f"GET /echo/status/{RUN_ID}: ")
    assert_no_key(caught.value)


@pytest.mark.parametrize("body", [{"status": "IN_QUEUE"}, {"id": None}, {"id": ""}, "job-1"])
async def test_a_submit_answer_without_an_id_is_a_bad_response(body: Any) -> None:
    async with client(json_reply(body)) as compute:
        with pytest.raises(BadResponse, match=r"POST /echo/run: the response does not match the contract"):
            await compute.submit("echo", {"prompt": "x"})


async def test_unknown_fields_are_ignored_and_every_status_field_is_read() -> None:
    body = {
        "id": RUN_ID,
        "status": "COMPLETED",
        "delayTime": 120,
        "executionTime": 3456.0,
        "output": {"images": ["a.png"]},
        "workerId": "w-9",
        "retries": 0,
        "newField": {"x": 1},
    }
    async with client(json_reply(body)) as compute:
        state = await compute.status("echo", RUN_ID)
    assert state == RunState(RUN_ID, RunStatus.COMPLETED, {"images": ["a.png"]}, True, None, 120, 3456, "w-9")


async def test_a_non_string_error_is_kept_as_json_text() -> None:
    body = {"id": RUN_ID, "status": "FAILED", "error": {"code": 3, "message": "oom"}}
    async with client(json_reply(body)) as compute:
        state = await compute.status("echo", RUN_ID)
    assert state.error == '{"code": 3, "message": "oom"}'
    assert classify_run(state).reason == 'failed: {"code": 3, "message": "oom"}'


async def test_health_and_purge_bodies_are_validated() -> None:
    async with client(json_reply({"jobs": "lots"})) as compute:
        with pytest.raises(BadResponse, match=r"GET /echo/health: .*jobs"):
            await compute.health("echo")
        with pytest.raises(BadResponse, match=r"removed: Field required"):
            await compute.purge_queue("echo")


# ------------------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("status_code", "error", "retryable"),
    [
        (400, Rejected, False),
        (413, Rejected, False),
        (401, Unauthorized, False),
        (403, Forbidden, False),
        (404, NotFound, False),
        (500, Unavailable, True),
        (502, Unavailable, True),
        (503, Unavailable, True),
        (418, BadResponse, False),
    ],
)
async def test_http_statuses_map_to_typed_errors(
    status_code: int, error: type[GatewayError], retryable: bool
) -> None:
    reply = json_reply({"error": f"server says {KEY} is wrong"}, status_code)
    async with client(reply) as compute:
        with pytest.raises(error) as caught:
            await compute.submit("echo", {"prompt": "x"})
    assert caught.value.retryable is retryable
    assert str(caught.value).startswith("POST /echo/run: ")
    assert_no_key(caught.value)
    if isinstance(caught.value, Rejected):
        assert caught.value.status_code == status_code


async def test_429_is_retried_with_backoff_then_raised(
    sequence: Callable[[list[Answer]], Reply],
) -> None:
    throttled = Answer.of(429, json={"error": "slow down"}, headers={"Retry-After": "0.001"})
    ok = Answer.of(200, json={"id": RUN_ID, "status": "IN_QUEUE"})
    async with client(sequence([throttled, throttled, ok])) as compute:
        assert await compute.submit("echo", {"a": 1}) == RUN_ID
        assert compute.requests_sent == 3
    async with client(lambda request: throttled, max_rate_limit_retries=1) as compute:
        with pytest.raises(RateLimited, match="429 Too Many Requests after 2 attempts") as caught:
            await compute.status("echo", RUN_ID)
    assert caught.value.retry_after == pytest.approx(0.001)


async def test_429_without_retry_after_backs_off_exponentially() -> None:
    throttled = Answer.of(429, text="too many")
    async with client(lambda request: throttled, max_rate_limit_retries=3) as compute:
        delays = [compute._retry_after(throttled, attempt) for attempt in range(4)]
    assert FAST.initial_s <= delays[0] < delays[1] < delays[2]
    assert all(delay <= FAST.max_s * (1 + FAST.jitter) for delay in delays)


# ------------------------------------------------------------------------------------- transport


def raising(exc: Exception) -> Reply:
    def reply(request: Request) -> Answer:
        raise exc

    return reply


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
        aiohttp.ServerDisconnectedError(),
    ],
)
async def test_transport_failures_are_unavailable(exc: Exception) -> None:
    async with client(raising(exc)) as compute:
        with pytest.raises(Unavailable) as on_submit:
            await compute.submit("echo", {"a": 1})
        with pytest.raises(Unavailable) as on_status:
            await compute.status("echo", RUN_ID)
    assert "the job may have been queued" in str(on_submit.value)
    assert "may have been queued" not in str(on_status.value)
    assert_no_key(on_submit.value)


async def test_a_submit_that_could_not_connect_says_nothing_was_sent() -> None:
    async with client(raising(aiohttp.ConnectionTimeoutError("Connection timeout to host"))) as compute:
        with pytest.raises(Unavailable, match="nothing was sent") as caught:
            await compute.submit("echo", {"a": 1})
    assert "queued" not in str(caught.value)


# ------------------------------------------------------------------------------------- wait


async def test_wait_polls_until_terminal_and_survives_transient_errors(
    sequence: Callable[[list[Answer]], Reply],
) -> None:
    replies = sequence(
        [
            Answer.of(200, json={"id": RUN_ID, "status": "IN_QUEUE"}),
            Answer.of(503, text="<html>busy</html>"),
            Answer.of(200, json={"id": RUN_ID, "status": "IN_PROGRESS", "workerId": "w"}),
            Answer.of(429, headers={"Retry-After": "0"}),
            Answer.of(200, json={"id": RUN_ID, "status": "COMPLETED", "output": "done", "workerId": "w"}),
        ]
    )
    async with client(replies) as compute:
        outcome = await compute.wait("echo", RUN_ID, timeout_s=5)
        assert outcome.succeeded and outcome.state.output == "done"
        assert compute.requests_sent == 5


async def test_wait_reports_404_as_not_found_with_the_last_state(
    sequence: Callable[[list[Answer]], Reply],
) -> None:
    replies = sequence(
        [
            Answer.of(200, json={"id": RUN_ID, "status": "IN_PROGRESS"}),
            Answer.of(404, json={"error": "request does not exist"}),
        ]
    )
    async with client(replies) as compute:
        outcome = await compute.wait("echo", RUN_ID, timeout_s=5)
    assert not outcome.succeeded and outcome.reason.startswith("not found (404)")
    assert outcome.state.status is RunStatus.IN_PROGRESS and outcome.details["last_status"] == "IN_PROGRESS"


async def test_wait_gives_up_at_the_deadline() -> None:
    async with client(json_reply({"id": RUN_ID, "status": "IN_QUEUE"})) as compute:
        outcome = await compute.wait("echo", RUN_ID, timeout_s=0.05)
        polls = compute.requests_sent
    assert outcome.reason == "deadline passed" and outcome.state.status is RunStatus.IN_QUEUE
    assert 1 <= polls <= 60  # bounded by the backoff, not a busy loop


async def test_wait_raises_on_a_bad_response_and_a_refused_key() -> None:
    async with client(json_reply({"id": RUN_ID, "status": "broken!"})) as compute:
        with pytest.raises(BadResponse, match="is not a job status"):
            await compute.wait("echo", RUN_ID, timeout_s=5)
    async with client(json_reply({"error": "no"}, 401)) as compute:
        with pytest.raises(Unauthorized):
            await compute.wait("echo", RUN_ID, timeout_s=5)


@pytest.mark.parametrize(
    ("body", "succeeded", "reason"),
    [
        ({"status": "COMPLETED", "output": {"a": 1}}, True, "completed"),
        ({"status": "COMPLETED", "output": 0}, True, "completed"),
        ({"status": "COMPLETED"}, False, "completed without output"),
        ({"status": "COMPLETED", "output": None}, False, "completed without output"),
        ({"status": "FAILED"}, False, "failed without an error text"),
        ({"status": "FAILED", "error": "disk full"}, False, "failed: disk full"),
        ({"status": "CANCELLED"}, False, "cancelled"),
        ({"status": "TIMED_OUT"}, False, "timed out: executionTimeout exceeded"),
    ],
)
async def test_terminal_states_are_classified(body: dict[str, Any], succeeded: bool, reason: str) -> None:
    async with client(json_reply({"id": RUN_ID, **body})) as compute:
        outcome = await compute.wait("echo", RUN_ID, timeout_s=5)
    assert (outcome.succeeded, outcome.reason) == (succeeded, reason)
    assert outcome.details["status"] == body["status"]


# ------------------------------------------------------------------------------------- requests


async def test_submit_sends_input_policy_and_webhook() -> None:
    seen: list[Request] = []

    def reply(request: Request) -> Answer:
        seen.append(request)
        return Answer.of(200, json={"id": RUN_ID, "status": "IN_QUEUE"})

    async with client(reply) as compute:
        await compute.submit(
            "my-endpoint",
            {"prompt": "é"},
            execution_timeout_ms=60_000,
            ttl_ms=3_600_000,
            webhook="https://hooks.test/done",
            low_priority=True,
        )
        await compute.submit("my-endpoint", {"prompt": "plain"})
    first, second = seen
    assert first.method == "POST" and str(first.url) == "https://runpod.test/v2/my-endpoint/run"
    assert first.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(first.content) == {
        "input": {"prompt": "é"},
        "policy": {"executionTimeout": 60_000, "ttl": 3_600_000, "lowPriority": True},
        "webhook": "https://hooks.test/done",
    }
    assert json.loads(second.content) == {"input": {"prompt": "plain"}}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"endpoint_id": "../admin", "job_input": {}}, "endpoint_id must be"),
        ({"endpoint_id": "echo", "job_input": ["x"]}, "input must be a JSON object"),
        ({"endpoint_id": "echo", "job_input": {"x": {1, 2}}}, "input is not JSON serializable"),
        ({"endpoint_id": "echo", "job_input": {"x": float("nan")}}, "input is not JSON serializable"),
        ({"endpoint_id": "echo", "job_input": {}, "ttl_ms": 0}, "policy.ttl must be a positive integer"),
        ({"endpoint_id": "echo", "job_input": {}, "execution_timeout_ms": 1.5}, "policy.executionTimeout"),
        ({"endpoint_id": "echo", "job_input": {}, "webhook": "ftp://x"}, "webhook must be an http"),
    ],
)
async def test_bad_submissions_are_rejected_before_sending(call: dict[str, Any], message: str) -> None:
    async with client(json_reply({"id": RUN_ID, "status": "IN_QUEUE"})) as compute:
        with pytest.raises(Rejected, match=message):
            await compute.submit(**call)
        assert compute.requests_sent == 0


async def test_a_bad_run_id_is_rejected_before_sending() -> None:
    async with client(json_reply({})) as compute:
        with pytest.raises(Rejected, match="run_id must be"):
            await compute.status("echo", "a/../../b")
        assert compute.requests_sent == 0


# ------------------------------------------------------------------------------------- the key


def test_configuration_from_the_settings_and_a_repr_without_the_key() -> None:
    settings = Settings.from_env(
        {"RUNPOD_API_KEY": KEY, "RUNPOD_ENDPOINT_BASE_URL": "http://127.0.0.1:9/v2/"}
    )
    assert settings.runpod_api_key is not None
    compute = RunPodCompute(settings.runpod_api_key.get_secret_value(), base_url=settings.runpod_base_url)
    assert compute.base_url == "http://127.0.0.1:9/v2"
    assert repr(compute) == "RunPodCompute(base_url='http://127.0.0.1:9/v2')" and KEY not in str(
        vars(compute)
    )
    assert Settings.from_env({"RUNPOD_API_KEY": KEY}).runpod_base_url == DEFAULT_BASE_URL
    with pytest.raises(Unauthorized, match="RUNPOD_API_KEY"):
        RunPodCompute("")


async def test_the_key_never_reaches_a_log_line() -> None:
    throttled = Answer.of(429, json={"error": f"key {KEY} throttled"}, headers={"Retry-After": "0"})
    replies = [throttled, Answer.of(503, text=f"down for {KEY}"), Answer.of(404, json={})]
    remaining = list(replies)

    def reply(request: Request) -> Answer:
        return remaining.pop(0)

    with structlog.testing.capture_logs() as logs:
        async with client(reply) as compute:
            await compute.wait("echo", RUN_ID, timeout_s=5)
    assert logs and KEY not in repr(logs)


# ------------------------------------------------------------------------------------- client-side limits


async def test_the_client_side_limiter_keeps_each_window_under_its_limit(virtual_clock: FakeClock) -> None:
    clock = virtual_clock
    sent_at: list[float] = []

    def reply(request: Request) -> Answer:
        sent_at.append(clock.now)
        return Answer.of(200, json={"id": RUN_ID, "status": "IN_QUEUE"})

    limits = {"run": ClientLimit(per_window=2, concurrent=10, window_s=10.0)}
    async with client(reply, limits=limits, clock=clock) as compute:
        await asyncio.gather(*(compute.submit("echo", {"n": n}) for n in range(5)))
    assert sent_at == [0.0, 0.0, 10.0, 10.0, 20.0]


async def test_the_client_side_limiter_bounds_calls_in_flight() -> None:
    in_flight = 0
    most = 0

    async def reply(request: Request) -> Answer:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return Answer.of(200, json={"id": RUN_ID, "status": "IN_PROGRESS"})

    limits = {"status": ClientLimit(per_window=1000, concurrent=3)}
    async with RunPodCompute(KEY, base_url="https://runpod.test/v2", replier=reply, limits=limits) as compute:
        await asyncio.gather(*(compute.status("echo", RUN_ID) for _ in range(12)))
    assert most == 3


def test_the_documented_limits_are_the_default() -> None:
    compute = RunPodCompute(KEY)
    assert compute.limits == DEFAULT_CLIENT_LIMITS
    assert compute.limits["run"].per_window < 1000 and compute.limits["status"].per_window < 2000


# ------------------------------------------------------------------------------------- runsync


def runsync_client(reply: Reply, **options: Any) -> RunPodCompute:
    return client(reply, sync=SyncPolicy(wait_ms=1500, window=6, min_share=0.5, probe_every=3), **options)


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (Answer.of(200, text="<html>gateway</html>", headers={"content-type": "text/html"}), "not JSON"),
        (Answer.of(200, json={"status": "COMPLETED", "output": 1}), r"runsync: .*id: Field required"),
        (Answer.of(200, json={"id": RUN_ID}), r"runsync: .*status: Field required"),
        (Answer.of(200, json={"id": RUN_ID, "status": "<b>ok</b>"}), "'<b>ok</b>' is not a job status"),
        (
            Answer.of(200, json={"id": RUN_ID, "status": "COMPLETED", "executionTime": "x"}),
            "executionTime",
        ),
        (Answer.of(200, json=["COMPLETED"]), "does not match the contract"),
    ],
)
async def test_a_bad_runsync_answer_is_a_bad_response_naming_the_field(
    response: Answer, message: str
) -> None:
    async with runsync_client(lambda request: response) as compute:
        with pytest.raises(BadResponse, match=message) as caught:
            await compute.submit("echo", {"a": 1})
    assert_no_key(caught.value)


async def test_runsync_sends_the_bounded_wait_and_the_whole_body() -> None:
    seen: list[Request] = []

    def reply(request: Request) -> Answer:
        seen.append(request)
        return Answer.of(200, json={"id": RUN_ID, "status": "COMPLETED", "output": {"ok": True}})

    async with runsync_client(reply) as compute:
        run_id = await compute.submit(
            "echo", {"a": 1}, execution_timeout_ms=60_000, webhook="https://h.test/x"
        )
        outcome = await compute.wait("echo", run_id, timeout_s=5)
    assert run_id == RUN_ID and outcome.succeeded and outcome.state.output == {"ok": True}
    (request,) = seen  # no status poll: the answer carried the result
    assert request.url.path == "/v2/echo/runsync" and request.url.query["wait"] == "1500"
    assert json.loads(request.content) == {
        "input": {"a": 1},
        "policy": {"executionTimeout": 60_000},
        "webhook": "https://h.test/x",
    }
    assert request.read_timeout == 1.5 + RUNSYNC_READ_MARGIN_S  # outlasts the wait


async def test_a_finished_runsync_outcome_can_be_taken_once() -> None:
    body = {"id": RUN_ID, "status": "FAILED", "error": "boom"}
    async with runsync_client(json_reply(body)) as compute:
        run_id = await compute.submit("echo", {})
        taken = compute.take_finished("echo", run_id)
        assert compute.take_finished("echo", run_id) is None
    assert taken is not None and not taken.succeeded and taken.reason == "failed: boom"


async def test_runsync_terminal_failures_are_classified_without_polling() -> None:
    body = {"id": RUN_ID, "status": "COMPLETED"}  # no output: the worker's upload failed
    async with runsync_client(json_reply(body)) as compute:
        outcome = await compute.wait("echo", await compute.submit("echo", {}), timeout_s=5)
        assert compute.requests_sent == 1
    assert not outcome.succeeded and outcome.reason == "completed without output"


async def test_runsync_still_in_progress_falls_back_to_status_polls() -> None:
    answers = iter(
        [
            {"id": RUN_ID, "status": "IN_PROGRESS"},
            {"id": RUN_ID, "status": "IN_PROGRESS"},
            {"id": RUN_ID, "status": "COMPLETED", "output": [1]},
        ]
    )
    paths: list[str] = []

    def reply(request: Request) -> Answer:
        paths.append(request.url.path)
        return Answer.of(200, json=next(answers))

    async with runsync_client(reply) as compute:
        run_id = await compute.submit("echo", {})
        outcome = await compute.wait("echo", run_id, timeout_s=5)
    assert outcome.succeeded and outcome.state.output == [1]
    assert paths == ["/v2/echo/runsync", f"/v2/echo/status/{RUN_ID}", f"/v2/echo/status/{RUN_ID}"]


@pytest.mark.parametrize("exc", [aiohttp.SocketTimeoutError("timed out"), aiohttp.ServerDisconnectedError()])
async def test_a_runsync_lost_in_transit_may_have_queued_the_job(exc: Exception) -> None:
    def reply(request: Request) -> Answer:
        raise exc

    async with runsync_client(reply) as compute:
        with pytest.raises(Unavailable, match=r"runsync.*the job may have been queued") as caught:
            await compute.submit("echo", {})
    assert_no_key(caught.value)


async def test_runsync_429_is_retried_like_run() -> None:
    replies = iter(
        [
            Answer.of(429, json={"error": "slow down"}, headers={"retry-after": "0"}),
            Answer.of(200, json={"id": RUN_ID, "status": "COMPLETED", "output": 1}),
        ]
    )
    async with runsync_client(lambda request: next(replies)) as compute:
        assert await compute.submit("echo", {}) == RUN_ID
        assert compute.requests_sent == 2


async def test_endpoints_whose_jobs_outlast_the_wait_go_back_to_run_and_probe_runsync() -> None:
    paths: list[str] = []
    ids = iter(range(1000))

    def reply(request: Request) -> Answer:
        paths.append(request.url.path.rsplit("/", 1)[-1])
        return Answer.of(200, json={"id": f"job-{next(ids)}", "status": "IN_QUEUE"})

    async with runsync_client(reply) as compute:
        for _ in range(11):
            await compute.submit("long", {})
        await compute.submit("short", {})  # another endpoint keeps its own record
    # 5 runsyncs to learn, then /run with a runsync probe every third submission.
    assert paths == ["runsync"] * 5 + ["run", "run", "runsync", "run", "run", "runsync"] + ["runsync"]


async def test_a_cancel_forgets_a_finished_runsync_answer() -> None:
    replies = iter(
        [
            Answer.of(200, json={"id": RUN_ID, "status": "COMPLETED", "output": 1}),
            Answer.of(200, json={"id": RUN_ID, "status": "COMPLETED", "output": 1}),
            Answer.of(200, json={"id": RUN_ID, "status": "COMPLETED", "output": 2}),
        ]
    )
    async with runsync_client(lambda request: next(replies)) as compute:
        run_id = await compute.submit("echo", {})
        await compute.cancel("echo", run_id)
        outcome = await compute.wait("echo", run_id, timeout_s=5)  # asks the service again
    assert outcome.state.output == 2


@pytest.mark.parametrize("wait_ms", [999, 300_001, 1.5, True])
def test_the_runsync_wait_must_be_within_the_contract(wait_ms: Any) -> None:
    with pytest.raises(ValueError, match="wait_ms"):
        SyncPolicy(wait_ms=wait_ms)


async def test_a_short_key_is_redacted_as_a_word_and_never_cuts_letters_out_of_others() -> None:
    """The issue's example: a one-letter key turned "does not exist" into "does not e[redacted]ist"."""
    reply = json_reply({"error": "request does not exist for key x"}, status_code=400)
    async with RunPodCompute("x", base_url="https://runpod.test/v2", replier=reply, poll=FAST) as compute:
        with pytest.raises(GatewayError) as raised:
            await compute.status("echo", RUN_ID)
    assert "does not exist for key [redacted]" in str(raised.value)


async def test_health_keeps_every_worker_count_runpod_reports() -> None:
    workers = {"idle": 1, "running": 2, "initializing": 3, "ready": 4, "throttled": 5, "unhealthy": 6}
    body = {
        "jobs": {"completed": 7, "failed": 0, "inProgress": 2, "inQueue": 1, "retried": 0},
        "workers": workers,
    }
    async with client(json_reply(body)) as compute:
        health = await compute.health("echo")
    assert health["workers"] == workers and health["jobs"]["completed"] == 7
