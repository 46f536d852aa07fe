"""The audit: sound histories pass; planted violations are found at the event that caused them."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podsettle import Settlements
from podsettle.adapters.chain import SEALS
from podsettle.domain import EscrowJob
from podsettle.projections import ReadModel
from podsettle.replay import AuditReport, audit, audit_export, export
from tests.histories import Plan, history, open_job, run, steps


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settlements]:
    if request.param == "memory":
        yield Settlements("memory")
    else:
        application = Settlements(f"sqlite:///{tmp_path / 'store.db'}")
        yield application
        application.close()


def drive(app: Settlements, plan: Plan, *, upto: int | None = None) -> EscrowJob:
    """Open one job and make its saves (all, or the first `upto`)."""
    job = open_job(plan)
    app.save(job)
    for save in steps(plan)[:upto]:
        for command in save:
            command(job)
        app.save(job)
    return job


def invariant_findings(report: AuditReport) -> list[tuple[str, int | None, str | None]]:
    return [(f.rule, f.position, f.job_id) for f in report.findings if f.kind == "invariant"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 40),
    group=st.integers(1, 5),
    max_open=st.sampled_from([2, 10_000]),
)
def test_the_audit_passes_on_sound_random_histories(seed: int, n: int, group: int, max_open: int) -> None:
    app = Settlements("memory")
    history(app, n, seed=seed, group=group)
    model = ReadModel(app)
    report = audit(app, read_model=model, max_open=max_open)
    assert report.ok, report.render()
    assert report.views_compared
    assert report.events == app.recorder.max_notification_id()
    assert report.jobs == n


def test_a_sound_store_passes_with_its_read_model_and_as_an_export(app: Settlements, tmp_path: Path) -> None:
    history(app, 60, seed=4, group=2)
    model = ReadModel(app, str(tmp_path / "views.db"))
    model.catch_up()
    report = audit(app, read_model=model)
    assert report.ok, report.render()
    assert "OK" in report.render()
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is True and data["events"] == report.events and data["first_bad"] is None
    summary = export(app, tmp_path / "log.jsonl", checkpoint_every=50)
    assert summary.events == report.events
    exported = audit_export(tmp_path / "log.jsonl", seals=SEALS)
    assert exported.ok, exported.render()
    assert (exported.events, exported.jobs) == (report.events, report.jobs)


def test_double_release_is_found_at_the_second_release(app: Settlements) -> None:
    run(app, [Plan("ok-1", "released"), Plan("ok-2", "refunded")])
    job = drive(app, Plan("double", "released"))
    job._released(*job.released._replace(returned=Decimal(0)))
    app.save(job)
    position = app.recorder.max_notification_id()
    report = audit(app)
    assert not report.ok
    assert ("Released recorded 2 times", position, job.id.hex) in invariant_findings(report)
    assert report.first_bad is not None and report.first_bad.position == position
    assert job.id.hex in report.render() and f"position {position}" in report.render()


def test_release_without_completion_is_found(app: Settlements) -> None:
    job = drive(app, Plan("no-output", "released"), upto=4)  # funded and running, nothing completed
    job._release_requested(key="no-output:release", method="release")
    job._released(
        to_payee=Decimal("0.495"), fee=Decimal("0.005"), referral_fee=Decimal(0), returned=Decimal(0)
    )
    app.save(job)
    position = app.recorder.max_notification_id()
    report = audit(app)
    assert ("Released without Completed", position, job.id.hex) in invariant_findings(report)


def test_bonus_above_terms_is_found(app: Settlements) -> None:
    plan = Plan("greedy", "released")
    job = open_job(plan)
    job = EscrowJob.open(
        job_key="greedy",
        endpoint_id="train",
        input_digest=job.input_digest,
        payer="ag_payer",
        payee="ag_worker",
        budget="0.50",
        deadline=job.deadline,
        bonus_pool="1",
    )
    app.save(job)
    for save in steps(plan):
        for command in save:
            command(job)
        app.save(job)
    job._bonus_requested(
        key="greedy:bonus",
        amount=Decimal("2.5"),
        pool=Decimal("5"),
        base_metric="0.8",
        achieved_metric="1.2",
        threshold="1.10",
    )
    app.save(job)
    position = app.recorder.max_notification_id()
    report = audit(app, quiescent=False)
    assert invariant_findings(report) == [("bonus above the job's bonus terms", position, job.id.hex)]


def test_a_violation_after_the_job_was_let_go_of_is_still_found(app: Settlements, tmp_path: Path) -> None:
    """The double release comes long after the job finished: the audit rebuilds it from its history."""
    job = drive(app, Plan("early", "released"))
    history(app, 30, seed=9)
    job._released(*job.released._replace(returned=Decimal(0)))
    app.save(job)
    position = app.recorder.max_notification_id()
    small = audit(app, max_open=1)
    assert ("Released recorded 2 times", position, job.id.hex) in invariant_findings(small)
    export(app, tmp_path / "log.jsonl")
    exported = audit_export(tmp_path / "log.jsonl", seals=SEALS, max_open=1)
    assert ("Released recorded 2 times", position, job.id.hex) in invariant_findings(exported)


def test_the_quiescent_rule_flags_a_funded_job_left_running(app: Settlements) -> None:
    job = drive(app, Plan("stuck", "released"), upto=4)
    report = audit(app)
    last = app.recorder.max_notification_id()
    assert invariant_findings(report) == [("funded job left in RUNNING", last, job.id.hex)]
    assert invariant_findings(audit(app, settled=True)) == invariant_findings(report)
    assert audit(app, quiescent=False).ok  # an engine may still be working on it


def test_an_amount_edited_in_the_store_breaks_the_seal_and_an_invariant(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    app = Settlements(f"sqlite:///{path}")
    job = drive(app, Plan("edited", "released"))
    with sqlite3.connect(path) as conn:
        rowid, state = conn.execute(
            "SELECT rowid, state FROM stored_events WHERE topic LIKE '%Released' AND originator_id = ?",
            (job.id.hex,),
        ).fetchone()
        conn.execute(
            "UPDATE stored_events SET state = ? WHERE rowid = ?",
            (state.replace(b'"0.495000"', b'"0.990000"'), rowid),
        )
    report = audit(app)
    rules = {(f.kind, f.rule, f.position) for f in report.findings}
    assert ("tamper", "event was changed: it does not match its seal", rowid) in rules
    assert ("invariant", "released to payee + fee + returned is not the funded amount", rowid) in rules


def test_the_report_as_json_and_text_names_job_position_and_rule(app: Settlements) -> None:
    job = drive(app, Plan("twice", "refunded"))
    job._refunded(returned=job.refunded.returned, fee_kept=job.refunded.fee_kept)
    app.save(job)
    report = audit(app)
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False
    assert data["first_bad"]["job_id"] == job.id.hex
    assert data["first_bad"]["rule"] == "Refunded recorded 2 times"
    assert data["first_bad"]["position"] == app.recorder.max_notification_id()
    assert "VIOLATIONS FOUND" in report.render()


@pytest.mark.parametrize("seed", range(0, 24, 3))
async def test_the_audit_passes_on_logs_of_the_engine_fault_simulation(seed: int, tmp_path: Path) -> None:
    """Crashes before and after every effect, lost responses, 429s, duplicates, operator resolutions:
    the engine's log, replayed through the aggregate, breaks no invariant and is chained intact."""
    from tests.fault_sim import simulate

    result = await simulate(seed, tmp_path)
    app = Settlements(f"sqlite:///{tmp_path / f'sim-{seed}.db'}")
    model = ReadModel(app)
    report = audit(app, read_model=model, settled=True)  # every job has settled by the end
    assert report.ok, f"seed {seed} (faults {result.faults}): {report.render()}"
    assert report.views_compared and report.jobs >= len(result.jobs)
    export(app, tmp_path / "sim.jsonl")
    assert audit_export(tmp_path / "sim.jsonl", seals=SEALS, settled=True).ok
    # And the log agrees with the ledger the escrows were really held in.
    from podsettle.adapters.ledger_gateway import LedgerEscrow
    from podsettle.replay import reconcile

    reconciled = await reconcile(app, LedgerEscrow(result.ledger, payer="ag_payer"))
    assert reconciled.ok, reconciled.render()
    escrows = sum((job.escrow_id is not None) + (job.bonus_escrow_id is not None) for job in result.jobs)
    assert reconciled.escrows_checked == escrows


def test_a_read_model_row_edited_or_removed_is_found_and_the_same_values_in_other_text_are_not(
    tmp_path: Path,
) -> None:
    app = Settlements("memory")
    history(app, 12, seed=5)
    path = tmp_path / "views.db"
    model = ReadModel(app, str(path))
    model.catch_up()
    assert audit(app, read_model=model).ok
    with sqlite3.connect(path) as conn:
        edited, removed, respelled = (r[0] for r in conn.execute("SELECT job_id FROM jobs LIMIT 3"))
        conn.execute("UPDATE jobs SET escrow_id = 'esc_forged' WHERE job_id = ?", (edited,))
        conn.execute("DELETE FROM jobs WHERE job_id = ?", (removed,))
        # the same amount written differently (and the derived funding time): still the same row
        conn.execute(
            "UPDATE jobs SET budget = budget || '000', funding_us = -1 WHERE job_id = ?", (respelled,)
        )
    report = audit(app, read_model=model)
    rows = {(f.job_id, f.detail.split(":")[0]) for f in report.findings if f.rule.startswith("job row")}
    assert rows == {(edited, "escrow_id"), (removed, "missing from the read model")}, report.render()
