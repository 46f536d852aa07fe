"""The processors: they carry out the intents the EscrowJob aggregate records.

For every effect the shape is the same: take the intent, record the attempt (the claim), call the
port, record the outcome through a command. The aggregate decides what comes next; a processor only
decides how to read what the gateway answered. An attempt found without an outcome (after a crash)
is confirmed through the gateway where it can be; a money call whose outcome cannot be known is
parked in ATTENTION with what is known. Compute may run twice; money moves at most once.

One step waits on another job rather than a gateway: EVALUATE (`acceptance.evaluated_by`) has the
engine open the evaluator, a paid job of its own keyed by the evaluated job's key, and waits for it
to rest; its score decides release or refund. Opening it again (after a restart) finds the same job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import re
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from uuid import UUID

from podsettle.adapters.ports import (
    AmountMismatch,
    BadResponse,
    ComputeGateway,
    Conflict,
    EscrowGateway,
    EscrowPending,
    EscrowStatus,
    EscrowView,
    Forbidden,
    GatewayError,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    RunOutcome,
    RunStatus,
    Settlement,
    Unauthorized,
    Unavailable,
)
from podsettle.domain import EscrowJob, State, Step
from podsettle.domain.acceptance import CustomCheck, evaluate
from podsettle.domain.digests import canonical_json, digest, digest_bytes
from podsettle.domain.errors import ClaimLost, DomainError, InvalidInput
from podsettle.domain.escrow_job import DEFAULT_REFUND_METHOD, Intent, JobView
from podsettle.domain.lifecycle import Status
from podsettle.domain.money import ZERO, Money, fmt
from podsettle.domain.rules import FeeSplit, escrow_timeout_hours, metered_payout, referral_fee, split
from podsettle.support import logs
from podsettle.support.logs import get_logger

log = get_logger("podsettle.processor")
Command = Callable[[EscrowJob], Any]
# Opens (or finds) the evaluator job of an evaluated job and drives it until it rests: the engine's.
Evaluator = Callable[[JobView], Awaitable[JobView]]
RUNPOD_TIMEOUT_SLACK_MS = 2000  # RunPod's executionTimeout runs this much past the engine's deadline


PROC = Path("/proc")
_LOCAL_ID = re.compile(
    r"^[^/]*/pid-(?P<pid>\d+)/start-(?P<start>\d+)/boot-(?P<boot>[0-9a-f-]+)/ns-(?P<ns>\d+)(/[^/]*)?$"
)


def _process_start(pid: int, proc: Path, *, running: bool = False) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or None.
    `running`: None as well for a process that has exited and waits for its parent to reap it (a
    zombie, state Z or X): it holds nothing any more, though its pid and start time remain."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if running and fields and fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _boot_and_namespace(proc: Path) -> tuple[str, str] | None:
    """This machine's boot id and this process's pid namespace, or None without /proc."""
    try:
        boot = (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
        namespace = os.readlink(proc / "self" / "ns" / "pid")
    except OSError:
        return None
    digits = "".join(c for c in namespace if c.isdigit())
    return (boot, digits) if boot and digits else None


@functools.cache
def _this_machine() -> tuple[str, str] | None:
    """`_boot_and_namespace` of the real /proc, read once: neither changes while a process runs."""
    return _boot_and_namespace(PROC)


def _here(proc: Path) -> tuple[str, str] | None:
    return _this_machine() if proc == PROC else _boot_and_namespace(proc)


# The ids `local_processor_id` gave to engines of this process that have not closed yet: a claim
# recorded under one of this process's ids that is not here was left by an engine that closed (or
# crashed in a test), and no live engine holds it.
_OPEN_HERE: set[str] = set()


# Claimers seen alive, and until when that is taken as still true (monotonic seconds).
_SEEN_ALIVE: dict[tuple[str, Path], float] = {}
ALIVE_FOR_S = 0.5


def local_processor_id(proc: Path = PROC) -> str:
    """The id this process records on its claims (`Attempted`): host, pid, the process's start time,
    the machine's boot id and the pid namespace, so that another process on this machine can tell
    for sure that the claimer has exited (a reused pid has another start time); plus a tag of its
    own, for two engines in one process. Without /proc: host, pid and the tag (never judged gone)."""
    host = socket.gethostname().replace("/", "-")[:32] or "host"
    tag = uuid.uuid4().hex[:8]
    pid = os.getpid()
    start = _process_start(pid, proc)
    found = _here(proc)
    if start is None or found is None:
        return f"{host}:{pid}:{tag}"
    boot, namespace = found
    processor_id = f"{host}/pid-{pid}/start-{start}/boot-{boot}/ns-{namespace}/{tag}"
    _OPEN_HERE.add(processor_id)
    return processor_id


def release_processor_id(processor_id: str) -> None:
    """The engine that used this id closed: its claims are no longer held by anyone alive."""
    _OPEN_HERE.discard(processor_id)


def process_gone(processor_id: str, proc: Path = PROC) -> bool:
    """True only when `processor_id` names a process of this machine and pid namespace (same boot id
    and namespace) that no longer runs: its pid is free, or taken by a process started at another
    time, or the process exited and is not reaped yet (a zombie: a parent that waits for its
    children one by one reaps it late); or an engine of this very process that has closed.
    Another machine, another namespace, no /proc or an id of another form: False (unsure)."""
    match = _LOCAL_ID.match(processor_id)
    if match is None:
        return False
    here = _here(proc)
    if here is None or here != (match["boot"], match["ns"]):
        return False
    pid, start = int(match["pid"]), int(match["start"])
    if proc == PROC and pid == os.getpid():
        # This very process: the claimer is gone when its engine has closed.
        return processor_id not in _OPEN_HERE
    key = (processor_id, proc)
    if _SEEN_ALIVE.get(key, 0.0) > time.monotonic():
        return False
    if _process_start(pid, proc, running=True) != start:
        _SEEN_ALIVE.pop(key, None)
        return True
    # Alive: not looked at again for a moment (waiters and the log follower ask often).
    _SEEN_ALIVE[key] = time.monotonic() + ALIVE_FOR_S
    if len(_SEEN_ALIVE) > 10_000:
        _SEEN_ALIVE.clear()
    return False


class RefundPending(Exception):
    """The escrow service will return the money on its own (dispute review, timeout sweep): the job
    stays REFUNDING and is looked at again later."""


class JobStore(Protocol):
    """What a processor needs from the store (the engine's writer implements it)."""

    async def execute(self, job_id: UUID, command: Command) -> tuple[Any, JobView]: ...

    async def claim(
        self, job_id: UUID, step: Step, processor: str, after: int, at: datetime
    ) -> tuple[int, JobView]: ...

    async def view(self, job_id: UUID, *, fresh: bool = False) -> JobView: ...

    async def job_input(self, job_key: str) -> dict[str, Any] | None: ...


@dataclass
class ProcessorConfig:
    processor_id: str = "engine"
    escrow_concurrency: int = 32
    compute_concurrency: int = 64
    retry_base_s: float = 0.05
    retry_cap_s: float = 5.0
    pending_refund_poll_s: float = 30.0
    # An attempt made by another processor is its to finish for this long (it may be alive and
    # waiting for an answer); after that it counts as abandoned and is confirmed or redone here.
    claim_lease_s: float = 30.0
    # Whether a claimer is a process of this machine that has exited: its claim is not waited for.
    claimer_gone: Callable[[str], bool] = process_gone
    # While waiting for another processor's claim, how often to look whether its claimer has exited
    # (no store read: `claimer_gone`); the wait otherwise ends when the log shows the job changed.
    claimer_check_s: float = 1.0
    # How long `drive` waits for a refund the service makes on its own (v1: dispute review, timeout
    # sweep) before it returns the job as "refunding" and leaves it to the background watcher.
    refund_wait_s: float = 0.0
    description: str = "RunPod job {endpoint_id} ({job_key})"
    # A job is funded only while at least this much is left before its deadline: less, and the start
    # would be refused (RunPod takes no executionTimeout under 5 s) after the fee is already spent.
    # Jobs queued behind the escrow's create limit (20/min) reach the FUND step late.
    min_start_window_s: float = 5.0
    seed: int | None = None


@dataclass
class Outputs:
    """Outputs of finished runs, kept in memory for the caller (the log keeps only digests)."""

    by_job: dict[UUID, Any] = field(default_factory=dict)


def _no_slot() -> contextlib.AbstractAsyncContextManager[None]:
    return contextlib.nullcontext()


class SeenClaim(NamedTuple):
    """A claim (`Attempted`) another processor wrote, as the log follower read it."""

    version: int
    processor: str
    at: datetime


class JobWatch:
    """What a log follower has seen of each job, and the tasks waiting for a job to change.

    A processor that finds a job claimed by another (live) processor does not poll the store for
    it: it waits here until the engine's log follower reads a newer event of that job (`seen`, called
    for every notification of a page, many jobs at once), then reads the job once. Waiters register
    the version they last read; an event the follower saw before the waiter registered still wakes it
    (`latest` is kept for recently seen jobs)."""

    def __init__(self, remember: int = 100_000) -> None:
        self.remember = remember
        self._latest: OrderedDict[UUID, int] = OrderedDict()
        # For jobs whose newest event read is another processor's claim: that claim (a waiter for
        # the job then waits on without reading the store).
        self._claims: dict[UUID, SeenClaim] = {}
        self._waiters: dict[UUID, list[tuple[int, asyncio.Future[None]]]] = {}
        self.wakes = 0  # waiters woken by an event the follower read
        self.timeouts = 0  # waits that ended without one (a lease to check, a claimer to look at)

    def latest(self, job_id: UUID) -> int:
        """The newest version of the job the follower has read (0 if none is remembered)."""
        return self._latest.get(job_id, 0)

    def seen(self, job_id: UUID, version: int, claim: tuple[str, datetime] | None = None) -> None:
        """The follower read an event of the job at `version` (with `claim`, the processor and time
        of an `Attempted` another processor wrote): wake whoever waits for an older one."""
        if version > self._latest.get(job_id, 0):
            self._latest[job_id] = version
            self._latest.move_to_end(job_id)
            if claim is None:
                self._claims.pop(job_id, None)
            else:
                self._claims[job_id] = SeenClaim(version, *claim)
            while len(self._latest) > self.remember:
                self._claims.pop(self._latest.popitem(last=False)[0], None)
        waiting = self._waiters.get(job_id)
        if not waiting:
            return
        kept = []
        for after, future in waiting:
            if version > after:
                if not future.done():
                    future.set_result(None)
                    self.wakes += 1
            else:
                kept.append((after, future))
        if kept:
            self._waiters[job_id] = kept
        else:
            del self._waiters[job_id]

    def claim(self, job_id: UUID) -> SeenClaim | None:
        """Another processor's claim, when that is the newest event of the job the follower read."""
        return self._claims.get(job_id)

    def forget(self, job_id: UUID) -> None:
        """The job rests: nothing will wait for it again (keeps `latest` small)."""
        self._latest.pop(job_id, None)
        self._claims.pop(job_id, None)

    async def changed(self, job_id: UUID, after: int, within_s: float) -> bool:
        """Wait until the follower reads an event of the job newer than version `after`, at most
        `within_s` seconds; True when one was read."""
        if self._latest.get(job_id, 0) > after:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append((after, future))
        try:
            async with asyncio.timeout(max(within_s, 0.0)):  # not wait_for: it can swallow a cancel
                await future
            return True
        except TimeoutError:
            self.timeouts += 1
            return False
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                waiting[:] = [(v, f) for v, f in waiting if f is not future]
                if not waiting:
                    del self._waiters[job_id]

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())


