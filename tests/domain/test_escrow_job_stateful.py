"""A hypothesis state machine over EscrowJob: random valid, invalid and repeated commands.

After every step: the invariants of DESIGN.md hold, a refused command recorded nothing, settled
money facts never change, and the job reloaded from a SQLite store equals the one in memory.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from podsettle import Settlements
from podsettle.domain import DomainError, EscrowJob, State, Step
from podsettle.domain.digests import digest
from podsettle.domain.rules import split
from tests.jobs import DEADLINE

EXAMPLES = int(os.environ.get("PODSETTLE_STATEFUL_EXAMPLES", "300"))
_store_dir = tempfile.mkdtemp(prefix="podsettle-stateful-")
STORE = Settlements(f"sqlite:///{Path(_store_dir) / 'jobs.db'}")

budgets = st.sampled_from(["0.10", "0.50", "1", "2.345678", "999999.999999"])
escrow_ids = st.sampled_from(["esc_a", "esc_b"])
runpod_ids = st.sampled_from(["rp-1", "rp-2"])
outputs = st.sampled_from([digest("out-1"), digest("out-2")])
failures = st.sampled_from(
    [("run", "FAILED", "oom"), ("run", "TIMED_OUT", "timeout"), ("acceptance", "COMPLETED", "no output")]
)
steps = st.sampled_from(list(Step))
# The right amounts most of the time, a wrong one sometimes.
skews = st.sampled_from([Decimal(0)] * 4 + [Decimal("0.000001"), Decimal("-0.01")])
metrics = st.sampled_from([Decimal("0.8"), Decimal("0.85"), Decimal("0.9"), Decimal("1.2"), Decimal("2")])


def _facts(job: EscrowJob) -> dict[str, Any]:
    return {k: v for k, v in vars(job).items() if k != "_pending_events"}


class EscrowJobMachine(RuleBasedStateMachine):
    job: EscrowJob

    @initialize(budget=budgets, pool=st.sampled_from([None, "1", "5"]))
    def open_job(self, budget: str, pool: str | None) -> None:
        self.job = EscrowJob.open(
            job_key=f"stateful-{uuid.uuid4().hex}",
            endpoint_id="train",
            input_digest=digest({"target": 0.9}),
            payer="ag_payer",
            payee="ag_worker",
            budget=budget,
            deadline=DEADLINE,
            bonus_pool=pool,
        )
        self.last: Callable[[EscrowJob], object] | None = None
        self.settled: dict[str, Any] = {}
        STORE.save(self.job)

    def _do(self, command: Callable[[EscrowJob], object]) -> None:
        version = self.job.version
        try:
            command(self.job)
        except DomainError:
            assert self.job.version == version, "a refused command recorded an event"
            assert self.job.collect_events() == []
            return
        self.last = command
        STORE.save(self.job)

    def _split(self, amount: Decimal) -> tuple[Decimal, Decimal, Decimal]:
        parts = split(amount)  # type: ignore[arg-type]
        return parts.fee, parts.net, parts.referral_fee

    # ------------------------------------------------------------ commands

    @rule(step=steps)
    def attempt(self, step: Step) -> None:
        self._do(lambda job: job.record_attempt(step, "machine"))

    @rule(escrow_id=escrow_ids, skew=skews)
    def funded(self, escrow_id: str, skew: Decimal) -> None:
        fee, net, _ = self._split(self.job.budget)
        self._do(lambda job: job.record_funded(escrow_id, job.budget, fee + skew, net))

    @rule(status=st.sampled_from([400, 402, 404, None]))
    def funding_rejected(self, status: int | None) -> None:
        self._do(lambda job: job.record_funding_rejected(f"refused {status}", status))

    @rule(runpod_id=runpod_ids)
    def started(self, runpod_id: str) -> None:
        self._do(lambda job: job.record_started(runpod_id))

    @rule(output=outputs)
    def completed(self, output: str) -> None:
        self._do(lambda job: job.record_completed(output, 100, 5, "w-1", {"accuracy": "0.9"}))

    @rule(failure=failures)
    def failed(self, failure: tuple[str, str, str]) -> None:
        self._do(lambda job: job.record_failed(*failure))

    @rule()
    def cancel(self) -> None:
        self._do(lambda job: job.request_cancel("operator asked"))

    @rule(skew=skews, partial=st.booleans())
    def released(self, skew: Decimal, partial: bool) -> None:
        fee, net, referral = self._split(self.job.budget)
        returned = Decimal("0.05") if partial and net > Decimal("0.05") else Decimal(0)
        self._do(lambda job: job.record_released(net - returned + skew, fee, referral, returned))

    @rule(skew=skews, fee_kept=st.booleans())
    def refunded(self, skew: Decimal, fee_kept: bool) -> None:
        fee, _, _ = self._split(self.job.budget)
        kept = fee if fee_kept else Decimal(0)
        self._do(lambda job: job.record_refunded(job.budget - kept + skew, kept))

    @rule()
    def refunded_by_service(self) -> None:
        fee, net, _ = self._split(self.job.budget)
        self._do(lambda job: job.record_refunded_by_service(net, fee, "timeout sweep"))

    @rule(base=metrics, achieved=metrics, pool=st.sampled_from(["1", "5", "10"]))
    def bonus(self, base: Decimal, achieved: Decimal, pool: str) -> None:
        self._do(lambda job: job.request_bonus(base, achieved, pool, Decimal("1.10")))

    @rule(escrow_id=escrow_ids, skew=skews)
    def bonus_funded(self, escrow_id: str, skew: Decimal) -> None:
        amount = self.job.bonus_amount or Decimal("0.1")
        fee, net, _ = self._split(amount)
        self._do(lambda job: job.record_bonus_funded(escrow_id, amount, fee + skew, net))

    @rule(skew=skews)
    def bonus_awarded(self, skew: Decimal) -> None:
        amount = self.job.bonus_amount or Decimal("0.1")
        fee, net, referral = self._split(amount)
        self._do(lambda job: job.record_bonus_awarded(net + skew, fee, referral))

    @rule(step=steps)
    def attention(self, step: Step) -> None:
        self._do(lambda job: job.raise_attention(step, "ambiguous", {"what": "lost response"}))

    @rule(retry=st.booleans())
    def resolve(self, retry: bool) -> None:
        self._do(lambda job: job.resolve("checked with the service", "operator-1", retry=retry))

    def _next_valid(self, choice: int) -> Callable[[EscrowJob], object] | None:
        """A command the job's state allows, so that random walks reach the deep states too."""
        job = self.job
        fee, net, referral = self._split(job.budget)
        intent = job.intent
        if job.state == State.ATTENTION:
            return lambda j: j.resolve("operator checked", "operator-1", retry=choice % 2 == 0)
        if intent is not None and intent.attempts == 0:
            return lambda j: j.record_attempt(intent.step, "machine")
        if intent is not None and intent.step == Step.FUND:
            if choice % 10 == 0:
                return lambda j: j.record_funding_rejected("insufficient_balance", 402)
            return lambda j: j.record_funded("esc_a", j.budget, fee, net)
        if intent is not None and intent.step == Step.START:
            return lambda j: (
                j.record_started("rp-1") if choice % 5 else j.record_failed("start", None, "bad input")
            )
        if job.state == State.RUNNING:
            if choice % 3 == 0:
                return lambda j: j.record_failed("run", "FAILED", "oom")
            return lambda j: j.record_completed(digest("out-1"), 100, 5, "w-1", {"accuracy": "0.9"})
        if intent is not None and intent.step == Step.RELEASE:
            return lambda j: j.record_released(net, fee, referral)
        if intent is not None and intent.step == Step.REFUND:
            return lambda j: j.record_refunded(net, fee) if choice % 2 else j.record_refunded(j.budget, 0)
        if job.state == State.RELEASED and job.bonus_amount is None:
            return lambda j: j.request_bonus(Decimal("0.8"), Decimal("0.96"), "5", Decimal("1.10"))
        if intent is not None and intent.step == Step.BONUS_FUND and job.bonus_amount is not None:
            b_fee, b_net, _ = self._split(job.bonus_amount)
            return lambda j: j.record_bonus_funded("esc_bonus", j.bonus_amount, b_fee, b_net)
        if intent is not None and intent.step == Step.BONUS_RELEASE and job.bonus_amount is not None:
            b_fee, b_net, b_ref = self._split(job.bonus_amount)
            return lambda j: j.record_bonus_awarded(b_net, b_fee, b_ref)
        return None

    @rule(choice=st.integers(0, 99))
    def progress(self, choice: int) -> None:
        command = self._next_valid(choice)
        if command is not None:
            self._do(command)

    # Two more entries for the same rule make progress likelier than any one invalid command.
    progress_again = rule(choice=st.integers(0, 99))(lambda self, choice: self.progress(choice))
    progress_once_more = rule(choice=st.integers(0, 99))(lambda self, choice: self.progress(choice))

    @rule()
    def repeat_last(self) -> None:
        """The same command again: an outcome is a no-op, anything else is refused or records anew."""
        if self.last is None:
            return
        version = self.job.version
        state = self.job.state
        self._do(self.last)
        if self.job.version == version:
            assert self.job.state == state

    def teardown(self) -> None:
        if hasattr(self, "job"):
            event(f"ended in {self.job.state}")
            if self.job.bonus_awarded is not None:
                event("bonus awarded")

    # ------------------------------------------------------------ invariants

    @invariant()
    def design_invariants_hold(self) -> None:
        assert self.job.violations() == []

    @invariant()
    def settled_money_never_changes(self) -> None:
        job = self.job
        for name in (
            "escrow_id",
            "funded_amount",
            "released",
            "refunded",
            "runpod_job_id",
            "bonus_awarded",
            "bonus_escrow_id",
        ):
            value = getattr(job, name)
            if name in self.settled:
                assert value == self.settled[name], f"{name} changed after it was settled"
            elif value is not None:
                self.settled[name] = value
        assert not (job.released and job.refunded)
        if job.state in (State.RELEASED, State.REFUNDED, State.REJECTED):
            assert job.intent is None or job.intent.step in (Step.BONUS_FUND, Step.BONUS_RELEASE)

    @invariant()
    def reloaded_from_sqlite_equals_memory(self) -> None:
        reloaded = STORE.get_job(self.job.id)
        assert _facts(reloaded) == _facts(self.job)


EscrowJobMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestEscrowJobLifecycle = EscrowJobMachine.TestCase
