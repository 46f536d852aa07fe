"""The one log follower (projections/follower.py): pages after a position, with and without a topics
filter, up to a stop; and the tracked position the engine's follower keeps in the library's table."""

from __future__ import annotations

from pathlib import Path

import pytest
from eventsourcing.projection import ApplicationSubscription
from eventsourcing.utils import get_topic

from podsettle import Settlements
from podsettle.domain import EscrowJob, Step
from podsettle.projections.follower import LogFollower, TrackedPosition
from tests.histories import act, history


@pytest.fixture
def app(tmp_path: Path) -> Settlements:
    return Settlements(f"sqlite:///{tmp_path / 'store.db'}")


def test_unfiltered_pages_cover_the_log_once_in_order(app: Settlements) -> None:
    history(app, 12, seed=3)
    last = app.recorder.max_notification_id()
    follower = LogFollower(app.recorder, page_size=7)
    pages = list(follower.pages_after(0))
    ids = [n.id for page in pages for n in page.notifications]
    assert ids == list(range(1, last + 1))
    assert all(len(page.notifications) == 7 for page in pages[:-1]) and len(pages) == -(-last // 7)
    assert [page.position for page in pages] == [page.notifications[-1].id for page in pages]
    assert list(follower.pages_after(last)) == []
    assert [n.id for p in follower.pages_after(5, stop=20) for n in p.notifications] == list(range(6, 21))


def test_a_filtered_follower_moves_past_events_that_do_not_match(app: Settlements) -> None:
    history(app, 6, seed=4)
    started = get_topic(EscrowJob.Started)
    wanted = [n.id for n in app.recorder.select_notifications(1, 10_000, topics=[started])]
    last = app.recorder.max_notification_id()
    assert wanted and wanted[-1] < last
    follower = LogFollower(app.recorder, topics=[started], page_size=2)
    pages = list(follower.pages_after(0))
    assert [n.id for page in pages for n in page.notifications] == wanted
    assert pages[-1].position == last  # read to the head, though the last events did not match
    full = follower.page_after(0)
    assert full.more and full.position == wanted[1]
    assert follower.page_after(last).notifications == ()
    assert follower.page_after(0, stop=wanted[0]).position == wanted[0]


def test_the_tracked_position_moves_forward_and_survives_a_second_follower(app: Settlements) -> None:
    history(app, 2, seed=5)
    first = TrackedPosition.open(app.factory, "intents")
    assert first.get() == 0
    first.record(10)
    second = TrackedPosition.open(app.factory, "intents")  # the table exists already
    assert second.get() == 10
    second.record(10)  # recorded by the other one first: the same fact, no error
    second.record(25)
    assert first.get() == 25
    assert TrackedPosition.open(app.factory, "other").get() == 0


def test_an_intent_written_meanwhile_is_in_the_next_page(app: Settlements) -> None:
    history(app, 3, seed=6)
    follower = LogFollower(app.recorder, topics=[get_topic(EscrowJob.Resolved)])
    position = follower.page_after(0).position
    job = app.list_jobs(state="FUNDING")
    assert job, "the history leaves a job waiting to be funded"
    act(app, job[0].id, lambda j: j.record_attempt(Step.FUND, "p1"))
    act(app, job[0].id, lambda j: j.raise_attention(Step.FUND, "lost response"))
    act(app, job[0].id, lambda j: j.resolve("nothing found", "operator", retry=True))
    page = follower.page_after(position)
    assert [n.originator_id for n in page.notifications] == [job[0].id]
    assert page.position == app.recorder.max_notification_id()


def test_the_library_cannot_subscribe_to_sqlite(app: Settlements) -> None:
    """Why the follower pulls (its docstring): should a later eventsourcing subscribe to SQLite,
    this fails, and `eventsourcing.projection` is worth trying again."""
    with pytest.raises(NotImplementedError):
        ApplicationSubscription(app, gt=0)
