"""A seeded fault simulation of the whole engine, on in-process gateways.

Faults are injected at the ports: crashes before and after every effect (the engine is abandoned
mid-flight and a new one starts on the same store), lost responses (the call happened, the answer
did not arrive), 429s, 5xx before anything happened, timeouts, duplicate deliveries, and, on the
compute side, jobs executed twice and COMPLETED without output. The same seed replays the same run.

`simulate_published` is the family "v1 as published": the real v1 adapter over HTTP against the
escrow sandbox with every default of the published server (disputes never resolved, one shared
rate-limit bucket, the timeout sweep on its 5-minute timer, on a clock the simulation moves).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from podsettle.adapters.ledger import MICRO, Ledger
from podsettle.adapters.ledger_gateway import LedgerEscrow
from podsettle.adapters.ports import (
    EscrowCapabilities,
    OutcomeUnknown,
    RateLimited,
    Unavailable,
)
from podsettle.application import Settlements
from podsettle.bootstrap import Engine
from podsettle.domain import State, Step
from podsettle.domain.escrow_job import EscrowJob
from podsettle.processor import ProcessorConfig
from podsettle.sandbox.inprocess_compute import InProcessCompute
from podsettle.sandbox.runpod_worker import EndpointConfig, Faults
from podsettle.settings import Settings
from tests.histories import act

T = TypeVar("T")
PAYER, PAYEE = "ag_payer", "ag_worker"
MINTED = Decimal("1000")


class SimulatedCrash(Exception):
    """The process dies here: nothing after this point happens in this engine."""


@dataclass
class FaultPlan:
    rng: random.Random
    crash_rate: float = 0.08
    lost_rate: float = 0.08
    rate_limit_rate: float = 0.05
    error_before_rate: float = 0.05
    duplicate_rate: float = 0.05
    crashes_left: int = 6
    log: list[str] = field(default_factory=list)

    def draw(self, call: str) -> str:
        roll = self.rng.random()
        for fault, rate in (
            ("crash_before", self.crash_rate / 2),
            ("crash_after", self.crash_rate / 2),
            ("lost", self.lost_rate),
            ("rate_limited", self.rate_limit_rate),
            ("error_before", self.error_before_rate),
            ("duplicate", self.duplicate_rate),
        ):
            if roll < rate:
                if fault.startswith("crash"):
                    if self.crashes_left <= 0:
                        return "ok"
                    self.crashes_left -= 1
                self.log.append(f"{call}:{fault}")
                return fault
            roll -= rate
        return "ok"

    async def around(self, call: str, money: bool, action: Callable[[], Awaitable[T]]) -> T:
        fault = self.draw(call)
        if fault == "crash_before":
            raise SimulatedCrash(f"crash before {call}")
        if fault == "rate_limited":
            raise RateLimited(f"429 on {call}", retry_after=0.0)
        if fault == "error_before":
            # A 5xx before the service did anything: for a money call the engine cannot know that.
            raise OutcomeUnknown(f"500 on {call}") if money else Unavailable(f"503 on {call}")
        result = await action()
        if fault == "duplicate":
            # The request delivered twice; the answer of the second, unless it was refused (e.g.
            # 409): then the first stands.
            with contextlib.suppress(Exception):
                result = await action()
        if fault == "crash_after":
            raise SimulatedCrash(f"crash after {call}")
        if fault == "lost":
            raise OutcomeUnknown(f"response to {call} lost") if money else Unavailable(f"{call} timed out")
        return result


class FaultyEscrow:
    def __init__(self, inner: LedgerEscrow, plan: FaultPlan, capabilities: EscrowCapabilities) -> None:
        self.inner = inner
        self.plan = plan
        self.capabilities = capabilities

    async def create(self, **kwargs: Any) -> Any:
        return await self.plan.around("create", True, lambda: self.inner.create(**kwargs))

    async def release(self, escrow_id: str, **kwargs: Any) -> Any:
        return await self.plan.around("release", True, lambda: self.inner.release(escrow_id, **kwargs))

    async def refund(self, escrow_id: str, **kwargs: Any) -> Any:
        return await self.plan.around("refund", True, lambda: self.inner.refund(escrow_id, **kwargs))

    async def get(self, escrow_id: str) -> Any:
        return await self.plan.around("get", False, lambda: self.inner.get(escrow_id))

    async def health(self) -> None:
        await self.inner.health()

    async def balance(self) -> Any:
        return await self.inner.balance()

    async def find_by_key(self, key: str) -> Any:
        if not self.capabilities.lookup_by_key:
            raise NotImplementedError("this escrow service has no lookup by key")
        return await self.plan.around("find", False, lambda: self.inner.find_by_key(key))

    async def aclose(self) -> None:
        return None


class FaultyCompute:
    def __init__(self, inner: InProcessCompute, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan

    async def submit(self, endpoint_id: str, job_input: dict[str, Any], **kwargs: Any) -> Any:
        return await self.plan.around(
            "submit", False, lambda: self.inner.submit(endpoint_id, job_input, **kwargs)
        )

    def body_and_limit(self, input_size: int, *, execution_timeout_ms: int, ttl_ms: int) -> tuple[int, int]:
        return self.inner.body_and_limit(input_size, execution_timeout_ms=execution_timeout_ms, ttl_ms=ttl_ms)

    async def status(self, endpoint_id: str, run_id: str) -> Any:
        return await self.inner.status(endpoint_id, run_id)

    async def wait(self, endpoint_id: str, run_id: str, *, timeout_s: float, **kwargs: Any) -> Any:
        return await self.plan.around(
            "wait", False, lambda: self.inner.wait(endpoint_id, run_id, timeout_s=timeout_s, **kwargs)
        )

    async def cancel(self, endpoint_id: str, run_id: str) -> Any:
        return await self.plan.around("cancel", False, lambda: self.inner.cancel(endpoint_id, run_id))

    async def retry(self, endpoint_id: str, run_id: str) -> Any:
        return await self.inner.retry(endpoint_id, run_id)

    async def health(self, endpoint_id: str) -> Any:
        return await self.inner.health(endpoint_id)

    async def purge_queue(self, endpoint_id: str) -> int:
        return await self.inner.purge_queue(endpoint_id)

    async def aclose(self) -> None:
        return None


def sim_handler(job: dict[str, Any]) -> Any:
    value = job["input"].get("value", 0)
    return {"value": value, "score": value % 7}


@dataclass
class SimResult:
    seed: int
    jobs: list[EscrowJob]
    ledger: Ledger
    restarts: int
    faults: list[str]
    operator_resolutions: int


async def simulate(seed: int, tmp: Path, *, jobs: int = 6, v1_like: bool | None = None) -> SimResult:
    rng = random.Random(seed)
    v1 = rng.random() < 0.3 if v1_like is None else v1_like
    ledger = Ledger(None)
    with ledger.transaction() as tx:
        tx.open_account(PAYER)
        tx.open_account(PAYEE)
    ledger.mint(PAYER, MINTED, key="mint")
    inner_escrow = LedgerEscrow(ledger, payer=PAYER)
    capabilities = (
        EscrowCapabilities(idempotent_create=False, lookup_by_key=False, cancel=True)
        if v1
        else inner_escrow.capabilities
    )
    faults = Faults(
        failure_rate=0.15, no_output_rate=0.1, duplicate_rate=0.15, latency_ms=rng.choice([0.0, 1.0])
    )
    inner_compute = InProcessCompute({"sim": EndpointConfig(handler=sim_handler, faults=faults)}, seed=seed)
    plan = FaultPlan(rng)
    store = f"sqlite:///{tmp / f'sim-{seed}.db'}"
    settings = Settings(store=store, payer=PAYER, payee=PAYEE, job_timeout_s=60)
    # One engine at a time (a restart follows a crash): no lease to wait out for the dead engine's attempts.
    config = ProcessorConfig(
        retry_base_s=0.0005, retry_cap_s=0.002, pending_refund_poll_s=0.01, seed=seed, claim_lease_s=0
    )
    inputs = [{"value": rng.randrange(1000)} for _ in range(jobs)]
    budgets = [rng.choice(["0.10", "0.50", "1.234567", "2", "2", "5000"]) for _ in range(jobs)]
    batch_id = f"sim-{seed}"
    restarts = 0
    resolutions = 0

    def new_engine() -> Engine:
        return Engine(
            Settlements(store),
            FaultyEscrow(inner_escrow, plan, capabilities),
            FaultyCompute(inner_compute, plan),
            payer=PAYER,
            settings=settings,
            processor=replace(config, processor_id=f"engine-{restarts}"),
            follow_interval_s=0.01,
        )

    opened = False
    while True:
        engine = new_engine()
        try:
            await engine.start()
            if not opened:
                # Budgets differ per job: open them one by one in the same batch.
                for index, (job_input, budget) in enumerate(zip(inputs, budgets, strict=True)):
                    spec = engine._spec(
                        "sim",
                        job_input,
                        budget,
                        job_key=f"{batch_id}-{index:03d}",
                        payee=None,
                        referral=None,
                        acceptance={"kind": "non_empty"},
                        bonus_pool="1",
                        batch_id=batch_id,
                        timeout_s=60,
                    )
                    await engine.writer.open([spec])
                opened = True
            results = await engine.resume()
            for result in results:
                # The same decision for a job in every round: a bonus request is made at most once.
                if result.status == "paid" and result.job_id.int % 2 == 0:
                    achieved = ["0.52", "0.6", "0.9"][result.job_id.int % 3]
                    await engine.award_bonus(result.job_id, "0.5", achieved, pool="1")
            leftovers = await engine.writer.call(lambda e=engine: e._unfinished_jobs()[0])
            if leftovers:
                raise AssertionError(f"seed {seed}: jobs left unfinished after resume: {leftovers}")
            await engine.aclose()
        except SimulatedCrash:
            engine.abandon()
            await asyncio.sleep(0)
            restarts += 1
            continue
        # The operator looks at every ATTENTION job in the ledger and records what really happened.
        app = Settlements(store)
        attention = app.list_jobs(state=State.ATTENTION)
        if not attention:
            break
        for job in attention:
            resolve_from_ledger(app, job, inner_escrow, ledger)
            resolutions += 1
        restarts += 1
    app = Settlements(store)
    return SimResult(seed, app.list_jobs(batch_id=batch_id), ledger, restarts, plan.log, resolutions)


def resolve_from_ledger(app: Settlements, job: EscrowJob, escrow: LedgerEscrow, ledger: Ledger) -> None:
    """What an operator does with the escrow service's dashboard: look up the escrow by key."""
    assert job.intent is not None
    step, key = job.intent.step, job.intent.key
    hold = ledger.find_hold(key)
    finding = f"checked the ledger for {key}: {'found ' + hold.hold_id if hold else 'nothing'}"
    if step in (Step.FUND, Step.BONUS_FUND) and hold is not None:
        amount = hold.amount
        from podsettle.domain.rules import split

        parts = split(amount)

        def found(j: EscrowJob) -> None:
            j.resolve(finding, "operator")
            if step == Step.FUND:
                j.record_funded(hold.hold_id, amount, parts.fee, parts.net)
            else:
                j.record_bonus_funded(hold.hold_id, amount, parts.fee, parts.net)

        act(app, job.id, found)
        return
    act(app, job.id, lambda j: j.resolve(finding, "operator", retry=True))


