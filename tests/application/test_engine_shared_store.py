"""Several engines on one store (SQLite file, PostgreSQL) settle the same jobs at the same time:
the `Attempted` event is the claim and the store's optimistic concurrency decides who holds it, so
no intent is executed twice: one escrow per job, each settled once, money conserved."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.utils import get_topic

from podsettle.adapters.ledger import Ledger
from podsettle.adapters.ledger_gateway import LedgerEscrow
from podsettle.application import Settlements
from podsettle.bootstrap import Engine
from podsettle.domain import EscrowJob, State
from podsettle.processor import ProcessorConfig
from podsettle.sandbox.inprocess_compute import InProcessCompute
from podsettle.settings import Settings
from podsettle.slots import Slot

PAYER, PAYEE = "ag_payer", "ag_worker"
POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES, connect_timeout=2):
            return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}", {}
        return
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432, and CI needs it")
        pytest.skip("PostgreSQL is not reachable")
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield "postgresql://postgres@127.0.0.1:5432/test", {"POSTGRES_SCHEMA": schema}
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


class HeldUntil:
    """An escrow gateway whose calls wait for `event` first."""

    def __init__(self, inner: LedgerEscrow, event: asyncio.Event) -> None:
        self.inner = inner
        self.event = event
        self.capabilities = inner.capabilities

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute

        async def held(*args: Any, **kwargs: Any) -> Any:
            await self.event.wait()
            return await attribute(*args, **kwargs)

        return held


async def test_two_engines_never_execute_one_intent_twice(store: tuple[str, dict[str, str]]) -> None:
    url, env = store
    ledger = Ledger(None)
    with ledger.transaction() as tx:
        tx.open_account(PAYER)
        tx.open_account(PAYEE)
    ledger.mint(PAYER, "1000", key="mint")
    both_resuming = asyncio.Event()
    escrow = HeldUntil(LedgerEscrow(ledger, payer=PAYER), both_resuming)
    compute = InProcessCompute(seed=3)
    settings = Settings(store="memory", payer=PAYER, payee=PAYEE)

    def engine(name: str) -> Engine:
        return Engine(
            Settlements(url, env={**env, "CREATE_TABLE": "y"}),
            escrow,
            compute,
            payer=PAYER,
            settings=settings,
            processor=ProcessorConfig(processor_id=name, retry_base_s=0.001, retry_cap_s=0.01),
            follow_interval_s=0.01,
            recover_on_start=False,  # both engines take up the jobs in `resume`, at the same moment
        )

    first, second = engine("engine-a"), engine("engine-b")
    specs = [
        first._spec(
            "flaky",
            {"value": n, "fail_rate": 0.3, "seed": n},
            "0.50",
            job_key=f"shared-{n:03d}",
            payee=None,
            referral=None,
            acceptance=None,
            bonus_pool=None,
            batch_id="shared",
            timeout_s=60,
        )
        for n in range(40)
    ]
    # The batch is opened by a third party (a CLI, another service); then both engines resume it,
    # each going through the same jobs in the same order: every job is raced for.
    Settlements(url, env={**env, "CREATE_TABLE": "y"}).open_jobs(specs)
    await asyncio.gather(first.start(), second.start())
    listed: list[int] = []

    async def resume(engine: Engine) -> list[Any]:
        # No escrow call goes through until both engines have listed the batch's unfinished jobs:
        # however the machine's load orders their threads, neither can settle the whole batch
        # before the other has taken it up (a resume that found nothing to do would race nothing).
        def on_start(jobs: int, waiting: str | None) -> None:
            listed.append(jobs)
            if len(listed) == 2:
                both_resuming.set()

        return await engine.resume(on_start=on_start)

    results_a, results_b = await asyncio.wait_for(asyncio.gather(resume(first), resume(second)), 60)
    results = results_a or results_b
    await first.aclose()
    await second.aclose()
    await compute.aclose()

    app = Settlements(url, env=env)
    final = app.list_jobs(batch_id="shared")
    assert len(final) == 40 and {r.status for r in results} <= {"paid", "refunded"}
    assert listed == [40, 40]  # each engine took up the whole batch
    # Both engines really competed for the same intents: claims were lost, and nothing ran twice.
    raced = sum(
        e.processor.claims_lost + e.processor.deferred + e.processor.claims_avoided for e in (first, second)
    )
    assert raced > 0, raced
    attempted = get_topic(EscrowJob.Attempted)
    attempts = [
        app.mapper.to_domain_event(n)
        for n in app.recorder.select_notifications(1, 10_000, topics=[attempted])
    ]
    # Each intent was claimed once: the loser of a race records nothing and makes no call.
    per_intent = Counter((a.originator_id, a.step) for a in attempts)
    assert set(per_intent.values()) == {1}, [k for k, v in per_intent.items() if v > 1]
    claims = Counter()
    for job in final:
        assert job.violations(quiescent=True) == [], (job.id, job.violations(quiescent=True))
        assert job.state in (State.RELEASED, State.REFUNDED)
        claims[job.id] = job.counts.get("Funded", 0)
    assert set(claims.values()) == {1}
    rows = ledger._conn.execute("SELECT meta, status FROM ledger_holds").fetchall()
    per_job = Counter(json.loads(meta)["job_id"] for meta, _ in rows)
    assert len(per_job) == 40 and set(per_job.values()) == {1}, "a job was escrowed twice"
    assert all(status in ("posted", "voided") for _, status in rows)
    conservation = ledger.conservation()
    assert conservation.conserved and conservation.held == 0


async def _until(condition: Any, what: str, within_s: float = 30.0) -> None:
    """Wait for `condition()` (a state, not a time: the deadline only stops a hung test)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still waiting for: {what}")
        await asyncio.sleep(0.01)


