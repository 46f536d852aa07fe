"""The client-side rate limiter keeps every window under its limit."""

from __future__ import annotations

import asyncio

import pytest

from podsettle.adapters.limits import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_no_window_holds_more_than_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        clock.now += seconds
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    limiter = RateLimiter(5, 10.0, clock=clock)
    times: list[float] = []

    async def call() -> None:
        await limiter.acquire()
        times.append(clock.now)

    await asyncio.gather(*(call() for _ in range(23)))
    assert len(times) == 23
    for t in times:
        assert sum(1 for u in times if t <= u < t + 10.0) <= 5
    assert times[-1] >= 40.0  # 23 calls at 5 per 10 s need four more windows


async def test_penalize_pauses_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        clock.now += seconds
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    limiter = RateLimiter(100, 1.0, clock=clock)
    limiter.penalize(3.0)
    await limiter.acquire()
    assert clock.now >= 3.0


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        RateLimiter(0, 1.0)
