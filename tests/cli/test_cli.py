"""Every command of the `podsettle` command line, with good and bad input, against a sandbox served
over loopback HTTP (the same adapters as production, configured through the environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from podsettle.cli import app
from podsettle.sandbox.app import Sandbox

runner = CliRunner()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    # Limits lifted: every command that may move money first checks the payer (one create slot).
    limits = {"create": 10_000, "complete": 10_000, "release": 10_000, "dispute": 10_000}
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
        # This sandbox reviews a dispute at once (dispute_review): the quickest refund here. The
        # default, the timeout sweep, is tested on its own below.
        "PODSETTLE_REFUND_METHOD": "dispute",
    }


def invoke(env: dict[str, str], *args: str) -> Any:
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)


def one_error_line(result: Any, words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("podsettle: error: "), result.stderr
    assert words in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_help_answers_quickly_without_heavy_imports() -> None:
    heavy = "('runpod', 'uvicorn', 'eventsourcing', 'starlette')"
    code = f"import sys; from podsettle.cli import app; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "podsettle.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout and "replay" in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        "demo",
        "sandbox",
        "run",
        "batch",
        "status",
        "jobs",
        "totals",
        "earnings",
        "bonus",
        "replay",
        "export",
        "reconcile",
        "resume",
        "migrate",
        "onboard",
    ],
)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_run_pays_a_successful_job(env: dict[str, str]) -> None:
    result = invoke(
        env, "run", "--endpoint", "echo", "--input", '{"prompt": "hi"}', "--budget", "0.50", "--json"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "paid" and data["to_workers"] == "0.495000" and data["fees"] == "0.005000"
    status = invoke(env, "status", data["job_id"], "--json")
    assert status.exit_code == 0 and json.loads(status.stdout)["state"] == "RELEASED"
    # `run` and `status` describe a job in the same words, with the same values.
    shown = json.loads(status.stdout)
    assert {**shown, "output": data["output"]} == data
    human = invoke(env, "status", data["job_id"])
    assert "RELEASED" in human.stdout


def test_run_exits_1_when_the_job_is_refunded(env: dict[str, str]) -> None:
    result = invoke(env, "run", "--endpoint", "fail", "--input", "{}", "--budget", "0.50", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "refunded"


def test_by_default_a_refund_waits_for_the_sweep_and_run_says_what_it_costs(env: dict[str, str]) -> None:
    del env["PODSETTLE_REFUND_METHOD"]
    env["PODSETTLE_REFUND_WAIT_S"] = "0"
    result = invoke(env, "run", "--endpoint", "fail", "--input", "{}", "--budget", "0.50", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["status"] == "refunding" and data["still_held"] == "0.500000"
    assert "timeout sweep" in result.stderr and "1% commission" in result.stderr
    shown = invoke(env, "status", data["job_id"], "--json")
    assert json.loads(shown.stdout)["state"] == "REFUNDING"


def test_a_payer_that_is_not_the_keys_agent_is_refused_and_nothing_moves(
    env: dict[str, str], sandbox: Sandbox
) -> None:
    other = sandbox.create_agent("0")
    env["PODSETTLE_PAYER"] = other.agent_id
    before = sandbox.ledger()
    result = invoke(env, "run", "--endpoint", "echo", "--input", "{}", "--budget", "0.50")
    assert result.exit_code == 2
    one_error_line(result, other.agent_id)
    assert sandbox.ledger() == before
    assert env["PF_API_KEY"] not in result.stderr


def test_a_resume_with_another_key_is_refused_for_jobs_of_another_payer(
    env: dict[str, str], sandbox: Sandbox
) -> None:
    env["PODSETTLE_REFUND_WAIT_S"] = "0"
    del env["PODSETTLE_REFUND_METHOD"]  # the job rests REFUNDING, waiting for the sweep
    first = invoke(env, "run", "--endpoint", "fail", "--input", "{}", "--budget", "0.50", "--json")
    assert json.loads(first.stdout)["state"] == "REFUNDING"
    payer = env["PODSETTLE_PAYER"]
    other = sandbox.create_agent("5")
    env["PF_API_KEY"], env["PODSETTLE_PAYER"] = other.api_key, other.agent_id
    before = sandbox.ledger()
    result = invoke(env, "resume")
    assert result.exit_code == 2
    one_error_line(result, payer)
    assert other.agent_id in result.stderr.splitlines()[-1]
    assert sandbox.ledger() == before


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--input", "{not json", "--budget", "0.50"], "--input: not valid JSON"),
        (["--input", "[1, 2]", "--budget", "0.50"], "--input: must be a JSON object"),
        (["--input", "{}", "--budget", "abc"], "--budget: 'abc' is not a number"),
        (["--input", "{}", "--budget", "-1"], "--budget: '-1' is negative"),
        (["--input", "{}", "--budget", "0.1234567"], "more than 6 decimal places"),
    ],
)
def test_run_refuses_bad_input_with_one_line(env: dict[str, str], args: list[str], words: str) -> None:
    result = invoke(env, "run", "--endpoint", "echo", *args)
    assert result.exit_code == 2
    one_error_line(result, words)


def test_run_without_a_key_is_a_configuration_error(env: dict[str, str]) -> None:
    del env["PF_API_KEY"]
    result = invoke(env, "run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "0.50")
    assert result.exit_code == 2
    one_error_line(result, "PF_API_KEY")


def test_run_against_an_unreachable_service_fails_fast(env: dict[str, str]) -> None:
    env["PODSETTLE_ESCROW_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    result = invoke(env, "run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "0.50")
    assert result.exit_code == 1
    one_error_line(result, "could not reach")
    assert env["PF_API_KEY"] not in result.stderr


def test_bad_configuration_names_the_variable(env: dict[str, str]) -> None:
    env["PODSETTLE_ESCROW_DIALECT"] = "v9"
    result = invoke(env, "run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "0.50")
    assert result.exit_code == 2
    one_error_line(result, "PODSETTLE_ESCROW_DIALECT")
    env["PODSETTLE_ESCROW_DIALECT"] = "v1"
    env["PODSETTLE_STORE"] = "mysql://nope"
    result = invoke(env, "totals")
    assert result.exit_code == 2
    one_error_line(result, "PODSETTLE_STORE")


def test_batch_from_json_lines_then_the_read_side(env: dict[str, str], tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps({"frame": 1, "tile": n}) for n in range(6)) + "\n\n")
    result = invoke(
        env, "batch", str(jobs), "--endpoint", "render", "--budget", "0.25", "--batch-id", "b1", "--json"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["totals"]["paid_jobs"] == 6 and data["totals"]["spent"] == "1.500000"

    totals = json.loads(invoke(env, "totals", "--batch", "b1", "--json").stdout)
    assert totals["paid_jobs"] == 6
    # The engine's batch totals and the read model's are one type: the same words and values.
    assert totals == data["totals"]
    assert totals["funded"] == "1.500000" and totals["still_held"] == "0.000000"
    listed = json.loads(invoke(env, "jobs", "--batch", "b1", "--state", "released", "--json").stdout)
    assert len(listed) == 6
    earned = json.loads(invoke(env, "earnings", "--json").stdout)
    assert [e["payee"] for e in earned] == [env["PODSETTLE_PAYEE"]]
    assert earned[0]["to_workers"] == "1.485000" and earned[0]["paid_jobs"] == 6
    assert invoke(env, "totals").exit_code == 0 and invoke(env, "earnings").exit_code == 0

    bad = invoke(env, "jobs", "--state", "sideways")
    assert bad.exit_code == 2
    one_error_line(bad, "--state")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"frame": 1}\n{oops\n', "line 2: not valid JSON"),
        ('{"frame": 1}\n"text"\n', "line 2: must be a JSON object"),
        ("\n\n", "holds no jobs"),
    ],
)
def test_batch_refuses_a_bad_file(env: dict[str, str], tmp_path: Path, content: str, words: str) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(content)
    result = invoke(env, "batch", str(jobs), "--endpoint", "render", "--budget", "0.25")
    assert result.exit_code == 2
    one_error_line(result, words)
    missing = invoke(env, "batch", str(tmp_path / "nope.jsonl"), "--endpoint", "render", "--budget", "0.25")
    assert missing.exit_code == 2
    one_error_line(missing, "no such file")


@pytest.mark.parametrize(
    ("bad_line", "words"),
    [
        ("{oops", "line 451: not valid JSON"),
        # Read as JSON by Python, refused as a job input by the engine's first pass.
        ('{"v": NaN}', "line 451: job_input.v: nan is not a JSON number"),
    ],
)
def test_a_bad_line_far_down_a_streamed_file_is_refused_before_anything_is_opened(
    env: dict[str, str], tmp_path: Path, bad_line: str, words: str
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    inputs = [json.dumps({"tile": n}) for n in range(600)]
    inputs[446] = bad_line
    # Blank lines are skipped as jobs, and still counted as lines: job 446 is on line 451.
    jobs.write_text("\n".join([*inputs[:10], "", "  ", "", "", *inputs[10:]]) + "\n")
    result = invoke(
        env, "batch", str(jobs), "--endpoint", "render", "--budget", "0.25", "--chunk-size", "50", "--json"
    )
    assert result.exit_code == 2
    one_error_line(result, words)
    assert result.stdout == ""
    listed = invoke(env, "jobs", "--json")
    assert listed.exit_code != 0 or json.loads(listed.stdout) == []


def test_batch_json_lists_each_job_as_it_settles_then_the_totals(env: dict[str, str], tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"frame": 2, "tile": n}) + "\n" for n in range(7)))
    result = invoke(
        env, "batch", str(jobs), "--endpoint", "render", "--budget", "0.25", "--batch-id", "s1",
        "--chunk-size", "3", "--concurrency", "2", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["batch_id"] == "s1" and data["totals"]["paid_jobs"] == 7
    assert sorted(job["job_key"] for job in data["jobs"]) == [f"s1-{n:06d}" for n in range(7)]
    assert all(job["status"] == "paid" for job in data["jobs"])


def test_bonus_on_a_paid_job(env: dict[str, str]) -> None:
    paid = json.loads(
        invoke(env, "run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "1", "--json").stdout
    )
    result = invoke(
        env, "bonus", paid["job_id"], "--baseline", "0.80", "--achieved", "0.92", "--pool", "5", "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["bonus_gross"] == "0.750000"
    below = invoke(env, "bonus", paid["job_id"], "--baseline", "0.80", "--achieved", "0.81", "--pool", "5")
    assert below.exit_code == 1  # a different request for the same job's one bonus is a conflict
    one_error_line(below, "already granted")
    bad = invoke(env, "bonus", paid["job_id"], "--baseline", "zero", "--achieved", "1")
    assert bad.exit_code == 2
    one_error_line(bad, "--baseline")
    unknown = invoke(env, "bonus", "not-a-uuid", "--baseline", "1", "--achieved", "2")
    assert unknown.exit_code == 2
    one_error_line(unknown, "JOB_ID")


def test_status_of_a_missing_job_and_a_missing_store(env: dict[str, str], tmp_path: Path) -> None:
    invoke(env, "run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "0.50")
    result = invoke(env, "status", "00000000-0000-0000-0000-000000000000")
    assert result.exit_code == 2
    one_error_line(result, "not found")
    env["PODSETTLE_STORE"] = f"sqlite:///{tmp_path / 'never.db'}"
    result = invoke(env, "totals")
    assert result.exit_code == 2
    one_error_line(result, "does not exist yet")


def test_replay_export_and_audit_of_the_export(env: dict[str, str], tmp_path: Path) -> None:
    invoke(env, "run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "0.50")
    invoke(env, "run", "--endpoint", "fail", "--input", "{}", "--budget", "0.50")
    audit = invoke(env, "replay", "--json")
    assert audit.exit_code == 0, audit.stdout
    assert json.loads(audit.stdout)["ok"] is True
    out = tmp_path / "log.jsonl"
    exported = invoke(env, "export", "--out", str(out))
    assert exported.exit_code == 0 and out.exists()
    assert invoke(env, "replay", "--log", str(out)).exit_code == 0
    lines = out.read_text().splitlines()
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # one event deleted
    result = invoke(env, "replay", "--log", str(tampered), "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["ok"] is False
    missing = invoke(env, "replay", "--log", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 2
    one_error_line(missing, "does not exist")


def test_reconcile_lists_and_resolves_attention(env: dict[str, str], sandbox: Sandbox) -> None:
    # Lose the answer to the next create: v1 has no lookup, so the job waits for an operator.
    import httpx

    # (The first create is the engine's payer check, which cannot fund: it passes untouched.)
    httpx.post(f"{sandbox.url}/sandbox/faults", json={"route": "create", "mode": "delay", "delay_s": 0})
    httpx.post(f"{sandbox.url}/sandbox/faults", json={"route": "create", "mode": "drop_after", "count": 1})
    result = invoke(env, "run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "0.50", "--json")
    assert result.exit_code == 1
    job = json.loads(result.stdout)
    assert job["status"] == "attention" and job["attention"]["step"] == "fund"
    listing = invoke(env, "reconcile", "--json")
    assert listing.exit_code == 1
    assert [item["job_id"] for item in json.loads(listing.stdout)["attention"]] == [job["job_id"]]
    no_finding = invoke(env, "reconcile", "--resolve", job["job_id"], "--outcome", "retry")
    assert no_finding.exit_code == 2
    one_error_line(no_finding, "--finding")
    wrong = invoke(env, "reconcile", "--resolve", job["job_id"], "--finding", "x", "--outcome", "released")
    assert wrong.exit_code == 2
    one_error_line(wrong, "does not fit a job stopped at fund")
    # The operator finds the escrow in the sandbox (the dashboard) and records it.
    state = sandbox.app.escrow.state.escrow
    with state.ledger.transaction() as tx:
        (escrow_id,) = tx.execute(
            "SELECT escrow_id FROM sandbox_escrows ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
    resolved = invoke(
        env,
        "reconcile",
        "--resolve",
        job["job_id"],
        "--finding",
        f"{escrow_id} is funded",
        "--outcome",
        f"funded:{escrow_id}",
        "--json",
    )
    assert resolved.exit_code == 0, resolved.stderr
    assert json.loads(resolved.stdout)["state"] == "FUNDED"
    resumed = invoke(env, "resume", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert [r["status"] for r in json.loads(resumed.stdout)] == ["paid"]
    assert json.loads(invoke(env, "reconcile", "--json").stdout)["attention"] == []


def test_onboard_against_the_sandbox(sandbox: Sandbox) -> None:
    env = {
        "PODSETTLE_CASINO_URL": sandbox.url,
        "PODSETTLE_FAUCET_URL": sandbox.url,
        "PODSETTLE_LOG_LEVEL": "ERROR",
    }
    result = runner.invoke(app, ["onboard", "--json"], env=env)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["agent_id"].startswith("ag_") and data["api_key"]
    unreachable = runner.invoke(app, ["onboard", "--casino-url", "http://127.0.0.1:9"], env=env)
    assert unreachable.exit_code == 1
    one_error_line(unreachable, "cannot reach")


@pytest.mark.slow
def test_demo_as_a_new_user_runs_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODSETTLE_", "PF_", "RUNPOD_"))}
    result = subprocess.run(
        [sys.executable, "-m", "podsettle.cli", "demo", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    totals = data["batch"]["totals"]
    assert totals["jobs"] == 24 and totals["paid_jobs"] > 0 and totals["refunded_jobs"] > 0
    assert totals["in_flight_jobs"] == 0
    assert data["bonus"]["status"] == "awarded"
    assert data["ledger_conserved"] is True and data["audit"]["ok"] is True
    assert all(isinstance(v, str) for v in (totals["spent"], totals["fees"], data["bonus"]["bonus_gross"]))
    assert (tmp_path / "podsettle-demo.db").exists()
    human = subprocess.run(
        [sys.executable, "-m", "podsettle.cli", "demo", "--jobs", "6"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert human.returncode == 0, human.stderr
    assert "Totals:" in human.stdout and "paid_jobs" in human.stdout and "OK" in human.stdout
