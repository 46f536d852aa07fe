"""Fixtures of the dashboard's tests: a store the demo filled, `podsettle serve` on it in a process of
its own (as a user runs it), and a headless Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.web.browser import Browser, chromium_or_skip


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without podsettle's settings (a developer's must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODSETTLE_", "PF_", "RUNPOD_"))}
    env["PODSETTLE_LOG_LEVEL"] = "ERROR"
    env.update(extra)
    return env


def fill_with_demo(folder: Path, jobs: int = 12) -> str:
    """`podsettle demo --store ...` into `folder`; returns the store's URL."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "demo.db"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "podsettle.cli",
            "demo",
            "--store",
            f"sqlite:///{path}",
            "--jobs",
            str(jobs),
            "--json",
        ],
        cwd=folder,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return f"sqlite:///{path}"


@dataclass
class Served:
    url: str
    store: str
    process: subprocess.Popen[str]


def start_serve(store: str, *, env: dict[str, str] | None = None, timeout: float = 60.0) -> Served:
    """`podsettle serve --port 0 --store STORE`, once it answers."""
    process = subprocess.Popen(
        [sys.executable, "-m", "podsettle.cli", "serve", "--port", "0", "--store", store],
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("podsettle dashboard: "):
        process.kill()
        raise AssertionError(f"serve did not start: {line!r} {process.communicate()[1]}")
    url = line.split()[2].rstrip("/")
    headers = {}
    token = (env or {}).get("PODSETTLE_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/api/overview", headers=headers, timeout=5).status_code == 200:
                return Served(url, store, process)
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"serve did not answer: {process.communicate()[1]}")
        time.sleep(0.1)


def stop_serve(served: Served) -> None:
    served.process.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn shuts down cleanly
    try:
        served.process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        served.process.kill()
        served.process.communicate()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fill_with_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def served(demo_store: str) -> Iterator[Served]:
    server = start_serve(demo_store)
    yield server
    stop_serve(server)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    binary = chromium_or_skip()
    opened = Browser(binary, tmp_path_factory.mktemp("chromium"))
    yield opened
    opened.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests leave what a person may want to look at (the dashboard's screenshots)."""
    return tmp_path_factory.mktemp("artifacts")
