"""Output that fits an 80-column terminal and can be copied: `jobs` ids that `status` takes, flags
shown as flags in `--help`, and the demo's closing command on a line of its own. Run as a user runs
them: a subprocess with its output to a pipe, and under a pseudo-terminal of 80 columns."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from podsettle.cli import app
from podsettle.cli.console import short_ids
from podsettle.sandbox.app import Sandbox

runner = CliRunner()
COMMANDS = ["demo", "sandbox", "serve", "run", "batch", "bonus", "cancel", "resume", "status", "jobs"]
COMMANDS += ["totals", "earnings", "replay", "export", "reconcile", "onboard", "mcp"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A store holding a paid batch and a refunded job, and the environment that reads it."""
    limits = {"create": 10_000, "complete": 10_000, "release": 10_000, "dispute": 10_000}
    folder = tmp_path_factory.mktemp("display")
    with Sandbox(escrow_options={"dispute_review": "refund", "rate_limits": limits}) as served:
        payer, worker = served.create_agent("50"), served.create_agent("0")
        env = {
            "PODSETTLE_STORE": f"sqlite:///{folder / 'store.db'}",
            "PODSETTLE_ESCROW_URL": served.url,
            "PF_API_KEY": payer.api_key,
            "PODSETTLE_PAYER": payer.agent_id,
            "PODSETTLE_PAYEE": worker.agent_id,
            "RUNPOD_API_KEY": "sandbox-key",
            "RUNPOD_ENDPOINT_BASE_URL": served.runpod_url,
            "PODSETTLE_ESCROW_RATE_LIMITS": "create=10000,release=10000,dispute=10000",
            "PODSETTLE_REFUND_METHOD": "dispute",
            "PODSETTLE_REFUND_WAIT_S": "10",
            "PODSETTLE_REFUND_POLL_S": "0.05",
        }
        jobs = folder / "jobs.jsonl"
        jobs.write_text("".join(f'{{"n": {n}}}\n' for n in range(6)))
        ran = runner.invoke(app, ["batch", str(jobs), "--endpoint", "echo", "--budget", "0.50"], env=env)
        assert ran.exit_code == 0, ran.stderr
        failed = runner.invoke(
            app, ["run", "--endpoint", "fail", "--input", "{}", "--budget", "0.25"], env=env
        )
        assert failed.exit_code == 1
    yield {"PODSETTLE_STORE": env["PODSETTLE_STORE"]}


def in_terminal(args: list[str], env: dict[str, str], columns: int = 80) -> str:
    """The command's output as a person sees it in a terminal `columns` wide."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    clean = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    child = subprocess.Popen(
        [sys.executable, "-m", "podsettle.cli", *args],
        stdin=follower, stdout=follower, stderr=follower, env={**clean, **env, "TERM": "dumb"},
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    child.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def piped(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "podsettle.cli", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env, "COLUMNS": "80"},
    )  # fmt: skip


STATUSES = {"paid", "refunded", "rejected", "attention", "refunding", "in_flight"}


def job_lines(text: str) -> list[list[str]]:
    rows = [line.split() for line in text.splitlines()]
    return [row for row in rows if len(row) > 1 and row[1] in STATUSES]


@pytest.mark.parametrize("how", ["piped", "terminal"])
def test_jobs_fit_80_columns_and_each_short_id_opens_its_job(store: dict[str, str], how: str) -> None:
    full = json.loads(piped(["jobs", "--json"], store).stdout)
    assert len(full) == 7, [(j["job_key"], j["status"]) for j in full]
    assert all(len(job["job_id"]) == 36 for job in full)
    text = piped(["jobs"], store).stdout if how == "piped" else in_terminal(["jobs"], store)
    lines = [line for line in text.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 80, text
    assert "…" not in "".join(line[:58] for line in lines)  # ids, states and amounts are whole
    rows = job_lines(text)
    assert len(rows) == 7, text
    by_id = {job["job_id"]: job for job in full}
    for short, status, to_workers, returned, held, *_ in rows:
        (match,) = [job_id for job_id in by_id if job_id.startswith(short)]
        job = by_id[match]
        assert (status, to_workers, returned, held) == (
            job["status"],
            job["to_workers"],
            job["returned"],
            job["still_held"],
        )
        shown = runner.invoke(app, ["status", short, "--json"], env=store)
        assert shown.exit_code == 0, shown.stderr
        assert json.loads(shown.stdout)["job_id"] == match
    # The money adds up as the totals have it.
    totals = json.loads(piped(["totals", "--json"], store).stdout)
    assert sum(float(r[2]) for r in rows) == pytest.approx(float(totals["to_workers"]))


def test_a_short_id_that_is_not_unique_or_unknown_is_one_line(store: dict[str, str]) -> None:
    full = [job["job_id"] for job in json.loads(piped(["jobs", "--json"], store).stdout)]
    missing = next(f"{c}" * 6 for c in "0123456789abcdef" if not any(j.startswith(c * 6) for j in full))
    result = runner.invoke(app, ["status", missing], env=store)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"podsettle: error: job '{missing}': no job id starts with it"


def test_short_ids_grow_until_they_are_unique() -> None:
    ids = ["abcdef01-0000", "abcdef01-1111", "12345678-0000"]
    assert short_ids(ids) == {
        "abcdef01-0000": "abcdef01-0",
        "abcdef01-1111": "abcdef01-1",
        "12345678-0000": "12345678",
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_flags_as_flags(command: str) -> None:
    result = piped([command, "--help"], {})
    assert result.returncode == 0
    assert "<bool>" not in result.stdout, result.stdout
    assert "--help" in result.stdout


def test_the_top_help_shows_flags_as_flags() -> None:
    result = piped(["--help"], {})
    assert result.returncode == 0 and "<bool>" not in result.stdout


@pytest.mark.parametrize("how", ["piped", "terminal"])
def test_the_demo_ends_with_its_command_on_a_line_of_its_own(tmp_path: Path, how: str) -> None:
    args = ["demo", "--jobs", "3", "--store", f"sqlite:///{tmp_path / 'demo.db'}"]
    if how == "piped":
        result: Any = piped(args, {})
        assert result.returncode == 0, result.stderr
        text = result.stderr
    else:
        text = in_terminal(args, {}, columns=60)
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    assert lines[-2] == "audit it again any time:"
    command = lines[-1].strip()
    assert command == f"podsettle replay --store sqlite:///{tmp_path / 'demo.db'}"
    again = piped(command.split()[1:], {})
    assert again.returncode == 0, again.stderr
