"""`podsettle migrate`: a SQLite log copied into PostgreSQL and back, in order, with its seals, the
copies audited and read the same; a tampered source and a non-empty target are refused untouched."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.bootstrap import Engine
from podsettle.cli.commands import app

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


async def _settled_store(path: Path) -> str:
    url = f"sqlite:///{path}"
    async with Engine.in_process(url, balance="100") as engine:
        jobs = [{"prompt": f"p{i}"} for i in range(6)] + [{}]
        await engine.run_batch("echo", jobs, per_job_budget="0.50", batch_id="b1")
        await engine.run_paid_job("fail", {}, budget="0.25")
    return url


def _events(url: str) -> list[tuple[str, int, str, bytes]]:
    store = Settlements(url)
    try:
        notes = store.recorder.select_notifications(1, 100_000)
        return [(str(n.originator_id), n.originator_version, n.topic, bytes(n.state)) for n in notes]
    finally:
        store.close()


async def test_sqlite_to_postgres_and_back(
    pg_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = await _settled_store(tmp_path / "source.db")
    middle, back = pg_database(), f"sqlite:///{tmp_path / 'back.db'}"
    digests = []
    for origin, target in ((source, middle), (middle, back)):
        code, out, err = _invoke("migrate", "--from", origin, "--to", target, "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["ok"] and result["same_events"] and result["target_audit_ok"]
        digests.append(result["log_digest"])
    assert digests[0] == digests[1]
    assert _events(source) == _events(middle) == _events(back)
    assert len(_events(source)) == json.loads(out)["events"]
    totals = []
    for url in (source, middle, back):
        code, out, err = _invoke("replay", "--store", url, "--json")
        assert code == 0 and json.loads(out)["ok"] is True, out + err
        code, out, err = _invoke("totals", "--store", url, "--json")
        assert code == 0, err
        totals.append(json.loads(out))
    assert totals[0] == totals[1] == totals[2] and totals[0]["jobs"] == 8


async def test_a_tampered_source_and_a_non_empty_target_are_refused(
    pg_database: Callable[[], str], tmp_path: Path
) -> None:
    source = await _settled_store(tmp_path / "source.db")
    target = pg_database()
    path = str(tmp_path / "source.db")
    with sqlite3.connect(path) as conn:
        (rowid, state) = conn.execute(
            "SELECT rowid, state FROM stored_events WHERE topic LIKE '%Released' LIMIT 1"
        ).fetchone()
        assert b'"0.495000"' in state
        conn.execute(
            "UPDATE stored_events SET state = ? WHERE rowid = ?",
            (state.replace(b'"0.495000"', b'"0.595000"'), rowid),
        )
    code, _, err = _invoke("migrate", "--from", source, "--to", target)
    assert code == 2 and "fails its audit" in err
    assert _events(target) == []  # nothing copied

    clean = await _settled_store(tmp_path / "clean.db")
    assert _invoke("migrate", "--from", clean, "--to", target)[0] == 0
    code, _, err = _invoke("migrate", "--from", clean, "--to", target)
    assert code == 2 and "already holds events" in err
    assert len(_events(target)) == len(_events(clean))
