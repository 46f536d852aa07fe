"""`Engine`: the async facade an agent runtime embeds.

    async with Engine.from_env() as engine:
        result = await engine.run_paid_job("endpoint-id", {"prompt": "..."}, budget="0.50", payee="ag_worker")

The engine opens jobs in the event store, carries out their intents through the processor, follows
the event log for intents written by other processes (tracking its position), and on start recovers
every job that an earlier engine left unfinished.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any, Self

from eventsourcing.utils import get_topic

from podsettle.adapters.ports import ComputeGateway, EscrowGateway
from podsettle.application import Settlements
from podsettle.batches import DEFAULT_CHUNK_SIZE, BatchStream, JobInputs, batch_job_key
from podsettle.bounties import Bounties, BountyResult, BudgetGuard, Pod, bounty_deadline
from podsettle.domain import EscrowJob
from podsettle.domain import acceptance as checks
from podsettle.domain.bounty import Bounty, Report
from podsettle.domain.digests import canonical_json
from podsettle.domain.errors import IllegalTransition, InvalidInput, JobNotFound
from podsettle.domain.escrow_job import (
    RESTING_EVENTS,
    Evaluation,
    JobMoney,
    JobView,
    check_id,
    job_json,
    reason_of,
)
from podsettle.domain.lifecycle import Status
from podsettle.domain.money import ZERO, fmt, to_money
from podsettle.domain.rules import BONUS_THRESHOLD, to_metric
from podsettle.processor import JobWatch, Processor, ProcessorConfig, release_processor_id
from podsettle.projections.follower import LogFollower, LogWakeup, Page, TrackedPosition
from podsettle.projections.rows import Totals as Totals  # the batch result's totals, re-exported
from podsettle.requests import JobRequest, build_request
from podsettle.settings import ConfigError, Settings
from podsettle.slots import Slot, slot_given_back
from podsettle.support.logs import configure_logging, get_logger
from podsettle.writer import JobWriter

log = get_logger("podsettle.engine")
FOLLOWER = "podsettle-intents"
INTENT_PAGE_SIZE = 1000  # intents read per follower tick
RECOVERY_PAGE_SIZE = 5000  # notifications read per page by the recovery scan (ids and topics only)
# Events after which a job has something to do; the follower drives the jobs they belong to.
INTENT_TOPICS = [
    get_topic(cls)
    for cls in (
        EscrowJob.FundingRequested,
        EscrowJob.StartRequested,
        EscrowJob.CancelRequested,
        EscrowJob.ReleaseRequested,
        EscrowJob.RefundRequested,
        EscrowJob.BonusRequested,
        EscrowJob.BonusFunded,
        EscrowJob.EvaluationRequested,
        EscrowJob.Resolved,
        EscrowJob.Started,
    )
]
# After these, a job rests (until an operator or a new command acts).
RESTING_TOPICS = frozenset(get_topic(cls) for cls in RESTING_EVENTS)
JOB_TOPIC_PREFIX = get_topic(EscrowJob) + "."
ATTEMPTED_TOPIC = get_topic(EscrowJob.Attempted)
# An attempt answered as having done nothing: the job is free to be claimed again at once.
NOTHING_DONE_TOPIC = get_topic(EscrowJob.NothingDone)
# What the engine's follower reads: intents (to drive), claims (whose, to wait for them rather than
# poll) and resting events (to wake the tasks waiting for another engine's job).
FOLLOW_TOPICS = [*INTENT_TOPICS, ATTEMPTED_TOPIC, NOTHING_DONE_TOPIC, *sorted(RESTING_TOPICS)]
# With a wake-up from the store (PostgreSQL's LISTEN/NOTIFY), the follower still pulls at least this
# often: a notification that never arrives costs this much latency, never an event.
PULL_FALLBACK_S = 2.0
# Reads woken by notifications are this far apart at least (many saves, one read).
WAKE_COALESCE_S = 0.02
TRACK_EVERY_S = 1.0  # the follower's position is written at most this often (re-reading is harmless)


class PayerMismatch(ConfigError):
    """The configured payer is not the agent the escrow key belongs to (or the log's jobs were opened
    under another payer than this engine's): nothing is funded under a name the service would not
    charge. The message names both agents."""


REFUND_BY_DISPUTE_WARNING = (
    "refunds are asked for by dispute: the published Purple Flea service has no route that resolves "
    "a dispute, and its timeout sweep skips disputed escrows; the money comes back only if Purple "
    "Flea's staff act. The default, PODSETTLE_REFUND_METHOD=timeout, lets the sweep return it."
)


def refund_terms(method: str, *, cancel: bool) -> str:
    """How long a refund takes on the escrow service and what it costs, in one line for the user."""
    if cancel:
        return "a failed job's escrow is cancelled: the whole amount comes back at once"
    if method == "dispute":
        return "a failed job's escrow is disputed: " + REFUND_BY_DISPUTE_WARNING
    return (
        "a failed job's escrow comes back through the service's timeout sweep: after the escrow's "
        "timeout (the job's deadline plus an hour, rounded up to whole hours) and up to 5 minutes "
        "more, less the 1% commission, which the service keeps"
    )


@dataclass(frozen=True)
class JobResult:
    """A job as its caller sees it: its status (`Status`), and where its money is (`JobMoney`)."""

    job_id: uuid.UUID
    job_key: str
    batch_id: str | None
    status: Status
    state: str
    endpoint_id: str
    payer: str
    payee: str
    budget: Decimal
    escrow_id: str | None
    runpod_job_id: str | None
    output: Any
    money: JobMoney
    reason: str | None
    attention: dict[str, str] | None
    execution_ms: int | None
    view: JobView = field(repr=False, compare=False)

    @property
    def warnings(self) -> list[str]:
        """What the caller should know though the money is right (a referral code the service ignored)."""
        return self.view.warnings  # for `to_json`, built only when it is asked for

    # A metered job (`price_per_item`): the items its output delivered, as the log recorded them.
    items: int | None = None
    retry_of: str | None = None  # the key of the refunded job this one ran again
    # A job gated by `acceptance.evaluated_by`: its evaluator job's id, score and the decision.
    evaluation: Evaluation | None = None

    @property
    def paid(self) -> bool:
        return self.status == Status.PAID

    @classmethod
    def of(cls, view: JobView, output: Any = None) -> JobResult:
        return cls(
            job_id=view.job_id,
            job_key=view.job_key,
            batch_id=view.batch_id,
            status=view.status,
            state=str(view.state),
            endpoint_id=view.endpoint_id,
            payer=view.payer,
            payee=view.payee,
            budget=view.budget,
            escrow_id=view.escrow_id,
            runpod_job_id=view.runpod_job_id,
            output=output,
            money=view.money,
            reason=reason_of(view),
            attention=view.attention,
            execution_ms=view.execution_ms,
            view=view,
            items=None if view.metering is None else view.metering.items,
            retry_of=view.retry_of,
            evaluation=view.evaluation,
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data in the words of `status` and the totals; amounts as strings."""
        return {**job_json(self.view), "output": self.output}


def batch_totals(results: Iterable[JobResult]) -> Totals:
    """The totals of a batch's results: the read model's totals type, summed the same way."""
    totals = Totals()
    for result in results:
        totals.add_job(result.status, result.money, result.execution_ms)
    return totals


@dataclass(frozen=True)
class BatchResult:
    batch_id: str
    results: list[JobResult]
    totals: Totals

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "totals": self.totals.to_json(),
            "jobs": [r.to_json() for r in self.results],
        }


