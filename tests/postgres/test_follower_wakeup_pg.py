"""The engine's log follower on PostgreSQL: woken by LISTEN/NOTIFY on the channel eventsourcing's
PostgreSQL recorder notifies at each insert, with a pull as the fallback (a notification that never
arrives costs latency, not an event); and the jobs a group needs read in one query."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from podsettle import engine as engine_module
from podsettle.adapters.ledger import Ledger
from podsettle.adapters.ledger_gateway import LedgerEscrow
from podsettle.application import Settlements
from podsettle.bootstrap import Engine
from podsettle.processor import ProcessorConfig
from podsettle.projections.follower import LogWakeup
from podsettle.requests import JobRequest
from podsettle.sandbox.inprocess_compute import InProcessCompute
from podsettle.settings import Settings
from podsettle.writer import JobWriter

PAYER, PAYEE = "ag_payer", "ag_worker"
URL = "postgresql://postgres@127.0.0.1:5432/test"


async def _until(condition: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    """Wait for a state (the deadline only stops a hung test)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still waiting for: {what}")
        await asyncio.sleep(0.01)


def _engine(schema: str, *, pull_fallback_s: float) -> tuple[Engine, InProcessCompute]:
    ledger = Ledger(None)
    with ledger.transaction() as tx:
        tx.open_account(PAYER)
        tx.open_account(PAYEE)
    ledger.mint(PAYER, "100", key="mint")
    compute = InProcessCompute(seed=1)
    engine = Engine(
        Settlements(URL, env={"POSTGRES_SCHEMA": schema, "CREATE_TABLE": "y"}),
        LedgerEscrow(ledger, payer=PAYER),
        compute,
        payer=PAYER,
        settings=Settings(store="memory", payer=PAYER, payee=PAYEE),
        processor=ProcessorConfig(processor_id="engine-follower"),
        follow_interval_s=0.05,
        # The jobs opened elsewhere here are left to their writer for this long, not a lease: these
        # tests are about how the follower learns of them.
        adopt_grace_s=0.5,
    )
    engine.pull_fallback_s = pull_fallback_s
    return engine, compute


def _specs(engine: Engine, keys: list[str]) -> list[JobRequest]:
    return [
        engine._spec(
            "echo",
            {"key": key},
            "0.50",
            job_key=key,
            payee=None,
            referral=None,
            acceptance=None,
            bonus_pool=None,
            batch_id=None,
            timeout_s=60,
        )
        for key in keys
    ]


async def test_a_write_by_another_process_wakes_the_follower_through_listen_notify(pg_schema: str) -> None:
    # Pulls an hour apart: only a notification can bring the job opened elsewhere to this engine.
    engine, compute = _engine(pg_schema, pull_fallback_s=3600)
    await engine.start()
    await _until(lambda: engine.listener is not None and engine.listener.listening.is_set(), "LISTEN")
    # The listener wakes the follower once when its LISTEN is in place; let that read be done.
    await _until(lambda: engine.follow_stats.pages >= 2, "the read after LISTEN")
    await asyncio.sleep(0.1)
    woken_before = engine.follow_stats.woken
    other = Settlements(URL, env={"POSTGRES_SCHEMA": pg_schema})
    other.open_jobs(_specs(engine, ["opened-elsewhere"]))  # an intent nobody here was asked to settle
    await _until(lambda: engine.follow_stats.adopted == 1, "the follower to take up the job")
    assert engine.follow_stats.listening
    assert engine.follow_stats.woken > woken_before
    (job_id,) = list(other.job_ids())
    result = await asyncio.wait_for(engine.wait(job_id), 30)
    assert result.status == "paid"
    await engine.aclose()
    await compute.aclose()
    assert engine.listener is not None and not engine.listener._thread.is_alive()


async def test_the_engine_s_own_saves_wake_no_one(pg_schema: str) -> None:
    """The notifications an engine's own saves send are left out by its listener: its follower has
    nothing to read in them (it used to read a page after nearly every save of its own)."""
    engine, compute = _engine(pg_schema, pull_fallback_s=3600)
    await engine.start()
    await _until(lambda: engine.listener is not None and engine.listener.listening.is_set(), "LISTEN")
    await _until(lambda: engine.follow_stats.pages >= 2, "the read after LISTEN")
    await asyncio.sleep(0.1)
    woken, pages = engine.follow_stats.woken, engine.follow_stats.pages
    result = await asyncio.wait_for(engine.run_paid_job("echo", {"own": 1}, "0.50"), 30)
    assert result.status == "paid"
    listener = engine.listener
    assert listener is not None
    await _until(lambda: listener.own >= 3, "the notifications of its saves (open, claims, outcomes)")
    await asyncio.sleep(0.2)
    assert (engine.follow_stats.woken, engine.follow_stats.pages) == (woken, pages)
    await engine.aclose()
    await compute.aclose()


