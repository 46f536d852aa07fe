"""A hypothesis state machine at the engine level: submit jobs, let time pass, inject faults, crash
the engine mid-flight and restart it on the same store. After every step the log's invariants hold
and the ledger conserves money; at the end, with faults cleared and an operator resolving what the
engine parked, every job has settled and the worker's balance is what the log says."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from podsettle.adapters.ledger import Ledger
from podsettle.adapters.ledger_gateway import LedgerEscrow
from podsettle.adapters.ports import EscrowCapabilities
from podsettle.application import Settlements
from podsettle.bootstrap import Engine
from podsettle.domain import State
from podsettle.processor import ProcessorConfig
from podsettle.sandbox.inprocess_compute import InProcessCompute
from podsettle.sandbox.runpod_worker import EndpointConfig, Faults
from podsettle.settings import Settings
from tests.fault_sim import (
    PAYEE,
    PAYER,
    FaultPlan,
    FaultyCompute,
    FaultyEscrow,
    SimulatedCrash,
    resolve_from_ledger,
)

EXAMPLES = int(os.environ.get("PODSETTLE_ENGINE_STATEFUL_EXAMPLES", "40"))


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def quick(job: dict) -> dict:  # type: ignore[type-arg]
    return {"n": job["input"].get("n", 0)}


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="podsettle-engine-machine-"))
        self.store = f"sqlite:///{self.dir / 'store.db'}"
        self.clock = Clock()
        self.ledger = Ledger(None, clock=self.clock)
        with self.ledger.transaction() as tx:
            tx.open_account(PAYER)
            tx.open_account(PAYEE)
        self.ledger.mint(PAYER, "100", key="mint")
        self.escrow = LedgerEscrow(self.ledger, payer=PAYER, clock=self.clock)
        self.compute = InProcessCompute(
            {
                "quick": EndpointConfig(handler=quick),
                "flaky": EndpointConfig(handler=quick, faults=Faults(failure_rate=0.3, no_output_rate=0.2)),
                "twice": EndpointConfig(handler=quick, faults=Faults(duplicate_rate=1.0)),
            },
            seed=1,
        )
        self.plan = FaultPlan(
            random.Random(7),
            crash_rate=0,
            lost_rate=0,
            rate_limit_rate=0,
            error_before_rate=0,
            duplicate_rate=0,
        )
        self.capabilities = self.escrow.capabilities
        self.engine: Engine | None = None
        self.crashes = 0
        self._boot()

    def _boot(self) -> None:
        self.engine = Engine(
            Settlements(self.store),
            FaultyEscrow(self.escrow, self.plan, self.capabilities),
            FaultyCompute(self.compute, self.plan),
            payer=PAYER,
            settings=Settings(store=self.store, payer=PAYER, payee=PAYEE, job_timeout_s=600),
            processor=ProcessorConfig(
                processor_id=f"machine-{self.crashes}",
                retry_base_s=0.0005,
                retry_cap_s=0.002,
                claim_lease_s=0,
            ),
            clock=self.clock,
            follow_interval_s=0.005,
        )
        self._run(self.engine.start())

    def _run(self, awaitable: object, timeout: float = 10.0) -> object:
        async def bounded() -> object:
            return await asyncio.wait_for(awaitable, timeout)  # type: ignore[arg-type]

        try:
            return self.loop.run_until_complete(bounded())
        except SimulatedCrash:
            self.crash()
            return None

    # ------------------------------------------------------------------ commands

    @precondition(lambda self: self.engine is not None)
    @rule(
        endpoint=st.sampled_from(["quick", "flaky", "twice"]),
        budget=st.sampled_from(["0.10", "0.50", "3"]),
        n=st.integers(0, 9),
    )
    def submit(self, endpoint: str, budget: str, n: int) -> None:
        assert self.engine is not None
        self._run(self.engine.submit(endpoint, {"n": n}, budget=budget))

    @precondition(lambda self: self.engine is not None)
    @rule(endpoint=st.sampled_from(["quick", "flaky"]), n=st.integers(0, 9))
    def submit_another(self, endpoint: str, n: int) -> None:
        self.submit(endpoint, "0.50", n)

    @precondition(lambda self: self.engine is not None)
    @rule()
    def let_it_run(self) -> None:
        self._run(asyncio.sleep(0.02))

    @precondition(lambda self: self.engine is not None)
    @rule()
    def crash(self) -> None:
        assert self.engine is not None
        self.engine.abandon()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.engine = None
        self.crashes += 1

    @precondition(lambda self: self.engine is None)
    @rule()
    def restart(self) -> None:
        self._boot()

    @rule(hours=st.sampled_from([0, 1, 3]))
    def advance_time(self, hours: int) -> None:
        """Hours pass: deadlines run out, and the escrow service sweeps expired escrows back."""
        self.clock.now += timedelta(hours=hours, seconds=1)
        self.escrow.sweep()

    @rule(
        kind=st.sampled_from(
            ["crash_rate", "lost_rate", "rate_limit_rate", "error_before_rate", "duplicate_rate"]
        ),
        rate=st.sampled_from([0.0, 0.1, 0.3]),
    )
    def inject_fault(self, kind: str, rate: float) -> None:
        setattr(self.plan, kind, rate)
        self.plan.crashes_left = 3

    @rule(v1=st.booleans())
    def switch_escrow_capabilities(self, v1: bool) -> None:
        """A v1-like service: no idempotent create, no lookup by key (ambiguity goes to ATTENTION)."""
        self.capabilities = (
            EscrowCapabilities(idempotent_create=False, lookup_by_key=False, cancel=True)
            if v1
            else self.escrow.capabilities
        )
        if self.engine is not None:
            self.engine.escrow.capabilities = self.capabilities  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ checks

    @invariant()
    def the_log_and_the_ledger_are_sound(self) -> None:
        app = Settlements(self.store)
        for job in app.list_jobs():
            assert job.violations() == [], (job.id, job.violations())
        conservation = self.ledger.conservation()
        assert conservation.conserved, conservation

    def teardown(self) -> None:
        try:
            self.plan.crash_rate = self.plan.lost_rate = self.plan.rate_limit_rate = 0
            self.plan.error_before_rate = self.plan.duplicate_rate = 0
            for _ in range(10):
                if self.engine is None:
                    self._boot()
                assert self.engine is not None
                self.loop.run_until_complete(asyncio.wait_for(self.engine.resume(), 30))
                self.loop.run_until_complete(self.engine.aclose())
                self.engine = None
                app = Settlements(self.store)
                parked = app.list_jobs(state=State.ATTENTION)
                for job in parked:
                    resolve_from_ledger(app, job, self.escrow, self.ledger)
                if not parked:
                    break
            app = Settlements(self.store)
            paid = Decimal(0)
            for job in app.list_jobs():
                assert job.violations(quiescent=True) == [], (job.id, job.violations(quiescent=True))
                assert job.state in (State.RELEASED, State.REFUNDED, State.REJECTED), job.summary()
                paid += job.released.to_payee if job.released else 0
            conservation = self.ledger.conservation()
            assert conservation.conserved and conservation.held == 0, conservation
            jobs = app.list_jobs()
            event(f"crashes: {min(self.crashes, 3)}+")
            event(f"jobs settled: {'none' if not jobs else '1-3' if len(jobs) < 4 else '4+'}")
            if any(job.counts.get("AttentionRaised") for job in jobs):
                event("an operator resolved an ATTENTION job")
            if any(job.failure and job.failure.stage == "release" for job in jobs):
                event("an escrow expired before its release")
            worker = {a.account_id: a.balance for a in conservation.accounts}[PAYEE]
            assert worker == paid
        finally:
            if self.engine is not None:
                self.engine.abandon()
            self.loop.run_until_complete(self.compute.aclose())
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()


EngineMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEngineStateMachine = EngineMachine.TestCase