@dataclass(frozen=True)
class BonusResult:
    job_id: uuid.UUID
    bonus_gross: Decimal
    reason: str
    status: str  # "awarded", "none" (below threshold), or the job's: "attention", "in_flight"
    escrow_id: str | None = None
    bonus_net: Decimal = ZERO
    bonus_fees: Decimal = ZERO

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "status": self.status,
            "reason": self.reason,
            "escrow_id": self.escrow_id,
            "bonus_gross": fmt(self.bonus_gross),
            "bonus_fees": fmt(self.bonus_fees),
            "bonus_net": fmt(self.bonus_net),
        }


@dataclass
class FollowStats:
    """What the engine's log follower did: pages read, how many of them a store notification woke
    (PostgreSQL's LISTEN/NOTIFY), jobs of other engines it drove itself."""

    pages: int = 0
    woken: int = 0
    adopted: int = 0
    listening: bool = False


@dataclass
class EngineStats:
    longest_stall_s: float = 0.0
    recovered: int = 0


@dataclass(frozen=True)
class _Seen:
    """The last event of a job in a page the follower read: its version, topic, and for a claim
    (`Attempted`) written by another processor, that processor's id."""

    version: int
    topic: str
    claimer: str | None
    claimed_at: datetime | None = None


@dataclass
class _Closers:
    callbacks: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)


