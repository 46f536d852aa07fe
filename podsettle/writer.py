"""The job writer: commands from many concurrent tasks, saved in groups.

Commits dominate the cost of writing events, so the writer applies every command queued while the
previous save was running to cached copies of the jobs and saves them all in one atomic
`Application.save(...)`: one commit for many jobs' events. All store access happens on one worker
thread, so the event loop never waits on SQLite or PostgreSQL.

A group save that loses a race with another engine (`IntegrityError`) is undone and its commands
are replayed one by one on fresh copies: outcome commands are idempotent and converge, a claim that
lost its race raises `ClaimLost`.

This is the one command path: the engine, its processor and the operator's resolution on the
command line (`run_command`, a writer for one command) all change jobs through a `JobWriter`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError

from podsettle.application import Settlements
from podsettle.domain import EscrowJob, Step
from podsettle.domain.errors import ClaimLost, ConflictingOutcome, DomainError
from podsettle.domain.escrow_job import JobView
from podsettle.requests import JobRequest
from podsettle.support.logs import get_logger

log = get_logger("podsettle.writer")
Command = Callable[[EscrowJob], Any]
MAX_RACE_RETRIES = 20
# A group save that lost a race is tried again as a group this many times before one save per command.
MAX_REGROUPS = 4


@dataclass
class _Request:
    kind: str  # "command" | "claim" | "open" | "view" | "fresh" | "input"
    future: asyncio.Future[Any]
    job_id: UUID | None = None
    command: Command | None = None
    specs: Sequence[JobRequest] = ()
    job_key: str = ""
    step: Step | None = None


@dataclass
class WriterStats:
    saves: int = 0
    commands: int = 0
    fallbacks: int = 0
    regroups: int = 0  # group saves that lost a race and were saved again as a group
    reads: int = 0  # jobs read from the store (not found in the writer's cache)
    bulk_reads: int = 0  # queries that read several jobs at once (`Settlements.get_jobs`)
    longest_save_s: float = 0.0
    save_s: float = 0.0  # time spent saving (the store's commits included)
    busy_s: float = 0.0  # time the store thread spent on groups (reading, applying, saving)
    # The sizes of the latest groups saved (a bounded window: a writer lives as long as its engine).
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))


class JobWriter:
    def __init__(self, app: Settlements, *, max_batch: int = 1000, cache_size: int = 20_000) -> None:
        self.app = app
        self.max_batch = max_batch
        self.cache_size = cache_size
        self.stats = WriterStats()
        self._cache: OrderedDict[UUID, EscrowJob] = OrderedDict()
        self._versions: OrderedDict[UUID, int] = OrderedDict()
        # Inputs of jobs opened here, until they are submitted: saves reading them back.
        self._inputs: dict[str, dict[str, Any]] = {}
        # The latest saved view of each cached job, for reads that need no round trip to the store
        # thread. Views are immutable and set on the store thread only after their save succeeded;
        # a caller that got a command's result finds that view here, or a later one.
        self._views: dict[UUID, JobView] = {}
        self._queue: list[_Request] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="podsettle-store")
        self._closed = False

    # ------------------------------------------------------------------ the async API

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="podsettle-writer")

    async def execute(self, job_id: UUID, command: Command) -> tuple[Any, JobView]:
        """Apply `command` to the job and save it; returns the command's result and the job after it."""
        result: tuple[Any, JobView] = await self._submit(_Request("command", self._future(), job_id, command))
        return result

    async def claim(
        self, job_id: UUID, step: Step, processor: str, after: int, at: datetime
    ) -> tuple[int, JobView]:
        """Record the attempt for the job's current intent (the claim), made after `after` attempts;
        `ClaimLost` if another processor claimed it first."""
        request = _Request(
            "claim",
            self._future(),
            job_id,
            lambda job: job.record_attempt(step, processor, after=after, at=at),
        )
        request.step = step
        result: tuple[int, JobView] = await self._submit(request)
        return result

    async def open(self, specs: Sequence[JobRequest]) -> list[UUID]:
        """Open jobs (idempotent by key) in one atomic save."""
        ids: list[UUID] = await self._submit(_Request("open", self._future(), specs=list(specs)))
        return ids

    async def view(self, job_id: UUID, *, fresh: bool = False) -> JobView:
        """The job now; `fresh` reads it from the store, for when another engine may have written."""
        if not fresh:
            known = self._views.get(job_id)
            if known is not None:
                return known
        view: JobView = await self._submit(_Request("fresh" if fresh else "view", self._future(), job_id))
        return view

    async def job_input(self, job_key: str) -> dict[str, Any] | None:
        cached = self._inputs.pop(job_key, None)  # opened here: no round trip to the store thread
        if cached is not None:
            return cached
        payload: dict[str, Any] | None = await self._submit(
            _Request("input", self._future(), job_key=job_key)
        )
        return payload

    async def call(self, function: Callable[[], Any]) -> Any:
        """Run a read-only store function on the store thread (never concurrently with a save)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def known_version(self, job_id: UUID) -> int:
        """The newest version of the job this writer has seen (0 if none): lets a log follower skip
        events it caused itself."""
        return self._versions.get(job_id, 0)

    def opened_here(self, job_id: UUID) -> bool:
        """Whether this writer saved the job's opening (just after `open`; False when another
        writer had opened it first, and `open` found it in the store)."""
        return self._versions.get(job_id, 0) > 0

    def held(self) -> dict[str, int]:
        """The entries this writer holds per job: jobs cached, their views, inputs not submitted yet,
        and versions seen (the last bounded by `cache_size`, the others emptied as jobs rest)."""
        return {
            "cached_jobs": len(self._cache),
            "views": len(self._views),
            "inputs": len(self._inputs),
            "versions": len(self._versions),
        }

    async def aclose(self) -> None:
        """Save what is queued, then stop."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop at once, dropping what is queued (a simulated crash: unsaved commands are lost)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for request in self._queue:
            request.future.cancel()
        self._queue.clear()
        # A save already running finishes (SQLite commits are atomic: finishing it is the same as a
        # crash just after it); nothing queued runs. Waiting also keeps the store's connections open
        # until the store thread is done with them.
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ the loop

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, request: _Request) -> Any:
        if self._closed:
            raise RuntimeError("the engine is closed")
        self.start()
        self._queue.append(request)
        self._wakeup.set()
        return await request.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            batch = [request for request in batch if not request.future.done()]
            try:
                outcomes = await loop.run_in_executor(self._executor, self._timed, batch)
            except Exception as error:
                # The store failed (not a race): nothing of this batch was saved. Its callers get the
                # error; the writer keeps serving, or every later command would wait forever.
                log.error("writer.save_failed", error=repr(error), commands=len(batch))
                outcomes = [(request, error) for request in batch]
            for request, outcome in outcomes:
                if request.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)

    # ------------------------------------------------------------------ on the store thread

    def _timed(self, batch: list[_Request]) -> list[tuple[_Request, Any]]:
        started = time.perf_counter()
        try:
            return self._process(batch)
        finally:
            self.stats.busy_s += time.perf_counter() - started

    def _load(self, job_id: UUID, touched: dict[UUID, EscrowJob] | None = None) -> EscrowJob:
        """The job as this writer has it: changed in the group being saved, cached, or read from the
        store. A resting job read from the store is not cached: a batch's settled jobs, read once
        more (a resumed batch, the log follower), would otherwise fill the cache."""
        if touched is not None and job_id in touched:
            return touched[job_id]
        job = self._cache.get(job_id)
        if job is None:
            self.stats.reads += 1
            job = self.app.get_job(job_id)
            self._keep(job)
        else:
            self._cache.move_to_end(job_id)
        return job

    def _keep(self, job: EscrowJob) -> None:
        """A job just read from the store: cached, unless it rests (then only its version is noted)."""
        if job.rests:
            self._note_version(job)
        else:
            self._remember(job)

    def _note_version(self, job: EscrowJob) -> None:
        self._versions[job.id] = job.version
        self._versions.move_to_end(job.id)
        # Bounded like the cache: a version forgotten costs the follower one needless read of a job
        # (it drives the job again and finds it resting), never a missed intent.
        while len(self._versions) > self.cache_size:
            self._versions.popitem(last=False)

    def _remember(self, job: EscrowJob) -> None:
        self._note_version(job)
        self._cache[job.id] = job
        while len(self._cache) > self.cache_size:
            self._views.pop(self._cache.popitem(last=False)[0], None)

    def _process(self, batch: list[_Request], *, regroups: int = MAX_REGROUPS) -> list[tuple[_Request, Any]]:
        outcomes: list[tuple[_Request, Any]] = []
        touched: dict[UUID, EscrowJob] = {}
        new: list[Any] = []
        broken: set[UUID] = set()
        inputs: dict[str, dict[str, Any]] = {}  # of the jobs opened here: kept once they are saved
        fresh = self._prefetch(batch)
        for request in batch:
            try:
                outcomes.append((request, self._apply(request, touched, new, broken, inputs, fresh)))
            except Exception as error:  # handed to the caller, who decides
                outcomes.append((request, error))
        aggregates = list({id(a): a for a in (*new, *touched.values())}.values())
        if broken:
            # A command raised after recording events (it must not: commands record all or nothing).
            # Nothing of this batch is saved; every request is replayed alone on fresh copies.
            log.error("writer.partial_command", jobs=[str(j) for j in broken])
            return self._fallback(batch)
        if aggregates:
            started = time.perf_counter()
            try:
                self.app.save_all(aggregates)
            except IntegrityError:
                if not regroups:
                    return self._fallback(batch)
                opens = [request for request in batch if request.kind == "open"]
                if opens:
                    return self._open_apart(batch, opens, aggregates, regroups - 1)
                return self._regroup(batch, aggregates, regroups - 1)
            except Exception:
                self._evict(aggregates)
                raise
            finally:
                elapsed = time.perf_counter() - started
                self.stats.save_s += elapsed
                self.stats.longest_save_s = max(self.stats.longest_save_s, elapsed)
            self.stats.saves += 1
            self.stats.batch_sizes.append(len(batch))
        self.stats.commands += len(batch)
        # Only now: `job_input` reads them without waiting for this thread, so an input whose save
        # failed (the key was opened with another input) must never be found there.
        for job_key, payload in inputs.items():
            if len(self._inputs) < self.cache_size:
                self._inputs[job_key] = payload
        for job in touched.values():
            self._note_version(job)
            if job.rests:
                self._cache.pop(job.id, None)
                self._views.pop(job.id, None)
                self._inputs.pop(job.job_key, None)  # e.g. rejected before it was ever submitted
            elif job.id in self._cache:  # (a batch larger than the cache may have pushed it out)
                self._views[job.id] = job.view()
        return outcomes

    def _apply(
        self,
        request: _Request,
        touched: dict[UUID, EscrowJob],
        new: list[Any],
        broken: set[UUID],
        inputs: dict[str, dict[str, Any]],
        fresh: set[UUID],
    ) -> Any:
        if request.kind == "open":
            ids = []
            for spec in request.specs:
                job, extra = self.app.build(spec)
                # A job this writer does not know is taken as new without reading the store: if it
                # exists after all (a batch run again), the save fails and `_fallback` opens the
                # batch through `open_jobs`, which compares it with the stored one.
                if job.id in touched or job.id in self._cache:
                    existing = self._load(job.id, touched)
                    if existing.input_digest != job.input_digest or existing.budget != job.budget:
                        raise ConflictingOutcome(
                            job.id, existing.state, "open", f"key {job.job_key!r} opened a different job"
                        )
                else:
                    new.extend([job, *extra])
                    self._remember(job)
                    touched[job.id] = job
                    if spec.job_input is not None:
                        inputs[spec.job_key] = dict(spec.job_input)
                ids.append(job.id)
            return ids
        if request.kind == "input":
            cached = self._inputs.pop(request.job_key, None)
            return cached if cached is not None else self.app.job_input(request.job_key)
        assert request.job_id is not None
        caught = None
        if request.kind == "fresh" and request.job_id not in touched and request.job_id not in fresh:
            caught = self._catch_up(request.job_id)
        job = caught if caught is not None else self._load(request.job_id, touched)
        if request.kind in ("view", "fresh"):
            return job.view()
        assert request.command is not None
        version = job.version
        try:
            result = request.command(job)
        except DomainError:
            if job.version != version:
                broken.add(job.id)
            raise
        if job.version != version:
            touched[job.id] = job
        return result, job.view()

    def _catch_up(self, job_id: UUID) -> EscrowJob | None:
        """A job asked for fresh (another engine may have written it): the cached copy brought up
        to date with the events stored after it (most often one or two); None when it is not
        cached (then it is read whole). A job that rests now leaves the cache, as one read resting
        does."""
        self._views.pop(job_id, None)
        job = self._cache.pop(job_id, None)
        if job is None:
            return None
        self.stats.reads += 1
        job = self.app.caught_up(job)  # (if it raises, the job stays out of the cache)
        self._keep(job)
        return job

    def _prefetch(self, batch: list[_Request]) -> set[UUID]:
        """Read every job the group needs from the store in one query (where the store has one):
        the jobs it does not hold, and those asked for fresh (another engine may have written
        them; of those it holds, only the events after its copy); and in one more, the inputs it
        does not hold. Returns the jobs read fresh here, which the group's `fresh` requests then
        use."""
        wanted: dict[UUID, None] = {}
        fresh: set[UUID] = set()
        inputs = [r.job_key for r in batch if r.kind == "input" and r.job_key not in self._inputs]
        if len(inputs) > 1:  # jobs another engine opened, about to start here: their inputs at once
            found_inputs = self.app.job_inputs(inputs)
            if found_inputs is not None:
                self._inputs.update(found_inputs)  # taken (popped) by this very group's requests
        for request in batch:
            job_id = request.job_id
            if job_id is None or request.kind in ("open", "input"):
                continue
            if request.kind == "fresh":
                fresh.add(job_id)
            elif job_id in self._cache:
                continue
            wanted[job_id] = None
        if len(wanted) < 2:
            return set()
        known = {job_id: job for job_id in fresh if (job := self._cache.get(job_id)) is not None}
        for job_id in fresh:
            self._views.pop(job_id, None)
        try:
            found = self.app.get_jobs(list(wanted), known=known)  # (brings `known` up to date in place)
        except Exception:
            for job_id in known:  # perhaps half brought up to date: read whole next time
                self._cache.pop(job_id, None)
            raise
        if found is None:
            return set()  # no bulk read on this store: each is caught up on its own (`_catch_up`)
        self.stats.bulk_reads += 1
        for job in found.values():
            self.stats.reads += 1
            self._remember(job)
        return fresh & found.keys()

    def _evict(self, aggregates: Sequence[Any]) -> None:
        for aggregate in aggregates:
            self._cache.pop(aggregate.id, None)
            self._views.pop(aggregate.id, None)
            # Unsaved versions must not make the log follower skip another writer's events.
            self._versions.pop(aggregate.id, None)

    def _regroup(
        self, batch: list[_Request], aggregates: Sequence[Any], regroups: int
    ) -> list[tuple[_Request, Any]]:
        """Another writer changed some of the jobs this group touched (another engine's claim or
        outcome): read those jobs again and apply the group's commands once more, still as one
        save. A claim whose intent was claimed meanwhile now fails alone (`ClaimLost`). Engines
        working one batch race often: the group is tried again up to `MAX_REGROUPS` times, each
        time reading only the jobs it touches, before it falls back to one save per command (a
        read and a commit each: a group of a hundred commands costs a hundred round trips)."""
        self.stats.regroups += 1
        self._evict(aggregates)
        return self._process(batch, regroups=regroups)

    def _open_apart(
        self, batch: list[_Request], opens: list[_Request], aggregates: Sequence[Any], regroups: int
    ) -> list[tuple[_Request, Any]]:
        """A group with opens failed to save: most likely another engine opened the same jobs (a
        batch given to several engines). Each open is made alone (`open_jobs` accepts a job opened
        already only if it is the same job) and the group's other commands are applied again as
        one save, on fresh copies of only the jobs they touch."""
        self.stats.regroups += 1
        self._evict(aggregates)
        outcomes = self._each_alone(opens)
        rest = [request for request in batch if request.kind != "open"]
        if rest:
            outcomes.extend(self._process(rest, regroups=regroups))
        return outcomes

    def _fallback(self, batch: list[_Request]) -> list[tuple[_Request, Any]]:
        """Replay each request alone, on fresh copies, saving each on its own."""
        self.stats.fallbacks += 1
        self._cache.clear()
        self._views.clear()
        self._inputs.clear()
        return self._each_alone(batch)

    def _each_alone(self, requests: list[_Request]) -> list[tuple[_Request, Any]]:
        """Each request carried out and saved on its own; its outcome, or the error it raised."""
        outcomes: list[tuple[_Request, Any]] = []
        for request in requests:
            try:
                outcomes.append((request, self._alone(request)))
            except Exception as error:
                outcomes.append((request, error))
        return outcomes

    def _alone(self, request: _Request) -> Any:
        if request.kind == "open":
            return self.app.open_jobs(request.specs)
        if request.kind == "input":
            return self.app.job_input(request.job_key)
        assert request.job_id is not None
        if request.kind in ("view", "fresh"):
            return self.app.get_job(request.job_id).view()
        assert request.command is not None
        for _ in range(MAX_RACE_RETRIES):
            job = self.app.get_job(request.job_id)
            result = request.command(job)
            try:
                self.app.save(job)
            except IntegrityError:
                if request.kind == "claim":
                    raise ClaimLost(request.job_id, request.step) from None
                continue
            return result, job.view()
        raise RuntimeError(f"job {request.job_id}: gave up after {MAX_RACE_RETRIES} concurrent updates")


async def run_command(app: Settlements, job_id: UUID, command: Command) -> tuple[Any, JobView]:
    """Run one command through a writer of its own, started and closed here, with the same race
    handling as the engine's (for a process that runs no engine: `podsettle reconcile --resolve`).
    Returns the command's result and the job after it."""
    writer = JobWriter(app)
    try:
        return await writer.execute(job_id, command)
    finally:
        await writer.aclose()
