"""Concurrency slots that a job waiting for another engine's claim gives back.

A batch (or a recovery) runs at most `concurrency` jobs at once, each holding a slot of a semaphore.
A job that waits for a claim another engine holds gives its slot back while it waits, so that the
batch moves on to jobs nobody holds instead of queueing behind the other engine's claims; the
processor calls `slot_given_back()` around such a wait (nothing happens for a task with no slot).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

_SLOT: ContextVar[Slot | None] = ContextVar("podsettle_slot", default=None)


class Slot:
    """One slot of `slots`, held by the task settling one job (`async with Slot(slots)`); or, made
    with `held=True` and `enter()`, a slot taken already by whoever started the task."""

    def __init__(self, slots: asyncio.Semaphore, *, held: bool = False) -> None:
        self.slots = slots
        self.held = held
        self._token: Any = None

    def enter(self) -> None:
        """This task holds the slot from now on (it was acquired for it)."""
        self._token = _SLOT.set(self)

    async def __aenter__(self) -> Slot:
        await self.slots.acquire()
        self.held = True
        self.enter()
        return self

    async def __aexit__(self, *exc: object) -> None:
        _SLOT.reset(self._token)
        if self.held:
            self.held = False
            self.slots.release()

    @contextlib.asynccontextmanager
    async def given_back(self) -> AsyncIterator[None]:
        if self.held:
            self.held = False
            self.slots.release()
        yield  # on an exception (a cancellation) the slot is not taken again
        await self.slots.acquire()
        self.held = True


def slot_given_back() -> contextlib.AbstractAsyncContextManager[None]:
    """The current task's slot, given back while it waits (nothing when it holds none)."""
    slot = _SLOT.get()
    return contextlib.nullcontext() if slot is None else slot.given_back()