def _engines_and_a_job(
    url: str, env: dict[str, str], a_escrow: Callable[[LedgerEscrow], Any], *, job_key: str
) -> tuple[Engine, Engine, InProcessCompute, Any]:
    """Engines A (its escrow wrapped by `a_escrow`) and B on one store and one ledger, neither
    recovering on start, and a job opened for them (its id)."""
    ledger = Ledger(None)
    with ledger.transaction() as tx:
        tx.open_account(PAYER)
        tx.open_account(PAYEE)
    ledger.mint(PAYER, "100", key="mint")
    compute = InProcessCompute(seed=3)
    settings = Settings(store="memory", payer=PAYER, payee=PAYEE)

    def engine(name: str, escrow: Any) -> Engine:
        return Engine(
            Settlements(url, env={**env, "CREATE_TABLE": "y"}),
            escrow,
            compute,
            payer=PAYER,
            settings=settings,
            processor=ProcessorConfig(processor_id=name, retry_base_s=0.001, retry_cap_s=0.01),
            follow_interval_s=0.02,
            recover_on_start=False,
        )

    a = engine("engine-a", a_escrow(LedgerEscrow(ledger, payer=PAYER)))
    b = engine("engine-b", LedgerEscrow(ledger, payer=PAYER))
    spec = a._spec(
        "echo",
        {"value": 1},
        "0.50",
        job_key=job_key,
        payee=None,
        referral=None,
        acceptance=None,
        bonus_pool=None,
        batch_id=job_key,
        timeout_s=60,
    )
    (job_id,) = Settlements(url, env={**env, "CREATE_TABLE": "y"}).open_jobs([spec])
    return a, b, compute, job_id


async def test_a_job_another_engine_holds_is_learned_from_the_log_not_polled(
    store: tuple[str, dict[str, str]],
) -> None:
    """Engine B waits for a job engine A has claimed: it reads the store only when A's follower-read
    events say the job changed, never while A holds the claim and writes nothing (it used to read
    the job every 0.2 s), and it gives its concurrency slot back meanwhile."""
    url, env = store
    release_a = asyncio.Event()
    a, b, compute, job_id = _engines_and_a_job(
        url, env, lambda escrow: HeldUntil(escrow, release_a), job_key="held-by-a"
    )
    await a.start()
    a_result = asyncio.ensure_future(a.wait(job_id))
    watcher = Settlements(url, env=env)
    await _until(lambda: watcher.get_job(job_id).intent.attempts == 1, "engine A's claim")  # type: ignore[union-attr]
    await b.start()
    slots = asyncio.Semaphore(1)

    async def settle_in_a_slot() -> Any:
        async with Slot(slots):
            return await b.wait(job_id)

    b_result = asyncio.ensure_future(settle_in_a_slot())
    await _until(lambda: b.processor.deferred == 1, "engine B to defer to A's claim")
    assert not slots.locked(), "a job waiting for another engine's claim keeps its slot"
    reads_while_held = b.writer.stats.reads
    await asyncio.sleep(1.5)  # A holds the claim and writes nothing: B must not read meanwhile
    assert b.writer.stats.reads == reads_while_held
    release_a.set()
    paid_a, paid_b = await asyncio.wait_for(asyncio.gather(a_result, b_result), 60)
    assert paid_a.status == paid_b.status == "paid"
    # B read the job only when the log said it changed: once per save of A's at most.
    assert b.watch.wakes >= 1
    assert b.writer.stats.reads - reads_while_held <= b.watch.wakes + 1
    attempts = [
        watcher.mapper.to_domain_event(n)
        for n in watcher.recorder.select_notifications(1, 1000, topics=[get_topic(EscrowJob.Attempted)])
    ]
    assert {a.processor for a in attempts} == {"engine-a"}
    await a.aclose()
    await b.aclose()
    await compute.aclose()


