"""The read models: incremental catch-up equals a rebuild, totals add up, tracking resumes exactly."""

from __future__ import annotations

import random
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podsettle import Settlements
from podsettle.domain import State
from podsettle.projections import ReadModel, Totals, row_of
from podsettle.projections import views as views_module
from tests.histories import OUTCOMES, Plan, history, run, steps

plans = st.lists(
    st.builds(
        Plan,
        key=st.just("x"),
        outcome=st.sampled_from(OUTCOMES),
        budget=st.sampled_from(["0.10", "0.50", "2.345678", "999.999999"]),
        batch=st.sampled_from(["b1", "b2", None]),
        payee=st.sampled_from(["ag_worker", "ag_other"]),
        endpoint=st.sampled_from(["echo", "train"]),
        execution_ms=st.integers(0, 100_000),
        delay_ms=st.integers(0, 10_000),
    ),
    min_size=1,
    max_size=12,
)


def keyed(drawn: list[Plan], tag: str) -> list[Plan]:
    return [
        Plan(f"{tag}-{i}", p.outcome, p.budget, p.batch, p.payee, p.endpoint, p.execution_ms, p.delay_ms)
        for i, p in enumerate(drawn)
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=plans, seed=st.integers(0, 2**32), page=st.sampled_from([3, 7, 1000]), group=st.integers(1, 4))
def test_incremental_catch_up_equals_a_rebuild_after_random_histories(
    drawn: list[Plan], seed: int, page: int, group: int
) -> None:
    app = Settlements("memory")
    rng = random.Random(seed)
    jobs = keyed(drawn, f"h{seed}")
    order = [i for i, plan in enumerate(jobs) for _ in steps(plan)]
    rng.shuffle(order)
    live = ReadModel(app, page_size=page, cache_size=rng.choice([1, 2, 64]))

    def maybe_catch_up(_: int) -> None:
        if rng.random() < 0.4:
            live.catch_up()

    run(app, jobs, order, group=group, on_save=maybe_catch_up)
    live.catch_up()
    one_shot = ReadModel(app)
    one_shot.catch_up()
    assert live.dump() == one_shot.dump()
    before = live.dump()
    live.rebuild()
    assert live.dump() == before
    # The rows are read off the aggregates as the application itself loads them.
    for job_id in app.job_ids():
        job = app.get_job(job_id)
        row = live.job(job_id)
        assert row is not None
        assert (row.state, row.version, row.funded, row.awaiting_outcome) == (
            str(job.state),
            job.version,
            (job.funded_amount or 0) + (job.bonus_funded.amount if job.bonus_funded else 0),
            job.awaiting_outcome,
        )
        assert row == row_of(job, row.position, row.funded_at)


def test_totals_add_up_over_jobs_payees_endpoints_and_batches(tmp_path: Path) -> None:
    app = Settlements(f"sqlite:///{tmp_path / 'store.db'}")
    history(app, 80, seed=7, group=3)
    model = ReadModel(app, str(tmp_path / "views.db"), page_size=50)
    assert model.catch_up() == app.recorder.max_notification_id()
    rows = model.jobs()
    assert len(rows) == 80
    everything = model.batch_totals()
    summed = Totals()
    for row in rows:
        summed.add(row)
    assert summed == everything
    assert everything.jobs == (
        everything.paid_jobs
        + everything.refunded_jobs
        + everything.rejected_jobs
        + everything.attention_jobs
        + everything.in_flight_jobs
    )
    per_batch = model.batches()
    assert sum(t.jobs for t in per_batch.values()) == 80
    assert sum((t.to_workers for t in per_batch.values()), Decimal(0)) == everything.to_workers
    for batch, tally in per_batch.items():
        in_batch = (
            model.jobs(batch_id=batch) if batch is not None else [r for r in rows if r.batch_id is None]
        )
        assert tally.jobs == len(in_batch)
    earnings = {e.payee: e for e in model.earnings()}
    for payee, e in earnings.items():
        mine = [r for r in rows if r.payee == payee]
        assert e.to_workers == sum((r.to_workers for r in mine), Decimal(0))
        assert e.bonus_net == sum((r.bonus_net for r in mine), Decimal(0))
        assert e.still_held == sum((r.still_held for r in mine), Decimal(0))
    spend = {s.endpoint_id: s for s in model.endpoint_spend()}
    assert sum(s.totals.jobs for s in spend.values()) == 80
    counts = model.state_counts()
    assert sum(counts.values()) == 80
    assert counts.get("RELEASED", 0) == everything.paid_jobs
    assert {r.state for r in model.jobs(state="released")} <= {"RELEASED"}
    assert len(model.jobs(state=State.ATTENTION)) == everything.attention_jobs
    # Funded money is accounted for: paid out, kept as fees, returned, or still held.
    assert everything.balanced
    assert (
        everything.to_workers + everything.returned + everything.fees + everything.still_held
        == everything.funded
    )
    held = sum(
        (r.funded for r in rows if r.state not in ("RELEASED", "REFUNDED") and r.bonus_gross == 0), Decimal(0)
    )
    assert held <= everything.still_held


def test_money_is_stored_as_text_with_six_places(tmp_path: Path) -> None:
    app = Settlements("memory")
    history(app, 20, seed=3)
    path = tmp_path / "views.db"
    ReadModel(app, str(path)).catch_up()
    with sqlite3.connect(path) as conn:
        kinds = conn.execute("SELECT DISTINCT typeof(funded), typeof(to_workers) FROM jobs").fetchall()
        assert kinds == [("text", "text")]
        amounts = [r[0] for r in conn.execute("SELECT to_workers FROM tallies").fetchall()]
    assert all(a.split(".")[1].__len__() == 6 for a in amounts)


