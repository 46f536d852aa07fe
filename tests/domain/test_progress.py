"""Progressed: each distinct progress value a running job reports is recorded once, at most
MAX_PROGRESS per job, only while the job runs; the audit's rules about it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from podsettle.domain.digests import digest
from podsettle.domain.errors import InvalidInput
from podsettle.domain.escrow_job import MAX_PROGRESS, PROGRESS_TEXT_MAX, EscrowJob, Progress
from tests.jobs import event_names, funded, opened, refunding, released, running

AT = datetime(2026, 11, 28, 11, 0, tzinfo=UTC)


def test_each_distinct_value_is_recorded_once() -> None:
    job = running()
    job.collect_events()
    recorded = [job.record_progress(value, AT) for value in (0.1, 0.1, {"pct": 50}, 0.1, {"pct": 50}, "done")]
    assert recorded == [True, False, True, False, False, True]
    assert event_names(job) == ["Progressed"] * 3
    assert job.progress == (
        Progress(digest(0.1), "0.1", 3, AT),
        Progress(digest({"pct": 50}), '{"pct":50}', 10, AT),
        Progress(digest("done"), '"done"', 6, AT),
    )
    assert job.view().progress == job.progress
    assert job.violations() == []


def test_a_long_value_is_recorded_by_its_digest_and_size() -> None:
    job = running()
    value = {"log": "x" * PROGRESS_TEXT_MAX}
    assert job.record_progress(value, AT)
    (only,) = job.progress
    assert only.value is None and only.digest == digest(value) and only.size > PROGRESS_TEXT_MAX


def test_the_count_is_bounded() -> None:
    job = running()
    recorded = sum(job.record_progress(step, AT) for step in range(MAX_PROGRESS + 10))
    assert recorded == MAX_PROGRESS == len(job.progress)
    assert not job.record_progress("one more", AT)


@pytest.mark.parametrize("build", [opened, funded, refunding, released])
def test_progress_outside_a_run_records_nothing(build: object) -> None:
    job = build()  # type: ignore[operator]
    job.collect_events()
    assert not job.record_progress(0.5, AT)
    assert event_names(job) == [] and job.progress == ()


def test_a_value_that_is_not_json_is_refused() -> None:
    with pytest.raises(InvalidInput, match="progress"):
        running().record_progress(float("nan"), AT)


def test_the_audit_finds_progress_out_of_order_repeated_or_over_the_bound() -> None:
    early = funded()
    early._progressed(digest(1), "1", 1, AT)
    assert "Progressed without Started" in early.violations()

    late = refunding()
    late._progressed(digest(1), "1", 1, AT)
    assert "Progressed after the run ended" in late.violations()

    twice = running()
    twice._progressed(digest(1), "1", 1, AT)
    twice._progressed(digest(1), "1", 1, AT)
    assert "the same Progressed twice" in twice.violations()

    flood = running()
    for step in range(MAX_PROGRESS + 1):
        flood._progressed(digest(step), str(step), 1, AT)
    assert any("over the bound" in found for found in flood.violations())


def test_the_event_round_trips_through_the_store() -> None:
    from podsettle import Settlements

    app = Settlements("memory")
    job = running()
    job.record_progress({"pct": 10}, AT)
    app.save(job)
    again = app.repository.get(job.id)
    assert isinstance(again, EscrowJob) and again.progress == job.progress
