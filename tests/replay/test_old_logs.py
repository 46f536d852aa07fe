"""Old logs keep working: a store and an export written by podsettle 0.1.0 (tests/data/release-0.1.0,
see its README) replay and audit with today's code, with the release's own figures.

The upcasting tests play the next change of an event: `EscrowJob.Funded` at class_version 2, whose
`upcast_v1_v2` adds a field the release never wrote. The release's v1 events must read through the
chain mapper, the store audit, the read model and the export audit, their seals checked over the
bytes as stored (never over the upcast state), and events written at v2 must seal and audit too.

The committed files are never opened in place: each test copies the store to its own directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from podsettle import Settlements
from podsettle.adapters.chain import SEALS, ChainError
from podsettle.domain import EscrowJob, State
from podsettle.projections import ReadModel
from podsettle.replay import AuditReport, audit, audit_export, export
from tests import jobs

FIXTURE = Path(__file__).parents[1] / "data" / "release-0.1.0"
EXPECTED: dict[str, Any] = json.loads((FIXTURE / "expected.json").read_text())
FUNDED_TOPIC = "podsettle.domain.escrow_job:EscrowJob.Funded"


@dataclass
class Store:
    """A private copy of the release's store, opened with today's code."""

    path: Path
    app: Settlements

    def rows(self, topic: str | None = None) -> list[tuple[int, str, int, str, bytes]]:
        query = "SELECT rowid, originator_id, originator_version, topic, state FROM stored_events"
        with sqlite3.connect(self.path) as conn:
            if topic is None:
                return conn.execute(query + " ORDER BY rowid").fetchall()
            return conn.execute(query + " WHERE topic = ? ORDER BY rowid", (topic,)).fetchall()

    def model(self, name: str = "views.db") -> ReadModel:
        return ReadModel(self.app, str(self.path.parent / name))


def open_copy(tmp_path: Path) -> Store:
    path = tmp_path / "store.db"
    shutil.copyfile(FIXTURE / "store.db", path)
    return Store(path, Settlements(f"sqlite:///{path}"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_copy(tmp_path)


def assert_release_figures(report: AuditReport, model: ReadModel) -> None:
    assert report.ok, report.render()
    assert report.views_compared
    assert (report.events, report.jobs, report.last_position) == (
        EXPECTED["events"],
        EXPECTED["jobs"],
        EXPECTED["last_position"],
    )
    assert model.state_counts() == EXPECTED["states"]
    assert_same_totals(model.batch_totals().to_json(), EXPECTED["totals"])
    for batch_id, totals in EXPECTED["batch_totals"].items():
        assert_same_totals(model.batch_totals(batch_id).to_json(), totals)


def assert_same_totals(now: dict[str, Any], release: dict[str, Any]) -> None:
    """Today's totals say what the release's said, in the new words (CHANGELOG.md lists them)."""
    renamed = {
        "paid_jobs": "paid",
        "refunded_jobs": "refunded_jobs",
        "rejected_jobs": "rejected",
        "attention_jobs": "attention",
        "in_flight_jobs": "in_flight",
        "timed_jobs": "runs",
        "execution_ms": "execution_ms",
        "returned": "refunded",
        "referral_fees": "referral",
        "bonus_net": "bonuses",
        "fees": "fees",
        "spent": "spent",
    }
    assert {new: now[new] for new in renamed} == {new: release[old] for new, old in renamed.items()}
    money = {name: Decimal(now[name]) for name in ("funded", "to_workers", "bonus_gross", "bonus_fees")}
    # `to_workers` counts bonuses, and `funded` the bonus escrows, where the release's did not.
    assert money["to_workers"] == Decimal(release["released"]) + Decimal(release["bonuses"])
    assert money["funded"] == Decimal(release["funded"]) + money["bonus_gross"]
    assert money["bonus_gross"] - money["bonus_fees"] == Decimal(release["bonuses"])
    assert Decimal(now["still_held"]) == 0


# ------------------------------------------------------------------------------ the release's log


def test_the_fixture_covers_every_outcome() -> None:
    """The store holds what the brief asked for; a rewritten fixture that lost a case fails here."""
    states = EXPECTED["states"]
    assert {"RELEASED", "REFUNDED", "REJECTED"} <= set(states)
    assert EXPECTED["totals"]["bonuses"] != "0.000000"
    assert EXPECTED["extra_jobs"]["attention_resolved"]["status"] == "paid"
    with sqlite3.connect(f"file:{FIXTURE / 'store.db'}?mode=ro", uri=True) as conn:
        topics = {topic for (topic,) in conn.execute("SELECT DISTINCT topic FROM stored_events")}
    for name in ("AttentionRaised", "Resolved", "BonusAwarded", "Refunded", "FundingRejected"):
        assert f"podsettle.domain.escrow_job:EscrowJob.{name}" in topics


def test_the_release_store_audits_clean_with_its_figures(store: Store) -> None:
    model = store.model()
    report = audit(store.app, read_model=model, seals=SEALS)
    assert_release_figures(report, model)
    assert report.to_json()["findings"] == []


def test_the_release_store_loads_every_job_through_the_chain_mapper(store: Store) -> None:
    found = store.app.list_jobs()
    assert len(found) == EXPECTED["jobs"]
    counts: dict[str, int] = {}
    for job in found:
        assert job.violations(quiescent=True) == [], job.summary()
        counts[str(job.state)] = counts.get(str(job.state), 0) + 1
    assert counts == EXPECTED["states"]
    resolved = store.app.get_job(EXPECTED["extra_jobs"]["attention_resolved"]["job_id"])
    assert resolved.state == State.RELEASED
    assert resolved.escrow_id == EXPECTED["extra_jobs"]["escrow_found_by_operator"]


def test_the_release_export_audits_clean() -> None:
    report = audit_export(FIXTURE / "export.jsonl", seals=SEALS)
    assert report.ok, report.render()
    assert (report.events, report.jobs) == (EXPECTED["events"], EXPECTED["jobs"])


def test_todays_export_of_the_release_store_is_the_releases_export(store: Store, tmp_path: Path) -> None:
    """The stored bytes and the export format are unchanged: the same file, the same running hash.
    (A deliberate new export format changes this test with its format name.)"""
    summary = export(store.app, tmp_path / "again.jsonl", seals=SEALS)
    assert summary.running_hash == EXPECTED["export_running_hash"]
    assert (tmp_path / "again.jsonl").read_bytes() == (FIXTURE / "export.jsonl").read_bytes()


def test_the_tests_leave_the_committed_store_as_it_was(tmp_path: Path) -> None:
    before = hashlib.sha256((FIXTURE / "store.db").read_bytes()).hexdigest()
    copy = open_copy(tmp_path)
    audit(copy.app, read_model=copy.model(), seals=SEALS)
    copy.app.save(jobs.released(key="written-to-the-copy"))
    assert hashlib.sha256((FIXTURE / "store.db").read_bytes()).hexdigest() == before


# ------------------------------------------------------------------------------ upcasting


@dataclass
class Upcasts:
    """How often the v2 variant's upcast ran."""

    calls: int = 0