# ---------------------------------------------------------------------------------- v1 as published


class SimClock:
    """The escrow service's clock: the simulation moves it (a rate-limit window passing, the hours
    until the timeout sweep refunds); the engine keeps the wall clock."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class PublishedEscrow(FaultyEscrow):
    """The real v1 adapter against the escrow sandbox as published (one shared rate-limit bucket,
    the 5-minute sweep on the simulation's clock, disputes never resolved), with the plan's faults.
    A 429 is the limiter's window at work (creates share one bucket; a release is counted per
    escrow): the service's clock moves past the window, as the wall clock would."""

    def __init__(self, inner: Any, plan: FaultPlan, clock: SimClock) -> None:
        super().__init__(inner, plan, inner.capabilities)
        self.clock = clock
        self.rate_limited = 0

    async def _limited(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except RateLimited:
            self.rate_limited += 1
            self.clock.now += timedelta(seconds=61)
            raise RateLimited("429: Limit per 60s", retry_after=0.0) from None

    async def create(self, **kwargs: Any) -> Any:
        return await self._limited(super().create(**kwargs))

    async def release(self, escrow_id: str, **kwargs: Any) -> Any:
        return await self._limited(super().release(escrow_id, **kwargs))

    async def refund(self, escrow_id: str, **kwargs: Any) -> Any:
        return await self._limited(super().refund(escrow_id, **kwargs))


@dataclass
class PublishedResult:
    seed: int
    jobs: list[EscrowJob]
    sandbox: Any  # the EscrowSandbox state
    payer: str
    worker: str
    neighbour: str
    restarts: int
    faults: list[str]
    operator_resolutions: int
    rate_limited: int
    sweeps_waited: int


async def simulate_published(seed: int, tmp: Path, *, jobs: int = 6) -> PublishedResult:
    """The engine against v1 as published, through crashes and lost answers; the refund path is the
    timeout sweep (configured: the one that returns money on the published service)."""
    from podsettle.adapters.purpleflea import purple_flea
    from podsettle.sandbox.escrow_server import create_escrow_app
    from podsettle.sandbox.http_server import BackgroundServer

    rng = random.Random(seed)
    clock = SimClock()
    app = create_escrow_app(clock=clock, seed=seed)  # every default as published
    state = app.state.escrow
    payer, payer_key = state.create_agent(Decimal("100"))
    worker, _ = state.create_agent()
    neighbour, neighbour_key = state.create_agent(Decimal("100"))
    # No duplicate deliveries: a create delivered twice makes two escrows on a service without keys,
    # which is the network's doing, not the engine's.
    plan = FaultPlan(rng, duplicate_rate=0.0)
    store = f"sqlite:///{tmp / f'published-{seed}.db'}"
    settings = Settings(store=store, payer=payer, payee=worker, job_timeout_s=60)
    config = ProcessorConfig(
        retry_base_s=0.0005, retry_cap_s=0.002, pending_refund_poll_s=0.01, seed=seed, claim_lease_s=0
    )
    faults = Faults(failure_rate=0.3, no_output_rate=0.1, latency_ms=0.0)
    compute = InProcessCompute({"sim": EndpointConfig(handler=sim_handler, faults=faults)}, seed=seed)
    budgets = [rng.choice(["0.10", "0.50", "1.234567", "2", "5000"]) for _ in range(jobs)]
    batch_id = f"published-{seed}"
    restarts = resolutions = sweeps = 0
    lifted = dict.fromkeys(("create", "complete", "release", "dispute"), 10**9)
    with BackgroundServer(app) as server:
        # A neighbour behind the same address (no proxy header: the one "unknown" bucket) has used
        # most of this window's creates.
        async with purple_flea(server.url, payer_key=neighbour_key, rate_limits=lifted) as other:
            for n in range(rng.randrange(10, 20)):
                await other.create(
                    key=f"n{n}",
                    payee=worker,
                    amount=Decimal("0.10"),
                    description="neighbour",
                    timeout_hours=1,
                )
        adapter = purple_flea(
            server.url, payer_key=payer_key, payer_id=payer, refund_method="timeout", rate_limits=lifted
        )
        escrow = PublishedEscrow(adapter, plan, clock)

        def new_engine() -> Engine:
            return Engine(
                Settlements(store),
                escrow,
                FaultyCompute(compute, plan),
                payer=payer,
                settings=settings,
                processor=replace(config, processor_id=f"engine-{restarts}"),
                follow_interval_s=0.01,
            )

        opened = False
        try:
            while True:
                engine = new_engine()
                try:
                    await engine.start()
                    if not opened:
                        for index, budget in enumerate(budgets):
                            spec = engine._spec(
                                "sim",
                                {"value": rng.randrange(1000)},
                                budget,
                                job_key=f"{batch_id}-{index:03d}",
                                payee=None,
                                referral=None,
                                acceptance={"kind": "non_empty"},
                                bonus_pool="1" if index % 2 else None,
                                batch_id=batch_id,
                                timeout_s=60,
                            )
                            await engine.writer.open([spec])
                        opened = True
                    results = await engine.resume()
                    for result in results:
                        if result.status == "paid" and result.job_id.int % 2 == 0:
                            await engine.award_bonus(result.job_id, "0.5", "0.9", pool="1")
                    leftovers = await engine.writer.call(lambda e=engine: e._unfinished_jobs()[0])
                    await engine.aclose()
                except SimulatedCrash:
                    engine.abandon()
                    await asyncio.sleep(0)
                    restarts += 1
                    continue
                log_app = Settlements(store)
                waiting = [log_app.get_job(job_id) for job_id in leftovers]
                if any(job.state not in (State.REFUNDING, State.RELEASING) for job in waiting):
                    raise AssertionError(
                        f"seed {seed}: jobs left unfinished: {[j.summary() for j in waiting]}"
                    )
                if waiting:
                    # Refunds by the timeout sweep: the service's hours pass (the escrows last at
                    # most 2 h here), then its next 5-minute tick refunds them.
                    clock.now += timedelta(hours=2, minutes=6)
                    state.maybe_sweep()
                    sweeps += 1
                    restarts += 1
                    continue
                resolved = [
                    job
                    for job in log_app.list_jobs(state=State.ATTENTION)
                    if resolve_from_service(log_app, job, state)
                ]
                if not resolved:
                    break  # what is left in ATTENTION has no outcome an operator could record
                resolutions += len(resolved)
                restarts += 1
                if restarts > 100:
                    raise AssertionError(f"seed {seed}: no end after {restarts} rounds")
        finally:
            await adapter.aclose()
    final = Settlements(store).list_jobs(batch_id=batch_id)
    return PublishedResult(
        seed,
        final,
        state,
        payer,
        worker,
        neighbour,
        restarts,
        plan.log,
        resolutions,
        escrow.rate_limited,
        sweeps,
    )


def published_escrows(state: Any, job_key: str) -> list[dict[str, Any]]:
    """The escrows the service holds for a job (found by their description, as on its dashboard)."""
    with state.ledger.transaction() as tx:
        cursor = tx.execute(
            "SELECT escrow_id, description, status, amount, commission FROM sandbox_escrows "
            "WHERE description LIKE ?",
            (f"%{job_key}%",),
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def resolve_from_service(app: Settlements, job: EscrowJob, state: Any) -> bool:
    """What an operator does with the service's records: find the job's escrow, or retry a call
    that can still act; False when neither applies (the escrow already ended otherwise: a bonus
    escrow the sweep refunded has no outcome to record, the job stays in ATTENTION)."""
    assert job.intent is not None
    step = job.intent.step
    finding = f"checked the escrow service for {job.job_key}"
    if step in (Step.FUND, Step.BONUS_FUND):
        bonus = step == Step.BONUS_FUND
        found = [
            e for e in published_escrows(state, job.job_key) if e["description"].startswith("Perf") == bonus
        ]
        if found:
            (escrow,) = found
            amount = Decimal(escrow["amount"]) / MICRO
            fee = Decimal(escrow["commission"]) / MICRO

            def funded(j: EscrowJob) -> None:
                j.resolve(f"{finding}: found {escrow['escrow_id']}", "operator")
                record = j.record_bonus_funded if bonus else j.record_funded
                record(escrow["escrow_id"], amount, fee, amount - fee)

            act(app, job.id, funded)
            return True
    elif step in (Step.RELEASE, Step.REFUND, Step.BONUS_RELEASE):
        escrow_id = job.bonus_escrow_id if step == Step.BONUS_RELEASE else job.escrow_id
        assert escrow_id is not None
        if state.view(escrow_id, None)["status"] not in ("funded", "completed"):
            return False
    act(app, job.id, lambda j: j.resolve(f"{finding}: nothing moved", "operator", retry=True))
    return True