class Processor:
    def __init__(
        self,
        store: JobStore,
        escrow: EscrowGateway,
        compute: ComputeGateway,
        *,
        config: ProcessorConfig | None = None,
        checks: dict[str, CustomCheck] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.escrow = escrow
        self.compute = compute
        self.config = config or ProcessorConfig()
        self.checks = checks if checks is not None else {}  # shared: checks registered later count
        self.clock = clock
        self.sleep = sleep
        self.outputs = Outputs()
        self._escrow_slots = asyncio.Semaphore(self.config.escrow_concurrency)
        self._compute_slots = asyncio.Semaphore(self.config.compute_concurrency)
        self._random = random.Random(self.config.seed)
        self._waits: dict[UUID, asyncio.Future[RunOutcome]] = {}
        self.pending_refunds: set[UUID] = set()
        # The agent this processor's escrow key pays as (set by the engine): jobs opened under another
        # payer are left alone, for an engine holding that payer's key.
        self.payer: str | None = None
        # Runs the evaluator job of a job gated by `acceptance.evaluated_by` (set by the engine).
        self.evaluator: Evaluator | None = None
        # Set by the engine: what its log follower has seen of each job (waits on other processors'
        # claims are woken by it), and how a waiting job gives its concurrency slot back meanwhile.
        self.watch: JobWatch | None = None
        self.waiting: Callable[[], contextlib.AbstractAsyncContextManager[None]] = _no_slot
        self.claims_lost = 0  # races for an intent that another processor won
        self.claims_avoided = 0  # claims not tried: the log showed the job had changed (re-read first)
        self.deferred = 0  # times this processor left an intent to the processor holding its claim
        self.claims_followed = 0  # newer claims of a held job waited on without reading the store
        # Attempts this processor claimed together with the outcome before them, not yet carried out.
        self._fresh_claims: dict[UUID, int] = {}
        # Calls that move money, with the recording of their outcomes: a stop lets them finish.
        self._money_calls: set[asyncio.Task[JobView]] = set()
        self._money_by_job: dict[UUID, asyncio.Task[JobView]] = {}
        # Set when the engine closes: an outcome recorded then claims no next intent (nobody here
        # would carry it out, and other engines would wait the lease for it).
        self.closing = False
        self._effects: dict[Step, Callable[[JobView, int], Awaitable[Command]]] = {
            Step.FUND: self._fund,
            Step.START: self._start,
            Step.CANCEL: self._cancel,
            Step.RELEASE: self._release,
            Step.REFUND: self._refund,
            Step.BONUS_FUND: self._bonus_fund,
            Step.BONUS_RELEASE: self._bonus_release,
            Step.EVALUATE: self._evaluate,
        }
        self._confirms: dict[Step, Callable[[JobView], Awaitable[Command | None]]] = {
            Step.FUND: self._confirm_fund,
            Step.START: self._confirm_redo,
            Step.CANCEL: self._confirm_redo,
            Step.RELEASE: self._confirm_release,
            Step.REFUND: self._confirm_refund,
            Step.BONUS_FUND: self._confirm_bonus_fund,
            Step.BONUS_RELEASE: self._confirm_bonus_release,
            Step.EVALUATE: self._confirm_redo,
        }

    # ------------------------------------------------------------------ driving a job

    async def drive(self, job_id: UUID, *, fresh: bool = False) -> JobView:
        """Carry out the job's intents until it rests (settled, rejected, or waiting for an operator).
        `fresh`: start from the store, not this engine's cache (another process wrote the job)."""
        view = await self._read_unless_held(job_id, fresh=fresh)
        if self.payer is not None and view.payer != self.payer and not view.rests:
            log.warning("job.other_payer", **self._ids(view), payer=view.payer, engine_payer=self.payer)
            return view
        waited_s = 0.0
        while not view.rests:
            if await self._money_call_in_flight(job_id):
                view = await self.store.view(job_id)
                continue
            intent = view.intent
            try:
                if intent is None:
                    if view.state != State.RUNNING:
                        return view  # nothing is wanted
                    view = await self._watch(view)
                elif intent.attempts == 0 or intent.answered:
                    if self.watch is not None and self.watch.latest(job_id) > view.version:
                        # The log has a newer event of this job (another processor's claim, most
                        # likely): wait for that claim, or read the job before claiming rather
                        # than lose the race in a save.
                        self.claims_avoided += 1
                        view = await self._read_unless_held(job_id, fresh=True)
                        continue
                    view = await self._execute(view, intent)
                elif self._fresh_claims.pop(job_id, None) == intent.attempts and (
                    intent.claimed_by == self.config.processor_id
                ):
                    view = await self._execute(view, intent, claimed=intent.attempts)
                elif self.held_by_another(intent):
                    self.deferred += 1
                    view = await self._wait_for_claim(
                        job_id, view.version, intent.claimed_by, intent.claimed_at
                    )
                else:
                    view = await self._recover(view, intent)
            except RefundPending:
                view = await self.store.view(job_id)
                if waited_s >= self.config.refund_wait_s:
                    self.pending_refunds.add(job_id)  # the engine looks again now and then
                    return view
                await self.sleep(self.config.pending_refund_poll_s)
                waited_s += self.config.pending_refund_poll_s
        self.pending_refunds.discard(job_id)
        return view

    def held_by_another(self, intent: Intent) -> bool:
        """Another processor's attempt that is still within its lease: that processor may be alive
        (unless it is a process of this machine known to have exited)."""
        claimer = intent.claimed_by
        if claimer in (None, self.config.processor_id) or intent.claimed_at is None or intent.answered:
            return False
        if (self.clock() - intent.claimed_at).total_seconds() >= self.config.claim_lease_s:
            return False
        if self.config.claimer_gone(claimer):
            log.info("claim.claimer_gone", processor=claimer)
            return False
        return True

    async def _read_unless_held(self, job_id: UUID, *, fresh: bool) -> JobView:
        """The job read from the store; or, when the log shows another processor holding it, the job
        as it is once that processor lets go (waited for without reading it first)."""
        held = self._held_in_log(job_id)
        if held is None:
            return await self.store.view(job_id, fresh=fresh)
        self.deferred += 1
        return await self._wait_for_claim(job_id, *held)

    def _held_in_log(self, job_id: UUID) -> SeenClaim | None:
        """Another processor's claim, when it is the newest event of the job the log follower read,
        within its lease and its claimer not known to have exited."""
        if self.watch is None:
            return None
        claim = self.watch.claim(job_id)
        if claim is None or claim.processor == self.config.processor_id:
            return None
        if (self.clock() - claim.at).total_seconds() >= self.config.claim_lease_s:
            return None
        if self.config.claimer_gone(claim.processor):
            return None
        return claim

    def interrupt_wait(self, job_id: UUID) -> None:
        """Stop waiting for the job's run (a cancel was requested): the drive loop re-reads the job."""
        task = self._waits.get(job_id)
        if task is not None:
            task.cancel()

    async def _execute(self, view: JobView, intent: Intent, *, claimed: int | None = None) -> JobView:
        """Claim the intent (unless `claimed` already), make the call, record the outcome. Calls that
        certainly had no effect (429, an unavailable compute service) are tried again as new attempts."""
        delay = self.config.retry_base_s
        while True:
            if claimed is not None:
                attempt, claimed = claimed, None
            else:
                ending, reserved = await self._before_claim(view, intent.step)
                if ending is not None:
                    return await self._record(view, ending)
                try:
                    seen = view.intent.attempts if view.intent is not None else 0
                    attempt, view = await self._claim(view, intent.step, seen, reserved)
                except ClaimLost:
                    self._unreserve(reserved)
                    self.claims_lost += 1
                    return await self._wait_for_other(view)
                except DomainError:
                    self._unreserve(reserved)
                    return await self.store.view(view.job_id)  # the intent changed meanwhile: re-read
            self._info("effect.attempt", view, step=str(intent.step), attempt=attempt)
            try:
                return await self._carry_out(view, intent.step, attempt)
            except RateLimited as error:
                await self.sleep(max(error.retry_after, delay))
            except Unavailable as error:
                # Nothing was sent (the service could not be reached), or a read failed: both safe
                # to try again. (A call whose outcome is unknown raises OutcomeUnknown instead.)
                log.warning("effect.retry", **self._ids(view), step=str(intent.step), error=str(error))
                await self.sleep(self._jitter(delay))
            except (OutcomeUnknown, BadResponse) as error:
                if intent.step.moves_money:
                    return await self._unknown(view, intent, error)
                log.warning("effect.retry", **self._ids(view), step=str(intent.step), error=str(error))
                await self.sleep(self._jitter(delay))
            delay = min(delay * 2, self.config.retry_cap_s)
            view = await self.store.view(view.job_id)
            if view.intent is None or view.intent.step != intent.step or view.rests:
                return view
            if view.deadline <= self.clock() and intent.step == Step.START:
                return await self._record(
                    view,
                    lambda job: job.record_failed(
                        "start", None, "RunPod could not be reached before the job's deadline"
                    ),
                )
            if view.deadline <= self.clock() and intent.step == Step.FUND and view.intent.attempts > 0:
                # Every attempt so far certainly did nothing (429, unreachable): give up, nothing funded.
                return await self._record(
                    view,
                    lambda job: job.record_funding_rejected(
                        "the escrow service could not be reached before the deadline"
                    ),
                )

    async def _claim(self, view: JobView, step: Step, seen: int, reserved: str | None) -> tuple[int, JobView]:
        """Record this processor's attempt. Cut off by a stop while the save runs, the attempt may
        be saved with no call behind it: for a money call it is then answered as having done
        nothing (the stop waits for that, as for a call under way), so that no engine has to ask
        the service about a call that was never made."""
        claiming = asyncio.ensure_future(
            self.store.claim(view.job_id, step, self.config.processor_id, seen, self.clock())
        )
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            self._unreserve(reserved)
            if step.moves_money:
                answer = asyncio.ensure_future(self._answer_unmade(claiming, view, step))
                self._money_calls.add(answer)
                answer.add_done_callback(self._money_calls.discard)
            raise

    async def _answer_unmade(
        self, claiming: asyncio.Future[tuple[int, JobView]], view: JobView, step: Step
    ) -> JobView:
        try:
            attempt, after = await claiming
        except Exception:  # the claim was not saved: nothing to answer
            return view
        await self._nothing_done(after, step, attempt, "stopped before the call was made")
        return after

    def _unreserve(self, reserved: str | None) -> None:
        """Give back the create slot reserved for the idempotency key `reserved` (if any)."""
        unreserve = getattr(self.escrow, "unreserve", None)
        if reserved is not None and unreserve is not None:
            unreserve("create", reserved)

    async def _before_claim(self, view: JobView, step: Step) -> tuple[Command | None, str | None]:
        """Wait, before claiming, for what a create needs and that sends nothing: its rate-limit slot
        (the published service allows 20 creates a minute). Waiting after the claim, a stop or a
        crash during the wait would leave an attempt whose outcome nobody can tell. A command that
        ends the job instead when no slot comes before its start window closes, and whether a slot
        was reserved (given back with `_unreserve` when the claim is not made)."""
        reserve = getattr(self.escrow, "reserve", None)
        if reserve is None or step not in (Step.FUND, Step.BONUS_FUND):
            return None, None
        within_s = None
        if step == Step.FUND:
            within_s = (view.deadline - self.clock()).total_seconds() - self.config.min_start_window_s
            if within_s <= 0:
                return None, None  # the create refuses it without a call (`_fund`)
        key = self._key(view)
        if await reserve("create", key, within_s, amount=self._create_amount(view, step)):
            return None, key
        reason = f"not funded: no escrow create could be sent within the {within_s:.1f} s left to start it"
        return (lambda job: job.record_funding_rejected(reason)), None

    async def _carry_out(self, view: JobView, step: Step, attempt: int) -> JobView:
        """Make the claimed call and record its outcome. A call that moves money is not cut off when
        the job's driver is cancelled (a stop, SIGINT or SIGTERM): cut off after it was sent, its
        outcome would be unknown, and the published service cannot be asked whether a create
        happened (the job would wait for an operator). It finishes in the background, its outcome is
        recorded, and `finish_money_calls` (the engine's close) waits for it."""
        if not step.moves_money:
            return await self._record(view, await self._effects[step](view, attempt))

        async def call_and_record() -> JobView:
            try:
                command = await self._effects[step](view, attempt)
            except (RateLimited, Unavailable) as error:
                # Certainly nothing happened: said in the log at once, so that an engine carrying
                # the job on after a stop or a crash makes a new attempt instead of asking about
                # this one (the published service cannot tell whether a create happened).
                await self._nothing_done(view, step, attempt, f"{type(error).__name__}: {error}")
                raise
            return await self._record(view, command)

        task = asyncio.get_running_loop().create_task(call_and_record(), name=f"money-{view.job_id}")
        self._money_calls.add(task)
        self._money_by_job[view.job_id] = task
        task.add_done_callback(partial(self._money_call_done, view.job_id))
        return await asyncio.shield(task)

    async def _money_call_in_flight(self, job_id: UUID) -> bool:
        """Wait for a call of this job that an earlier, cancelled drive left running (it finishes
        and records its outcome on its own); True when there was one. A drive must not confirm or
        redo an attempt whose call is still under way here."""
        task = self._money_by_job.get(job_id)
        if task is None or task.done():
            return False
        with contextlib.suppress(Exception):
            await asyncio.shield(task)
        return True

    async def _nothing_done(self, view: JobView, step: Step, attempt: int, reason: str) -> None:
        try:
            await self.store.execute(view.job_id, lambda job: job.record_nothing_done(step, attempt, reason))
        except DomainError as error:  # only informs: the next attempt is made either way
            log.warning("effect.nothing_done_not_recorded", **self._ids(view), error=str(error))

    def _money_call_done(self, job_id: UUID, task: asyncio.Task[JobView]) -> None:
        self._money_calls.discard(task)
        if self._money_by_job.get(job_id) is task:
            del self._money_by_job[job_id]
        if not task.cancelled() and task.exception() is not None:
            # The driver, if still there, handles it (a retry, a confirmation); after a stop the next
            # engine's recovery does, from the attempt in the log.
            log.debug("effect.finished_after_stop", error=repr(task.exception()))

    async def finish_money_calls(self, within_s: float) -> int:
        """Wait (up to `within_s`) for calls that move money to end and their outcomes to be recorded;
        those still running then are cancelled (their attempts stay in the log for recovery). The
        number cancelled."""
        pending = set(self._money_calls)
        if not pending:
            return 0
        log.info("engine.finishing_money_calls", calls=len(pending), within_s=within_s)
        _, late = await asyncio.wait(pending, timeout=within_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            log.warning("engine.money_calls_cut_off", calls=len(late))
        return len(late)

    def abandon_money_calls(self) -> None:
        """A simulated crash: the calls in flight end with the process."""
        for task in list(self._money_calls):
            task.cancel()

    async def _recover(self, view: JobView, intent: Intent) -> JobView:
        """An attempt without an outcome: confirm through the gateway, else redo or park."""
        try:
            command = await self._confirms[intent.step](view)
        except NotImplementedError:
            # The service cannot be asked (the seed dialect has no read route).
            command = self._unconfirmable(view, intent.step)
        except (Unavailable, RateLimited, OutcomeUnknown, BadResponse) as error:
            log.warning("effect.confirm_later", **self._ids(view), step=str(intent.step), error=str(error))
            await self.sleep(self._jitter(self.config.retry_cap_s))
            return await self.store.view(view.job_id)
        if command is None:
            return await self._execute(view, intent)  # known not to have happened, or safe to redo
        return await self._record(view, command)

    async def confirm(self, view: JobView) -> Command | None:
        """What the escrow service says became of the job's open intent, as the command recovery
        records (`reconcile --apply` records it the same way); None when it has not happened."""
        if view.intent is None:
            return None
        return await self._confirms[view.intent.step](view)

    def _unconfirmable(self, view: JobView, step: Step) -> Command | None:
        if step in (Step.RELEASE, Step.REFUND, Step.BONUS_RELEASE, Step.START, Step.CANCEL):
            return None  # these act on one escrow (or are compute): repeating them cannot move money twice
        return self._attention_command(step, "the escrow service cannot be asked what happened", {})

    async def _unknown(self, view: JobView, intent: Intent, error: GatewayError) -> JobView:
        """The call may or may not have moved money: the drive loop confirms it next (`_recover`)."""
        log.warning("effect.outcome_unknown", **self._ids(view), step=str(intent.step), error=str(error))
        return await self.store.view(view.job_id)

    async def _record(self, view: JobView, command: Command) -> JobView:
        """Record an outcome. When it opens the next intent (start after funding, release or refund
        after the run, the bonus release after its funding), claim that intent in the same save:
        the attempt is still recorded before its call, with one commit fewer. Creates are never
        claimed this way (their intents come from opening a job or granting a bonus)."""
        processor, now = self.config.processor_id, self.clock()

        def outcome_then_claim(job: EscrowJob) -> int | None:
            command(job)
            following = job.intent
            if following is None or following.attempts or job.state == State.ATTENTION or self.closing:
                return None
            return job.record_attempt(following.step, processor, after=0, at=now)

        try:
            claimed, after = await self.store.execute(view.job_id, outcome_then_claim)
        except DomainError as error:
            current = await self.store.view(view.job_id)
            if current.version != view.version or current.rests:
                return current  # another processor recorded an outcome first; ours is moot
            # Nobody else wrote, and the log refuses what the gateway reported: park it for an
            # operator with what is known, rather than guess (and rather than loop).
            log.error("effect.outcome_refused", **self._ids(view), error=str(error))
            if current.intent is None:
                return current
            return await self._park(current, current.intent.step, f"outcome refused by the log: {error}", {})
        self._info("effect.recorded", after, state=str(after.state))
        if claimed is not None:
            self._fresh_claims[view.job_id] = claimed
        return after

    async def _park(self, view: JobView, step: Step, reason: str, known: dict[str, str]) -> JobView:
        known = {"attempt": str(view.intent.attempts if view.intent else 0), **known}
        if view.intent is not None:
            known.setdefault("key", view.intent.key)
        log.error("effect.attention", **self._ids(view), step=str(step), reason=reason)
        _, after = await self.store.execute(view.job_id, lambda job: job.raise_attention(step, reason, known))
        return after

    async def _wait_for_other(self, view: JobView) -> JobView:
        """Another processor won the claim: read the job again (in the store: the other processor's
        writes are not in this engine's cache); the drive loop then waits for that claim. Without a
        log follower to wake it, give the other processor time first."""
        if self.watch is None:
            await self.sleep(self._jitter(self.config.retry_base_s * 4))
        return await self.store.view(view.job_id, fresh=True)

    async def _wait_for_claim(
        self, job_id: UUID, version: int, claimer: str | None, claimed_at: datetime | None
    ) -> JobView:
        """Another live processor holds the job's claim: wait, without reading the store, until the
        log follower reads a newer event of the job (`JobWatch`), the claim's lease runs out, or its
        claimer is seen to have exited; then read the job once. The job gives its concurrency slot
        back while it waits (`waiting`). Without a watch (a processor used on its own), poll."""
        if self.watch is None or claimed_at is None:
            await self.sleep(self._jitter(min(0.2, self.config.claim_lease_s / 4)))
            return await self.store.view(job_id, fresh=True)
        # The claim waited for (at `version`), then each newer claim the follower reads, as long as
        # the newest event is another processor's claim (it recorded an outcome and claimed the next
        # intent in one save): the store is read when the job rests, is free, or its claim lapsed.
        async with self.waiting():
            while True:
                held_s = (self.clock() - claimed_at).total_seconds()
                left_s = self.config.claim_lease_s - held_s
                if left_s <= 0:
                    break
                step_s = min(left_s, self.config.claimer_check_s)
                if await self.watch.changed(job_id, version, self._jitter(step_s)):
                    newer = self.watch.claim(job_id)
                    if newer is None or newer.processor == self.config.processor_id:
                        break
                    version, claimer, claimed_at = newer
                    self.claims_followed += 1
                    continue
                if claimer is not None and self.config.claimer_gone(claimer):
                    break
        return await self.store.view(job_id, fresh=True)

    # ------------------------------------------------------------------ escrow effects

    async def _fund(self, view: JobView, attempt: int) -> Command:
        try:
            async with self._escrow_slots:
                left_s = (view.deadline - self.clock()).total_seconds()
                if left_s < self.config.min_start_window_s:
                    reason = (
                        f"not funded: {max(left_s, 0.0):.1f} s left before the job's deadline, less than "
                        f"the {self.config.min_start_window_s:g} s a start needs"
                    )
                    return lambda job: job.record_funding_rejected(reason)
                receipt = await self.escrow.create(
                    key=self._key(view),
                    payee=view.payee,
                    amount=view.budget,
                    description=self.config.description.format(
                        endpoint_id=view.endpoint_id, job_key=view.job_key
                    ),
                    timeout_hours=escrow_timeout_hours(view.deadline, self.clock()),
                    referral=view.referral,
                    metadata={"job_id": str(view.job_id), "input_digest": view.input_digest},
                    # Queued behind the create limit past that, the job could no longer start.
                    send_within_s=left_s - self.config.min_start_window_s,
                )
        except Rejected as error:
            reason, code = f"escrow refused: {error}", error.status_code
            return lambda job: job.record_funding_rejected(reason, code)
        except (Unauthorized, Forbidden) as error:
            reason = f"escrow refused the payer's key ({type(error).__name__}): {error}"
            status = 401 if isinstance(error, Unauthorized) else 403
            return lambda job: job.record_funding_rejected(reason, status)
        except AmountMismatch as error:
            return self._attention_command(
                Step.FUND, f"escrow reported other amounts: {error}", error.reported
            )
        escrow_id, amount, fee, net = receipt.escrow_id, receipt.amount, receipt.fee, receipt.net
        # The create answer is checked before anything else moves (the start is recorded in the same
        # save as the funding): the service's figures are the facts, and only a difference that the
        # job's dialect's rule cannot explain, or another payer charged, waits for an operator.
        expected = split(view.budget, dialect=view.dialect)
        known = {
            "escrow_id": escrow_id,
            "amount": fmt(amount),
            "fee": fmt(fee),
            "net": fmt(net),
            "expected_fee": fmt(expected.fee),
            "expected_net": fmt(expected.net),
        }
        if (amount, fee, net) != (expected.amount, expected.fee, expected.net):
            return self._attention_command(
                Step.FUND,
                f"escrow {escrow_id} holds {fmt(amount)} with fee {fmt(fee)} / net {fmt(net)}; the "
                f"{view.dialect or 'exact'} rule gives {fmt(expected.amount)} with fee "
                f"{fmt(expected.fee)} / net {fmt(expected.net)}",
                known,
            )
        if receipt.payer is not None and receipt.payer != view.payer:
            return self._attention_command(
                Step.FUND,
                f"escrow {escrow_id} was charged to agent {receipt.payer}, not the job's payer {view.payer}",
                {**known, "creator_id": receipt.payer},
            )
        self._info("escrow.funded", view, escrow_id=escrow_id, amount=fmt(amount))
        return lambda job: job.record_funded(escrow_id, amount, fee, net)

    async def _confirm_fund(self, view: JobView) -> Command | None:
        return await self._confirm_create(view, Step.FUND)

    async def _confirm_create(self, view: JobView, step: Step) -> Command | None:
        """A create whose outcome is unknown: look it up by key, or repeat it where the service makes
        repeats safe; otherwise nobody can tell, and an operator must look."""
        caps = self.escrow.capabilities
        if caps.lookup_by_key:
            found = await self.escrow.find_by_key(self._key(view))
            if found is None:
                return None  # certainly not created: safe to create
            return self._created_command(view, step, found)
        if caps.idempotent_create:
            return None  # the same key gives the same escrow: repeating it is safe
        return self._attention_command(
            step,
            "escrow create may or may not have happened, and the escrow service offers no lookup by key",
            {"key": self._key(view), "payee": view.payee, "amount": fmt(self._create_amount(view, step))},
        )

    def _created_command(self, view: JobView, step: Step, found: EscrowView) -> Command:
        escrow_id, amount, fee, net = found.escrow_id, found.amount, found.fee, found.net
        if step == Step.FUND:
            return lambda job: job.record_funded(escrow_id, amount, fee, net)
        return lambda job: job.record_bonus_funded(escrow_id, amount, fee, net)

    async def _release(self, view: JobView, attempt: int) -> Command:
        assert view.escrow_id is not None and view.funded_amount is not None
        try:
            async with self._escrow_slots:
                settlement = await self.escrow.release(
                    view.escrow_id,
                    key=self._key(view),
                    # All of the escrow as funded, or what a metered job earned (the rest goes back).
                    expected=self._release_split(view),
                )
        except Conflict:
            command = await self._confirm_release(view)
            if command is None:
                return self._attention_command(
                    Step.RELEASE, "release refused (409) but the escrow is releasable", {}
                )
            return command
        except AmountMismatch as error:
            return self._attention_command(
                Step.RELEASE, f"release moved other amounts: {error}", error.reported
            )
        except (Unauthorized, Forbidden, NotFound, Rejected) as error:
            return self._attention_command(
                Step.RELEASE, f"release refused: {type(error).__name__}: {error}", {}
            )
        self._info("escrow.released", view, to_payee=fmt(settlement.to_payee))
        if view.referral and settlement.referral_fee == 0 and settlement.fee > 0:
            # Not a money problem (the fee is the same): the referrer was simply not paid.
            log.warning(
                "escrow.referral_ignored",
                **self._ids(view),
                referral=view.referral,
                detail="the escrow service paid no referral share: it matched no agent's referral code",
            )
        return self._settled_command(settlement)

    async def _confirm_release(self, view: JobView) -> Command | None:
        """Read the escrow: released -> record it; still funded -> release again (the service moves an
        escrow's money once, so a repeated release cannot pay twice); refunded -> the service took it
        back first."""
        assert view.escrow_id is not None
        escrow = await self.escrow.get(view.escrow_id)
        if (other := self._other_creator(view, escrow, Step.RELEASE)) is not None:
            return other
        if escrow.status == EscrowStatus.RELEASED:
            if view.metering is not None:
                # A partial release: the service reports the escrow's amounts, not what was posted.
                parts = split(Money(view.payout), dialect=view.dialect)
                referral = parts.referral_fee if view.referral else Decimal(0)
                paid, cut, back = parts.net, parts.fee, escrow.amount - parts.amount
                return lambda job: job.record_released(paid, cut, referral, back)
            # A read does not say what the referrer got: the rule's share when a code was given.
            referral = referral_fee(escrow.fee, view.dialect) if view.referral else Decimal(0)
            to_payee, fee = escrow.net, escrow.fee
            return lambda job: job.record_released(to_payee, fee, referral)
        if escrow.status in (EscrowStatus.FUNDED, EscrowStatus.COMPLETED):
            return None
        if escrow.status == EscrowStatus.REFUNDED:
            returned, kept = self._refund_amounts(view, escrow)
            return lambda job: job.record_refunded_by_service(
                returned, kept, "the escrow service refunded the escrow (timeout) before it was released"
            )
        return self._attention_command(Step.RELEASE, f"escrow is {escrow.status}; it cannot be released", {})

    async def _refund(self, view: JobView, attempt: int) -> Command:
        assert view.escrow_id is not None
        reason = view.failure.reason if view.failure else "job failed"
        try:
            async with self._escrow_slots:
                settlement = await self.escrow.refund(
                    view.escrow_id,
                    key=self._key(view),
                    reason=reason,
                    expected=self._recorded_split(view) if view.funded_amount is not None else None,
                    # The path chosen when the job opened, whatever this engine's default is.
                    method=view.refund_method or DEFAULT_REFUND_METHOD,
                )
        except EscrowPending as pending:
            self._info("escrow.refund_pending", view, status=pending.status)
            raise RefundPending(view.escrow_id) from pending
        except Conflict:
            command = await self._confirm_refund(view)
            if command is None:
                return self._attention_command(
                    Step.REFUND, "refund refused (409) but the escrow is funded", {}
                )
            return command
        except AmountMismatch as error:
            return self._attention_command(
                Step.REFUND, f"refund moved other amounts: {error}", error.reported
            )
        except (Unauthorized, Forbidden, NotFound, Rejected) as error:
            return self._attention_command(
                Step.REFUND, f"refund refused: {type(error).__name__}: {error}", {}
            )
        self._info("escrow.refunded", view, returned=fmt(settlement.returned))
        return self._settled_command(settlement)

    async def _confirm_refund(self, view: JobView) -> Command | None:
        assert view.escrow_id is not None
        escrow = await self.escrow.get(view.escrow_id)
        if (other := self._other_creator(view, escrow, Step.REFUND)) is not None:
            return other
        if escrow.status == EscrowStatus.REFUNDED:
            returned, kept = self._refund_amounts(view, escrow)
            return lambda job: job.record_refunded(returned, kept)
        if escrow.status in (EscrowStatus.FUNDED, EscrowStatus.COMPLETED):
            return None
        if escrow.status == EscrowStatus.DISPUTED:
            raise RefundPending(view.escrow_id)
        return self._attention_command(Step.REFUND, f"escrow is {escrow.status}; it cannot be refunded", {})

    def _refund_amounts(self, view: JobView, escrow: EscrowView) -> tuple[Decimal, Decimal]:
        """What came back: a service that can cancel returns everything; v1's refunds (dispute,
        timeout sweep) keep the commission."""
        amount = view.funded_amount or escrow.amount
        kept = Decimal(0) if self.escrow.capabilities.cancel else escrow.fee
        return amount - kept, kept

    async def _bonus_fund(self, view: JobView, attempt: int) -> Command:
        assert view.bonus_amount is not None
        try:
            async with self._escrow_slots:
                receipt = await self.escrow.create(
                    key=self._key(view),
                    payee=view.payee,
                    amount=view.bonus_amount,
                    description=f"Performance bonus for {view.job_key}",
                    timeout_hours=1,
                    referral=view.referral,
                    metadata={"job_id": str(view.job_id), "bonus": "true"},
                )
        except (Rejected, Unauthorized, Forbidden) as error:
            return self._attention_command(Step.BONUS_FUND, f"bonus escrow refused: {error}", {})
        except AmountMismatch as error:
            return self._attention_command(
                Step.BONUS_FUND, f"bonus escrow amounts differ: {error}", error.reported
            )
        escrow_id, amount, fee, net = receipt.escrow_id, receipt.amount, receipt.fee, receipt.net
        return lambda job: job.record_bonus_funded(escrow_id, amount, fee, net)

    async def _confirm_bonus_fund(self, view: JobView) -> Command | None:
        return await self._confirm_create(view, Step.BONUS_FUND)

    async def _bonus_release(self, view: JobView, attempt: int) -> Command:
        assert view.bonus_escrow_id is not None and view.bonus_funded is not None
        try:
            async with self._escrow_slots:
                settlement = await self.escrow.release(
                    view.bonus_escrow_id,
                    key=self._key(view),
                    # The bonus escrow holds exactly the granted amount (record_bonus_funded checks it).
                    expected=split(view.bonus_amount or ZERO, dialect=view.dialect),
                )
        except Conflict:
            command = await self._confirm_bonus_release(view)
            return command or self._attention_command(Step.BONUS_RELEASE, "bonus release refused (409)", {})
        except (AmountMismatch, Unauthorized, Forbidden, NotFound, Rejected) as error:
            return self._attention_command(Step.BONUS_RELEASE, f"bonus release refused: {error}", {})
        to_payee, fee, referral = settlement.to_payee, settlement.fee, settlement.referral_fee
        return lambda job: job.record_bonus_awarded(to_payee, fee, referral)

    async def _confirm_bonus_release(self, view: JobView) -> Command | None:
        assert view.bonus_escrow_id is not None
        escrow = await self.escrow.get(view.bonus_escrow_id)
        if escrow.status == EscrowStatus.RELEASED:
            referral = referral_fee(escrow.fee, view.dialect) if view.referral else Decimal(0)
            to_payee, fee = escrow.net, escrow.fee
            return lambda job: job.record_bonus_awarded(to_payee, fee, referral)
        if escrow.status in (EscrowStatus.FUNDED, EscrowStatus.COMPLETED):
            return None
        return self._attention_command(Step.BONUS_RELEASE, f"bonus escrow is {escrow.status}", {})

    @staticmethod
    def _settled_command(settlement: Settlement) -> Command:
        if settlement.status == EscrowStatus.RELEASED:
            to_payee, fee, referral, returned = (
                settlement.to_payee,
                settlement.fee,
                settlement.referral_fee,
                settlement.returned,
            )
            return lambda job: job.record_released(to_payee, fee, referral, returned)
        returned, kept = settlement.returned, settlement.fee
        return lambda job: job.record_refunded(returned, kept)

    # ------------------------------------------------------------------ the evaluation gate

    async def _evaluate(self, view: JobView, attempt: int) -> Command:
        """Run the evaluator job (open it, or find it after a restart) and record its verdict.

        Its score is read off the evaluator's recorded metrics, so a verdict needs nothing held in
        memory. An evaluator that was not paid (refunded, rejected, or being refunded) gave no score:
        the evaluated job is refunded too (no score, no release). One in ATTENTION parks this job."""
        if self.evaluator is None:
            return self._attention_command(Step.EVALUATE, "no engine is set to open the evaluator job", {})
        try:
            evaluator = await self.evaluator(view)
        except DomainError as error:  # the payer's budget, an endpoint without a payee, ...
            reason = f"the evaluator job could not be opened: {error}"
            return self._attention_command(Step.EVALUATE, reason, {})
        evaluator_id, status = str(evaluator.job_id), evaluator.status
        if status == Status.PAID:
            metric = str(view.acceptance.get("metric", "score"))
            score = evaluator.metrics.get(metric)
            if score is None:  # its own check requires the score: a release without it is an anomaly
                reason = f"evaluator job {evaluator.job_key} was paid without a {metric!r} score"
                return self._attention_command(Step.EVALUATE, reason, {"evaluator_job_id": evaluator_id})
            self._info("evaluation.scored", view, evaluator_job_id=evaluator_id, score=score)
            return lambda job: job.record_evaluated(evaluator_id, score)
        if status in (Status.REFUNDED, Status.REJECTED, Status.REFUNDING):
            why = evaluator.failure.reason if evaluator.failure else evaluator.rejection or str(status)
            reason = f"the evaluator job {evaluator.job_key} gave no score ({status}: {why})"
            return lambda job: job.record_evaluated(evaluator_id, None, reason)
        if status == Status.ATTENTION:
            reason = f"the evaluator job {evaluator.job_key} waits for an operator"
            return self._attention_command(Step.EVALUATE, reason, {"evaluator_job_id": evaluator_id})
        # Still in flight (driven by another engine): look again after a pause, as a new attempt.
        raise Unavailable(f"the evaluator job {evaluator.job_key} is still {evaluator.state}")

    # ------------------------------------------------------------------ compute effects

    async def _start(self, view: JobView, attempt: int) -> Command:
        job_input = await self.store.job_input(view.job_key)
        if job_input is None:
            return lambda job: job.record_failed("start", None, "the job's input is not in the store")
        try:
            input_bytes = canonical_json(job_input, "job_input")
        except InvalidInput as error:
            problem = f"the job's stored input is not JSON: {error}"
            return lambda job: job.record_failed("start", None, problem)
        # The bytes sent are the bytes the digest was opened with: never run (and pay for) other work.
        if digest_bytes(input_bytes) != view.input_digest:
            return lambda job: job.record_failed(
                "start", None, "the job's input does not match the digest it was opened with"
            )
        remaining_ms = int((view.deadline - self.clock()).total_seconds() * 1000)
        if remaining_ms < 5000:
            return lambda job: job.record_failed(
                "start", None, "less than 5 s left before the job's deadline"
            )
        try:
            async with self._compute_slots:
                run_id = await self.compute.submit(
                    view.endpoint_id,
                    input_bytes,
                    # RunPod's own limit a little after the engine's deadline: at the deadline the
                    # engine cancels and refunds, and RunPod's limit only stops a job that an engine
                    # which died can no longer cancel.
                    execution_timeout_ms=remaining_ms + RUNPOD_TIMEOUT_SLACK_MS,
                    ttl_ms=max(remaining_ms + 60_000, 10_000),
                )
        except (Rejected, Unauthorized, Forbidden, NotFound) as error:
            reason = f"RunPod refused the job: {type(error).__name__}: {error}"
            return lambda job: job.record_failed("start", None, reason)
        except OutcomeUnknown as error:
            raise Unavailable(f"submit outcome unknown ({error}); submitting again") from error
        self._info("runpod.started", view, runpod_job_id=run_id, attempt=attempt)
        # A submission through /runsync may have brought the run's end with its id: then the start
        # and the outcome are recorded in one save (one commit less, and no moment at which the log
        # says "running" while the result is only in this process's memory).
        take_finished = getattr(self.compute, "take_finished", None)
        outcome: RunOutcome | None = take_finished(view.endpoint_id, run_id) if take_finished else None
        if outcome is None or self.clock() >= view.deadline:
            # Without a result, or past the deadline (which `_watch` enforces, as for any run).
            return lambda job: job.record_started(run_id)
        then = self._outcome_command(view, outcome)

        def started_and_ended(job: EscrowJob) -> None:
            job.record_started(run_id)
            then(job)

        return started_and_ended

    async def _confirm_redo(self, view: JobView) -> Command | None:
        """Compute may run twice: an unconfirmed start or cancel is simply done again."""
        return None

    async def _watch(self, view: JobView) -> JobView:
        """Wait for a running job to end, then record whether it really succeeded."""
        assert view.runpod_job_id is not None
        remaining = (view.deadline - self.clock()).total_seconds()
        if remaining <= 0:
            return await self._past_deadline(view)
        job_id = view.job_id
        recorded = 0

        async def on_progress(value: Any) -> None:
            # One event per distinct value (the aggregate refuses repeats and bounds the count).
            nonlocal recorded
            try:
                now = self.clock()
                done, _ = await self.store.execute(job_id, lambda job: job.record_progress(value, now))
            except DomainError as error:  # not JSON, or the job moved on: progress only informs
                log.warning("runpod.progress_not_recorded", **self._ids(view), error=str(error))
                return
            if done:
                recorded += 1
                self._info("runpod.progress", view, progress=recorded)

        wait = asyncio.ensure_future(
            self.compute.wait(
                view.endpoint_id, view.runpod_job_id, timeout_s=remaining, on_progress=on_progress
            )
        )
        self._waits[view.job_id] = wait
        try:
            outcome = await wait
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return await self.store.view(view.job_id)  # interrupted by a cancel request
        except (Unavailable, RateLimited, BadResponse) as error:
            log.warning("runpod.status_unavailable", **self._ids(view), error=str(error))
            await self.sleep(self._jitter(self.config.retry_base_s * 10))
            return await self.store.view(view.job_id)
        except NotFound:
            return await self._record(
                view,
                lambda job: job.record_failed(
                    "run", None, "RunPod no longer knows the job (404: its ttl expired or it was lost)"
                ),
            )
        finally:
            self._waits.pop(view.job_id, None)
        if recorded:
            # The progress events moved the job's version: the outcome is recorded after them.
            view = await self.store.view(view.job_id)
        if not outcome.succeeded and outcome.reason == "deadline passed":
            return await self._past_deadline(view)
        return await self._record(view, self._outcome_command(view, outcome))

    async def _past_deadline(self, view: JobView) -> JobView:
        assert view.runpod_job_id is not None
        try:
            await self.compute.cancel(view.endpoint_id, view.runpod_job_id)
        except GatewayError as error:  # best effort: the job is failed and refunded either way
            log.warning("runpod.cancel_failed", **self._ids(view), error=str(error))
        return await self._record(
            view,
            lambda job: job.record_failed(
                "deadline", RunStatus.TIMED_OUT.value, "the job did not finish before its deadline"
            ),
        )

    def _outcome_command(self, view: JobView, outcome: RunOutcome) -> Command:
        state = outcome.state
        if not outcome.succeeded:
            stage = "cancel" if state.status == RunStatus.CANCELLED else "run"
            status, reason = state.status.value, outcome.reason
            return lambda job: job.record_failed(stage, status, reason)
        check = evaluate(view.acceptance, state.output, self.checks)
        if not check.passed:
            reason = f"acceptance check failed: {check.reason}"
            return lambda job: job.record_failed("acceptance", RunStatus.COMPLETED.value, reason)
        try:
            output_digest = digest(state.output, "output")
        except InvalidInput as error:  # e.g. a NaN read from the response: not a result to pay for
            problem = f"the output is not JSON: {error}"
            return lambda job: job.record_failed("acceptance", RunStatus.COMPLETED.value, problem)
        items: int | None = None
        if view.price_per_item is not None:
            # Metered: one item per part the run delivered (a streaming endpoint's parts, in order).
            if not isinstance(state.output, list):
                problem = f"a metered job's output must be a list of items, not {type(state.output).__name__}"
                return lambda job: job.record_failed("acceptance", RunStatus.COMPLETED.value, problem)
            items = len(state.output)
            if metered_payout(view.budget, view.price_per_item, items) == 0:
                nothing = f"{items} items delivered earn nothing at {fmt(view.price_per_item)} per item"
                return lambda job: job.record_failed("acceptance", RunStatus.COMPLETED.value, nothing)
        self.outputs.by_job[view.job_id] = state.output
        execution_ms, delay_ms, worker_id, metrics = (
            state.execution_ms,
            state.delay_ms,
            state.worker_id,
            check.metrics,
        )
        return lambda job: job.record_completed(
            output_digest, execution_ms, delay_ms, worker_id, metrics, items
        )

    async def _cancel(self, view: JobView, attempt: int) -> Command:
        assert view.runpod_job_id is not None
        reason = view.cancel_reason or "cancelled"
        async with self._compute_slots:
            state = await self.compute.cancel(view.endpoint_id, view.runpod_job_id)
        if state.status == RunStatus.COMPLETED and state.delivered:
            # It finished before the cancel arrived: judge it like any finished run.
            outcome = RunOutcome(state=state, succeeded=True, reason="completed")
            return self._outcome_command(view, outcome)
        status = state.status.value
        return lambda job: job.record_failed("cancel", status, reason)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _release_split(view: JobView) -> FeeSplit:
        """What a release moves: a metered job's earnings by its dialect's rule, else the escrow as
        funded."""
        if view.metering is not None:
            return split(Money(view.payout), dialect=view.dialect)
        return Processor._recorded_split(view)

    @staticmethod
    def _recorded_split(view: JobView) -> FeeSplit:
        """The job's escrow as funded: the service's figures recorded then, the referral share by the
        job's dialect's rule (the service computed it at create, and reports it only on release)."""
        assert view.funded_amount is not None
        if view.fee is None or view.net is None:
            return split(view.funded_amount, dialect=view.dialect)
        fee, net = Money(view.fee), Money(view.net)
        return FeeSplit(view.funded_amount, fee, net, referral_fee(fee, view.dialect))

    def _other_creator(self, view: JobView, escrow: EscrowView, step: Step) -> Command | None:
        """An answer about the job's escrow that names another creator than the job's payer: the
        escrow is not the one the log says this payer funded; an operator must look."""
        if escrow.payer is None or escrow.payer == view.payer:
            return None
        return self._attention_command(
            step,
            f"escrow {escrow.escrow_id} names creator {escrow.payer}, not the job's payer {view.payer}",
            {"escrow_id": escrow.escrow_id, "creator_id": escrow.payer, "payer": view.payer},
        )

    @staticmethod
    def _key(view: JobView) -> str:
        assert view.intent is not None
        return view.intent.key

    @staticmethod
    def _create_amount(view: JobView, step: Step) -> Decimal:
        return view.budget if step == Step.FUND else (view.bonus_amount or Decimal(0))

    @staticmethod
    def _attention_command(step: Step, reason: str, known: Mapping[str, str]) -> Command:
        details = {str(k): str(v) for k, v in known.items()}
        return lambda job: job.raise_attention(step, reason, details)

    def _info(self, event: str, view: JobView, **fields: Any) -> None:
        """An info line about a job; skipped before its fields are built when info is filtered out
        (the default level is WARNING, and these lines come several times per job)."""
        if logs.enabled(logging.INFO):
            log.info(event, **self._ids(view), **fields)

    @staticmethod
    def _ids(view: JobView) -> dict[str, Any]:
        ids: dict[str, Any] = {"job_id": str(view.job_id), "job_key": view.job_key}
        if view.escrow_id:
            ids["escrow_id"] = view.escrow_id
        if view.runpod_job_id:
            ids["runpod_job_id"] = view.runpod_job_id
        return ids

    def _jitter(self, seconds: float) -> float:
        return seconds * (0.5 + self._random.random())
