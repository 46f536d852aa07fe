"""`reconcile --check-escrow --apply` records what the escrow service confirms (a refund by its
timeout sweep, a release) with the engine's own commands; `reconcile` exits 1 when anything waits
for an operator or a wait is past its bound."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.bootstrap import engine_from_settings
from podsettle.cli import app as cli
from podsettle.cli.reconcile import list_attention
from podsettle.domain import EscrowJob, State, Step
from podsettle.domain.digests import digest
from podsettle.domain.money import to_money
from podsettle.domain.rules import split
from podsettle.replay import audit
from podsettle.settings import Settings
from tests.escrow_sandbox_helpers import Sandbox, running_sandbox
from tests.histories import Plan, drive_history
from tests.jobs import DEADLINE

BUDGET = to_money("1.00")


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with running_sandbox() as running:
        yield running


def waiting_job(app: Settlements, escrow_id: str, payee: str, *, failed: bool, payer: str) -> EscrowJob:
    """A job funded with `escrow_id`, then failed (its refund asked for and attempted) or completed
    (its release attempted): the log waits for the service's answer."""
    parts = split(BUDGET)
    job = EscrowJob.open(
        job_key=f"job-{escrow_id}",
        endpoint_id="echo",
        input_digest=digest({"k": escrow_id}),
        payer=payer,  # the agent the service charged: an escrow of another creator is not the job's
        payee=payee,
        budget=BUDGET,
        deadline=datetime.now(UTC) + timedelta(minutes=10),
        batch_id=None,
        referral=None,
        bonus_pool=None,
    )
    job.record_attempt(Step.FUND, "proc-1")
    job.record_funded(escrow_id, BUDGET, parts.fee, parts.net)
    job.record_attempt(Step.START, "proc-1")
    job.record_started("rp-1")
    if failed:
        job.record_failed("run", "FAILED", "CUDA out of memory")
        job.record_attempt(Step.REFUND, "proc-1")
    else:
        job.record_completed(digest({"out": 1}), 1000, 10, "worker-1", {})
        job.record_attempt(Step.RELEASE, "proc-1")
    app.save(job)
    return job


def factory(box: Sandbox, payer: str, payer_key: str, store: str) -> Any:
    def make(**_: Any) -> Any:
        return engine_from_settings(
            Settings(
                store=store,
                escrow_url=box.url,
                pf_api_key=payer_key,
                runpod_api_key="unused",
                payer=payer,
                refund_method="timeout",
                log_level="ERROR",
            )
        )

    return make


async def test_a_refund_by_the_sweep_and_a_release_are_recorded_as_the_engine_records_them(
    box: Sandbox, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    app = Settlements(store)
    payer, payer_key = box.agent("10.00")
    worker, _ = box.agent("0")
    async with box.adapter(payer_key) as pf:
        swept = await pf.create(key="a", payee=worker, amount=BUDGET, description="job a", timeout_hours=1)
        released = await pf.create(key="b", payee=worker, amount=BUDGET, description="job b", timeout_hours=5)
        kept = await pf.create(key="c", payee=worker, amount=BUDGET, description="job c", timeout_hours=5)
        await pf.release(released.escrow_id, key="b", expected=split(BUDGET))
    refunding = waiting_job(app, swept.escrow_id, worker, failed=True, payer=payer)
    releasing = waiting_job(app, released.escrow_id, worker, failed=False, payer=payer)
    still = waiting_job(app, kept.escrow_id, worker, failed=True, payer=payer)
    box.http.post("/sandbox/clock", json={"advance_s": 2 * 3600})
    assert box.http.post("/sandbox/sweep").json() == {"refunded": [swept.escrow_id]}
    make = factory(box, payer, payer_key, store)

    listed = await list_attention(app, check_escrow=True, engine_factory=make)
    assert {(d["job_id"], d["settles"]) for d in listed["differences"]} == {
        (str(refunding.id), "refunded"),
        (str(releasing.id), "released"),
    }
    assert listed["applied"] == []
    assert app.get_job(refunding.id).state == State.REFUNDING  # listing changes nothing

    applied = await list_attention(app, check_escrow=True, engine_factory=make, apply=True)
    assert {(a["job_id"], a["recorded"]) for a in applied["applied"]} == {
        (str(refunding.id), "REFUNDED"),
        (str(releasing.id), "RELEASED"),
    }
    assert applied["differences"] == []
    assert [w["job_id"] for w in applied["waiting"]] == [str(still.id)]  # its escrow is still funded
    refunded = app.get_job(refunding.id).refunded
    assert (refunded.returned, refunded.fee_kept) == (Decimal("0.99"), Decimal("0.01"))  # commission kept
    assert app.get_job(releasing.id).released.to_payee == Decimal("0.99")
    assert audit(app).ok
    again = await list_attention(app, check_escrow=True, engine_factory=make, apply=True)
    assert again["applied"] == [] and again["differences"] == []


async def test_a_wait_past_its_bound_is_listed_past_it(tmp_path: Path) -> None:
    app = Settlements(f"sqlite:///{tmp_path / 'store.db'}")
    job = drive_history(app, Plan("late", "refunded"), upto=6)
    assert job.state == State.REFUNDING
    unused = lambda **_: pytest.fail("no service without --check-escrow")  # noqa: E731
    now = datetime.now(UTC)
    calm = await list_attention(app, check_escrow=False, engine_factory=unused, now=lambda: now)
    assert [(w["job_id"], w["past_bound"]) for w in calm["waiting"]] == [(str(job.id), False)]
    later = now + timedelta(hours=2)
    late = await list_attention(app, check_escrow=False, engine_factory=unused, now=lambda: later)
    assert [(w["job_id"], w["past_bound"]) for w in late["waiting"]] == [(str(job.id), True)]


def test_reconcile_exits_1_on_a_wait_past_its_bound_and_0_on_a_busy_log(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    app = Settlements(f"sqlite:///{store}")
    env = {"PODSETTLE_STORE": f"sqlite:///{store}", "PODSETTLE_LOG_LEVEL": "ERROR"}
    runner = CliRunner()
    drive_history(app, Plan("refund-due", "refunded"), upto=6)  # funded now: its escrow's hour runs
    busy = runner.invoke(cli, ["reconcile", "--json"], env=env, catch_exceptions=False)
    assert busy.exit_code == 0, busy.stdout
    assert [w["past_bound"] for w in json.loads(busy.stdout)["waiting"]] == [False]
    running = drive_history(app, Plan("ran-out", "released"), upto=4)  # running past its deadline
    assert running.deadline == DEADLINE < datetime.now(UTC)
    late = runner.invoke(cli, ["reconcile"], env=env, catch_exceptions=False)
    assert late.exit_code == 1
    assert "PAST ITS BOUND" in late.stdout
    apply_alone = runner.invoke(cli, ["reconcile", "--apply"], env=env, catch_exceptions=False)
    assert apply_alone.exit_code == 2 and "--check-escrow" in apply_alone.stderr
