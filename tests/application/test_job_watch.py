"""The engine's JobWatch: tasks waiting for a job another engine holds are woken by the log
follower when it reads a newer event of that job, or give up after their bound."""

from __future__ import annotations

import asyncio
import uuid

from podsettle.processor import JobWatch


async def test_a_waiter_is_woken_by_a_newer_event_of_its_job_only() -> None:
    watch = JobWatch()
    job, other = uuid.uuid4(), uuid.uuid4()
    waiting = asyncio.ensure_future(watch.changed(job, after=3, within_s=30))
    await asyncio.sleep(0)
    watch.seen(other, 9)  # another job's event
    watch.seen(job, 3)  # not newer than what the waiter read
    await asyncio.sleep(0.01)
    assert not waiting.done()
    watch.seen(job, 4)
    assert await asyncio.wait_for(waiting, 1) is True
    assert watch.wakes == 1 and watch.waiting == 0
    # An event read before a waiter registers still counts for it.
    assert await watch.changed(job, after=3, within_s=30) is True


async def test_a_waiter_gives_up_after_its_bound_to_look_at_the_claim_s_lease() -> None:
    watch = JobWatch()
    job = uuid.uuid4()
    assert await watch.changed(job, after=1, within_s=0.01) is False
    assert watch.timeouts == 1 and watch.waiting == 0
