"""`resume` and the claims of processes that are gone: a claimer on this machine that has exited
(told apart from a reused pid by its start time) is not waited for; a claimer it cannot judge
(another machine, another pid namespace, no /proc) keeps its lease. And `resume` with the escrow
service unreachable fails as `run` does, touching nothing."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.bootstrap import in_process_engine
from podsettle.cli import app as cli
from podsettle.domain import State, Step
from podsettle.domain.money import to_money
from podsettle.domain.rules import split
from podsettle.processor import ProcessorConfig, local_processor_id, process_gone, release_processor_id
from tests.histories import Plan, drive_history
from tests.jobs import opened

BOOT = "86883401-47f3-4743-8b83-b74740de880b"
NS = "4026531836"


def fake_proc(
    root: Path,
    *,
    boot: str = BOOT,
    ns: str = NS,
    processes: dict[int, int] | None = None,
    zombies: tuple[int, ...] = (),
) -> Path:
    """A /proc with a boot id, this process's pid namespace and `processes` (pid: start time), those
    in `zombies` exited and not reaped yet."""
    (root / "sys" / "kernel" / "random").mkdir(parents=True)
    (root / "sys" / "kernel" / "random" / "boot_id").write_text(boot + "\n")
    (root / "self" / "ns").mkdir(parents=True)
    os.symlink(f"pid:[{ns}]", root / "self" / "ns" / "pid")
    for pid, start in (processes or {}).items():
        (root / str(pid)).mkdir()
        # Fields after the command name: state, then 18 more, then the start time (field 22).
        rest = " ".join(["Z" if pid in zombies else "S", *["0"] * 18, str(start), "0"])
        (root / str(pid) / "stat").write_text(f"{pid} (a (strange) name) {rest}\n")
    return root


def claimer(pid: int, start: int, *, boot: str = BOOT, ns: str = NS) -> str:
    return f"host/pid-{pid}/start-{start}/boot-{boot}/ns-{ns}/abcd1234"


def test_a_claimer_is_gone_only_when_this_machine_says_so(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", processes={4242: 1000})
    assert process_gone(claimer(4242, 1000), proc) is False  # alive
    assert process_gone(claimer(4242, 999), proc) is True  # the pid was reused by another process
    assert process_gone(claimer(4343, 1000), proc) is True  # the pid is free
    # Unsure: another machine (or boot), another pid namespace, an id of another form, no /proc.
    assert process_gone(claimer(4343, 1000, boot="0" * 8 + BOOT[8:]), proc) is False
    assert process_gone(claimer(4343, 1000, ns="1"), proc) is False
    assert process_gone("myhost:4343", proc) is False
    assert process_gone("engine-1a2b3c4d", proc) is False
    assert process_gone(claimer(4343, 1000), tmp_path / "no-proc") is False


def test_a_claimer_that_exited_and_waits_to_be_reaped_is_gone(tmp_path: Path) -> None:
    """A `podsettle batch` started by a parent that waits for its children one by one stays a zombie
    until reaped: its claims must not be waited for until the lease runs out (a minute)."""
    proc = fake_proc(tmp_path / "proc", processes={4242: 1000, 4343: 1000}, zombies=(4343,))
    assert process_gone(claimer(4242, 1000), proc) is False
    assert process_gone(claimer(4343, 1000), proc) is True


def test_a_real_child_process_is_gone_once_it_exits_though_not_yet_reaped() -> None:
    code = "from podsettle.processor import local_processor_id; print(local_processor_id(), flush=True)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    processor = child.stdout.readline().strip()
    child.stdout.read()  # its end: it is exiting; not reaped (no wait, no poll) until the end
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 30
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_gone(processor) is True  # a zombie now: pid and start time still there
    child.wait(10)
    assert process_gone(processor) is True


def test_the_processor_id_names_this_process_and_is_never_judged_gone() -> None:
    mine = local_processor_id()
    assert f"/pid-{os.getpid()}/" in mine and mine.startswith(socket.gethostname()[:32])
    assert process_gone(mine) is False
    assert local_processor_id() != mine  # two engines in one process do not share an id


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_the_claims_of_an_engine_of_this_process_that_closed_are_not_waited_for(tmp_path: Path) -> None:
    """Two engines in one process (a runtime that closes one and opens another, the CLI under a test
    runner): the closed one holds nothing, whatever the lease."""
    first = local_processor_id()
    second = local_processor_id()
    release_processor_id(first)
    assert process_gone(first) is True
    assert process_gone(second) is False  # still open: its lease is honoured
    store, ledger = await releasing_job_claimed_by(tmp_path, first)
    engine = in_process_engine(
        store, ledger_path=ledger, processor=ProcessorConfig(processor_id=second, claim_lease_s=300)
    )
    async with engine:
        results = await asyncio.wait_for(engine.resume(), 20)
    assert [r.status for r in results] == ["paid"]
    assert engine.processor.deferred == 0
    assert process_gone(second) is True  # closed now


def dead_processor_id() -> str:
    """The processor id of a process of this machine that has exited."""
    code = "from podsettle.processor import local_processor_id; print(local_processor_id())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


async def releasing_job_claimed_by(tmp_path: Path, processor: str) -> tuple[str, str]:
    """A job whose release was claimed just now by `processor`, which never recorded its outcome."""
    store, ledger = f"sqlite:///{tmp_path / 'store.db'}", str(tmp_path / "ledger.db")
    first = in_process_engine(store, ledger_path=ledger, recover_on_start=False)
    budget = to_money("0.50")
    receipt = await first.escrow.create(
        key="job:fund", payee="ag_worker", amount=budget, description="job claimed", timeout_hours=2
    )
    await first.aclose()
    job = opened(key="claimed")
    parts = split(job.budget)
    job.record_attempt(Step.FUND, "proc-0")
    job.record_funded(receipt.escrow_id, budget, parts.fee, parts.net)
    job.record_attempt(Step.START, "proc-0")
    job.record_started("rp-1")
    job.record_completed("d" * 64, 1000, 10, "worker-1", {})
    job.record_attempt(Step.RELEASE, processor, at=datetime.now(UTC))
    app = Settlements(store)
    app.save(job)
    app.close()
    return store, ledger


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
async def test_resume_does_not_wait_for_the_claim_of_a_process_that_exited(tmp_path: Path) -> None:
    dead = dead_processor_id()
    assert process_gone(dead)
    store, ledger = await releasing_job_claimed_by(tmp_path, dead)
    engine = in_process_engine(
        store,
        ledger_path=ledger,
        processor=ProcessorConfig(processor_id=local_processor_id(), claim_lease_s=30),
    )
    started = time.monotonic()
    async with engine:
        results = await asyncio.wait_for(engine.resume(), 20)
    assert time.monotonic() - started < 10  # not the 30 s lease
    assert [r.status for r in results] == ["paid"]
    assert engine.processor.deferred == 0


async def test_resume_waits_for_the_lease_of_a_claimer_it_cannot_judge(tmp_path: Path) -> None:
    foreign = claimer(1, 1, boot="00000000-0000-0000-0000-000000000000")
    store, ledger = await releasing_job_claimed_by(tmp_path, foreign)
    engine = in_process_engine(
        store,
        ledger_path=ledger,
        processor=ProcessorConfig(processor_id=local_processor_id(), claim_lease_s=1.5),
    )
    started = time.monotonic()
    told: list[tuple[int, str | None]] = []
    settled: list[str] = []
    async with engine:
        resuming = engine.resume(
            on_start=lambda n, w: told.append((n, w)), on_result=lambda r: settled.append(r.status)
        )
        results = await asyncio.wait_for(resuming, 20)
    assert time.monotonic() - started >= 1.0
    assert [r.status for r in results] == ["paid"] == settled
    assert engine.processor.deferred > 0
    # The resume said what it waited for (issue 15: `resume` no longer waits without a word).
    ((jobs, waiting),) = told
    assert jobs == 1 and waiting is not None
    assert waiting.startswith("1 job(s) are claimed by another engine (") and "1.5 s" in waiting


def test_resume_with_the_escrow_service_unreachable_fails_as_run_does(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = tmp_path / "store.db"
    app = Settlements(f"sqlite:///{store}")
    job = drive_history(app, Plan("unfinished", "refunded"), upto=6)
    assert job.state == State.REFUNDING
    last = app.recorder.max_notification_id()
    env = {
        "PODSETTLE_STORE": f"sqlite:///{store}",
        "PODSETTLE_ESCROW_URL": f"http://127.0.0.1:{port}",
        "PF_API_KEY": "pf_live_" + "k" * 40,
        "PODSETTLE_PAYER": "ag_payer",
        "PODSETTLE_PAYEE": "ag_worker",
        "RUNPOD_API_KEY": "runpod-key",
        "RUNPOD_ENDPOINT_BASE_URL": f"http://127.0.0.1:{port}/v2",
        "PODSETTLE_LOG_LEVEL": "ERROR",
    }
    runner = CliRunner()
    started = time.monotonic()
    resumed = runner.invoke(cli, ["resume"], env=env, catch_exceptions=False)
    assert time.monotonic() - started < 30
    ran = runner.invoke(
        cli,
        ["run", "--endpoint", "echo", "--input", "{}", "--budget", "0.50"],
        env=env,
        catch_exceptions=False,
    )
    assert (resumed.exit_code, ran.exit_code) == (1, 1)
    resumed_line = resumed.stderr.strip().splitlines()[-1]
    ran_line = ran.stderr.strip().splitlines()[-1]
    # The same message; the route named is the first call each makes (run: the payer check's create).
    unreachable = re.compile(
        r"^podsettle: error: Unavailable: \w+ \S+ \S+: could not reach the service .*nothing was sent$"
    )
    assert unreachable.match(resumed_line) and unreachable.match(ran_line), (resumed_line, ran_line)
    assert (
        Settlements(f"sqlite:///{store}").recorder.max_notification_id() == last
    )  # left for the next resume
