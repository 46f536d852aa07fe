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
    caller, for when the service answered 429 anyway. `acquire(within_s=...)` gives up (returns
    False, no slot taken) when no slot comes within that many seconds: a call that is worth making
    only before a deadline is then never made late.
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

    async def acquire(self, within_s: float | None = None) -> bool:
        # Each caller reserves the next free slot at once (no await between reading and reserving,
        # so one event loop needs no lock) and then sleeps until it; reservations stay in order.
        now = self._clock()
        while self._calls and self._calls[0] <= now - self.period_s:
            self._calls.popleft()
        at = max(now, self._paused_until, self._calls[-1] if self._calls else now)
        if len(self._calls) >= self.max_calls:
            at = max(at, self._calls[-self.max_calls] + self.period_s)
        if within_s is not None and at > now + within_s:
            return False
        self._calls.append(at)
        while True:
            wait = max(at, self._paused_until) - self._clock()
            if wait <= 0:
                return True
            await asyncio.sleep(wait)

    def penalize(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + seconds)