def test_a_new_read_model_resumes_from_its_tracked_position(tmp_path: Path) -> None:
    app = Settlements(f"sqlite:///{tmp_path / 'store.db'}")
    history(app, 30, seed=11)
    path = str(tmp_path / "views.db")
    first = ReadModel(app, path)
    first.catch_up()
    position = first.position
    first.close()
    history(app, 30, seed=12)
    again = ReadModel(app, path)
    assert again.position == position
    assert again.catch_up() == app.recorder.max_notification_id() - position
    fresh = ReadModel(app)
    fresh.catch_up()
    assert again.dump() == fresh.dump()
    assert again.catch_up() == 0  # nothing new: nothing to do


def test_a_failed_flush_writes_nothing_and_the_next_catch_up_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Settlements("memory")
    history(app, 25, seed=5)
    model = ReadModel(app, str(tmp_path / "views.db"), page_size=40)
    real = views_module._tally_values
    calls = {"n": 0}

    def failing(tally: Totals) -> tuple[object, ...]:
        calls["n"] += 1
        if calls["n"] == 9:  # inside the second page's transaction
            raise RuntimeError("disk full")
        return real(tally)

    monkeypatch.setattr(views_module, "_tally_values", failing)
    with pytest.raises(RuntimeError):
        model.catch_up()
    assert model.position == 40  # the first page only: the second one rolled back whole
    assert model.views.tracking(app.name).position == 40
    monkeypatch.setattr(views_module, "_tally_values", real)
    model.catch_up()
    fresh = ReadModel(app)
    fresh.catch_up()
    assert model.dump() == fresh.dump()


def test_timings_and_the_compute_cost_lower_bound() -> None:
    app = Settlements("memory")
    plans = [
        Plan(f"t-{i}", "released", execution_ms=ms, delay_ms=delay)
        for i, (ms, delay) in enumerate([(1000, 10), (2000, 20), (3000, 30), (4000, 40)])
    ]
    run(app, [*plans, Plan("t-fail", "refunded", execution_ms=999)])
    model = ReadModel(app, gpu_second_price=Decimal("0.00031"))
    model.catch_up()
    timings = model.timings()
    assert timings.execution_ms.count == 4
    assert (timings.execution_ms.p50, timings.execution_ms.p90, timings.execution_ms.max) == (
        2000,
        4000,
        4000,
    )
    assert (timings.delay_ms.p50, timings.delay_ms.p99) == (20, 40)
    assert (
        timings.funding_ms.count == 5 and timings.funding_ms.p50 is not None and timings.funding_ms.p50 >= 0
    )
    assert timings.gpu_seconds == Decimal("10")
    assert timings.compute_cost_floor == Decimal("0.003100")
    spend = model.endpoint_spend()[0]
    assert spend.compute_cost_floor == Decimal("0.003100")
    data = timings.to_json()
    assert data["compute_cost_floor"] == "0.003100" and data["execution_ms"]["p50"] == "2000"
    assert ReadModel(app).timings().compute_cost_floor is None  # no price configured
    with pytest.raises(ValueError):
        ReadModel(app, gpu_second_price=0.1)  # type: ignore[arg-type]


def test_json_amounts_are_strings() -> None:
    app = Settlements("memory")
    history(app, 15, seed=2)
    model = ReadModel(app)
    model.catch_up()
    totals = model.batch_totals().to_json()
    assert isinstance(totals["to_workers"], str) and isinstance(totals["jobs"], int)
    row = model.jobs()[0].to_json()
    assert isinstance(row["budget"], str) and isinstance(row["opened_at"], str)
    assert all(isinstance(e.to_json()["to_workers"], str) for e in model.earnings())


def test_a_views_file_of_the_old_layout_is_rebuilt_in_the_new_one(tmp_path: Path) -> None:
    app = Settlements("memory")
    history(app, 12, seed=4)
    path = tmp_path / "views.db"
    with sqlite3.connect(path) as conn:  # the layout before the totals had one vocabulary
        conn.executescript(
            "CREATE TABLE tallies (view TEXT, key TEXT, jobs INTEGER, paid INTEGER, released TEXT,"
            " PRIMARY KEY (view, key));"
            "INSERT INTO tallies VALUES ('all', '', 99, 99, '1.000000');"
            "CREATE TABLE tracking (name TEXT PRIMARY KEY, position INTEGER NOT NULL,"
            " events INTEGER NOT NULL, log_digest TEXT NOT NULL);"
            f"INSERT INTO tracking VALUES ('{app.name}', 999999, 999999, '00');"
        )
    model = ReadModel(app, str(path))
    assert model.position == 0  # nothing of the old file is trusted: it is read again from the log
    model.catch_up()
    fresh = ReadModel(app)
    fresh.catch_up()
    assert model.dump() == fresh.dump()
    assert model.batch_totals().jobs == 12
    model.close()
    again = ReadModel(app, str(path))  # a file of the current layout is kept
    assert again.position == fresh.position


def test_two_readers_of_one_views_file_never_count_an_event_twice(tmp_path: Path) -> None:
    # Each reader held its position and tallies in memory: the second one to catch up added the
    # first one's events again on top of the tallies it had written.
    app = Settlements(f"sqlite:///{tmp_path / 'store.db'}")
    views = str(tmp_path / "store.db.views")
    first, second = ReadModel(app, views), ReadModel(app, views)
    history(app, 8, seed=3)
    first.catch_up()
    second.catch_up()
    history(app, 5, seed=4)
    second.catch_up()
    first.catch_up()
    rebuilt = ReadModel(app)
    rebuilt.catch_up()
    assert first.batch_totals().jobs == second.batch_totals().jobs == 13
    assert first.dump() == second.dump() == rebuilt.dump()