@pytest.fixture
def funded_v2(monkeypatch: pytest.MonkeyPatch) -> Iterator[Upcasts]:
    """`EscrowJob.Funded` as a later release would change it: class_version 2, and v1 events (the
    release's) upcast by adding the field v2 introduces. The `@event` method takes the fields it names,
    so the new field reaches the event, not the method."""
    upcasts = Upcasts()

    def upcast_v1_v2(state: dict[str, Any]) -> None:
        assert "currency" not in state and "class_version" not in state
        state["currency"] = "USDC"
        upcasts.calls += 1

    monkeypatch.setattr(EscrowJob.Funded, "class_version", 2)
    monkeypatch.setattr(EscrowJob.Funded, "upcast_v1_v2", staticmethod(upcast_v1_v2), raising=False)
    yield upcasts


def test_a_v2_event_class_reads_the_release_v1_events(store: Store, funded_v2: Upcasts) -> None:
    funded_rows = store.rows(FUNDED_TOPIC)
    assert funded_rows and all(b'"class_version"' not in row[4] for row in funded_rows)
    seen = 0
    for _, originator_id, _, _, _ in funded_rows:
        # The mapper checks each seal (verify is on) before it decodes: an upcast state that were
        # sealed again would not match.
        for event in store.app.repository.event_store.get(UUID(originator_id)):
            if isinstance(event, EscrowJob.Funded):
                assert event.currency == "USDC"  # type: ignore[attr-defined]
                seen += 1
    assert seen == len(funded_rows) == funded_v2.calls
    assert {str(job.state) for job in store.app.list_jobs()} == set(EXPECTED["states"])


