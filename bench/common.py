"""Helpers shared by the bench scripts: timing, medians, the machine, and the one-line figures.

Every figure is printed as one parseable line, so that `bench/run_all.py` can collect it:

    figure: <name> = <value> <unit> (ratio <r> vs <baseline>)

The ratio part is optional. Names are short identifiers (letters, digits, `_`, `-`, `.`).
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK_ENV = "PODSETTLE_BENCH_QUICK"
RUNS_ENV = "PODSETTLE_BENCH_RUNS"
FIGURE = re.compile(
    r"^figure:\s*(?P<name>[\w.\-]+)\s*=\s*(?P<value>[-+0-9.eE]+|nan|inf)\s*(?P<unit>[^(]*?)\s*"
    r"(?:\(ratio\s+(?P<ratio>[-+0-9.eE]+|nan|inf)\s+vs\s+(?P<baseline>[^)]*)\))?\s*$"
)


def quick() -> bool:
    """True in quick mode (one short run of everything): `PODSETTLE_BENCH_QUICK=1`."""
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pick(full: int, short: int) -> int:
    """A size: `short` in quick mode, else `full`."""
    return short if quick() else full


def quiet_logging() -> None:
    """Only warnings and errors from podsettle's structured logs (the benchmarks print figures)."""
    from podsettle.support.logs import configure_logging

    configure_logging(level="WARNING", force=True)


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """`with stopwatch() as elapsed: ...; elapsed()` (seconds, perf_counter; frozen on exit)."""
    started = time.perf_counter()
    stopped: list[float] = []
    yield lambda: (stopped[0] if stopped else time.perf_counter()) - started
    stopped.append(time.perf_counter())


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else math.nan


def _number(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.4g}"


def figure(
    name: str,
    value: float,
    unit: str,
    *,
    ratio_to: float | None = None,
    baseline: str | None = None,
    note: str | None = None,
) -> str:
    """Print (and return) one figure line; `note` goes to a separate `#` line that parsers skip."""
    line = f"figure: {name} = {_number(value)} {unit}".rstrip()
    if ratio_to is not None:
        line += f" (ratio {_number(ratio_to)} vs {baseline or 'baseline'})"
    print(line, flush=True)
    if note:
        print(f"# {name}: {note}", flush=True)
    return line


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    ratio: float | None = None
    baseline: str | None = None


