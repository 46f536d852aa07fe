"""`--store` is a store URL for every command, `demo` included, and errors name the flag; `demo`
refuses a store holding events it did not write; `replay` on an empty store says so; the pool
settings reach the library."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.cli.commands import app
from podsettle.settings import Settings
from tests.histories import history

runner = CliRunner()


@pytest.mark.parametrize("command", ["demo", "totals", "replay", "jobs"])
def test_a_bad_store_flag_is_named_as_the_flag(command: str, tmp_path: Path) -> None:
    result = runner.invoke(app, [command, "--store", f"sqlite:///{tmp_path}/missing/store.db"])
    assert result.exit_code == 2
    assert "--store: the folder" in result.stderr and "PODSETTLE_STORE" not in result.stderr


def test_demo_takes_a_store_url_not_a_file_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--store", str(tmp_path / "demo.db")])
    assert result.exit_code == 2 and "--store:" in result.stderr and "is not a store" in result.stderr
    assert not (tmp_path / "demo.db").exists()


def test_demo_refuses_a_store_it_did_not_write_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "mine.db"
    mine = Settlements(f"sqlite:///{path}")
    history(mine, 3)
    events = mine.recorder.max_notification_id()
    mine.close()
    result = runner.invoke(app, ["demo", "--store", f"sqlite:///{path}", "--jobs", "2"])
    assert result.exit_code == 2
    assert "holds events the demo did not write" in result.stderr
    again = Settlements(f"sqlite:///{path}")
    assert again.recorder.max_notification_id() == events  # nothing deleted, nothing added
    again.close()


def test_replay_of_an_empty_store_says_it_is_empty(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    Settlements(url).close()
    result = runner.invoke(app, ["replay", "--store", url])
    assert result.exit_code == 1 and "is empty" in result.stdout
    as_json = runner.invoke(app, ["replay", "--store", url, "--json"])
    assert as_json.exit_code == 1 and '"empty": true' in as_json.stdout


def test_pool_settings_are_the_libraries_variables() -> None:
    settings = Settings.from_env(
        {"POSTGRES_POOL_SIZE": "4", "POSTGRES_MAX_OVERFLOW": "2", "POSTGRES_PRE_PING": "true"}
    )
    assert settings.store_env() == {
        "POSTGRES_POOL_SIZE": "4",
        "POSTGRES_MAX_OVERFLOW": "2",
        "POSTGRES_PRE_PING": "y",
    }
    assert Settings().store_env() == {}
    with pytest.raises(Exception, match="POSTGRES_POOL_SIZE"):
        Settings.from_env({"POSTGRES_POOL_SIZE": "0"})
