"""The job writer, the one command path: a store failure reaches the callers of the failed save
and leaves the writer serving; a one-command writer (`run_command`) handles races like the engine."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from podsettle import JobRequest, Settlements
from podsettle.domain import State, Step
from podsettle.writer import JobWriter, run_command
from tests.histories import OUTCOMES, Plan, act, drive_history, steps
from tests.jobs import DEADLINE, request


def spec(key: str) -> JobRequest:
    return request(key, budget="0.25")


async def test_a_store_error_reaches_the_callers_and_the_writer_keeps_serving() -> None:
    app = Settlements("memory")
    save_all = app.save_all
    failures: list[int] = []

    def locked_once(aggregates: Any) -> None:
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        save_all(aggregates)

    app.save_all = locked_once  # type: ignore[method-assign]
    writer = JobWriter(app)
    with pytest.raises(sqlite3.OperationalError):
        await asyncio.wait_for(writer.open([spec("a")]), 5)
    assert writer.known_version(app.build(spec("a"))[0].id) == 0  # never saved: not known
    (job_id,) = await asyncio.wait_for(writer.open([spec("a")]), 5)
    claimed, view = await asyncio.wait_for(writer.claim(job_id, Step.FUND, "p1", after=0, at=DEADLINE), 5)
    assert claimed == 1 and view.state == State.FUNDING
    await writer.aclose()
    assert app.get_job(job_id).intent is not None


async def test_a_resolution_racing_another_operator_is_refused_not_recorded_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ours, theirs = Settlements(url), Settlements(url)
    job_id = theirs.open_job(spec("attention"))
    act(theirs, job_id, lambda j: j.record_attempt(Step.FUND, "p1"))
    act(theirs, job_id, lambda j: j.raise_attention(Step.FUND, "lost response", {"status": "timeout"}))
    read = ours.get_job
    raced: list[bool] = []

    def read_then_lose_the_race(job_id: Any) -> Any:
        job = read(job_id)
        if not raced:  # the other operator resolves between our read and our save
            raced.append(True)
            act(theirs, job_id, lambda j: j.resolve("found funded", "operator-2", retry=True))
        return job

    monkeypatch.setattr(ours, "get_job", read_then_lose_the_race)
    from podsettle.cli.reconcile import resolve_job
    from podsettle.domain.errors import IllegalTransition

    with pytest.raises(IllegalTransition, match="only an ATTENTION job"):
        await resolve_job(ours, str(job_id), "found nothing", "retry", "operator-1")
    job = theirs.get_job(job_id)
    assert job.counts["Resolved"] == 1 and job.state == State.FUNDING


async def test_a_resolution_with_an_outcome_that_does_not_fit_records_nothing(tmp_path: Path) -> None:
    app = Settlements(f"sqlite:///{tmp_path / 'store.db'}")
    job_id = app.open_job(spec("attention"))
    act(app, job_id, lambda j: j.record_attempt(Step.FUND, "p1"))
    act(app, job_id, lambda j: j.raise_attention(Step.FUND, "lost response"))
    version = app.get_job(job_id).version
    from podsettle.cli.reconcile import resolve_job
    from podsettle.domain.errors import InvalidInput

    with pytest.raises(InvalidInput, match="does not fit"):
        await resolve_job(app, str(job_id), "looked", "released", "operator-1")
    assert app.get_job(job_id).version == version
    summary = await resolve_job(app, str(job_id), "escrow found", "funded:esc_found", "operator-1")
    assert summary["state"] == "FUNDED" and app.get_job(job_id).escrow_id == "esc_found"


async def test_run_command_retries_an_outcome_that_lost_a_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ours, theirs = Settlements(url), Settlements(url)
    job_id = theirs.open_job(spec("converge"))
    act(theirs, job_id, lambda j: j.record_attempt(Step.FUND, "p1"))
    read = ours.get_job
    raced: list[bool] = []

    def read_then_lose_the_race(job_id: Any) -> Any:
        job = read(job_id)
        if not raced:
            raced.append(True)
            act(theirs, job_id, lambda j: j.record_funded("esc_1", "0.25", "0.002500", "0.247500"))
        return job

    monkeypatch.setattr(ours, "get_job", read_then_lose_the_race)
    _, view = await run_command(
        ours, job_id, lambda j: j.record_funded("esc_1", "0.25", "0.002500", "0.247500")
    )
    assert view.state == State.FUNDED
    assert theirs.get_job(job_id).counts["Funded"] == 1


async def test_an_operator_release_records_the_services_figures_not_podsettles_own(tmp_path: Path) -> None:
    """Issue 13's example: budget 0.100450 on v1, where the service's float arithmetic gives fee
    0.001004 / net 0.099446 and exact half-up would give 0.001005 / 0.099445."""
    from dataclasses import replace

    from podsettle.cli.reconcile import resolve_job
    from podsettle.domain.digests import digest
    from podsettle.domain.money import to_money

    app = Settlements(f"sqlite:///{tmp_path / 'store.db'}")
    request = replace(spec("v1-release"), budget=to_money("0.100450"), dialect="v1")
    job_id = app.open_job(request)
    act(app, job_id, lambda j: j.record_attempt(Step.FUND, "p1"))
    act(app, job_id, lambda j: j.record_funded("esc_1", to_money("0.100450"), "0.001004", "0.099446"))
    act(app, job_id, lambda j: j.record_attempt(Step.START, "p1"))
    act(app, job_id, lambda j: j.record_started("rp-1"))
    act(app, job_id, lambda j: j.record_completed(digest({"out": 1})))
    act(app, job_id, lambda j: j.record_attempt(Step.RELEASE, "p1"))
    act(app, job_id, lambda j: j.raise_attention(Step.RELEASE, "release answered 500"))
    summary = await resolve_job(app, str(job_id), "released in the dashboard", "released", "operator-1")
    job = app.get_job(job_id)
    assert summary["state"] == "RELEASED" and job.released is not None
    assert (job.released.to_payee, job.released.fee) == (to_money("0.099446"), to_money("0.001004"))
    assert job.violations(quiescent=True) == []


async def test_a_group_that_loses_a_race_is_saved_again_as_a_group(tmp_path: Path) -> None:
    """Another engine claimed one of the jobs this writer's group touches: the group is applied
    again on fresh copies of those jobs and saved as one group (not one save per command); the stale
    claim alone is lost, and nothing is claimed twice."""
    from podsettle.domain.errors import ClaimLost

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ours, theirs = Settlements(url), Settlements(url)
    raced, other, third = (theirs.open_job(spec(key)) for key in ("raced", "other", "third"))
    writer = JobWriter(ours)
    for job_id in (raced, other, third):
        await writer.view(job_id)  # cached here: this writer does not see the other engine's claim
    act(theirs, raced, lambda j: j.record_attempt(Step.FUND, "theirs", after=0))
    outcomes = await asyncio.gather(
        *(writer.claim(job_id, Step.FUND, "ours", after=0, at=DEADLINE) for job_id in (raced, other, third)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], ClaimLost)
    assert [o[0] for o in outcomes[1:]] == [1, 1]  # type: ignore[index]
    assert (writer.stats.regroups, writer.stats.fallbacks) == (1, 0)
    await writer.aclose()
    claimers = {job_id: ours.get_job(job_id).intent.claimed_by for job_id in (raced, other, third)}  # type: ignore[union-attr]
    assert claimers == {raced: "theirs", other: "ours", third: "ours"}


@pytest.mark.parametrize("outcome", OUTCOMES)
async def test_a_job_another_engine_moved_on_is_caught_up_with_its_new_events_only(
    tmp_path: Path, outcome: str
) -> None:
    """A job this writer holds, asked for fresh after another engine saved more of it: the copy is
    brought up to date with the events after its version (not read whole again), and it is then the
    job a full read gives, from every point of every kind of history to every later point (a job
    that rests then leaves the cache)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    theirs, ours = Settlements(url), Settlements(url)
    reads: list[tuple[int | None, int]] = []
    select = ours.recorder.select_events

    def counted(originator_id: Any, **kwargs: Any) -> Any:
        found = select(originator_id, **kwargs)
        reads.append((kwargs.get("gt"), len(found)))
        return found

    ours.recorder.select_events = counted  # type: ignore[method-assign]
    saves = len(steps(Plan(key="count", outcome=outcome)))
    checked = 0
    for held_at in range(saves):
        for moved_to in range(held_at + 1, saves + 1):
            plan = Plan(key=f"caught-{held_at}-{moved_to}", outcome=outcome)
            job = drive_history(theirs, plan, upto=held_at)
            writer = JobWriter(ours)
            copy = await writer.view(job.id)
            if copy.rests:
                await writer.aclose()
                continue
            for save in steps(plan)[held_at:moved_to]:  # the other engine moves the job on
                for command in save:
                    command(job)
                theirs.save(job)
            reads.clear()
            after = await writer.view(job.id, fresh=True)
            whole = theirs.get_job(job.id)
            assert (after.version, after) == (whole.version, whole.view())
            assert reads == [(copy.version, whole.version - copy.version)]  # its new events only
            assert writer.held()["cached_jobs"] == (0 if whole.rests else 1)
            await writer.aclose()
            checked += 1
    assert checked >= saves  # every point a copy can be held at, caught up to each later one
