"""A seeded fault simulation of the whole engine, on in-process gateways.

Faults are injected at the ports: crashes before and after every effect (the engine is abandoned
mid-flight and a new one starts on the same store), lost responses (the call happened, the answer
did not arrive), 429s, 5xx before anything happened, timeouts, duplicate deliveries, and, on the
compute side, jobs executed twice and COMPLETED without output. The same seed replays the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from podsettle.adapters.ledger import Ledger
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
