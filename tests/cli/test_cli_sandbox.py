"""`podsettle sandbox` as a user starts it in a second terminal: its options reach the sandbox it
serves (rate limits, dispute review, workers, seeded faults, the sweep and its clock), the banner
lists the admin routes, and a port in use is one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from podsettle.cli import app

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def served(*options: str) -> Iterator[tuple[str, str]]:
    """`podsettle sandbox OPTIONS` in its own process: (its base URL, its banner)."""
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "podsettle.cli", "sandbox", "--port", str(port), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert child.poll() is None, child.communicate()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the sandbox did not start"
            time.sleep(0.1)
        banner = ""
        assert child.stdout is not None
        while "Admin base:" not in banner:
            banner += child.stdout.readline()
        yield base, banner
    finally:
        child.terminate()
        child.communicate(timeout=30)


def agent(base: str, balance: str) -> dict[str, Any]:
    response = httpx.post(f"{base}/sandbox/agents", json={"balance": balance}, timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def creates(base: str, count: int) -> list[int]:
    payer, worker = agent(base, "100"), agent(base, "0")
    headers = {"Authorization": f"Bearer {payer['api_key']}"}
    body = {
        "amount_usd": 0.1,
        "counterparty_agent_id": worker["agent_id"],
        "timeout_hours": 1,
        "description": "a rate limit check",
    }
    with httpx.Client(timeout=10) as client:
        return [
            client.post(f"{base}/escrow/create", json=body, headers=headers).status_code for _ in range(count)
        ]


def cli_env(base: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    payer, worker = agent(base, "20"), agent(base, "0")
    return {
        "PODSETTLE_STORE": f"sqlite:///{tmp_path / 'store.db'}",
        "PODSETTLE_ESCROW_URL": base,
        "PF_API_KEY": payer["api_key"],
        "PODSETTLE_PAYER": payer["agent_id"],
        "PODSETTLE_PAYEE": worker["agent_id"],
        "RUNPOD_API_KEY": "sandbox-key",
        "RUNPOD_ENDPOINT_BASE_URL": f"{base}/v2",
        "PODSETTLE_ESCROW_RATE_LIMITS": "create=10000,release=10000,dispute=10000",
        "PODSETTLE_JOB_TIMEOUT_S": "60",
        "PODSETTLE_REFUND_POLL_S": "0.1",
        **extra,
    }


def wait_for(check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_banner_lists_the_admin_routes_and_the_defaults_are_the_service() -> None:
    with served() as (base, banner):
        for route in (
            "/sandbox/agents",
            "/sandbox/ledger",
            "/sandbox/disputes/ESCROW_ID/resolve",
            "/sandbox/clock",
            "/sandbox/sweep",
            "/sandbox/faults",
        ):
            assert route in banner
        assert "Escrow rate limits: faithful; disputes: manual" in banner
        codes = creates(base, 21)  # the published service: 20 creates a minute
        assert codes[:20] == [201] * 20 or set(codes[:20]) <= {200, 201}
        assert codes[20] == 429


@pytest.mark.parametrize(("option", "expect_429"), [("off", False), ("create=25", True)])
def test_rate_limits_off_or_given(option: str, expect_429: bool) -> None:
    with served("--rate-limits", option) as (base, banner):
        assert f"Escrow rate limits: {option};" in banner
        codes = creates(base, 26)
        assert 429 not in codes[:25]
        assert (codes[25] == 429) is expect_429


def test_dispute_review_refund_returns_a_disputed_escrow_at_once(tmp_path: Path) -> None:
    for review, expected_state in (("refund", "REFUNDED"), ("manual", "REFUNDING")):
        with served("--dispute-review", review) as (base, _):
            env = cli_env(
                base, tmp_path / review, PODSETTLE_REFUND_METHOD="dispute", PODSETTLE_REFUND_WAIT_S="5"
            )
            (tmp_path / review).mkdir()
            result = runner.invoke(
                app, ["run", "--endpoint", "fail", "--input", "{}", "--budget", "0.50", "--json"], env=env
            )
            assert result.exit_code == 1, result.stderr
            assert json.loads(result.stdout)["state"] == expected_state
            ledger = httpx.get(f"{base}/sandbox/ledger", timeout=10).json()
            payer = next(a for a in ledger["accounts"] if a["account"] == env["PODSETTLE_PAYER"])
            assert payer["held"] == ("0.000000" if review == "refund" else "0.500000")
            assert ledger["conserved"] is True


def test_workers_and_seeded_faults_reach_every_endpoint(tmp_path: Path) -> None:
    with served("--workers", "2", "--faults", "7/failure_rate=1") as (base, _):
        headers = {"Authorization": "Bearer any-key"}
        health = httpx.get(f"{base}/v2/echo/health", headers=headers, timeout=10).json()
        assert health["workers"]["idle"] == 2  # 4 without --workers
        faults = httpx.get(f"{base}/v2/echo/_faults", headers=headers, timeout=10).json()
        assert faults["failure_rate"] == 1.0
        env = cli_env(base, tmp_path, PODSETTLE_REFUND_METHOD="timeout")
        result = runner.invoke(
            app, ["run", "--endpoint", "echo", "--input", '{"x": 1}', "--budget", "0.50", "--json"], env=env
        )
        assert result.exit_code == 1  # every execution fails: the job is refunded, never paid
        assert json.loads(result.stdout)["status"] in ("refunding", "refunded")


def test_a_faster_clock_lets_the_timeout_sweep_return_a_v1_refund(tmp_path: Path) -> None:
    # x3600: the escrow's timeout (an hour and more) passes in seconds; the sweep runs every minute
    # of that clock. The refund comes back as on the service: the amount less the 1% commission.
    with served("--clock-speed", "3600", "--sweep-every", "60") as (base, banner):
        assert "clock: x3600" in banner
        env = cli_env(base, tmp_path, PODSETTLE_REFUND_METHOD="timeout", PODSETTLE_REFUND_WAIT_S="30")
        result = runner.invoke(
            app, ["run", "--endpoint", "fail", "--input", "{}", "--budget", "0.50", "--json"], env=env
        )
        assert result.exit_code == 1, result.stderr
        job_id = json.loads(result.stdout)["job_id"]

        def refunded() -> bool:
            shown = runner.invoke(app, ["status", job_id, "--json"], env=env)
            return bool(json.loads(shown.stdout)["state"] == "REFUNDED")

        if not refunded():
            runner.invoke(app, ["resume"], env=env)  # the run's engine closed: its claims are not waited for
        wait_for(refunded)
        ledger = httpx.get(f"{base}/sandbox/ledger", timeout=10).json()
        payer = next(a for a in ledger["accounts"] if a["account"] == env["PODSETTLE_PAYER"])
        assert payer == {"account": env["PODSETTLE_PAYER"], "balance": "19.995000", "held": "0.000000"}


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "podsettle.cli", "sandbox", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ},
        )
    assert result.returncode == 2
    assert result.stdout == ""  # no banner for a server that is not running
    assert result.stderr.splitlines() == [
        f"podsettle: error: --host 127.0.0.1 --port {port}: Address already in use (choose another --port)"
    ]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--rate-limits", "create=fast"], "--rate-limits: 'create=fast'"),
        (["--rate-limits", "creat=5"], "routes: create"),
        (["--dispute-review", "later"], "--dispute-review: 'later'"),
        (["--faults", "x/failure_rate=1"], "--faults: 'x/failure_rate=1' does not start with a seed"),
        (["--faults", "7/failure_rate=2"], "--faults: failure_rate:"),
        (["--faults", "7/no_such=1"], "--faults: no_such:"),
    ],
)
def test_bad_sandbox_options_are_one_line(options: list[str], words: str) -> None:
    result = runner.invoke(app, ["sandbox", "--port", "0", *options])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("podsettle: error: ") and words in lines[0], lines
