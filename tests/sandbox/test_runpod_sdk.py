"""The official `runpod` SDK client drives the emulator unchanged (only its base URL and key are set).

`runpod` is imported inside the fixtures only: it takes seconds to import, and `import podsettle`
must never pull it in.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import pytest

from podsettle.sandbox.http_server import BackgroundServer
from podsettle.sandbox.runpod_emulator import EndpointConfig, create_runpod_app

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


@pytest.fixture(scope="module")
def emulator() -> Iterator[BackgroundServer]:
    app = create_runpod_app(
        endpoints={
            "one-worker": EndpointConfig(handler="podsettle.sandbox.handlers:sleep", workers=1),
            "tokens": EndpointConfig(handler="tests.runpod_user_handlers:tokens"),
        },
        seed=5,
    )
    with BackgroundServer(app) as server:
        yield server


@pytest.fixture
def sdk(emulator: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    import runpod

    monkeypatch.setattr(runpod, "endpoint_url_base", f"{emulator.url}/v2")
    monkeypatch.setattr(runpod, "api_key", "sdk-test-key")
    module: ModuleType = runpod
    return module


def settle(job: Any) -> str:
    """Polls `job.status()` quickly (the SDK's own `output(timeout)` sleeps a whole second per poll)."""
    for _ in range(2000):
        status: str = job.status()
        if status in TERMINAL:
            return status
        time.sleep(0.005)
    raise AssertionError("the job never finished")


def test_run_status_and_output(sdk: ModuleType) -> None:
    endpoint = sdk.Endpoint("echo")
    job = endpoint.run({"prompt": "a cat"})
    assert isinstance(job.job_id, str) and job.job_id.endswith("-u1")
    assert settle(job) == "COMPLETED"
    assert job.output() == {"prompt": "a cat"}


def test_run_sync_returns_the_output(sdk: ModuleType) -> None:
    output = sdk.Endpoint("train").run_sync({"target": 0.75, "seed": 1}, timeout=30)
    assert set(output) == {"accuracy", "loss", "epochs", "seed"}
    assert abs(output["accuracy"] - 0.75) <= 0.05


def test_a_failed_job_has_no_output(sdk: ModuleType) -> None:
    job = sdk.Endpoint("fail").run({"message": "boom"})
    assert settle(job) == "FAILED"
    assert job.output() is None


def test_cancel(sdk: ModuleType) -> None:
    endpoint = sdk.Endpoint("one-worker")
    job = endpoint.run({"seconds": 30})
    assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
    assert job.status() == "CANCELLED"


def test_health_and_purge_queue(sdk: ModuleType) -> None:
    endpoint = sdk.Endpoint("one-worker")
    running = endpoint.run({"seconds": 30})
    for _ in range(3):
        endpoint.run({"seconds": 30})
    health = endpoint.health()
    assert set(health) == {"jobs", "workers"}
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert health["workers"]["idle"] + health["workers"]["running"] == 1
    assert endpoint.purge_queue() == {"removed": 3, "status": "completed"}
    running.cancel()


def test_stream_yields_a_generator_handlers_partials(sdk: ModuleType) -> None:
    job = sdk.Endpoint("tokens").run({"text": "one two three"})
    assert list(job.stream()) == ["one", "two", "three"]


def test_a_missing_key_is_refused(sdk: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdk, "api_key", "")
    with pytest.raises(RuntimeError, match="401 Unauthorized"):
        sdk.Endpoint("echo", api_key="").run({"prompt": "x"})


@pytest.fixture
async def aiohttp_session() -> AsyncIterator[Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session


async def test_asyncio_endpoint_run_status_output_cancel_health(
    sdk: ModuleType, aiohttp_session: Any
) -> None:
    import asyncio

    endpoint = sdk.AsyncioEndpoint("echo", aiohttp_session)
    job = await endpoint.run({"prompt": "async"})
    for _ in range(2000):
        if await job.status() in TERMINAL:
            break
        await asyncio.sleep(0.005)
    assert await job.status() == "COMPLETED"
    assert await job.output() == {"prompt": "async"}

    slow = await sdk.AsyncioEndpoint("one-worker", aiohttp_session).run({"seconds": 30})
    assert await slow.cancel() == {"id": slow.job_id, "status": "CANCELLED"}
    assert await slow.status() == "CANCELLED"

    health = await endpoint.health()
    assert health["jobs"]["completed"] >= 1
