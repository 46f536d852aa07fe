"""RunPod worker files, written as RunPod documents them, run unchanged in the sandbox; the official SDK
(sync and asyncio) and podsettle's client get RunPod's answers from them (tests/data/runpod_workers)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from podsettle.adapters.ports import RunStatus
from podsettle.adapters.runpod import PollPolicy, RunPodCompute
from podsettle.sandbox.http_server import BackgroundServer
from podsettle.sandbox.inprocess_compute import InProcessCompute
from podsettle.sandbox.runpod_emulator import EmulatorState, EndpointConfig, create_runpod_app
from podsettle.sandbox.worker_file import WorkerFileError, load_worker

WORKERS = Path(__file__).resolve().parents[1] / "data" / "runpod_workers"
EXPECTED: dict[str, dict[str, Any]] = {
    name: case
    for name, case in json.loads((WORKERS / "expected.json").read_text()).items()
    if name != "_about"
}
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


def worker(name: str) -> str:
    return str(WORKERS / name)


@pytest.fixture(scope="module")
def emulator() -> Iterator[BackgroundServer]:
    endpoints: dict[str, Any] = {name: worker(case["file"]) for name, case in EXPECTED.items()}
    endpoints.update(
        {
            "concurrent": EndpointConfig(handler=worker("concurrent_worker.py"), workers=1),
            "refresh": EndpointConfig(handler=worker("refresh_worker.py"), workers=1),
            "counting": EndpointConfig(handler=worker("counting_worker.py"), workers=1),
            "blocking": EndpointConfig(handler=worker("blocking_worker.py"), workers=1),
        }
    )
    with BackgroundServer(create_runpod_app(endpoints=endpoints, seed=3)) as server:
        yield server


def state_of(server: BackgroundServer) -> EmulatorState:
    app: Any = server._server.config.app
    result: EmulatorState = app.state.runpod
    return result


@pytest.fixture
def sdk(emulator: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    import runpod

    monkeypatch.setattr(runpod, "endpoint_url_base", f"{emulator.url}/v2")
    monkeypatch.setattr(runpod, "api_key", "worker-files-key")
    module: ModuleType = runpod
    return module


def http(emulator: BackgroundServer, *, bare: bool = False) -> httpx.Client:
    key = "worker-files-key"
    headers = {"Authorization": key if bare else f"Bearer {key}"}
    return httpx.Client(base_url=f"{emulator.url}/v2", headers=headers, timeout=30)


def finish(client: httpx.Client, endpoint: str, job_id: str) -> dict[str, Any]:
    for _ in range(400):
        body: dict[str, Any] = client.get(f"/{endpoint}/status/{job_id}", params={"wait": 1000}).json()
        if body["status"] in TERMINAL:
            return body
    raise AssertionError("the job never finished")


def check_answer(case: dict[str, Any], status: str, output: Any, has_output: bool, error: Any) -> None:
    assert status == case["status"]
    if "output" in case:
        assert has_output and output == case["output"]
    elif case["status"] == "FAILED":
        assert output is None
    if "error" in case:
        assert error == case["error"]
    if "error_prefix" in case:
        assert isinstance(error, str) and error.startswith(case["error_prefix"])
    if "error_json_keys" in case:
        details = json.loads(error)
        assert sorted(details) == case["error_json_keys"]
        assert details["error_message"] == case["error_message"]
        assert details["runpod_version"] == sys.modules["runpod"].__version__


# ------------------------------------------------------------------ loading


def test_a_documented_worker_file_is_captured_not_started() -> None:
    argv, sigint, hook = list(sys.argv), signal.getsignal(signal.SIGINT), sys.excepthook
    for name in ("hello_worker.py", "rude_worker.py", "progress_worker.py"):
        spec = load_worker(worker(name))
        assert callable(spec.handler) and spec.path == WORKERS / name
    # The real `start` rewrites sys.argv and installs a SIGINT handler; a worker file may do so too.
    assert sys.argv == argv and signal.getsignal(signal.SIGINT) is sigint and sys.excepthook is hook


def test_the_start_options_are_read() -> None:
    assert load_worker(worker("stream_aggregate_worker.py")).return_aggregate_stream is True
    assert load_worker(worker("stream_worker.py")).return_aggregate_stream is False
    assert load_worker(worker("refresh_worker.py")).refresh_worker is True
    modifier = load_worker(worker("concurrent_worker.py")).concurrency_modifier
    assert modifier is not None and modifier(1) == 4
    guarded = load_worker(worker("main_guard/worker.py"))  # start under __main__: read from the source
    assert guarded.handler.__name__ == "generate" and guarded.return_aggregate_stream is True


def test_an_exiting_file_is_reported_and_the_process_lives_on() -> None:
    with pytest.raises(WorkerFileError, match=r"exiting_worker.py called exit\(1\)"):
        load_worker(worker("exiting_worker.py"))


def test_a_file_without_a_handler_says_what_to_name_it() -> None:
    with pytest.raises(WorkerFileError, match="name the handler function 'handler'"):
        load_worker(worker("no_handler_worker.py"))
    with pytest.raises(WorkerFileError, match="does not exist"):
        load_worker(worker("missing.py"))


def test_two_worker_folders_each_get_their_own_sibling_module(tmp_path: Path) -> None:
    other = tmp_path / "other_worker"
    other.mkdir()
    (other / "helpers.py").write_text("def shout(text):\n    return text.lower() + '?'\n")
    (other / "handler.py").write_text(
        (WORKERS / "sibling_worker" / "handler.py").read_text().replace("__main__", "__never__")
    )
    first = load_worker(worker("sibling_worker"))
    second = load_worker(str(other))
    job = {"id": "j", "input": {"text": "Hi"}}
    assert first.handler(job) == {"shout": "HI!"} and second.handler(job) == {"shout": "hi?"}
    assert "helpers" not in sys.modules and str(other) not in sys.path


# ------------------------------------------------------------------ RunPod's answers


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_official_sdk_gets_runpods_answers(sdk: ModuleType, name: str) -> None:
    case = EXPECTED[name]
    job = sdk.Endpoint(name).run(case["input"])
    for _ in range(2000):
        if job.status() in TERMINAL:
            break
        time.sleep(0.005)
    state = job._fetch_job()
    check_answer(case, state["status"], state.get("output"), "output" in state, state.get("error"))
    if case["status"] == "COMPLETED":
        assert job.output() == case["output"]


def test_the_sdk_streams_a_generator_worker(sdk: ModuleType) -> None:
    job = sdk.Endpoint("stream").run(EXPECTED["stream"]["input"])
    assert list(job.stream()) == EXPECTED["stream"]["stream"]
    assert job.output() == []  # without return_aggregate_stream, as on RunPod


async def test_the_asyncio_sdk_gets_runpods_answers(sdk: ModuleType) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for name in ("hello", "stream", "stream-aggregate", "error"):
            case = EXPECTED[name]
            job = await sdk.AsyncioEndpoint(name, session).run(case["input"])
            for _ in range(2000):
                if await job.status() in TERMINAL:
                    break
                await asyncio.sleep(0.005)
            state = await job._fetch_job()
            check_answer(case, state["status"], state.get("output"), "output" in state, state.get("error"))


@pytest.fixture
async def client(emulator: BackgroundServer) -> AsyncIterator[RunPodCompute]:
    compute = RunPodCompute(
        "worker-files-key", base_url=f"{emulator.url}/v2", poll=PollPolicy(initial_s=0.02)
    )
    yield compute
    await compute.aclose()


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_podsettles_client_gets_runpods_answers(client: RunPodCompute, name: str) -> None:
    case = EXPECTED[name]
    run_id = await client.submit(name, case["input"])
    state = (await client.wait(name, run_id, timeout_s=20)).state
    check_answer(case, state.status.value, state.output, state.has_output, state.error)


async def test_progress_updates_show_while_the_job_runs(client: RunPodCompute) -> None:
    run_id = await client.submit("progress", {"steps": 3, "pause": 0.3})
    seen: list[Any] = []
    for _ in range(200):
        state = await client.status("progress", run_id)
        if state.status is RunStatus.IN_PROGRESS and state.has_output and state.output not in seen:
            seen.append(state.output)
            assert state.execution_ms is not None  # executionTime while running
        if state.status.terminal:
            break
        await asyncio.sleep(0.05)
    assert seen[:1] == ["step 1/3"] and "step 3/3" in seen
    assert state.status is RunStatus.COMPLETED and state.output == {"steps": 3}


# ------------------------------------------------------------------ start options at work


def test_concurrency_modifier_lets_one_worker_take_several_jobs(emulator: BackgroundServer) -> None:
    with http(emulator) as c:
        started = time.monotonic()
        ids = [
            c.post("/concurrent/run", json={"input": {"seconds": 0.5, "tag": n}}).json()["id"]
            for n in range(4)
        ]
        time.sleep(0.2)
        assert c.get("/concurrent/health").json()["jobs"]["inProgress"] == 4  # one worker, four jobs
        answers = [finish(c, "concurrent", job_id) for job_id in ids]
    assert [a["output"] for a in answers] == [{"done": n} for n in range(4)]
    assert time.monotonic() - started < 1.5  # one at a time would take 2 s


def test_refresh_worker_imports_the_file_afresh_after_each_job(emulator: BackgroundServer) -> None:
    with http(emulator) as c:
        for endpoint, expected in (("refresh", [1, 1, 1]), ("counting", [1, 2, 3])):
            calls = []
            for _ in range(3):
                job_id = c.post(f"/{endpoint}/run", json={"input": {}}).json()["id"]
                calls.append(finish(c, endpoint, job_id)["output"]["calls_in_this_worker"])
            assert calls == expected, endpoint


def test_a_blocking_sync_handler_does_not_stall_other_endpoints(emulator: BackgroundServer) -> None:
    with http(emulator) as c:
        blocked = c.post("/blocking/run", json={"input": {"seconds": 1.5}}).json()["id"]
        time.sleep(0.1)
        started = time.monotonic()
        answer = c.post("/hello/runsync", json={"input": {"name": "x"}}).json()
        assert answer["status"] == "COMPLETED" and time.monotonic() - started < 1.0
        assert finish(c, "blocking", blocked)["status"] == "COMPLETED"


async def test_a_blocking_worker_file_runs_in_a_thread_in_process_too() -> None:
    endpoints = {"blocking": worker("blocking_worker.py")}
    async with InProcessCompute(endpoints, seed=1) as compute:  # sync handlers on the loop by default
        slow = await compute.submit("blocking", {"seconds": 1.0})
        started = time.monotonic()
        quick = await compute.wait("echo", await compute.submit("echo", {"a": 1}), timeout_s=5)
        assert quick.succeeded and time.monotonic() - started < 0.5
        assert (await compute.wait("blocking", slow, timeout_s=5)).succeeded


# ------------------------------------------------------------------ the routes other clients use


def test_s3config_and_webhookv2_reach_the_handler(emulator: BackgroundServer) -> None:
    s3 = {"accessId": "a", "accessSecret": "s", "bucketName": "b", "endpointUrl": "u", "objectPath": "o"}
    body = {"input": {"name": "s3"}, "s3Config": s3, "webhookV2": "http://127.0.0.1:9/hook"}
    with http(emulator) as c:
        answer = c.post("/hello/runsync", json=body).json()
    assert answer["output"] == {"greeting": "Hello, s3!", "s3Config": s3, "webhookV2": body["webhookV2"]}


def test_runsync_ids_and_a_bare_key(emulator: BackgroundServer) -> None:
    with http(emulator, bare=True) as c:
        answer = c.post("/hello/runsync", json={"input": {}}).json()
        assert answer["id"].startswith("sync-") and answer["id"].endswith("-u1")
        assert not c.post("/hello/run", json={"input": {}}).json()["id"].startswith("sync-")
    refused = httpx.post(
        f"{emulator.url}/v2/hello/run", json={"input": {}}, headers={"Authorization": "Bearer"}
    )
    assert refused.status_code == 401


def test_health_counts_every_worker_state(emulator: BackgroundServer) -> None:
    with http(emulator) as c:
        workers = c.get("/hello/health").json()["workers"]
    assert set(workers) == {"idle", "initializing", "ready", "running", "throttled", "unhealthy"}
    assert workers["idle"] + workers["running"] + workers["initializing"] + workers["unhealthy"] == 4


def test_a_retried_job_carries_retries(emulator: BackgroundServer) -> None:
    with http(emulator) as c:
        job_id = c.post("/raising/run", json={"input": {}}).json()["id"]
        assert "retries" not in finish(c, "raising", job_id)
        assert c.post(f"/raising/retry/{job_id}").json()["status"] == "IN_QUEUE"
        assert finish(c, "raising", job_id)["retries"] == 1


def test_long_polls_answer_when_the_job_changes_and_within_their_wait(emulator: BackgroundServer) -> None:
    with http(emulator) as c:
        job_id = c.post("/blocking/run", json={"input": {"seconds": 0.6}}).json()["id"]
        c.get(f"/blocking/status/{job_id}", params={"wait": 500})  # answered by IN_PROGRESS at the latest
        started = time.monotonic()
        body = c.get(f"/blocking/status-sync/{job_id}", params={"wait": 5000}).json()
        assert body["status"] == "COMPLETED" and time.monotonic() - started < 2.0  # the job ended first

        slow = c.post("/blocking/run", json={"input": {"seconds": 3}}).json()["id"]
        time.sleep(0.1)  # it runs: nothing changes for 3 s, so each long poll lasts its whole wait
        for route in ("status", "status-sync", "stream"):
            started = time.monotonic()
            answer = c.get(f"/blocking/{route}/{slow}", params={"wait": 400}).json()
            waited = time.monotonic() - started
            assert answer["status"] == "IN_PROGRESS" and 0.35 <= waited < 1.5, (route, waited)
        c.post(f"/blocking/cancel/{slow}")


def test_stream_long_polls_hand_out_each_part_once(emulator: BackgroundServer) -> None:
    with http(emulator) as c:
        parts: list[Any] = []
        stream_id = c.post("/stream/run", json={"input": {"text": "a b c"}}).json()["id"]
        for _ in range(50):
            body = c.get(f"/stream/stream/{stream_id}", params={"wait": 1000}).json()
            parts.extend(body["stream"])
            if body["status"] in TERMINAL and not body["stream"]:
                break
    assert parts == [{"output": {"token": t}} for t in "abc"]


def test_long_polling_clients_make_no_request_storm(emulator: BackgroundServer) -> None:
    """JS `runSync`: /runsync?wait=1000, then status-sync until the job ends; Go: /stream?wait=."""
    requests = state_of(emulator).requests
    with http(emulator) as c:
        before = requests.copy()
        answer = c.post("/blocking/runsync", params={"wait": 1000}, json={"input": {"seconds": 2.5}}).json()
        assert answer["status"] in ("IN_QUEUE", "IN_PROGRESS")
        while answer["status"] not in TERMINAL:
            answer = c.get(f"/blocking/status-sync/{answer['id']}", params={"wait": 1000}).json()
        assert answer["status"] == "COMPLETED"
        job_id = c.post("/progress/run", json={"input": {"steps": 4, "pause": 0.3}}).json()["id"]
        while c.get(f"/progress/status/{job_id}", params={"wait": 1000}).json()["status"] not in TERMINAL:
            pass
    made = requests - before
    # 2.5 s in waits of 1 s: at most the runsync and a few status-syncs (not one per millisecond);
    # the progress job: one answer per change (start, 4 updates, the end), not a busy loop.
    assert made["runsync"] == 1 and made["status-sync"] <= 3, made
    assert made["status"] <= 8, made


# ------------------------------------------------------------------ the two ways in


async def test_engine_sandbox_mounts_a_worker_file(tmp_path: Path) -> None:
    from podsettle import Engine

    store = f"sqlite:///{tmp_path / 'engine.db'}"
    async with Engine.sandbox(store, balance="10", endpoints={"hello": worker("hello_worker.py")}) as engine:
        result = await engine.run_paid_job("hello", {"name": "engine"}, budget="0.50")
    assert result.output == {"greeting": "Hello, engine!"}
    assert result.money.to_workers > 0 and result.money.returned == 0 and result.money.still_held == 0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_sandbox_command_serves_worker_files() -> None:
    import subprocess

    port = free_port()
    command = [sys.executable, "-m", "podsettle.cli", "sandbox", "--port", str(port)]
    command += [
        "--endpoint",
        f"hello={worker('hello_worker.py')}",
        "--endpoint",
        f"words={worker('stream_worker.py')}",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}/v2"
        for _ in range(300):
            try:
                answer = httpx.post(
                    f"{base}/hello/runsync", json={"input": {"name": "cli"}}, headers={"Authorization": "k"}
                )
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                time.sleep(0.05)
        assert answer.json()["output"] == {"greeting": "Hello, cli!"}
        words = httpx.post(
            f"{base}/words/runsync", json={"input": {"text": "a b"}}, headers={"Authorization": "k"}
        )
        assert words.json()["output"] == []
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("hello", "--endpoint takes NAME=path/to/worker.py"),
        (f"gone={worker('exiting_worker.py')}", "called exit(1)"),
        (f"bad name={worker('hello_worker.py')}", "an endpoint id uses letters"),
    ],
)
def test_the_sandbox_command_refuses_what_it_cannot_mount(option: str, message: str) -> None:
    from typer.testing import CliRunner

    from podsettle.cli.commands import app

    result = CliRunner().invoke(app, ["sandbox", "--port", "0", "--endpoint", option])
    assert result.exit_code == 2 and message in result.output


def test_the_mount_route_takes_a_worker_file(emulator: BackgroundServer) -> None:
    with http(emulator) as c:
        mounted = c.put(
            "/mounted/_endpoint", json={"handler": worker("stream_aggregate_worker.py"), "workers": 1}
        )
        assert mounted.json()["return_aggregate_stream"] is True
        assert c.post("/mounted/runsync", json={"input": {"text": "x y"}}).json()["output"] == ["X", "Y"]
        refused = c.put("/exits/_endpoint", json={"handler": worker("exiting_worker.py")})
        assert refused.status_code == 400 and "called exit(1)" in refused.json()["error"]
