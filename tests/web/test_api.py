"""The dashboard's JSON API against the projections: on a store holding every outcome a job can have
(tests/histories.py), each route answers what the read model and the log say, amounts as strings."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from podsettle.application import Settlements
from podsettle.domain import State
from podsettle.projections import ReadModel
from podsettle.web.app import create_app
from podsettle.web.dashboard import SettledSeries
from tests.histories import OUTCOMES, Plan, run

PORT = 8788


def every_outcome(prefix: str) -> list[Plan]:
    return [
        Plan(key=f"{prefix}-{n}", outcome=outcome, batch=("batch-a", "batch-b", None)[n % 3], payee=payee)
        for n, (outcome, payee) in enumerate(
            (outcome, payee) for payee in ("ag_worker", "ag_other") for outcome in OUTCOMES
        )
    ]


@pytest.fixture
def store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    run(Settlements(url), every_outcome("first"))
    return url


@pytest.fixture
def client(store: str) -> Iterator[TestClient]:
    app = create_app(Settlements(store), port=PORT, loopback=True, token=None)
    with TestClient(app, base_url=f"http://127.0.0.1:{PORT}") as served:
        yield served


def projections(store: str) -> ReadModel:
    model = ReadModel(Settlements(store), None)
    model.catch_up()
    return model


def get(client: TestClient, path: str, **params: Any) -> Any:
    answer = client.get(path, params=params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    return answer.json()


def test_overview_is_the_read_models_totals(client: TestClient, store: str) -> None:
    model = projections(store)
    data = get(client, "/api/overview")
    assert data["position"] == model.position
    assert data["totals"] == model.batch_totals().to_json()
    assert all(isinstance(data["totals"][name], str) for name in ("funded", "to_workers", "fees", "spent"))
    assert data["states"] == {str(s): 0 for s in State} | model.state_counts()
    assert {b["batch_id"]: b["jobs"] for b in data["batches"]} == {
        key: t.jobs for key, t in model.batches().items()
    }
    one = get(client, "/api/overview", batch="batch-a")
    assert one["totals"] == model.batch_totals("batch-a").to_json() and one["batch_id"] == "batch-a"


def test_jobs_by_batch_and_state_most_recent_first(client: TestClient, store: str) -> None:
    model = projections(store)
    everything = get(client, "/api/jobs")
    assert everything["count"] == len(model.jobs()) == len(everything["jobs"])
    assert everything["jobs"] == [row.to_json() for row in reversed(model.jobs())]
    released = get(client, "/api/jobs", batch="batch-b", state="released")
    assert [j["job_id"] for j in released["jobs"]] == [
        row.job_id for row in reversed(model.jobs(state="RELEASED", batch_id="batch-b"))
    ]
    assert released["count"] > 0
    page = get(client, "/api/jobs", limit=3, offset=2)
    assert page["jobs"] == everything["jobs"][2:5] and page["count"] == everything["count"]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"state": "sideways"}, "state: 'sideways' is not one of"),
        ({"limit": "0"}, "limit: must be between 1 and 1000"),
        ({"limit": "many"}, "limit: 'many' is not a whole number"),
        ({"offset": "-1"}, "offset: must not be negative"),
    ],
)
def test_a_bad_query_is_a_400_naming_the_parameter(
    client: TestClient, params: dict[str, str], words: str
) -> None:
    answer = client.get("/api/jobs", params=params)
    assert answer.status_code == 400 and words in answer.json()["error"]


def test_a_jobs_timeline_is_its_events_in_order(client: TestClient, store: str) -> None:
    app = Settlements(store)
    for row in projections(store).jobs():
        data = get(client, f"/api/jobs/{row.job_id}")
        events = list(app.events.get(app._uuid(row.job_id)))
        assert [(e["version"], e["event"]) for e in data["events"]] == [
            (e.originator_version, type(e).__name__) for e in events
        ]
        assert data["job"] == app.get_job(row.job_id).summary()
        assert [e["at"] for e in data["events"]] == sorted(e["at"] for e in data["events"])
    funded = next(e for e in data["events"] if e["event"] == "Funded")  # the last job's, money as text
    assert isinstance(funded["fields"]["amount"], str) and Decimal(funded["fields"]["amount"]) > 0
    missing = client.get("/api/jobs/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404
    assert client.get("/api/jobs/not-a-uuid").status_code == 400


def test_earnings_and_attention(client: TestClient, store: str) -> None:
    model = projections(store)
    earnings = get(client, "/api/earnings")["earnings"]
    assert sorted(earnings, key=lambda e: e["payee"]) == sorted(
        (e.to_json() for e in model.earnings()), key=lambda e: e["payee"]
    )
    waiting = get(client, "/api/attention")["attention"]
    left = model.jobs(state="ATTENTION")
    assert len(left) == 2  # attention_left, once per payee
    assert sorted(w["job_id"] for w in waiting) == sorted(row.job_id for row in left)
    assert {(w["step"], w["reason"]) for w in waiting} == {("release", "release outcome unknown")}
    assert all(w["known"] == {"status": "502"} for w in waiting)


def test_money_settled_over_time_ends_at_the_totals(client: TestClient, store: str) -> None:
    data = get(client, "/api/settled")
    totals = projections(store).batch_totals()
    assert data["to_workers"] == f"{totals.to_workers:.6f}" and data["returned"] == f"{totals.returned:.6f}"
    points = data["points"]
    assert points and points[-1]["to_workers"] == data["to_workers"]
    for earlier, later in pairwise(points):
        assert earlier["at"] < later["at"]
        assert Decimal(earlier["to_workers"]) <= Decimal(later["to_workers"])
        assert Decimal(earlier["returned"]) <= Decimal(later["returned"])


def test_the_api_follows_what_another_writer_records(client: TestClient, store: str) -> None:
    before = get(client, "/api/overview")
    run(Settlements(store), every_outcome("second"))  # another application on the same store
    after = get(client, "/api/overview")
    model = projections(store)
    assert after["position"] == model.position > before["position"]
    assert after["totals"] == model.batch_totals().to_json()
    assert after["totals"]["jobs"] == 2 * before["totals"]["jobs"]
    assert get(client, "/api/settled")["to_workers"] == f"{model.batch_totals().to_workers:.6f}"


def test_the_chart_keeps_at_most_its_points_and_always_the_last(tmp_path: Path) -> None:
    series = SettledSeries(Settlements(f"sqlite:///{tmp_path / 'empty.db'}"))
    start = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 10)
    for tick in range(1000):
        series._ticks[start + tick] = [Decimal("0.010000"), Decimal("0.001000")]
    points = series.points(max_points=50)
    assert len(points) == 50
    assert points[0].at == datetime(2026, 1, 1, tzinfo=UTC)
    assert points[-1].at == datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=99.9)
    assert (points[-1].to_workers, points[-1].returned) == (Decimal("10"), Decimal("1"))
    assert [p.at for p in points] == sorted(p.at for p in points)
