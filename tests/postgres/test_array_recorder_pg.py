"""The PostgreSQL recorder podsettle uses (adapters/postgres_recorder.py): the library's recorder with
a save's events inserted in one statement (a server function that takes the library's table lock,
notifies and inserts four binary arrays). What it stores reads back byte for byte through the
library's own reads; a version stored already refuses the whole save (the optimistic concurrency
every claim relies on); saves from several connections get notification ids in one unbroken run
each, in commit order (the table lock, kept); and a store the library's own recorder made (an
earlier podsettle) gets the function when it is opened."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder

from podsettle.adapters.postgres_recorder import ArrayInsertRecorder
from podsettle.application import Settlements

pytestmark = pytest.mark.postgres


def _events(originator: uuid.UUID, versions: range, size: int = 300) -> list[StoredEvent]:
    every_byte = bytes(range(256))
    return [
        StoredEvent(
            originator_id=originator,
            originator_version=version,
            topic=f"podsettle.domain.escrow_job:EscrowJob.Attempted-é-{version}",
            state=(every_byte * (size // 256 + 1))[: size + version] + b"\x00'\"\\{}",
        )
        for version in versions
    ]


def test_a_postgres_store_records_through_the_array_recorder(pg_database: Callable[[], str]) -> None:
    app = Settlements(pg_database())
    try:
        assert isinstance(app.recorder, ArrayInsertRecorder)
    finally:
        app.close()


def test_what_it_inserts_reads_back_unchanged_in_insert_order(pg_database: Callable[[], str]) -> None:
    app = Settlements(pg_database())
    try:
        recorder = app.recorder
        first, second = uuid.uuid4(), uuid.uuid4()
        saved = [*_events(first, range(1, 4)), *_events(second, range(1, 3))]
        ids = recorder.insert_events(saved)
        assert ids is not None and len(ids) == 5 and list(ids) == sorted(ids)
        assert list(recorder.select_events(first)) == saved[:3]
        assert list(recorder.select_events(second)) == saved[3:]
        notifications = recorder.select_notifications(1, 10)
        assert [n.id for n in notifications] == list(ids)
        assert [(n.originator_id, n.originator_version, n.topic, n.state) for n in notifications] == [
            (e.originator_id, e.originator_version, e.topic, e.state) for e in saved
        ]
    finally:
        app.close()


def test_a_version_stored_already_refuses_the_whole_save(pg_database: Callable[[], str]) -> None:
    app = Settlements(pg_database())
    try:
        recorder = app.recorder
        job, other = uuid.uuid4(), uuid.uuid4()
        recorder.insert_events(_events(job, range(1, 3)))
        with pytest.raises(IntegrityError):
            recorder.insert_events([*_events(other, range(1, 2)), *_events(job, range(2, 3))])
        assert list(recorder.select_events(other)) == []
        assert len(recorder.select_notifications(1, 10)) == 2
        # The connection is usable after the refusal.
        recorder.insert_events(_events(other, range(1, 2)))
        assert len(recorder.select_events(other)) == 1
    finally:
        app.close()


def test_concurrent_saves_get_unbroken_runs_of_ids_in_commit_order(pg_database: Callable[[], str]) -> None:
    store = pg_database()
    apps = [Settlements(store) for _ in range(3)]
    runs: list[list[int]] = []
    lock = threading.Lock()

    def save_many(app: Settlements) -> None:
        for _ in range(20):
            ids = app.recorder.insert_events(_events(uuid.uuid4(), range(1, 6), size=50))
            assert ids is not None
            with lock:
                runs.append(list(ids))

    try:
        threads = [threading.Thread(target=save_many, args=(app,)) for app in apps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(runs) == 60
        for ids in runs:
            assert ids == list(range(ids[0], ids[0] + 5))  # one save: no other save's ids inside
        every = sorted(i for ids in runs for i in ids)
        assert every == list(range(every[0], every[0] + 300))
    finally:
        for app in apps:
            app.close()


def test_a_store_made_by_the_library_s_own_recorder_takes_the_function_when_opened(
    pg_database: Callable[[], str],
) -> None:
    store = pg_database()
    older = Settlements(store, env={"APPLICATION_RECORDER_TOPIC": ""})
    try:
        assert type(older.recorder) is PostgresApplicationRecorder
        job = uuid.uuid4()
        older.recorder.insert_events(_events(job, range(1, 3)))
    finally:
        older.close()
    app = Settlements(store)
    try:
        assert isinstance(app.recorder, ArrayInsertRecorder)
        ids = app.recorder.insert_events(_events(job, range(3, 5)))
        assert ids is not None and len(ids) == 2
        assert [e.originator_version for e in app.recorder.select_events(job)] == [1, 2, 3, 4]
    finally:
        app.close()