def test_the_audit_and_the_read_model_read_upcast_events(store: Store, funded_v2: Upcasts) -> None:
    funded = len(store.rows(FUNDED_TOPIC))
    alone = audit(store.app, seals=SEALS)  # the audit's own decoder, one read of each event
    assert alone.ok, alone.render()
    assert (alone.events, funded_v2.calls) == (EXPECTED["events"], funded)
    model = store.model()
    report = audit(store.app, read_model=model, seals=SEALS)  # the read model reads through the mapper
    assert_release_figures(report, model)
    assert funded_v2.calls == 3 * funded


def test_the_export_audit_reads_upcast_events(funded_v2: Upcasts) -> None:
    report = audit_export(FIXTURE / "export.jsonl", seals=SEALS)
    assert report.ok, report.render()
    assert report.events == EXPECTED["events"]
    assert funded_v2.calls > 0


def test_events_written_at_v2_are_sealed_over_their_stored_bytes(tmp_path: Path, funded_v2: Upcasts) -> None:
    store = open_copy(tmp_path)
    job = jobs.released(key="written-at-v2")
    store.app.save(job)
    written = [row for row in store.rows(FUNDED_TOPIC) if row[1] == job.id.hex]
    assert len(written) == 1
    _, originator_id, version, topic, state = written[0]
    assert b'"class_version":2' in state
    unsealed = SEALS.unseal(originator_id, version, topic, state)
    assert unsealed is not None and unsealed[2], "the seal covers the stored bytes, class_version included"
    calls = funded_v2.calls
    fresh = Settlements(f"sqlite:///{store.path}")  # a cold seal cache: every seal checked on load
    assert fresh.get_job(job.id).state == State.RELEASED
    assert funded_v2.calls == calls  # a v2 event is not upcast
    report = audit(fresh, read_model=ReadModel(fresh, str(tmp_path / "mixed.db")), seals=SEALS)
    assert report.ok, report.render()
    assert report.events == len(store.rows()) > EXPECTED["events"]
    out = tmp_path / "mixed.jsonl"
    export(fresh, out, seals=SEALS)
    exported = audit_export(out, seals=SEALS)
    assert exported.ok, exported.render()
    assert exported.events == report.events


def test_a_changed_v1_event_is_caught_under_the_v2_class(store: Store, funded_v2: Upcasts) -> None:
    """The upcast does not hide tampering: the seal is checked over what is stored."""
    rowid, originator_id, _, _, state = store.rows(FUNDED_TOPIC)[0]
    changed = state.replace(b'"escrow_id":"esc_', b'"escrow_id":"esX_', 1)
    assert changed != state
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE stored_events SET state = ? WHERE rowid = ?", (changed, rowid))
    fresh = Settlements(f"sqlite:///{store.path}")
    with pytest.raises(ChainError, match="does not match its seal"):
        fresh.get_job(UUID(originator_id))
    report = audit(fresh, seals=SEALS)
    assert [(f.rule, f.position) for f in report.findings if f.kind == "tamper"] == [
        ("event was changed: it does not match its seal", rowid)
    ]
