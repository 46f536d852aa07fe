"""Client-side rate limiting: stay under a service's documented per-route limits instead of
collecting 429s."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """At most `max_calls` per sliding window of `period_s` seconds (asyncio, one event loop).

    `await limiter.acquire()` returns when a call may be made; `penalize(seconds)` pauses every
    caller, for when the service answered 429 anyway.
    """

    def __init__(
        self, max_calls: int, period_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_calls < 1 or period_s <= 0:
            raise ValueError("a rate limit needs max_calls >= 1 and period_s > 0")
        self.max_calls = max_calls
        self.period_s = period_s
        self._clock = clock
        self._calls: deque[float] = deque()
        self._paused_until = 0.0
        self._lock: asyncio.Lock | None = None

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                now = self._clock()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                while self._calls and self._calls[0] <= now - self.period_s:
                    self._calls.popleft()
                if len(self._calls) < self.max_calls:
                    self._calls.append(now)
                    return
                await asyncio.sleep(self._calls[0] + self.period_s - now)

    def penalize(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + seconds)
