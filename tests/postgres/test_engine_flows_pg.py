"""The engine's flows (tests/application/test_engine_flows.py) on a PostgreSQL store, in-process and
over HTTP against the sandbox; afterwards the store's own read models agree with the engine's results
and a rebuild, and the audit passes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from podsettle.adapters.chain import SEALS
from podsettle.bootstrap import Engine
from podsettle.projections import ReadModel
from podsettle.projections.views_pg import postgres_views
from podsettle.replay import audit
from tests.application.test_engine_flows import (  # noqa: F401  collected here again, with this module's engine
    test_a_budget_above_the_balance_is_rejected_and_moves_nothing,
    test_a_failed_job_refunds_the_payer,
    test_a_job_past_its_deadline_is_cancelled_and_refunded,
    test_a_key_reused_for_a_different_job_is_refused,
    test_a_successful_job_pays_the_worker,
    test_acceptance_checks_gate_the_release,
    test_bad_input_is_refused_before_anything_is_recorded,
    test_batch_settlement_with_totals,
    test_bonus_is_capped_at_the_pool,
    test_cancelling_a_running_job_refunds,
    test_no_bonus_on_an_unpaid_job,
    test_performance_bonus,
    test_the_same_job_key_never_pays_twice,
)
from tests.postgres.conftest import URL


@pytest.fixture(params=["in-process", "http-v1"])
async def engine(
    request: pytest.FixtureRequest, pg_schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[Engine]:
    monkeypatch.setenv("POSTGRES_SCHEMA", pg_schema)
    store = f"{URL}/test"
    if request.param == "in-process":
        made = Engine.in_process(store, balance="100")
    else:
        made = Engine.sandbox(store, dialect="v1", balance="100")
    async with made as running:
        yield running
        app = running.app
    views = postgres_views(app)
    assert views is not None
    model = ReadModel(app, views)
    model.catch_up()
    assert model.batch_totals().jobs == len(list(app.job_ids()))
    report = audit(app, read_model=model, seals=SEALS, quiescent=False)
    assert report.views_compared and report.ok, report.render()
    model.close()
