"""Fixtures shared by every layer's tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator

import pytest

from podsettle.support.logs import configure_logging


@pytest.fixture(scope="session", autouse=True)
def podsettle_logging() -> None:
    """The test process is a runtime that embeds podsettle: logging is configured before anything
    logs (lines to stderr, warnings and up), as the CLI does first thing. Left at structlog's
    defaults, a sandbox thread's debug lines would go to stdout, which `CliRunner` captures as a
    command's --json output."""
    configure_logging("WARNING", force=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeClock]:
    """Virtual time: `asyncio.sleep` waits until a driver moves the clock to the earliest wake-up,
    once every task that can run has run, so concurrent sleepers overlap as they would for real."""
    clock = FakeClock()
    real_sleep = asyncio.sleep
    sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
    order = itertools.count()

    async def fake_sleep(seconds: float) -> None:
        if seconds <= 0:
            await real_sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(sleepers, (clock.now + seconds, next(order), future))
        await future

    async def drive() -> None:
        while True:
            for _ in range(20):
                await real_sleep(0)
            if sleepers:
                wake, _, future = heapq.heappop(sleepers)
                clock.now = max(clock.now, wake)
                future.set_result(None)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    driver = asyncio.get_running_loop().create_task(drive())
    yield clock
    driver.cancel()
