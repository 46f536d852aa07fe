"""The client-side rate limiter keeps every window under its limit."""

from __future__ import annotations

import asyncio

import pytest

from podsettle.adapters.limits import RateLimiter
from tests.conftest import FakeClock


async def test_no_window_holds_more_than_the_limit(virtual_clock: FakeClock) -> None:
    clock = virtual_clock
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


async def test_penalize_pauses_callers(virtual_clock: FakeClock) -> None:
    clock = virtual_clock
    limiter = RateLimiter(100, 1.0, clock=clock)
    limiter.penalize(3.0)
    await limiter.acquire()
    assert clock.now >= 3.0


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        RateLimiter(0, 1.0)


async def test_a_caller_with_a_deadline_gives_up_without_taking_a_slot() -> None:
    """A create queued behind the limit that could only be sent after its job's start window closes
    is never sent (the issue's fee lost on a job funded too late to start)."""
    clock = FakeClock()
    limiter = RateLimiter(2, 60.0, clock=clock)
    assert await limiter.acquire(within_s=1.0) and await limiter.acquire(within_s=1.0)
    assert not await limiter.acquire(within_s=30.0)  # the next slot is 60 s away
    clock.now = 59.0
    assert not await limiter.acquire(within_s=0.5)
    assert len(limiter._calls) == 2  # the refusals reserved nothing
    clock.now = 60.0
    assert await limiter.acquire(within_s=0.0)