class EngineCore:
    """The engine's behaviour, built from its parts; `podsettle.Engine` (bootstrap.py) adds the wirings."""

    def __init__(
        self,
        settlements: Settlements,
        escrow: EscrowGateway,
        compute: ComputeGateway,
        *,
        payer: str,
        settings: Settings | None = None,
        processor: ProcessorConfig | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        follow_interval_s: float = 0.25,
        adopt_grace_s: float | None = None,
        recover_on_start: bool = True,
    ) -> None:
        self.app = settlements
        self.escrow = escrow
        self.compute = compute
        self.payer = check_id(payer, "payer") or payer
        self.settings = settings or Settings()
        # Recorded on every job this engine opens: the fee rule the service's figures follow, and
        # how a refund will be asked for, whichever engine later carries it out.
        self.dialect: str | None = getattr(escrow, "dialect", None)
        self.refund_method = "cancel" if escrow.capabilities.cancel else self.settings.refund_method
        self.clock = clock
        self.follow_interval_s = follow_interval_s
        self.recover_on_start = recover_on_start
        # Whether the engine follows the log for intents other processes wrote, and drives them (a
        # one-off command that acts on given jobs, such as `cancel`, must not work the others).
        self.follow_log = True
        self.stats = EngineStats()
        self.writer = JobWriter(settlements)
        self._checks: dict[str, checks.CustomCheck] = {}
        self.processor = Processor(
            self.writer,
            escrow,
            compute,
            config=processor or ProcessorConfig(processor_id=f"engine-{uuid.uuid4().hex[:8]}"),
            checks=self._checks,
            clock=clock,
        )
        self.processor.payer = self.payer
        # An intent another process wrote and nobody claimed is left to that process as a claim
        # would be, for a lease (default): it claims it when it gets to it (a chunk of its batch
        # opened ahead of the jobs it runs may wait a while for a slot there); driven here after.
        lease = self.processor.config.claim_lease_s
        self.adopt_grace_s = lease if adopt_grace_s is None else adopt_grace_s
        self.processor.evaluator = self._run_evaluator
        self.watch = JobWatch()
        self.processor.watch = self.watch
        self.processor.waiting = slot_given_back
        # Jobs this engine was asked to settle (opened or joined here, found by recovery): its log
        # follower leaves them to the tasks that settle them instead of driving them itself.
        self._wanted: set[uuid.UUID] = set()
        # Jobs of other engines whose claims the follower saw: driven here only when a claim lapses
        # (lease over, or its process gone). job id -> (version, claimer, lapses at: monotonic s).
        self._foreign: dict[uuid.UUID, tuple[int, str, float]] = {}
        self.pull_fallback_s = PULL_FALLBACK_S
        self.listener: LogWakeup | None = None  # the follower's wake-up, on PostgreSQL
        self.follow_stats = FollowStats()
        self.budget = BudgetGuard(settlements, self.payer, self.settings.payer_budget, self.writer.call)
        self.bounties = Bounties(
            settlements, escrow, compute, payer=self.payer, call=self.writer.call, clock=clock
        )
        self._driving: dict[uuid.UUID, asyncio.Task[JobView]] = {}
        self._background: list[asyncio.Task[Any]] = []
        self._closers = _Closers()
        self.sandbox_server: Any = None  # the in-process sandbox, when `Engine.sandbox` made this engine
        self._started = False
        self._closed = False

    def on_close(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        self._closers.callbacks.append(callback)

    def register_check(self, name: str, check: checks.CustomCheck) -> None:
        """Make a custom acceptance check available to jobs by name (`acceptance=checks.custom(name)`)."""
        self._checks[name] = check

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        configure_logging(self.settings.log_level)
        self.writer.start()
        try:
            await self._check_payer()
        except BaseException:
            self._started = False
            raise
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._measure_stalls(), name="podsettle-stalls"))
        position = 0
        if self.recover_on_start:
            position = await self._recover()
        if self.follow_log:
            self._background.append(loop.create_task(self._follow(position), name="podsettle-follower"))
        else:
            self.processor.watch = None  # nothing would wake its waiters: they read the store instead
        self._background.append(loop.create_task(self._watch_pending_refunds(), name="podsettle-refunds"))

    async def aclose(self) -> None:
        """Stop: jobs still in flight are left for the next engine's recovery; queued writes are saved."""
        if self._closed:
            return
        self._closed = True
        self.processor.closing = True
        tasks = [*self._background, *self._driving.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Calls that move money and were under way finish, and their outcomes are saved: cut off,
        # they would leave jobs whose escrow nobody can tell exists.
        await self.processor.finish_money_calls(self.settings.stop_grace_s)
        await self.writer.aclose()
        release_processor_id(self.processor.config.processor_id)
        self._log_work()
        for callback in reversed(self._closers.callbacks):
            result = callback()
            if result is not None:
                await result

    def _log_work(self) -> None:
        """What this engine did with the store and with other engines' claims, at close (`info`):
        where a batch shared by several engines spent its work."""
        writer, processor, follow = self.writer.stats, self.processor, self.follow_stats
        log.info(
            "engine.work",
            saves=writer.saves,
            commands=writer.commands,
            store_busy_s=round(writer.busy_s, 3),
            saving_s=round(writer.save_s, 3),
            jobs_read=writer.reads,
            bulk_reads=writer.bulk_reads,
            regroups=writer.regroups,
            fallbacks=writer.fallbacks,
            claims_lost=processor.claims_lost,
            claims_avoided=processor.claims_avoided,
            deferred=processor.deferred,
            claims_followed=processor.claims_followed,
            follower_pages=follow.pages,
            follower_woken=follow.woken,
            adopted=follow.adopted,
        )

    def abandon(self) -> None:
        """A simulated crash: stop at once without saving anything queued or closing connections."""
        self._closed = True
        for task in [*self._background, *self._driving.values()]:
            task.cancel()
        self.processor.abandon_money_calls()
        self.writer.abandon()
        release_processor_id(self.processor.config.processor_id)

    # ------------------------------------------------------------------ jobs

    def _spec(
        self,
        endpoint_id: str,
        job_input: Mapping[str, Any],
        budget: object,
        *,
        job_key: str,
        payee: str | None,
        referral: str | None,
        acceptance: Mapping[str, Any] | None,
        bonus_pool: object,
        batch_id: str | None,
        timeout_s: float | None,
        price_per_item: object = None,
        retry_of: str | None = None,
    ) -> JobRequest:
        """The caller's raw arguments as one validated request (nothing recorded or funded yet)."""
        return build_request(
            job_key=job_key,
            endpoint_id=endpoint_id,
            job_input=job_input,
            budget=budget,
            payer=self.payer,
            payee=self.settings.payee_for(endpoint_id, payee),
            now=self.clock(),
            timeout_s=self.settings.job_timeout_s if timeout_s is None else timeout_s,
            batch_id=batch_id,
            referral=referral,
            acceptance=acceptance,
            bonus_pool=bonus_pool,
            known_checks=self._checks,
            price_per_item=price_per_item,
            retry_of=retry_of,
            body_and_limit=self.compute.body_and_limit,
            escrow=self.escrow.capabilities,
            description=self.processor.config.description.format(endpoint_id=endpoint_id, job_key=job_key),
            dialect=self.dialect,
            refund_method=self.refund_method,
        )

    async def submit(
        self,
        endpoint_id: str,
        job_input: Mapping[str, Any],
        budget: object = "0.50",
        *,
        payee: str | None = None,
        referral: str | None = None,
        acceptance: Mapping[str, Any] | None = None,
        bonus_pool: object = None,
        job_key: str | None = None,
        timeout_s: float | None = None,
        price_per_item: object = None,
    ) -> uuid.UUID:
        """Open a job and start settling it in the background; returns its id.

        `price_per_item` meters the job: its output must be a list (a streaming endpoint's parts),
        and the release pays min(budget, len(output) x price), rounded down to the micro-USDC,
        returning the rest of the budget to the payer; an output that earns nothing is refunded.
        It needs an escrow that can release part of an escrow (the local ledger)."""
        spec = self._spec(
            endpoint_id,
            job_input,
            budget,
            job_key=job_key or f"job-{uuid.uuid4().hex}",
            payee=payee,
            referral=referral,
            acceptance=acceptance,
            bonus_pool=bonus_pool,
            batch_id=None,
            timeout_s=timeout_s,
            price_per_item=price_per_item,
        )
        await self.start()
        (job_id,) = await self._open([spec])
        self._drive(job_id)
        return job_id

    def _opened(self, job_key: str) -> bool:
        """Whether a job of this key is in the log already (a blocking store call)."""
        try:
            self.app.find_job(job_key)
        except JobNotFound:
            return False
        return True

    async def _open(self, specs: list[JobRequest]) -> list[uuid.UUID]:
        """Open jobs, refused (`BudgetExceeded`) when the new ones would pass the payer's budget."""
        ids = await self._open_jobs(specs)
        self._wanted.update(ids)
        return ids

    async def _open_jobs(self, specs: list[JobRequest]) -> list[uuid.UUID]:
        if self.budget.budget is None:
            return await self.writer.open(specs)

        def new_ones() -> list[JobRequest]:
            fresh = []
            for spec in specs:
                try:
                    self.app.find_job(spec.job_key)
                except JobNotFound:
                    fresh.append(spec)
            return fresh

        fresh: list[JobRequest] = await self.writer.call(new_ones)
        asked = sum((spec.budget for spec in fresh), ZERO)
        ids: list[uuid.UUID] = await self.budget.admit(
            asked, lambda: self.writer.open(specs), new=bool(fresh)
        )
        return ids

    async def run_paid_job(
        self,
        endpoint_id: str,
        job_input: Mapping[str, Any],
        budget: object = "0.50",
        *,
        payee: str | None = None,
        referral: str | None = None,
        acceptance: Mapping[str, Any] | None = None,
        bonus_pool: object = None,
        job_key: str | None = None,
        timeout_s: float | None = None,
        price_per_item: object = None,
    ) -> JobResult:
        """Fund an escrow, run the job on RunPod, and release on success or refund on failure.

        Returns when the job rests: paid, refunded, rejected (nothing funded), attention (an operator
        must look), or refunding (the escrow service returns the money on its own schedule).
        Passing the same `job_key` again returns the same job instead of paying twice.
        With `price_per_item` the job is paid by what it delivered (see `submit`).
        """
        job_id = await self.submit(
            endpoint_id,
            job_input,
            budget,
            payee=payee,
            referral=referral,
            acceptance=acceptance,
            bonus_pool=bonus_pool,
            job_key=job_key,
            timeout_s=timeout_s,
            price_per_item=price_per_item,
        )
        return await self.wait(job_id)

    def stream_batch(
        self,
        endpoint_id: str,
        jobs: JobInputs,
        per_job_budget: object = "0.25",
        *,
        payee: str | None = None,
        referral: str | None = None,
        acceptance: Mapping[str, Any] | None = None,
        bonus_pool: object = None,
        concurrency: int | None = None,
        batch_id: str | None = None,
        timeout_s: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        on_result: Callable[[JobResult], None] | None = None,
    ) -> BatchStream:
        """A batch of any size, settled in flat memory: `async for result in stream` gives each job's
        result as it rests (in the order they rest), and `stream.totals` sums them as they come.

        `jobs` may be any iterable or async iterable of job inputs, read as they are needed. Jobs
        are opened `chunk_size` at a time, each chunk in one atomic save, and at most `concurrency`
        run at once. A sized collection (a list, or anything with `len` that can be read twice) is
        validated whole first, and checked against the payer's balance, before anything is opened;
        a one-shot iterator is validated a chunk at a time, and a bad input stops the opening: the
        jobs opened before it settle, then the stream raises `BadBatchInput` (naming its index).
        Running the same `batch_id` again resumes the batch after the last chunk it opened (its
        opened jobs are driven, or just returned, not opened again). `on_result` is called as each
        job rests, before the stream yields it."""
        batch = batch_id or f"batch-{uuid.uuid4().hex[:12]}"
        check_id(batch, "batch_id")

        def build(index: int, job_input: Mapping[str, Any]) -> JobRequest:
            return self._spec(
                endpoint_id,
                job_input,
                per_job_budget,
                job_key=batch_job_key(batch, index),
                payee=payee,
                referral=referral,
                acceptance=acceptance,
                bonus_pool=bonus_pool,
                batch_id=batch,
                timeout_s=timeout_s,
            )

        return BatchStream(
            self,
            batch,
            jobs,
            build,
            concurrency=concurrency or self.settings.concurrency,
            chunk_size=chunk_size,
            on_result=on_result,
        )

    async def run_batch(
        self,
        endpoint_id: str,
        jobs: JobInputs,
        per_job_budget: object = "0.25",
        *,
        payee: str | None = None,
        referral: str | None = None,
        acceptance: Mapping[str, Any] | None = None,
        bonus_pool: object = None,
        concurrency: int | None = None,
        batch_id: str | None = None,
        timeout_s: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        on_result: Callable[[JobResult], None] | None = None,
    ) -> BatchResult:
        """Run a fleet of jobs in parallel and settle each; individual failures do not raise.

        `stream_batch`, with every result kept and returned in the batch's order: for a batch
        whose results fit in memory. Jobs are opened in chunks (each chunk whole or not at all), at
        most `concurrency` in flight. Re-running with the same `batch_id` resumes it.
        """
        stream = self.stream_batch(
            endpoint_id,
            jobs,
            per_job_budget,
            payee=payee,
            referral=referral,
            acceptance=acceptance,
            bonus_pool=bonus_pool,
            concurrency=concurrency,
            batch_id=batch_id,
            timeout_s=timeout_s,
            chunk_size=chunk_size,
            on_result=on_result,
        )
        results = [result async for result in stream]
        results.sort(key=lambda result: int(result.job_key.rsplit("-", 1)[1]))
        log.info("batch.settled", batch_id=stream.batch_id, **stream.totals.to_json())
        return BatchResult(stream.batch_id, results, stream.totals)

    async def wait(self, job_id: uuid.UUID | str) -> JobResult:
        """Drive the job (unless this engine already is) until it rests; its result."""
        uid = Settlements._uuid(job_id)
        await self.start()
        view = await self._drive(uid)
        return JobResult.of(view, self.processor.outputs.by_job.pop(uid, None))

    async def job(self, job_id: uuid.UUID | str) -> JobResult:
        """The job as the log has it now (no waiting)."""
        view = await self.writer.view(Settlements._uuid(job_id))
        return JobResult.of(view, self.processor.outputs.by_job.get(view.job_id))

    async def cancel(self, job_id: uuid.UUID | str, reason: str = "cancelled by the caller") -> JobResult:
        """Cancel a running job on RunPod, then refund its escrow."""
        uid = Settlements._uuid(job_id)
        await self.start()
        await self.writer.execute(uid, lambda job: job.request_cancel(reason))
        self.processor.interrupt_wait(uid)
        return await self.wait(uid)

    async def retry(
        self,
        job_id: uuid.UUID | str,
        endpoint_id: str | None = None,
        *,
        payee: str | None = None,
        timeout_s: float | None = None,
    ) -> JobResult:
        """Run a refunded (or rejected) job again as a new paid job, linked to it (`retry_of`).

        The new job has the first one's input, budget, acceptance check, pricing, referral and batch,
        its own escrow and its own fee, and runs on `endpoint_id` (default: the same endpoint). Its
        payee is `payee`, else the first job's on the same endpoint, else the endpoint's configured
        payee. Its key is the first one's with `:rN` (N the attempt, from 2): retrying the same job
        again returns that job instead of paying twice. Returns when the new job rests."""
        first = await self.writer.view(Settlements._uuid(job_id), fresh=True)
        if first.status not in (Status.REFUNDED, Status.REJECTED):
            raise IllegalTransition(
                first.job_id, first.state, "retry", "only a refunded or rejected job runs again"
            )
        target = endpoint_id or first.endpoint_id
        job_input = await self.writer.job_input(first.job_key)
        if job_input is None:
            raise InvalidInput("job_id", f"the input of {first.job_key!r} is not in the store")
        if payee is None and target == first.endpoint_id:
            payee = first.payee
        spec = self._spec(
            target,
            job_input,
            first.budget,
            job_key=retry_key(first.job_key),
            payee=payee,
            referral=first.referral,
            acceptance=first.acceptance,
            bonus_pool=None,
            batch_id=first.batch_id,
            timeout_s=timeout_s,
            price_per_item=first.price_per_item,
            retry_of=first.job_key,
        )
        await self.start()
        (retry_id,) = await self.writer.open([spec])
        return await self.wait(retry_id)

    async def _run_evaluator(self, view: JobView) -> JobView:
        """The evaluator job of a job gated by `acceptance.evaluated_by`: opened under this engine's
        payer (the buyer pays the evaluation, out of its own escrow with its own fee), keyed by the
        evaluated job's key so that opening it again finds it, and driven until it rests."""
        rule = view.acceptance
        metric = str(rule["metric"])
        assert view.output_digest is not None  # evaluation is requested only after a completion
        spec = self._spec(
            str(rule["endpoint"]),
            checks.evaluator_input(view.job_key, view.output_digest, view.metrics, metric),
            rule["budget"],
            job_key=checks.evaluator_key(view.job_key),
            payee=None,
            referral=None,
            acceptance=checks.evaluator_acceptance(metric),
            bonus_pool=None,
            batch_id=view.batch_id,
            timeout_s=None,
        )
        (evaluator_id,) = await self._open([spec])
        return await self._drive(evaluator_id)

    async def award_bonus(
        self,
        job_id: uuid.UUID | str,
        base_metric: object,
        achieved_metric: object,
        pool: object = "5",
        *,
        threshold: object = BONUS_THRESHOLD,
    ) -> BonusResult:
        """The product page's performance bonus on a paid job: only when achieved >= 1.10 x baseline;
        min(pool x (achieved - baseline) / baseline, pool), funded and released once."""
        uid = Settlements._uuid(job_id)
        base = to_metric(_metric_text(base_metric), "base_metric")
        achieved = to_metric(_metric_text(achieved_metric), "achieved_metric")
        limit = to_metric(_metric_text(threshold), "threshold")
        pool_ = to_money(pool, "pool")
        await self.start()
        decision, _ = await self.writer.execute(
            uid, lambda job: job.request_bonus(base, achieved, pool_, limit)
        )
        if not decision.granted:
            return BonusResult(uid, ZERO, decision.reason, "none")
        view = await self._drive(uid)
        award = view.bonus_awarded
        if award is not None:
            return BonusResult(
                uid, award.amount, decision.reason, "awarded", view.bonus_escrow_id, award.to_payee, award.fee
            )
        status = Status.ATTENTION if view.status == Status.ATTENTION else Status.IN_FLIGHT
        return BonusResult(uid, decision.amount, decision.reason, status, view.bonus_escrow_id)

    # ------------------------------------------------------------------ bounties

    async def post_bounty(
        self,
        endpoint_id: str,
        amount: object,
        *,
        target: object,
        metric: str = "accuracy",
        deadline_s: float = 600,
        bounty_key: str | None = None,
    ) -> uuid.UUID:
        """Reserve `amount` for the first pod whose reported `metric` reaches `target` before the
        deadline (podsettle/bounties.py). The reservation is in the log and counts against the
        payer's budget until the bounty is paid or expires; nothing is funded yet. Posting the same
        `bounty_key` again finds the first bounty."""
        bounty = Bounty.post(
            bounty_key=bounty_key or f"bounty-{uuid.uuid4().hex[:12]}",
            payer=self.payer,
            endpoint_id=endpoint_id,
            amount=amount,
            metric=metric,
            target=_metric_text(target),
            deadline=bounty_deadline(self.clock(), deadline_s),
        )
        if bounty.amount < self.escrow.capabilities.min_amount:
            raise InvalidInput(
                "amount",
                f"{fmt(bounty.amount)} is below the escrow's minimum of "
                f"{fmt(self.escrow.capabilities.min_amount)} USDC",
            )
        await self.start()
        known = await self.writer.call(lambda: bounty.id in self.app.repository)
        bounty_id: uuid.UUID = await self.budget.admit(
            bounty.amount, lambda: self.bounties.post(bounty), new=not known
        )
        return bounty_id

    async def race_bounty(self, bounty_id: uuid.UUID | str, pods: Sequence[Pod]) -> BountyResult:
        """Run `pods` on the bounty's endpoint; the first to report the target is paid the bounty,
        the others are cancelled and not paid; with no winner by the deadline the bounty expires."""
        await self.start()
        payee = self.settings.payee_for((await self.bounties.load(_uid(bounty_id))).endpoint_id, None)
        return await self.bounties.race(_uid(bounty_id), pods, payee)

    async def claim_bounty(self, bounty_id: uuid.UUID | str, reports: Sequence[Report]) -> BountyResult:
        """Claim with reports that reached the target (earliest wins, a tie to the smaller RunPod
        job id) and pay the winner; a bounty already claimed keeps its winner and is paid once."""
        await self.start()
        return await self.bounties.claim(_uid(bounty_id), reports)

    async def bounty(self, bounty_id: uuid.UUID | str) -> BountyResult:
        """The bounty as the log has it now (no waiting)."""
        return BountyResult.of(await self.bounties.load(_uid(bounty_id)))

    async def run_unpaid(
        self, endpoint_id: str, job_input: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> Any:
        """The RunPod call a paid job makes (the same gateway, input bytes and streaming), with no
        escrow and nothing recorded: its output, or `RuntimeError` with RunPod's reason. What the
        engine's own cost per paid call is measured against (bench/billing_bench.py)."""
        check_id(endpoint_id, "endpoint_id")
        data = canonical_json(dict(job_input), "job_input")
        limit_s = self.settings.job_timeout_s if timeout_s is None else timeout_s
        run_id = await self.compute.submit(
            endpoint_id, data, execution_timeout_ms=int(limit_s * 1000), ttl_ms=int(limit_s * 1000) + 60_000
        )
        outcome = await self.compute.wait(endpoint_id, run_id, timeout_s=limit_s)
        if not outcome.succeeded:
            raise RuntimeError(f"RunPod job {run_id} on {endpoint_id}: {outcome.reason}")
        return outcome.state.output

    async def check_services(self, endpoint_id: str) -> None:
        """Fail fast, before anything is opened, when the escrow service or the endpoint cannot be
        reached (raises the gateway's error, e.g. `Unavailable`, `Unauthorized`, `NotFound`)."""
        await self.escrow.health()
        await self.compute.health(endpoint_id)

    async def resume(
        self,
        *,
        on_start: Callable[[int, str | None], None] | None = None,
        on_result: Callable[[JobResult], None] | None = None,
    ) -> list[JobResult]:
        """Finish every job that is not resting (the CLI's `resume`); their results. Refuses
        (`PayerMismatch`) when some were opened under another payer than this engine's: this key
        would pay for them under the wrong name. `on_start(jobs, waiting)` is told how many jobs
        there are and, when some are claimed by another engine, what the resume waits for;
        `on_result` is called as each job rests."""
        await self.start()
        ids, _ = await self.writer.call(self._unfinished_jobs)
        payers: list[str] = await self.writer.call(lambda: [self.app.get_job(i).payer for i in ids])
        others = sorted({payer for payer in payers if payer != self.payer})
        if others:
            count = sum(1 for payer in payers if payer != self.payer)
            raise PayerMismatch(
                f"{count} unfinished job(s) were opened under payer {', '.join(others)}, and this "
                f"engine pays as {self.payer} (PODSETTLE_PAYER and PF_API_KEY): resume them with that "
                "payer's key; nothing was done"
            )
        if on_start is not None:
            on_start(len(ids), await self._claims_waited_for(ids))

        async def one(job_id: uuid.UUID) -> JobResult:
            result = await self.wait(job_id)
            if on_result is not None:
                on_result(result)
            return result

        return list(await asyncio.gather(*(one(job_id) for job_id in ids)))

    async def _claims_waited_for(self, ids: Sequence[uuid.UUID]) -> str | None:
        """What a resume waits for: the live claims of other engines on these jobs, if any."""
        views = [await self.writer.view(job_id, fresh=True) for job_id in ids]
        held = [v.intent for v in views if v.intent is not None and self.processor.held_by_another(v.intent)]
        if not held:
            return None
        claimers = sorted({str(intent.claimed_by) for intent in held})
        lease = self.processor.config.claim_lease_s
        return (
            f"{len(held)} job(s) are claimed by another engine ({', '.join(claimers)}): waiting up to "
            f"{lease:g} s for those claims to lapse (PODSETTLE_CLAIM_LEASE_S); a process of this "
            "machine that has exited is not waited for"
        )

    async def _check_payer(self) -> None:
        """Before any money moves: the configured payer must be the agent the escrow key belongs to
        (learned once per key through a call that cannot fund anything, when the service has one)."""
        verify = getattr(self.escrow, "verify_payer", None)
        if verify is None or await verify(self.payer):
            return
        known: list[str] = await self.writer.call(self.app.payers)
        owner = None
        for agent in known:
            if agent != self.payer and await verify(agent):
                owner = agent
                break
        whose = f"to agent {owner}" if owner else "to another agent"
        raise PayerMismatch(
            f"PODSETTLE_PAYER is {self.payer}, but PF_API_KEY belongs {whose}: the service would charge "
            "that agent while the log named this one; nothing was funded"
        )

    def per_job_state(self) -> dict[str, int]:
        """How many entries the engine holds now in each of its per-job structures: all of them
        empty once every job rests, whatever the batch's size (the writer's `versions`, which let
        the log follower skip this engine's own events, are bounded by its cache size instead)."""
        return {
            "driving": len(self._driving),
            "outputs": len(self.processor.outputs.by_job),
            "run_waits": len(self.processor._waits),
            "fresh_claims": len(self.processor._fresh_claims),
            "pending_refunds": len(self.processor.pending_refunds),
            **self.writer.held(),
        }

    # ------------------------------------------------------------------ driving

    def _drive(self, job_id: uuid.UUID, *, fresh: bool = False) -> asyncio.Task[JobView]:
        task = self._driving.get(job_id)
        if task is None or task.done():
            drive = self.processor.drive(job_id, fresh=fresh)
            task = asyncio.get_running_loop().create_task(drive, name=f"job-{job_id}")
            self._driving[job_id] = task
            task.add_done_callback(lambda t, j=job_id: self._drive_done(j, t))  # type: ignore[misc]
        return task

    def _drive_done(self, job_id: uuid.UUID, task: asyncio.Task[JobView]) -> None:
        if self._driving.get(job_id) is task:
            del self._driving[job_id]
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("job.drive_failed", job_id=str(job_id), error=repr(task.exception()))
        elif task.result().rests:
            self._wanted.discard(job_id)
            self._foreign.pop(job_id, None)
            self.watch.forget(job_id)

    def _unfinished_jobs(self) -> tuple[list[uuid.UUID], int]:
        """Every job whose last event leaves it with something to do, and the log's last position.

        Reads topics and ids only (no decoding), in pages, keeping just the unfinished set."""
        last = self.app.recorder.max_notification_id() or 0
        unfinished: dict[uuid.UUID, None] = {}
        scan = LogFollower(self.app.recorder, page_size=RECOVERY_PAGE_SIZE)
        for page in scan.pages_after(0, stop=last):
            for notification in page.notifications:
                if not notification.topic.startswith(JOB_TOPIC_PREFIX):
                    continue
                originator = notification.originator_id
                job_id = originator if isinstance(originator, uuid.UUID) else uuid.UUID(str(originator))
                if notification.topic in RESTING_TOPICS:
                    unfinished.pop(job_id, None)
                else:
                    unfinished[job_id] = None
        return list(unfinished), last

    async def _recover(self) -> int:
        """Drive every job an earlier engine left unfinished (in the background)."""
        found: tuple[list[uuid.UUID], int] = await self.writer.call(self._unfinished_jobs)
        ids, last = found
        self.stats.recovered = len(ids)
        if ids:
            log.info("engine.recovering", jobs=len(ids))
            self._wanted.update(ids)
            loop = asyncio.get_running_loop()
            self._background.append(loop.create_task(self._recover_jobs(ids), name="podsettle-recovery"))
        return last

    async def _recover_jobs(self, ids: list[uuid.UUID]) -> None:
        """At most `concurrency` at once, a task for a job only while it is driven: a large log's
        unfinished jobs cost their ids, not a task each."""
        slots = asyncio.Semaphore(self.settings.concurrency)
        running: set[asyncio.Task[None]] = set()

        async def one(job_id: uuid.UUID, slot: Slot) -> None:
            # Its slot is given back while it waits for another engine's claim.
            slot.enter()
            try:
                await self._drive(job_id)
            except Exception:  # logged by `_drive_done`; the others go on
                pass
            finally:
                if slot.held:
                    slots.release()

        loop = asyncio.get_running_loop()
        try:
            # Newest first: the jobs another engine may be working through in log order are met
            # from the other end (as a batch joined from another process is walked).
            for job_id in reversed(ids):
                await slots.acquire()
                task = loop.create_task(one(job_id, Slot(slots, held=True)))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.wait(set(running))
        finally:
            for task in running:
                task.cancel()

    async def _follow(self, position: int) -> None:
        """Follow the log: drive intents written by other processes (an operator's resolution,
        another engine's jobs), wake the tasks waiting for jobs other engines hold (`JobWatch`), and
        take over claims that lapse; recording how far it has read.

        On PostgreSQL a LISTEN on the library's insert channel wakes it at each save (`LogWakeup`);
        it pulls anyway every `pull_fallback_s`, so a lost notification costs latency only. Other
        stores are pulled every `follow_interval_s`."""
        tracked: TrackedPosition = await self.writer.call(
            partial(TrackedPosition.open, self.app.factory, FOLLOWER)
        )
        position = max(position, await self.writer.call(tracked.get))
        follower = LogFollower(self.app.recorder, topics=FOLLOW_TOPICS, page_size=INTENT_PAGE_SIZE)
        wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        listener = LogWakeup.start(self.app.recorder, lambda: loop.call_soon_threadsafe(wakeup.set))
        self.follow_stats.listening = listener is not None
        self.listener = listener
        interval = self.follow_interval_s if listener is None else self.pull_fallback_s
        recorded_at = 0.0
        try:
            while True:
                wakeup.clear()
                more = False
                try:
                    read: tuple[Page, dict[uuid.UUID, _Seen]] = await self.writer.call(
                        partial(self._read_page, follower, position)
                    )
                    page, seen = read
                    self.follow_stats.pages += 1
                    self._take(seen)
                    more = page.more
                    if page.position > position:
                        position = page.position
                        if time.monotonic() - recorded_at >= TRACK_EVERY_S:
                            await self.writer.call(partial(tracked.record, position))
                            recorded_at = time.monotonic()
                    self._take_over_lapsed()
                except RuntimeError:
                    return  # the writer closed
                except Exception as error:  # keep following, or other writers' intents are stranded
                    log.error("engine.follow_failed", error=repr(error))
                    await asyncio.sleep(max(1.0, self.follow_interval_s))
                if more:
                    await asyncio.sleep(0)
                    continue
                # `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` can swallow a
                # cancellation that arrives as the wake-up does, and the engine would never close.
                try:
                    async with asyncio.timeout(self._next_wait(interval)):
                        await wakeup.wait()
                except TimeoutError:
                    continue
                self.follow_stats.woken += 1
                await asyncio.sleep(WAKE_COALESCE_S)
        finally:
            if listener is not None:
                await asyncio.to_thread(listener.stop)

    def _next_wait(self, interval: float) -> float:
        """Until the next pull: the interval, or sooner when a claim seen in the log lapses."""
        if not self._foreign:
            return interval
        soonest = min(at for _, _, at in self._foreign.values()) - time.monotonic()
        return max(0.05, min(interval, soonest))

    def _read_page(self, follower: LogFollower, position: int) -> tuple[Page, dict[uuid.UUID, _Seen]]:
        """On the store thread: the next page, and each job's last event in it (a claim written by
        another processor decoded for its processor id; this engine's own events are not)."""
        page = follower.page_after(position)
        last: dict[uuid.UUID, Any] = {}
        for notification in page.notifications:
            originator = notification.originator_id
            job_id = originator if isinstance(originator, uuid.UUID) else uuid.UUID(str(originator))
            last[job_id] = notification
        seen: dict[uuid.UUID, _Seen] = {}
        for job_id, notification in last.items():
            version, claimer, claimed_at = notification.originator_version, None, None
            if notification.topic == ATTEMPTED_TOPIC and not self._knows(job_id, version):
                event: Any = self.app.mapper.to_domain_event(notification)
                claimer, claimed_at = str(event.processor), event.at
            seen[job_id] = _Seen(version, notification.topic, claimer, claimed_at)
        return page, seen

    def _take(self, seen: Mapping[uuid.UUID, _Seen]) -> None:
        """Act on a page: wake waiters (many jobs at once), note other engines' claims, and drive
        what nobody here is settling and no live claim covers."""
        me = self.processor.config.processor_id
        for job_id, last in seen.items():
            claim = None
            if last.claimer is not None and last.claimed_at is not None:
                claim = (last.claimer, last.claimed_at)
            self.watch.seen(job_id, last.version, claim)
            self._foreign.pop(job_id, None)
            if last.topic in RESTING_TOPICS or job_id in self._driving or job_id in self._wanted:
                continue
            if last.topic == NOTHING_DONE_TOPIC:
                continue  # its processor tries again (waiters were woken); not adopted to race it
            if self._knows(job_id, last.version):
                continue  # written by this engine
            if last.claimer is not None and last.claimer != me:
                lapses = time.monotonic() + self.processor.config.claim_lease_s
                self._foreign[job_id] = (last.version, last.claimer, lapses)
                continue
            # Written by another process and claimed by nobody yet: most likely the engine that wrote
            # it (opening a chunk of a batch, recording an outcome) claims it in a moment. It is
            # driven here if it is still unclaimed after `adopt_grace_s` (`_take_over_lapsed`).
            self._foreign[job_id] = (last.version, "", time.monotonic() + self.adopt_grace_s)

    def _take_over_lapsed(self) -> None:
        """Drive the jobs of other engines whose claims lapsed (lease over, or their process gone)
        with nothing newer in the log: the drive confirms or redoes the attempt (DESIGN.md)."""
        if not self._foreign:
            return
        now, gone = time.monotonic(), {"": False}  # "": an intent nobody has claimed
        for job_id, (version, claimer, lapses) in list(self._foreign.items()):
            if claimer not in gone:
                gone[claimer] = self.processor.config.claimer_gone(claimer)
            if now < lapses and not gone[claimer]:
                continue
            del self._foreign[job_id]
            if self.watch.latest(job_id) > version or job_id in self._driving or job_id in self._wanted:
                continue
            self.follow_stats.adopted += 1
            self._drive(job_id, fresh=True)

    def _knows(self, job_id: uuid.UUID, version: int) -> bool:
        return self.writer.known_version(job_id) >= version

    async def _watch_pending_refunds(self) -> None:
        """Refunds the escrow service makes on its own schedule (v1): look at them now and then."""
        while True:
            await asyncio.sleep(self.processor.config.pending_refund_poll_s)
            for job_id in list(self.processor.pending_refunds):
                if job_id not in self._driving:
                    self._drive(job_id)

    async def _measure_stalls(self, interval: float = 0.005) -> None:
        """The longest time the event loop was blocked (store calls must not stall it)."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            stall = loop.time() - before - interval
            self.stats.longest_stall_s = max(self.stats.longest_stall_s, stall)


def _uid(value: uuid.UUID | str) -> uuid.UUID:
    return Settlements._uuid(value)


_RETRY_KEY = re.compile(r"^(?P<base>.+):r(?P<attempt>[0-9]+)$")


def retry_key(job_key: str) -> str:
    """The key of the job that runs `job_key` again: `KEY:r2` for a first job, `KEY:r3` after it."""
    found = _RETRY_KEY.match(job_key)
    if found is None:
        return f"{job_key}:r2"
    return f"{found['base']}:r{int(found['attempt']) + 1}"


def _metric_text(value: object) -> object:
    """Metrics often arrive as Python floats (0.92): read them by their shortest decimal text."""
    if isinstance(value, float):
        return repr(value)
    return value
