"""Tampering with the SQLite store (sqlite3, behind the application's back) and with an export:
each case is caught and the first bad position named."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podsettle import Settlements
from podsettle.adapters.chain import SEALS, ChainError
from podsettle.domain import State
from podsettle.projections import ReadModel
from podsettle.replay import AuditReport, audit, audit_export, export
from tests.histories import history


@dataclass
class Store:
    app: Settlements
    path: Path
    model: ReadModel

    def rows(self) -> list[tuple[int, str, int, str]]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute(
                "SELECT rowid, originator_id, originator_version, topic FROM stored_events ORDER BY rowid"
            ).fetchall()

    def sql(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        with sqlite3.connect(self.path) as conn:
            for statement, params in statements:
                conn.execute(statement, params)

    def state(self, rowid: int) -> bytes:
        with sqlite3.connect(self.path) as conn:
            found: bytes = conn.execute(
                "SELECT state FROM stored_events WHERE rowid = ?", (rowid,)
            ).fetchone()[0]
        return found

    def job_rows(self, originator_id: str) -> list[int]:
        return [rowid for rowid, oid, _, _ in self.rows() if oid == originator_id]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    path = tmp_path / "store.db"
    app = Settlements(f"sqlite:///{path}")
    history(app, 40, seed=21, group=2)
    model = ReadModel(app, str(tmp_path / "views.db"), checkpoint_every=25)
    model.catch_up()
    assert audit(app, read_model=model).ok
    yield Store(app, path, model)
    app.close()


def fresh(store: Store) -> Settlements:
    """The store as a new process would open it (no cached seals)."""
    return Settlements(f"sqlite:///{store.path}")


def tamper_at(report: AuditReport) -> int | None:
    assert not report.ok
    first = report.first_bad
    assert first is not None
    return first.position


def middle_event(store: Store) -> tuple[int, str, int]:
    """A job's event in the middle of the log that is not the job's last one."""
    rows = store.rows()
    last_version: dict[str, int] = {}
    for _, oid, version, _ in rows:
        last_version[oid] = max(version, last_version.get(oid, 0))
    for rowid, oid, version, _ in rows[len(rows) // 2 :]:
        if 1 < version < last_version[oid]:
            return rowid, oid, version
    raise AssertionError("no middle event")


# ------------------------------------------------------------------------------------ the store


def test_a_modified_event_is_caught_where_it_is(store: Store) -> None:
    rowid, oid, version = middle_event(store)
    state = store.state(rowid)
    store.sql(
        (
            "UPDATE stored_events SET state = ? WHERE rowid = ?",
            (state.replace(b'"_data_":"', b'"_data_":"1', 1), rowid),
        )
    )
    for report in (audit(fresh(store)), audit(fresh(store), read_model=store.model)):
        assert tamper_at(report) == rowid
        assert any(
            f.rule.startswith("event was changed") and f.job_id == oid and f.version == version
            for f in report.findings
        )
    with pytest.raises(ChainError):
        fresh(store).get_job(oid)  # the application refuses to act on it


def test_a_modified_last_event_is_caught_by_its_own_seal(store: Store) -> None:
    rowid, oid, _, _ = store.rows()[-1]
    state = store.state(rowid)
    forged = state.replace(
        b'"timestamp":{"_type_":"datetime_iso","_data_":"2',
        b'"timestamp":{"_type_":"datetime_iso","_data_":"1',
    )
    assert forged != state
    store.sql(("UPDATE stored_events SET state = ? WHERE rowid = ?", (forged, rowid)))
    report = audit(fresh(store))
    assert tamper_at(report) == rowid
    assert report.first_bad is not None and report.first_bad.job_id == oid


def test_a_deleted_event_is_caught_at_its_position(store: Store) -> None:
    rowid, oid, _ = middle_event(store)
    store.sql(("DELETE FROM stored_events WHERE rowid = ?", (rowid,)))
    report = audit(fresh(store), read_model=store.model)
    assert tamper_at(report) == rowid
    rules = {(f.rule, f.job_id) for f in report.findings}
    assert ("job's versions are not contiguous: an event was removed, inserted or moved", oid) in rules


def test_a_deleted_last_event_is_caught_by_the_read_model(store: Store) -> None:
    rowid = store.rows()[-1][0]
    store.sql(("DELETE FROM stored_events WHERE rowid = ?", (rowid,)))
    report = audit(fresh(store), read_model=store.model)
    assert tamper_at(report) == rowid
    assert "more of the log than the store holds" in report.render()


def test_an_inserted_event_is_caught_at_its_position(store: Store) -> None:
    rowid, oid, _ = middle_event(store)
    donor = store.state(rowid - 1)
    last_version = max(v for _, o, v, _ in store.rows() if o == oid)
    topic = store.rows()[rowid - 2][3]
    # Make room at `rowid` (moving the later rows up by one), then put a forged event there.
    store.sql(
        ("UPDATE stored_events SET rowid = -rowid WHERE rowid >= ?", (rowid,)),
        ("UPDATE stored_events SET rowid = 1 - rowid WHERE rowid < 0", ()),
        (
            "INSERT INTO stored_events (rowid, originator_id, originator_version, topic, state) "
            "VALUES (?, ?, ?, ?, ?)",
            (rowid, oid, last_version + 1, topic, donor),
        ),
    )
    assert audit(fresh(store)).first_bad is not None
    report = audit(fresh(store), read_model=store.model)
    assert tamper_at(report) == rowid
    assert any(f.position == rowid and f.job_id == oid for f in report.findings)


def test_events_of_one_job_reordered_are_caught(store: Store) -> None:
    _, oid, version = middle_event(store)
    rows = store.job_rows(oid)
    first, second = rows[version - 1], rows[version]  # versions v and v+1
    store.sql(
        ("UPDATE stored_events SET rowid = -1 WHERE rowid = ?", (first,)),
        ("UPDATE stored_events SET rowid = ? WHERE rowid = ?", (first, second)),
        ("UPDATE stored_events SET rowid = ? WHERE rowid = -1", (second,)),
    )
    report = audit(fresh(store))
    assert tamper_at(report) == first
    assert report.first_bad is not None and report.first_bad.job_id == oid


def test_events_of_two_jobs_reordered_are_caught_by_the_read_model_checkpoints(store: Store) -> None:
    rows = store.rows()
    a = len(rows) // 2
    b = next(i for i in range(a + 1, len(rows)) if rows[i][1] != rows[a][1])
    first, second = rows[a][0], rows[b][0]
    store.sql(
        ("UPDATE stored_events SET rowid = -1 WHERE rowid = ?", (first,)),
        ("UPDATE stored_events SET rowid = ? WHERE rowid = ?", (first, second)),
        ("UPDATE stored_events SET rowid = ? WHERE rowid = -1", (second,)),
    )
    report = audit(fresh(store), read_model=store.model)
    bad = tamper_at(report)
    assert bad is not None and first <= bad < first + 25  # the first checkpoint at or after the move


# ------------------------------------------------------------------------------------ an export


@pytest.fixture
def exported(store: Store, tmp_path: Path) -> list[bytes]:
    path = tmp_path / "log.jsonl"
    export(store.app, path, checkpoint_every=20)
    lines = path.read_bytes().splitlines(keepends=True)
    assert audit_export(path, seals=SEALS).ok
    return lines


def export_first_bad(tmp_path: Path, lines: list[bytes]) -> int | None:
    path = tmp_path / "tampered.jsonl"
    path.write_bytes(b"".join(lines))
    for report in (audit_export(path, seals=SEALS), audit_export(path)):
        assert not report.ok, report.render()
    first = audit_export(path).first_bad
    assert first is not None
    return first.line


def test_an_export_line_modified_is_caught_at_that_line(exported: list[bytes], tmp_path: Path) -> None:
    k = len(exported) // 2
    assert b'"kind":"event"' in exported[k]
    exported[k] = exported[k].replace(b'"_data_\\":\\"', b'"_data_\\":\\"9', 1)
    assert export_first_bad(tmp_path, exported) == k


def test_an_export_line_deleted_is_caught_at_that_line(exported: list[bytes], tmp_path: Path) -> None:
    k = len(exported) // 3
    del exported[k]
    assert export_first_bad(tmp_path, exported) == k


def test_an_export_line_inserted_is_caught_at_that_line(exported: list[bytes], tmp_path: Path) -> None:
    k = len(exported) // 2
    exported.insert(k, exported[5])
    assert export_first_bad(tmp_path, exported) == k


def test_export_lines_reordered_are_caught_at_the_first_moved_line(
    exported: list[bytes], tmp_path: Path
) -> None:
    k = len(exported) // 2
    exported[k], exported[k + 1] = exported[k + 1], exported[k]
    assert export_first_bad(tmp_path, exported) == k


def test_an_export_cut_short_is_caught(exported: list[bytes], tmp_path: Path) -> None:
    assert export_first_bad(tmp_path, exported[:-1]) == len(exported) - 1
    assert export_first_bad(tmp_path, exported[:-3]) == len(exported) - 3


def test_the_last_event_line_modified_is_caught(exported: list[bytes], tmp_path: Path) -> None:
    k = len(exported) - 2  # the last event (the end line follows it)
    assert b'"kind":"event"' in exported[k]
    exported[k] = exported[k].replace(b'"version":', b'"version":1', 1)
    assert export_first_bad(tmp_path, exported) == k


@pytest.mark.parametrize(
    "env",
    [
        {"COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor"},
        {"TRANSCODER_TOPIC": "eventsourcing.persistence:JSONTranscoder"},
    ],
)
def test_sealed_events_round_trip_with_a_compressor_or_the_library_transcoder(
    tmp_path: Path, env: dict[str, str]
) -> None:
    path = tmp_path / "store.db"
    writer = Settlements(f"sqlite:///{path}", env=env)
    plans = history(writer, 12, seed=5, group=3)
    written = [writer.find_job(plan.key).version for plan in plans]
    writer.close()
    reader = Settlements(f"sqlite:///{path}", env=env)  # a cold seal cache: every load checks seals
    try:
        jobs = [reader.find_job(plan.key) for plan in plans]
        assert all(job.violations() == [] for job in jobs)
        assert [job.version for job in jobs] == written
        # A job written further after a restart chains to what is in the store.
        open_ = [job for job in jobs if job.intent is not None and job.state != State.ATTENTION]
        assert open_, "the history should leave some job with an open intent"
        job = reader.get_job(open_[0].id)
        assert job.intent is not None
        job.record_attempt(job.intent.step, "round-trip")
        reader.save(job)
        assert reader.get_job(job.id).version == open_[0].version + 1
        if "COMPRESSOR_TOPIC" not in env:  # the audit reads plaintext states
            assert audit(reader).ok
    finally:
        reader.close()


def test_an_event_resealed_with_a_renamed_field_is_reported_not_a_crash(store: Store) -> None:
    from podsettle.adapters.chain import seal_state, split_sealed

    funded = [row for row in store.rows() if row[3].endswith("EscrowJob.Funded")]
    assert funded, "the history has no Funded event"
    rowid, oid, version, topic = funded[0]
    prev, _, body = split_sealed(store.state(rowid))
    renamed = body.replace(b'"escrow_id":', b'"escrow_ref":')
    assert renamed != body
    # Someone who knows the (unkeyed) seal format rewrites the event consistently.
    forged, _ = seal_state(oid, version, topic, renamed, prev)
    store.sql(("UPDATE stored_events SET state = ? WHERE rowid = ?", (forged, rowid)))
    report = audit(fresh(store))
    assert not report.ok
    assert any(
        f.rule == "event does not fit its class" and f.job_id == oid and f.position == rowid
        for f in report.findings
    )
