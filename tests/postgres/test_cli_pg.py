"""The command line on PostgreSQL stores: `demo --store postgresql://...` runs and then refuses the
database it filled (it deletes nothing); `replay` of an empty database says it is empty; the pool
settings size the library's pool."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.cli.commands import app
from podsettle.settings import Settings

runner = CliRunner()


def test_demo_on_a_postgres_store_then_refuses_it(
    pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = pg_database()
    result = runner.invoke(app, ["demo", "--store", url, "--jobs", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["audit"]["ok"] is True and data["batch"]["totals"]["jobs"] == 4
    assert not list(tmp_path.iterdir())  # its views live in the database
    again = runner.invoke(app, ["demo", "--store", url, "--jobs", "4"])
    assert again.exit_code == 2 and "earlier demo's events" in again.stderr
    replay = runner.invoke(app, ["replay", "--store", url, "--json"])
    assert replay.exit_code == 0 and json.loads(replay.stdout)["ok"] is True


def test_replay_of_an_empty_postgres_store_says_it_is_empty(pg_database: Callable[[], str]) -> None:
    url = pg_database()
    result = runner.invoke(app, ["replay", "--store", url])
    assert result.exit_code == 1 and f"the store {url} is empty" in result.stdout


def test_pool_settings_size_the_pool(pg_schema: str) -> None:
    settings = Settings.from_env({"POSTGRES_POOL_SIZE": "3", "POSTGRES_MAX_OVERFLOW": "2"})
    store = Settlements(
        "postgresql://postgres@127.0.0.1:5432/test",
        env={**settings.store_env(), "POSTGRES_SCHEMA": pg_schema},
    )
    pool = store.recorder.datastore.pool  # type: ignore[attr-defined]
    assert (pool.min_size, pool.max_size) == (3, 5)
    store.close()


def test_stores_opened_together_on_a_new_database_all_open(pg_database: Callable[[], str]) -> None:
    # Several processes starting on a new database raced in the library's CREATE TABLE IF NOT
    # EXISTS: the losers failed (a duplicate type, or "tuple concurrently updated").
    import threading

    url = pg_database()
    barrier = threading.Barrier(6)
    opened: list[Settlements] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(Settlements(url))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(opened) == 6
    for store in opened:
        store.close()
