"""What a user meets when a store cannot be opened, a `memory` store is asked to move money, an
option is wrong or reused, and when a job or a batch is cancelled: each driven through the command
line, asserting the exit code, the one line, and that the escrow ledger and the log stay consistent."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from podsettle.cli import app
from podsettle.sandbox.app import Sandbox

runner = CliRunner()
PG = "127.0.0.1:5432"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    limits = {"create": 10_000, "complete": 10_000, "release": 10_000, "dispute": 10_000, "cancel": 10_000}
    with Sandbox(escrow_options={"dispute_review": "refund", "rate_limits": limits}) as served:
        yield served


@pytest.fixture
def env(sandbox: Sandbox, tmp_path: Path) -> dict[str, str]:
    payer = sandbox.create_agent("50")
    worker = sandbox.create_agent("0")
    return {
        "PODSETTLE_STORE": f"sqlite:///{tmp_path / 'store.db'}",
        "PODSETTLE_ESCROW_URL": sandbox.url,
        "PF_API_KEY": payer.api_key,
        "PODSETTLE_PAYER": payer.agent_id,
        "PODSETTLE_PAYEE": worker.agent_id,
        "RUNPOD_API_KEY": "sandbox-key",
        "RUNPOD_ENDPOINT_BASE_URL": sandbox.runpod_url,
        "PODSETTLE_ESCROW_RATE_LIMITS": "create=10000,release=10000,dispute=10000",
        "PODSETTLE_LOG_LEVEL": "ERROR",
        "PODSETTLE_JOB_TIMEOUT_S": "60",
        "PODSETTLE_REFUND_WAIT_S": "10",
        "PODSETTLE_REFUND_POLL_S": "0.05",
        "PODSETTLE_REFUND_METHOD": "dispute",
    }


def invoke(env: dict[str, str], *args: str) -> Any:
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def one_error_line(result: Any, *words: str) -> str:
    # JSON log lines come only because PODSETTLE_LOG_LEVEL is set here (as a developer would).
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("podsettle: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def balance(sandbox: Sandbox, agent: str) -> tuple[str, str]:
    (account,) = [a for a in sandbox.ledger()["accounts"] if a["account"] == agent]
    return account["balance"], account["held"]


def job_count(env: dict[str, str]) -> int:
    listed = invoke(env, "jobs", "--json")
    assert listed.exit_code == 0, listed.stderr
    return len(json.loads(listed.stdout))


# ------------------------------------------------------------------------------ store failures

COMMANDS: list[tuple[str, ...]] = [
    ("jobs",),
    ("totals",),
    ("earnings",),
    ("status", "00000000-0000-0000-0000-000000000000"),
    ("export", "--out", "events.jsonl"),
    ("reconcile",),
    ("run", "--endpoint", "echo", "--input", "{}", "--budget", "0.50"),
    ("batch", "JOBS", "--endpoint", "echo", "--budget", "0.50"),
    ("bonus", "00000000-0000-0000-0000-000000000000", "--baseline", "1", "--achieved", "2"),
    ("resume",),
    ("cancel", "00000000-0000-0000-0000-000000000000"),
]


def _failing_stores(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """{case: (store URL, words its one line must hold)}."""
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("these are notes, not a database\n")
    return {
        "not a database": (f"sqlite:///{not_a_database}", "file is not a database"),
        "a folder": (f"sqlite:///{tmp_path}", "is a folder"),
        "server down": ("postgresql://postgres@127.0.0.1:1/test", "does not answer"),
        "database missing": (f"postgresql://postgres@{PG}/podsettle_no_such_db", "does not exist"),
        "credentials refused": (f"postgresql://no_such_role:s3cret-pw@{PG}/test", "credentials refused"),
    }


def _postgres_up() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "case", ["not a database", "a folder", "server down", "database missing", "credentials refused"]
)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_store_that_cannot_be_opened_is_one_line_and_exit_2_for_every_command(
    env: dict[str, str],
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    command: tuple[str, ...],
) -> None:
    if case in ("database missing", "credentials refused") and not _postgres_up():
        pytest.skip("needs the PostgreSQL server of the test setup")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.jsonl").write_text('{"x": 1}\n')
    url, words = _failing_stores(tmp_path)[case]
    args = [("jobs.jsonl" if arg == "JOBS" else arg) for arg in command]
    before = balance(sandbox, env["PODSETTLE_PAYER"])
    started = time.monotonic()
    result = invoke(env, *args, "--store", url)
    took = time.monotonic() - started
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = one_error_line(result, "store ", words)
    assert "s3cret-pw" not in result.stdout + result.stderr  # the password is never shown
    assert took < 5, f"{command[0]} took {took:.1f} s to report {case}"
    assert balance(sandbox, env["PODSETTLE_PAYER"]) == before, line  # nothing was funded


def test_an_unwritable_place_for_a_new_store_is_one_line(env: dict[str, str], sandbox: Sandbox) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("uses a folder no process can create a file in")
    before = balance(sandbox, env["PODSETTLE_PAYER"])
    result = invoke(
        env,
        "run",
        "--endpoint",
        "echo",
        "--input",
        "{}",
        "--budget",
        "0.50",
        "--store",
        "sqlite:////proc/podsettle.db",
    )
    assert result.exit_code == 2
    one_error_line(result, "store sqlite:////proc/podsettle.db", "cannot create", "writable folder")
    assert balance(sandbox, env["PODSETTLE_PAYER"]) == before


def test_a_store_that_fails_after_opening_is_named_in_one_line(env: dict[str, str], tmp_path: Path) -> None:
    ran = invoke(env, "run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "0.50")
    assert ran.exit_code == 0, ran.stderr
    from podsettle.cli import commands

    # The store passes the check, then breaks while it is read (a disk gone, a file replaced).
    original = commands._settlements

    def broken(store: str | None) -> Any:
        import sqlite3

        settlements = original(store)

        def fail(*_: Any, **__: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

        settlements.get_job = fail
        return settlements

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(commands, "_settlements", broken)
        result = invoke(env, "status", "00000000-0000-0000-0000-000000000000")
    assert result.exit_code == 2
    one_error_line(result, f"store sqlite:///{tmp_path / 'store.db'}", "disk I/O error")


# ------------------------------------------------------------------------------ memory stores


@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if c[0] in ("run", "batch", "bonus", "resume", "cancel")],
    ids=lambda c: c[0],
)
def test_a_memory_store_refuses_commands_that_move_money(
    env: dict[str, str],
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.jsonl").write_text('{"x": 1}\n')
    env["PODSETTLE_STORE"] = "memory"
    args = [("jobs.jsonl" if arg == "JOBS" else arg) for arg in command]
    before = balance(sandbox, env["PODSETTLE_PAYER"])
    for _ in range(2):  # twice, as a user repeating a command: never a second payment
        result = invoke(env, *args, "--key", "order-17") if command[0] == "run" else invoke(env, *args)
        assert result.exit_code == 2
        one_error_line(result, f"{command[0]}: a memory store", "paid twice", "--store sqlite:///")
    assert balance(sandbox, env["PODSETTLE_PAYER"]) == before


def test_a_memory_store_still_serves_reading_commands(env: dict[str, str]) -> None:
    env["PODSETTLE_STORE"] = "memory"
    result = invoke(env, "totals", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["jobs"] == 0


# ------------------------------------------------------------------------------ options


def test_an_unknown_endpoint_is_a_usage_error(env: dict[str, str], sandbox: Sandbox, tmp_path: Path) -> None:
    before = balance(sandbox, env["PODSETTLE_PAYER"])
    result = invoke(env, "run", "--endpoint", "no-such-endpoint", "--input", "{}", "--budget", "0.50")
    assert result.exit_code == 2
    one_error_line(result, "--endpoint no-such-endpoint", "no such endpoint")
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"x": 1}\n')
    result = invoke(env, "batch", str(jobs_file), "--endpoint", "no-such-endpoint", "--budget", "0.50")
    assert result.exit_code == 2
    one_error_line(result, "--endpoint no-such-endpoint")
    assert balance(sandbox, env["PODSETTLE_PAYER"]) == before
    assert job_count(env) == 0


def test_a_key_reused_with_other_input_says_which_option_to_change(
    env: dict[str, str], sandbox: Sandbox
) -> None:
    first = invoke(
        env, "run", "--endpoint", "echo", "--input", '{"n": 1}', "--budget", "0.50", "--key", "order-17"
    )
    assert first.exit_code == 0, first.stderr
    again = invoke(
        env, "run", "--endpoint", "echo", "--input", '{"n": 1}', "--budget", "0.50", "--key", "order-17"
    )
    assert again.exit_code == 0  # the same request: the same job, shown again, not paid again
    after_first = balance(sandbox, env["PODSETTLE_PAYER"])
    other = invoke(
        env, "run", "--endpoint", "echo", "--input", '{"n": 2}', "--budget", "0.50", "--key", "order-17"
    )
    assert other.exit_code == 2
    line = one_error_line(other, "--key 'order-17' was already used for a different job", "new --key")
    assert "cannot open in state" not in line
    assert balance(sandbox, env["PODSETTLE_PAYER"]) == after_first
    assert job_count(env) == 1


def test_a_batch_id_reused_with_other_input_says_which_option_to_change(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text('{"n": 1}\n{"n": 2}\n')
    second.write_text('{"n": 3}\n{"n": 4}\n')
    ran = invoke(env, "batch", str(first), "--endpoint", "echo", "--budget", "0.50", "--batch-id", "b-1")
    assert ran.exit_code == 0, ran.stderr
    held = balance(sandbox, env["PODSETTLE_PAYER"])
    other = invoke(env, "batch", str(second), "--endpoint", "echo", "--budget", "0.50", "--batch-id", "b-1")
    assert other.exit_code == 2
    one_error_line(other, "--batch-id 'b-1' was already used for a different job", "new --batch-id")
    assert balance(sandbox, env["PODSETTLE_PAYER"]) == held
    assert job_count(env) == 2


def test_bonus_errors_name_the_flags(env: dict[str, str]) -> None:
    paid = json.loads(
        invoke(env, "run", "--endpoint", "echo", "--input", "{}", "--budget", "1", "--json").stdout
    )
    for flag, args in (
        ("--baseline", ("--baseline", "-1", "--achieved", "1")),
        ("--achieved", ("--baseline", "1", "--achieved", "lots")),
        ("--threshold", ("--baseline", "1", "--achieved", "2", "--threshold", "x")),
        ("--pool", ("--baseline", "1", "--achieved", "2", "--pool", "-3")),
    ):
        result = invoke(env, "bonus", paid["job_id"], *args)
        assert result.exit_code == 2, (flag, result.stderr)
        line = one_error_line(result, flag)
        assert "_metric" not in line and "pool:" not in line.replace("--pool:", "")


def test_onboard_prints_the_agent_then_fails_when_the_faucet_refuses() -> None:
    with Sandbox() as served:  # its own: the faucet allows one claim per address a day
        urls = ["--casino-url", served.url, "--faucet-url", served.url]
        first = runner.invoke(app, ["onboard", *urls])
        assert first.exit_code == 0, first.stderr
        refused = runner.invoke(app, ["onboard", *urls])
        assert refused.exit_code == 1
        assert refused.stdout.startswith("agent:  ag_") and "key:    " in refused.stdout
        assert "faucet: not claimed" in refused.stdout
        one_error_line(refused, "faucet refused")
        as_json = runner.invoke(app, ["onboard", *urls, "--json"])
        assert as_json.exit_code == 1 and json.loads(as_json.stdout)["claimed"] is False
        agents = {a["account"]: a["balance"] for a in served.ledger()["accounts"]}
        assert agents[json.loads(as_json.stdout)["agent_id"]] == "0.000000"


# ------------------------------------------------------------------------------ cancel


def _wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_cancel_batch_ends_the_jobs_still_waiting_to_be_funded_with_nothing_funded(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    """One job runs (concurrency 1), three wait their turn to be funded: cancelling the batch
    refunds the running one and ends the waiting ones REJECTED without any escrow (no fee lost)."""
    import os
    import subprocess

    jobs_file = tmp_path / "queued.jsonl"
    jobs_file.write_text("".join(f'{{"seconds": 60, "n": {n}}}\n' for n in range(4)))
    payer = env["PODSETTLE_PAYER"]
    start_balance = Decimal(balance(sandbox, payer)[0])
    batch = subprocess.Popen(
        [sys.executable, "-m", "podsettle.cli", "batch", str(jobs_file), "--endpoint", "sleep",
         "--budget", "0.50", "--batch-id", "b-queued", "--concurrency", "1", "--json"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def listed(state: str) -> list[dict[str, Any]]:
            if not (tmp_path / "store.db").exists():
                return []
            shown = invoke(env, "jobs", "--batch", "b-queued", "--state", state, "--json")
            return json.loads(shown.stdout) if shown.exit_code == 0 else []

        _wait_for(lambda: len(listed("running")) == 1 and len(listed("funding")) == 3)
        cancelled = invoke(env, "cancel", "--batch", "b-queued", "--json")
        assert cancelled.exit_code == 0, cancelled.stderr
        statuses = sorted(r["status"] for r in json.loads(cancelled.stdout))
        assert statuses == ["refunded", "rejected", "rejected", "rejected"], cancelled.stdout
        out, err = batch.communicate(timeout=60)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.communicate()
    assert batch.returncode == 1, err
    assert json.loads(out)["totals"]["paid_jobs"] == 0
    rejected = listed("rejected")
    assert len(rejected) == 3 and all(job["escrow_id"] is None for job in rejected)
    # Only the running job's escrow existed: the payer lost its fee and nothing else.
    after, held = balance(sandbox, payer)
    assert held == "0.000000"
    totals = json.loads(invoke(env, "totals", "--batch", "b-queued", "--json").stdout)
    assert start_balance - Decimal(after) == Decimal(totals["fees"]) == Decimal("0.005000")
    assert invoke(env, "replay").exit_code == 0


def test_cancel_batch_stops_a_streamed_batch_from_opening_more_chunks(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    """A 40-job file opened 2 at a time: cancelling the batch ends what is opened and the batch
    opens no more; it says so and exits 1. Only the jobs that had been funded cost a fee."""
    import os
    import subprocess

    jobs_file = tmp_path / "long.jsonl"
    jobs_file.write_text("".join(f'{{"seconds": 60, "n": {n}}}\n' for n in range(40)))
    payer = env["PODSETTLE_PAYER"]
    start_balance = Decimal(balance(sandbox, payer)[0])
    batch = subprocess.Popen(
        [sys.executable, "-m", "podsettle.cli", "batch", str(jobs_file), "--endpoint", "sleep",
         "--budget", "0.50", "--batch-id", "b-chunks", "--concurrency", "2", "--chunk-size", "2"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def running() -> int:
            if not (tmp_path / "store.db").exists():
                return 0
            shown = invoke(env, "jobs", "--batch", "b-chunks", "--state", "running", "--json")
            return len(json.loads(shown.stdout)) if shown.exit_code == 0 else 0

        _wait_for(lambda: running() == 2)
        cancelled = invoke(env, "cancel", "--batch", "b-chunks", "--json")
        assert cancelled.exit_code == 0, cancelled.stderr
        _, err = batch.communicate(timeout=90)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.communicate()
    assert batch.returncode == 1, err
    assert "podsettle: batch b-chunks was cancelled: it opened " in err
    totals = json.loads(invoke(env, "totals", "--batch", "b-chunks", "--json").stdout)
    assert 4 <= totals["jobs"] < 40 and totals["paid_jobs"] == 0  # whole chunks, far fewer than 40
    assert totals["jobs"] % 2 == 0
    after, held = balance(sandbox, payer)
    assert held == "0.000000"
    assert start_balance - Decimal(after) == Decimal(totals["fees"])
    funded = Decimal(totals["funded"]) / Decimal("0.50")
    assert funded == 2  # only the two running jobs had escrows
    assert invoke(env, "replay").exit_code == 0


def test_cancel_a_job_and_then_its_batch_while_the_batch_runs_in_another_process(
    env: dict[str, str], sandbox: Sandbox, tmp_path: Path
) -> None:
    import os
    import subprocess

    jobs_file = tmp_path / "slow.jsonl"
    jobs_file.write_text("".join(f'{{"seconds": 60, "n": {n}}}\n' for n in range(3)))
    payer = env["PODSETTLE_PAYER"]
    start_balance = balance(sandbox, payer)[0]
    child_env = {**os.environ, **env}
    batch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "podsettle.cli",
            "batch",
            str(jobs_file),
            "--endpoint",
            "sleep",
            "--budget",
            "0.50",
            "--batch-id",
            "b-cancel",
            "--json",
        ],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def running() -> list[dict[str, Any]]:
            if not (tmp_path / "store.db").exists():
                return []
            listed = invoke(env, "jobs", "--batch", "b-cancel", "--state", "running", "--json")
            return json.loads(listed.stdout) if listed.exit_code == 0 else []

        _wait_for(lambda: len(running()) == 3)
        first = running()[0]["job_id"]
        one = invoke(env, "cancel", first[:8])  # the short id `jobs` shows
        assert one.exit_code == 0, one.stderr
        assert one.stdout.split() == [first, "refunded"]
        again = invoke(env, "cancel", first)
        assert again.exit_code == 1
        one_error_line(again, "only a job waiting to be funded, FUNDED or RUNNING can be cancelled")

        rest = invoke(env, "cancel", "--batch", "b-cancel", "--json")
        assert rest.exit_code == 0, rest.stderr
        assert len(json.loads(rest.stdout)) == 2
        out, err = batch.communicate(timeout=60)
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.communicate()
    assert batch.returncode == 1, err  # the batch ends: none paid
    assert json.loads(out)["totals"]["paid_jobs"] == 0
    assert invoke(env, "cancel", "--batch", "b-cancel").stdout.startswith(
        "batch b-cancel: no job waits to be funded"
    )
    assert invoke(env, "cancel", "--batch", "nope").exit_code == 2
    assert invoke(env, "cancel").exit_code == 2
    # Every escrow settled: nothing held, nothing paid, the worker got nothing, the log audits clean.
    after, held = balance(sandbox, payer)
    assert held == "0.000000"
    assert balance(sandbox, env["PODSETTLE_PAYEE"]) == ("0.000000", "0.000000")
    totals = json.loads(invoke(env, "totals", "--batch", "b-cancel", "--json").stdout)
    assert totals["jobs"] == 3 and totals["paid_jobs"] == 0
    from decimal import Decimal

    assert Decimal(start_balance) - Decimal(after) == Decimal(totals["fees"])
    assert invoke(env, "replay").exit_code == 0
    assert sandbox.ledger()["conserved"] is True