async def test_a_missed_notification_is_picked_up_by_the_pull(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[LogWakeup] = []
    listen = LogWakeup.start

    def deaf(recorder: Any, on_notify: Callable[[], object]) -> LogWakeup | None:
        # It LISTENs, but every notification is lost on the way to the follower.
        wakeup = listen(recorder, lambda: None)
        if wakeup is not None:
            started.append(wakeup)
        return wakeup

    monkeypatch.setattr(engine_module.LogWakeup, "start", staticmethod(deaf))
    engine, compute = _engine(pg_schema, pull_fallback_s=0.3)
    await engine.start()
    await _until(lambda: bool(started) and started[0].listening.is_set(), "LISTEN")
    other = Settlements(URL, env={"POSTGRES_SCHEMA": pg_schema})
    other.open_jobs(_specs(engine, ["opened-elsewhere"]))
    await _until(lambda: started[0].notified >= 1, "the notification (which is then lost)")
    await _until(lambda: engine.follow_stats.adopted == 1, "the pull to find the job")
    assert engine.follow_stats.woken == 0  # nothing woke it: the pull did
    await engine.aclose()
    await compute.aclose()


async def test_the_jobs_a_group_needs_are_read_in_one_query(pg_schema: str) -> None:
    opener = Settlements(URL, env={"POSTGRES_SCHEMA": pg_schema, "CREATE_TABLE": "y"})
    engine, compute = _engine(pg_schema, pull_fallback_s=1)
    ids = opener.open_jobs(_specs(engine, [f"bulk-{n}" for n in range(6)]))
    reader = Settlements(URL, env={"POSTGRES_SCHEMA": pg_schema})
    bulk = reader.get_jobs([*ids, ids[0]])
    assert bulk is not None and set(bulk) == set(ids)
    for job_id in ids:
        one = reader.get_job(job_id)
        assert (bulk[job_id].version, bulk[job_id].view()) == (one.version, one.view())
    writer = JobWriter(reader)
    views = await asyncio.gather(*(writer.view(job_id, fresh=True) for job_id in ids))
    assert [v.job_id for v in views] == ids
    assert (writer.stats.bulk_reads, writer.stats.reads) == (1, len(ids))
    # Opening the same batch again (a process joining it) compares it with the store in one query.
    again = reader.open_jobs(_specs(engine, [f"bulk-{n}" for n in range(6)]))
    assert again == ids
    await writer.aclose()
    await compute.aclose()


async def test_jobs_another_process_moved_on_are_caught_up_in_one_query_with_their_new_events(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group asking for jobs this writer holds, fresh (another process wrote them): one query
    reads only the events after each copy's version, and each job is then what a full read gives;
    a job nobody moved on stays as it was."""
    from podsettle import application
    from podsettle.domain import Step
    from podsettle.domain.rules import split

    env = {"POSTGRES_SCHEMA": pg_schema, "CREATE_TABLE": "y"}
    theirs, ours = Settlements(URL, env=env), Settlements(URL, env=env)
    engine, compute = _engine(pg_schema, pull_fallback_s=1)
    ids = theirs.open_jobs(_specs(engine, [f"caught-{n}" for n in range(4)]))
    writer = JobWriter(ours)
    copies = await asyncio.gather(*(writer.view(job_id) for job_id in ids))
    assert writer.held()["cached_jobs"] == 4
    for job_id in ids[:3]:  # another process claims the funding of three of them; one is funded
        job = theirs.get_job(job_id)
        job.record_attempt(Step.FUND, "other-process")
        theirs.save(job)
    funded = theirs.get_job(ids[0])
    parts = split(funded.budget)
    funded.record_funded("escrow-1", parts.amount, parts.fee, parts.net)
    theirs.save(funded)
    asked: list[dict[Any, int]] = []
    select = application.select_events_of

    def spied(recorder: Any, job_ids: Any, **kwargs: Any) -> Any:
        asked.append(dict(kwargs.get("after") or {}))
        return select(recorder, job_ids, **kwargs)

    monkeypatch.setattr(application, "select_events_of", spied)
    views = await asyncio.gather(*(writer.view(job_id, fresh=True) for job_id in ids))
    assert asked == [{job_id: copy.version for job_id, copy in zip(ids, copies, strict=True)}]
    for job_id, view in zip(ids, views, strict=True):
        whole = theirs.get_job(job_id)
        assert (view.version, view) == (whole.version, whole.view())
    moved = [v.version - c.version for v, c in zip(views, copies, strict=True)]
    assert moved[0] > moved[1] == moved[2] == 1 and moved[3] == 0
    await writer.aclose()
    await compute.aclose()


def test_a_listener_stops_at_once_however_long_it_waits_for_a_notification(pg_schema: str) -> None:
    """Stopping wakes the listener on a channel of its own: a closing engine does not wait out the
    listener's wait for a notification (here an hour)."""
    import threading

    app = Settlements(URL, env={"POSTGRES_SCHEMA": pg_schema, "CREATE_TABLE": "y"})
    woken = threading.Event()
    wakeup = LogWakeup(app.recorder, woken.set, wait_s=3600)
    wakeup._thread.start()
    assert wakeup.listening.wait(10) and woken.wait(10)  # in place, and it looked once
    wakeup.stop()  # joins the thread for up to 5 s
    assert not wakeup._thread.is_alive()
    assert not wakeup.listening.is_set()
    app.close()
