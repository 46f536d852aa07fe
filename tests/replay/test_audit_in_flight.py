"""The audit tells a busy log from a broken one: a funded job waiting on a service is reported in
flight until the bound its log fixes; past it, or with `settled`, it is a violation; every true
violation fails whatever waits."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.adapters.chain import SEALS
from podsettle.cli import app as cli
from podsettle.domain import EscrowJob, State
from podsettle.projections import ReadModel
from podsettle.replay import audit, audit_export, export, waiting_on_service
from podsettle.replay.audit import SWEEP_PERIOD
from tests.histories import Plan, drive_history, history, open_job, steps
from tests.jobs import DEADLINE


def busy_store(app: Settlements) -> dict[str, EscrowJob]:
    """Settled jobs, and three funded ones waiting: a refund (failed, the refund asked for and
    attempted), a release (attempted), and one still running."""
    history(app, 8, seed=3)
    return {
        "refund": drive_history(app, Plan("waits-refund", "refunded"), upto=6),
        "release": drive_history(app, Plan("waits-release", "released"), upto=6),
        "compute": drive_history(app, Plan("waits-compute", "released"), upto=4),
    }


def at(moment: datetime) -> object:
    return lambda: moment


def rules(report: object) -> list[tuple[str, str | None]]:
    return sorted((f.rule, f.job_id) for f in report.findings)  # type: ignore[attr-defined]


@pytest.fixture
def app(tmp_path: Path) -> Settlements:
    return Settlements(f"sqlite:///{tmp_path / 'store.db'}")


def test_jobs_waiting_on_a_service_pass_reported_in_flight_until_their_bound(
    app: Settlements, tmp_path: Path
) -> None:
    jobs = busy_store(app)
    assert [jobs[k].state for k in ("refund", "release", "compute")] == [
        State.REFUNDING,
        State.RELEASING,
        State.RUNNING,
    ]
    before_deadline = DEADLINE - timedelta(minutes=1)
    report = audit(app, read_model=ReadModel(app), now=at(before_deadline))
    assert report.ok, report.render()
    waiting = {job.job_id: (job.state, job.waiting_for) for job in report.in_flight}
    assert waiting == {
        jobs["refund"].id.hex: ("REFUNDING", "refund"),
        jobs["release"].id.hex: ("RELEASING", "release"),
        jobs["compute"].id.hex: ("RUNNING", "compute"),
    }
    assert "3 job(s) in flight" in report.render()
    assert json.loads(json.dumps(report.to_json()))["in_flight_count"] == 3
    export(app, tmp_path / "log.jsonl")
    exported = audit_export(tmp_path / "log.jsonl", seals=SEALS, now=at(before_deadline))
    assert exported.ok and len(exported.in_flight) == 3
    # Let go of early (a small memory bound): the same verdict.
    assert len(audit(app, max_open=1, now=at(before_deadline)).in_flight) == 3


def test_past_its_bound_a_waiting_job_is_a_violation(app: Settlements) -> None:
    jobs = busy_store(app)
    # Compute is bound by the job's deadline.
    after_deadline = DEADLINE + timedelta(seconds=1)
    report = audit(app, now=at(after_deadline))
    assert rules(report) == [("funded job left in RUNNING", jobs["compute"].id.hex)]
    assert len(report.in_flight) == 2
    # A refund or a release by the escrow's expiry plus the sweep's five minutes.
    kind, until = waiting_on_service(jobs["refund"], None)
    assert kind == "refund"
    report = audit(app, now=at(until + timedelta(seconds=1)), max_open=1)
    assert rules(report) == sorted(
        [
            ("funded job left in REFUNDING", jobs["refund"].id.hex),
            ("funded job left in RELEASING", jobs["release"].id.hex),
            ("funded job left in RUNNING", jobs["compute"].id.hex),
        ]
    )
    assert report.in_flight == []


def test_settled_fails_on_any_job_in_flight(app: Settlements) -> None:
    jobs = busy_store(app)
    report = audit(app, now=at(DEADLINE - timedelta(hours=1)), settled=True)
    assert not report.ok and report.in_flight == []
    assert {job_id for _, job_id in rules(report)} == {job.id.hex for job in jobs.values()}
    assert report.to_json()["settled_required"] is True


def test_a_tampered_or_inconsistent_log_fails_whatever_waits(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    app = Settlements(f"sqlite:///{path}")
    jobs = busy_store(app)
    released = drive_history(app, Plan("twice", "released"))
    released._released(*released.released._replace(returned=0))  # a second Released
    app.save(released)
    calm = at(DEADLINE - timedelta(minutes=1))
    report = audit(app, now=calm)
    assert rules(report) == [("Released recorded 2 times", released.id.hex)]
    assert len(report.in_flight) == 3
    with sqlite3.connect(path) as conn:  # an amount changed in the waiting job's Funded event
        rowid, state = conn.execute(
            "SELECT rowid, state FROM stored_events WHERE topic LIKE '%Funded' AND originator_id = ?",
            (jobs["refund"].id.hex,),
        ).fetchone()
        conn.execute(
            "UPDATE stored_events SET state = ? WHERE rowid = ?",
            (state.replace(b'"0.495000"', b'"0.490000"'), rowid),
        )
    tampered = audit(Settlements(f"sqlite:///{path}"), now=calm)
    assert ("tamper", "event was changed: it does not match its seal") in {
        (f.kind, f.rule) for f in tampered.findings
    }
    assert ("fee + net is not the funded amount", jobs["refund"].id.hex) in rules(tampered)


def test_the_bound_of_an_escrow_follows_the_engines_escrow_timeout() -> None:
    job = open_job(Plan("bound", "refunded"))
    for save in steps(Plan("bound", "refunded"))[:6]:
        for command in save:
            command(job)
    funded = DEADLINE - timedelta(hours=10)
    # Funded well before the deadline: the escrow lasts past the deadline by the margin (and the
    # rounding up to whole hours), then the sweep's period.
    assert waiting_on_service(job, funded) == ("refund", DEADLINE + timedelta(hours=2) + SWEEP_PERIOD)
    # Funded after the deadline: the escrow's minimum of one hour.
    late = DEADLINE + timedelta(hours=5)
    assert waiting_on_service(job, late) == ("refund", late + timedelta(hours=1) + SWEEP_PERIOD)
    # Never more than the service's 720 hours.
    early = DEADLINE - timedelta(hours=2000)
    assert waiting_on_service(job, early) == ("refund", early + timedelta(hours=720) + SWEEP_PERIOD)
    settled = drive_history(Settlements("memory"), Plan("done", "refunded"))
    assert waiting_on_service(settled, funded) is None


def test_the_replay_command_passes_a_busy_log_and_settled_fails_it(app: Settlements, tmp_path: Path) -> None:
    # Funded now, with a deadline already past: the release and the refund still wait (the escrow's
    # hour has not passed), so the log is busy, not broken.
    history(app, 8, seed=3)
    waiting = {
        drive_history(app, Plan("waits-refund", "refunded"), upto=6).id.hex,
        drive_history(app, Plan("waits-release", "released"), upto=6).id.hex,
    }
    env = {"PODSETTLE_STORE": f"sqlite:///{tmp_path / 'store.db'}", "PODSETTLE_LOG_LEVEL": "ERROR"}
    runner = CliRunner()
    busy = runner.invoke(cli, ["replay", "--json"], env=env, catch_exceptions=False)
    assert busy.exit_code == 0, busy.stdout
    data = json.loads(busy.stdout)
    assert data["ok"] is True and data["in_flight_count"] == 2
    assert {job["job_id"] for job in data["in_flight"]} == waiting
    text = runner.invoke(cli, ["replay"], env=env, catch_exceptions=False)
    assert text.exit_code == 0 and "2 job(s) in flight" in text.stdout
    strict = runner.invoke(cli, ["replay", "--settled", "--json"], env=env, catch_exceptions=False)
    assert strict.exit_code == 1
    assert {f["job_id"] for f in json.loads(strict.stdout)["findings"]} == waiting
