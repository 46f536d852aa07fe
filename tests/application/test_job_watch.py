"""The engine's JobWatch: tasks waiting for a job another engine holds are woken by the log
follower when the job changes in a way that concerns them, not by that engine's next claim."""

from __future__ import annotations

import asyncio
import uuid

from podsettle.processor import JobWatch


async def test_a_waiter_sleeps_through_the_holder_s_next_claim_and_wakes_when_the_job_moves_on() -> None:
    watch = JobWatch()
    job = uuid.uuid4()
    waiting = asyncio.ensure_future(watch.changed(job, after=3, within_s=30))
    await asyncio.sleep(0)
    watch.seen(job, 5, wake=False)  # the holder's outcome and next claim: still held
    await asyncio.sleep(0.01)
    assert not waiting.done() and watch.held_on == 1
    watch.seen(job, 6)  # the job rests (or its intent is free): the waiter reads it
    assert await asyncio.wait_for(waiting, 1) is True
    assert watch.wakes == 1 and watch.waiting == 0
    # A waiter that registers after a non-waking event with an older version returns at once
    # (it reads the job once, sees the claim, and waits again from the newer version).
    assert await watch.changed(job, after=4, within_s=30) is True


async def test_a_waiter_gives_up_after_its_bound_to_look_at_the_claim_s_lease() -> None:
    watch = JobWatch()
    job = uuid.uuid4()
    assert await watch.changed(job, after=1, within_s=0.01) is False
    assert watch.timeouts == 1 and watch.waiting == 0