def parse_figure(line: str) -> Figure | None:
    match = FIGURE.match(line.strip())
    if match is None:
        return None
    ratio_text = match["ratio"]
    return Figure(
        name=match["name"],
        value=float(match["value"]),
        unit=match["unit"].strip(),
        ratio=float(ratio_text) if ratio_text is not None else None,
        baseline=match["baseline"].strip() if match["baseline"] else None,
    )


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    memory_gb = math.nan
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
        memory_gb = pages * page_size / 1024**3
    except (ValueError, OSError, AttributeError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import sqlite3

    return {
        "cores": os.cpu_count() or 0,
        "cpu": cpu,
        "memory_gb": round(memory_gb, 1),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "sqlite": sqlite3.sqlite_version,
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


class BareGateways:
    """The engine's in-process gateways called directly, as a baseline without the engine: the local
    ledger with a funded payer, and the RunPod handlers in process. `await gateways.job(...)` makes
    one job's calls: escrow create, submit, wait, escrow release."""

    def __init__(self, budget: str, *, payer: str = "ag_payer", payee: str = "ag_worker") -> None:
        from podsettle.adapters.ledger import Ledger
        from podsettle.adapters.ledger_gateway import LedgerEscrow
        from podsettle.domain.money import to_money
        from podsettle.domain.rules import split

        self.ledger = Ledger()
        for account in (payer, payee):
            self.ledger.open_account(account)
        self.ledger.mint(payer, "1000000", key="mint")
        self.escrow = LedgerEscrow(self.ledger, payer=payer)
        self.payee = payee
        self.amount = to_money(budget)
        self.expected = split(self.amount)
        self.compute: Any = None

    async def __aenter__(self) -> BareGateways:
        from podsettle.sandbox.inprocess_compute import InProcessCompute

        self.compute = InProcessCompute()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.compute.aclose()
        self.ledger.close()

    async def job(self, endpoint: str, job_input: dict[str, Any]) -> None:
        key = os.urandom(16).hex()
        receipt = await self.escrow.create(
            key=f"{key}:fund", payee=self.payee, amount=self.amount, description="job", timeout_hours=1
        )
        run_id = await self.compute.submit(endpoint, job_input)
        outcome = await self.compute.wait(endpoint, run_id, timeout_s=60)
        if not outcome.succeeded:
            raise SystemExit(f"a job without the engine failed: {outcome}")
        await self.escrow.release(receipt.escrow_id, key=f"{key}:release", expected=self.expected)


# A sandbox of both services in a process of its own, its rate limits lifted (the benches that run
# `podsettle batch` processes against it): it prints its URLs and agents, and ends when stdin closes.
_SANDBOX_SCRIPT = """
import json, sys
from podsettle.sandbox.app import Sandbox
from podsettle.sandbox.runpod_worker import EndpointConfig
from podsettle.support.logs import configure_logging
configure_logging("WARNING")
lifted = {route: 10_000_000 for route in ("create", "complete", "release", "dispute", "cancel")}
# RunPod's documented limits too (runsync: 2,000 per 10 s): a bench's cases follow one another
# within a window, and a case would otherwise wait out 429s the cases before it earned.
# "slow": jobs that take the time their input asks for ("seconds"), on enough workers that the
# endpoint never queues them: what a process bound by its own concurrency, not its CPU, meets.
slow = EndpointConfig(handler="podsettle.sandbox.handlers:sleep", workers=512)
with Sandbox(
    endpoints={"slow": slow}, escrow_options={"rate_limits": lifted}, runpod_options={"rate_limits": {}}
) as sandbox:
    payer, worker = sandbox.create_agent("10000000"), sandbox.create_agent("0")
    print(json.dumps({"url": sandbox.url, "runpod_url": sandbox.runpod_url, "payer": payer.agent_id,
                      "key": payer.api_key, "worker": worker.agent_id}), flush=True)
    sys.stdin.read()
"""


def compiled() -> None:
    """Compile podsettle's modules to bytecode once, as an installed package has them: a machine
    whose environment sets PYTHONDONTWRITEBYTECODE would otherwise compile every module from source
    in every process a bench starts (about a tenth of a short `podsettle batch` process's CPU)."""
    import compileall

    for folder in ("podsettle", "domain", "adapters", "projections", "replay", "sandbox"):
        compileall.compile_dir(ROOT / folder, quiet=1)


@contextmanager
def sandbox_process() -> Iterator[dict[str, str]]:
    """The sandbox process's URLs, agents and pid while the block runs."""
    import json
    import subprocess

    sandbox = subprocess.Popen(
        [sys.executable, "-c", _SANDBOX_SCRIPT],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sandbox.stdout is not None
    try:
        yield {**json.loads(sandbox.stdout.readline()), "pid": str(sandbox.pid)}
    finally:
        sandbox.communicate("", timeout=60)


def engine_env(store: str, sandbox: dict[str, str]) -> dict[str, str]:
    """The environment of a `podsettle batch` process on `store` against `sandbox_process()`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODSETTLE_", "PF_", "RUNPOD_"))}
    return {
        **env,
        "PODSETTLE_STORE": store,
        "PODSETTLE_ESCROW_URL": sandbox["url"],
        "PF_API_KEY": sandbox["key"],
        "PODSETTLE_PAYER": sandbox["payer"],
        "PODSETTLE_PAYEE": sandbox["worker"],
        "RUNPOD_API_KEY": "sandbox-key",
        "RUNPOD_ENDPOINT_BASE_URL": sandbox["runpod_url"],
        "PODSETTLE_ESCROW_RATE_LIMITS": "create=10000000,release=10000000,cancel=10000000,dispute=10000000",
        "PODSETTLE_LOG_LEVEL": "WARNING",
    }
