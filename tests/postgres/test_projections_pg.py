"""The read models of a PostgreSQL store live in that store: tables beside its events, written with
their tracking position in one transaction, kept by whichever process reads them, never counting an
event twice when several readers catch up at once; two stores read from one working directory keep
apart."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.adapters.chain import SEALS
from podsettle.cli.commands import app as cli
from podsettle.projections import ReadModel
from podsettle.projections.views_pg import PostgresViewStore, postgres_views
from podsettle.replay import audit
from tests.histories import history
from tests.postgres.conftest import URL


def _store(schema: str) -> Settlements:
    return Settlements(f"{URL}/test", env={"POSTGRES_SCHEMA": schema})


def _views(app: Settlements) -> PostgresViewStore:
    views = postgres_views(app)
    assert views is not None
    return views


def test_views_in_the_store_equal_a_rebuild_in_sqlite_and_pass_the_audit(pg_schema: str) -> None:
    app = _store(pg_schema)
    live = ReadModel(app, _views(app), page_size=7)
    history(app, 25, seed=4, group=3, on_save=lambda n: live.catch_up() if n % 5 == 0 else None)
    live.catch_up()
    in_sqlite = ReadModel(app)  # the same projections into an in-memory SQLite database
    in_sqlite.catch_up()
    assert live.dump() == in_sqlite.dump()
    assert live.batch_totals().jobs == 25
    report = audit(app, read_model=ReadModel(app, _views(app)), seals=SEALS, quiescent=False)
    assert report.views_compared and report.ok, report.render()
    before = live.dump()
    assert live.rebuild() == app.recorder.max_notification_id()
    assert live.dump() == before
    app.close()


def test_a_second_reader_picks_up_where_the_first_left_the_views(pg_schema: str) -> None:
    app = _store(pg_schema)
    first, second = ReadModel(app, _views(app)), ReadModel(app, _views(app))
    history(app, 10, seed=1)
    first.catch_up()
    history(app, 10, seed=2)
    assert second.catch_up() == app.recorder.max_notification_id() - first.position
    first.catch_up()  # its tallies in memory are stale: it reloads them, adds nothing twice
    assert first.batch_totals().jobs == second.batch_totals().jobs == 20
    assert first.dump() == second.dump()
    app.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_concurrent_catch_ups_never_count_an_event_twice(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "postgres":
        app = _store(request.getfixturevalue("pg_schema"))

        def views() -> object:
            return _views(app)
    else:
        app = Settlements(f"sqlite:///{tmp_path / 'store.db'}")

        def views() -> object:
            return str(tmp_path / "store.db.views")

    readers = [ReadModel(app, views(), page_size=5) for _ in range(4)]  # type: ignore[arg-type]
    errors: list[BaseException] = []
    writing = threading.Event()

    def follow(model: ReadModel) -> None:
        try:
            while writing.is_set():
                model.catch_up()
            model.catch_up()
        except BaseException as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)

    writing.set()
    threads = [threading.Thread(target=follow, args=(model,)) for model in readers]
    for thread in threads:
        thread.start()
    history(app, 40, seed=9, group=2)
    writing.clear()
    for thread in threads:
        thread.join(60)
    assert not errors
    rebuilt = ReadModel(app)
    rebuilt.catch_up()
    for model in readers:
        assert model.dump() == rebuilt.dump()
        assert model.batch_totals().jobs == 40
    app.close()


def _cli(store: str, *args: str) -> dict[str, object]:
    result = CliRunner().invoke(cli, [*args, "--store", store, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_two_databases_audited_from_one_working_directory_keep_their_own_views(
    pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PODSETTLE_VIEWS", raising=False)
    stores = [pg_database(), pg_database()]
    for n, url in zip((6, 11), stores, strict=True):
        app = Settlements(url)
        history(app, n, seed=n)
        app.close()
    for _ in range(2):  # the second time, each store's views are already there, at its end
        for n, url in zip((6, 11), stores, strict=True):
            report = _cli(url, "replay")
            assert report["ok"] is True, report
            assert report["views_compared"] is True
            assert _cli(url, "totals")["jobs"] == n
    assert not list(tmp_path.iterdir())  # no views file in the working directory