class HeldCalls:
    """An escrow gateway whose calls named in `gates` each wait for their event first."""

    def __init__(self, inner: LedgerEscrow, gates: dict[str, asyncio.Event]) -> None:
        self.inner = inner
        self.gates = gates
        self.capabilities = inner.capabilities

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        gate = self.gates.get(name)
        if gate is None:
            return attribute

        async def held(*args: Any, **kwargs: Any) -> Any:
            await gate.wait()
            return await attribute(*args, **kwargs)

        return held


async def test_an_engine_follows_the_claims_of_a_job_another_engine_carries_on_without_reading_it(
    store: tuple[str, dict[str, str]],
) -> None:
    """Engine A records each outcome of its job together with its claim on the next step (funded
    and the start claimed; ended and the release claimed). Engine B, waiting for the job, follows
    those claims in the log: it reads the job again only when it rests."""
    url, env = store
    gates = {"create": asyncio.Event(), "release": asyncio.Event()}
    a, b, compute, job_id = _engines_and_a_job(
        url, env, lambda escrow: HeldCalls(escrow, gates), job_key="carried-by-a"
    )
    watcher = Settlements(url, env=env)

    def last_claim() -> str | None:
        intent = watcher.get_job(job_id).intent
        return str(intent.step) if intent is not None and intent.attempts else None

    await a.start()
    a_result = asyncio.ensure_future(a.wait(job_id))
    await _until(lambda: last_claim() == "fund", "engine A's claim on the funding")
    await b.start()
    b_result = asyncio.ensure_future(b.wait(job_id))
    await _until(lambda: b.processor.deferred == 1, "engine B to defer to A's claim")
    reads = b.writer.stats.reads
    gates["create"].set()  # A funds, claims the start, runs the job, claims the release, waits
    await _until(lambda: last_claim() == "release", "engine A's claim on the release")
    await _until(lambda: b.processor.claims_followed >= 1, "engine B to follow A's claims")
    assert b.writer.stats.reads == reads
    assert not b_result.done()
    gates["release"].set()
    paid_a, paid_b = await asyncio.wait_for(asyncio.gather(a_result, b_result), 60)
    assert paid_a.status == paid_b.status == "paid"
    assert b.writer.stats.reads == reads + 1  # once, when the job rested
    attempts = [
        watcher.mapper.to_domain_event(n)
        for n in watcher.recorder.select_notifications(1, 1000, topics=[get_topic(EscrowJob.Attempted)])
    ]
    assert [(a.step, a.processor) for a in attempts] == [
        ("fund", "engine-a"),
        ("start", "engine-a"),
        ("release", "engine-a"),
    ]
    await a.aclose()
    await b.aclose()
    await compute.aclose()


async def test_an_intent_another_engine_wrote_and_has_not_claimed_is_left_to_it_for_a_lease(
    store: tuple[str, dict[str, str]],
) -> None:
    """A job another process opened and has not claimed yet (a chunk of its batch, opened ahead of
    the jobs it runs, waits for a slot there) is left to that process for a claim lease, as a claim
    would be, before this engine's follower drives it: two batches on one store do not take each
    other's queued jobs (they did after 2 s, and each process then read the other's jobs back)."""
    url, env = store
    a, b, compute, job_id = _engines_and_a_job(url, env, lambda escrow: escrow, job_key="queued-there")
    await b.start()
    await _until(lambda: job_id in b._foreign, "engine B's follower to see the job")
    _version, claimer, lapses_at = b._foreign[job_id]
    lease = b.processor.config.claim_lease_s
    assert claimer == "" and lapses_at - time.monotonic() > lease - 5
    assert b.follow_stats.adopted == 0 and job_id not in b._driving
    await a.aclose()
    await b.aclose()
    await compute.aclose()
