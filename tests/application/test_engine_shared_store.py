"""Several engines on one store (SQLite file, PostgreSQL) settle the same jobs at the same time:
the `Attempted` event is the claim and the store's optimistic concurrency decides who holds it, so
no intent is executed twice: one escrow per job, each settled once, money conserved."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
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
    resuming: list[Engine] = []

    async def resume(engine: Engine) -> list[Any]:
        # The first engine's escrow calls wait until the second engine resumes too: whatever the
        # machine's load, both engines are working the batch at the same time.
        resuming.append(engine)
        if len(resuming) == 2:
            both_resuming.set()
        return await engine.resume()

    results_a, results_b = await asyncio.wait_for(asyncio.gather(resume(first), resume(second)), 60)
    results = results_a or results_b
    await first.aclose()
    await second.aclose()
    await compute.aclose()

    app = Settlements(url, env=env)
    final = app.list_jobs(batch_id="shared")
    assert len(final) == 40 and {r.status for r in results} <= {"paid", "refunded"}
    # Both engines really competed for the same intents: claims were lost, and nothing ran twice.
    raced = sum(e.processor.claims_lost + e.processor.deferred for e in (first, second))
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
