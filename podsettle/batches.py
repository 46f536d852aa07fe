"""Batches of any size in flat memory: a batch's jobs are opened in chunks and settle as a stream.

    stream = engine.stream_batch("endpoint-id", inputs, "0.25", concurrency=32)
    async for result in stream:       # each job's result as it rests
        ...
    stream.totals                     # summed as results came in; nothing per job is kept

The inputs are read as they are needed. Each chunk of `chunk_size` jobs is opened in one atomic
save, at most two chunks ahead of the jobs being run, and at most `concurrency` jobs are in flight
(counting those that rested and that the caller has not taken yet). Chunks are opened in order, so
the opened jobs of a batch are always its first n: a batch run again with the same id finds n in a
few reads, drives (or just returns) those jobs, and opens the rest after them.

Engines given the same batch split it by claims. One that joins a batch already opened (by another
engine, or by itself before a restart) goes through the opened jobs from the last one back, and
through each chunk it opens after them from its end: in the same order it would queue behind the
other's claims, each slot waiting on a job held there, so the two meet in the middle instead.
Engines started on the batch together race to open each chunk: those that lose the race run the
chunk in an order of their own (shuffled), so that no two go through it in step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any
from uuid import UUID

from podsettle.domain.errors import InvalidInput
from podsettle.domain.escrow_job import job_id_for
from podsettle.domain.money import fmt
from podsettle.projections.rows import Totals
from podsettle.requests import JobRequest
from podsettle.slots import Slot
from podsettle.support.logs import get_logger

if TYPE_CHECKING:
    from podsettle.engine import EngineCore, JobResult

log = get_logger("podsettle.batches")
DEFAULT_CHUNK_SIZE = 200  # jobs opened per atomic save: one save stays short for the jobs in flight
IN_THREAD = 100  # more inputs than this are read and validated off the event loop

JobInputs = Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]]
Build = Callable[[int, Mapping[str, Any]], JobRequest]


def batch_job_key(batch_id: str, index: int) -> str:
    """The key of a batch's job: the batch id and the job's place in it (from 0)."""
    return f"{batch_id}-{index:06d}"


class BadBatchInput(InvalidInput):
    """One input of a batch is not acceptable: `index` is its place in the batch (from 0)."""

    def __init__(self, index: int, error: InvalidInput) -> None:
        self.index = index
        self.inner = error
        super().__init__(f"jobs[{index}].{error.field}", error.reason)


@dataclass(frozen=True)
class _End:
    """No more chunks (or results): the stream ended, with the error that ended it, if any."""

    error: BaseException | None = None


@dataclass(frozen=True)
class _Failed:
    """A job's drive raised: the stream raises it."""

    error: BaseException


def opened_prefix(opened: Callable[[str], bool], batch_id: str) -> int:
    """How many of the batch's jobs are in the log (a blocking store function). They are always its
    first n (chunks are opened in order, each whole): found by doubling, then bisecting."""
    if not opened(batch_job_key(batch_id, 0)):
        return 0
    low, high = 0, 1  # opened(low), and high still to look at
    while opened(batch_job_key(batch_id, high)):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if opened(batch_job_key(batch_id, middle)):
            low = middle
        else:
            high = middle
    return high


class BatchStream:
    """A batch being settled: `async for result in stream` gives each job's result as it rests.

    `total` is the number of jobs when it is known before anything is opened (the inputs were a
    sized collection, validated whole first); `resumed` the jobs found opened already (the batch was
    run before with this id), `opened` the jobs of the batch in the log now, `settled` the results
    so far and `totals` their sums. A stream is iterated once."""

    def __init__(
        self,
        engine: EngineCore,
        batch_id: str,
        jobs: JobInputs,
        build: Build,
        *,
        concurrency: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        on_result: Callable[[JobResult], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise InvalidInput("concurrency", f"must be at least 1, got {concurrency}")
        if chunk_size < 1:
            raise InvalidInput("chunk_size", f"must be at least 1, got {chunk_size}")
        self.batch_id = batch_id
        self.concurrency = concurrency
        self.chunk_size = chunk_size
        self.total: int | None = len(jobs) if isinstance(jobs, Sized) else None
        self.resumed = 0
        self.opened = 0
        self.settled = 0
        self.cancelled = False  # its jobs were cancelled while it ran: it opened no more
        self.totals = Totals()
        self._engine = engine
        self._jobs = jobs
        self._build = build
        self._on_result = on_result
        self._iterated = False
        self._running: set[asyncio.Task[None]] = set()
        self._shuffle = random.Random().shuffle

    def __aiter__(self) -> AsyncIterator[JobResult]:
        if self._iterated:
            raise RuntimeError(f"batch {self.batch_id}: a stream is iterated once")
        self._iterated = True
        return self._results()

    # ------------------------------------------------------------------ the consumer

    async def _results(self) -> AsyncIterator[JobResult]:
        engine = self._engine
        await engine.start()
        if self.total is not None and isinstance(self._jobs, Iterable):
            await self._validate_whole(self._jobs)
        chunks: asyncio.Queue[list[UUID] | _End] = asyncio.Queue(maxsize=1)
        results: asyncio.Queue[JobResult | _Failed | _End] = asyncio.Queue()
        slots = asyncio.Semaphore(self.concurrency)
        loop = asyncio.get_running_loop()
        opener = loop.create_task(self._open_chunks(chunks), name=f"batch-{self.batch_id}-opener")
        starter = loop.create_task(self._start_jobs(chunks, results, slots), name=f"batch-{self.batch_id}")
        try:
            while True:
                item = await results.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                if isinstance(item, _Failed):
                    raise item.error
                slots.release()
                yield item
        finally:
            # Stopped early (the caller broke off, was cancelled, or a job raised): the jobs still
            # being driven stay in the log, for `resume` or for this batch run again.
            tasks = [opener, starter, *self._running]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ validating

    async def _validate_whole(self, jobs: Iterable[Mapping[str, Any]]) -> None:
        """A sized batch is checked whole before anything is opened: every input is valid (a bad one
        opens nothing), and, where the escrow shows the payer's balance, the jobs not opened yet fit
        in it (else the jobs past it would each be sent to be refused)."""
        assert self.total is not None
        if self.total > IN_THREAD:
            budget = await asyncio.to_thread(self._check_inputs, jobs)
        else:
            budget = self._check_inputs(jobs)
        if budget is None:
            return
        engine = self._engine
        available = await engine.escrow.balance()
        if available is None:
            return
        found = await engine.writer.call(lambda: opened_prefix(engine._opened, self.batch_id))
        needed = budget * max(0, self.total - found)
        if needed > available:
            raise InvalidInput(
                "budget",
                f"the batch's {self.total} jobs need {fmt(needed)} USDC and the payer holds "
                f"{fmt(available)}; nothing was opened",
            )

    def _check_inputs(self, jobs: Iterable[Mapping[str, Any]]) -> Decimal | None:
        """Build every job's request and drop it (keeping none); the budget of one job."""
        budget: Decimal | None = None
        count = 0
        for index, job_input in enumerate(jobs):
            budget = self._request(index, job_input).budget
            count += 1
        if count != self.total:
            raise InvalidInput("jobs", f"gave {count} inputs where its length said {self.total}")
        return budget

    def _request(self, index: int, job_input: Mapping[str, Any]) -> JobRequest:
        try:
            return self._build(index, job_input)
        except BadBatchInput:
            raise
        except InvalidInput as error:
            raise BadBatchInput(index, error) from error

    # ------------------------------------------------------------------ opening

    async def _open_chunks(self, chunks: asyncio.Queue[list[UUID] | _End]) -> None:
        """Open the batch chunk by chunk, putting each chunk's job ids (in the order to run them) in
        `chunks`, one ahead of the jobs being started; then the end, with the error that ended it."""
        engine = self._engine
        end = _End()
        try:
            found = await engine.writer.call(lambda: opened_prefix(engine._opened, self.batch_id))
            self.resumed = self.opened = found
            joined = found > 0
            inputs = self._inputs()
            if found:
                await self._skip_opened(inputs, found)
                # The opened jobs need no input: from the last one back, a chunk at a time.
                for stop in range(found, 0, -self.chunk_size):
                    start = max(0, stop - self.chunk_size)
                    back = range(stop - 1, start - 1, -1)
                    ids = [job_id_for(batch_job_key(self.batch_id, i)) for i in back]
                    engine._wanted.update(ids)  # this engine settles them: its follower leaves them
                    await chunks.put(ids)
            index = found
            while True:
                if index and await engine.writer.call(partial(self._cancelled, index - 1)):
                    self.cancelled = True  # `cancel --batch` (or a caller) cancelled its jobs
                    log.info("batch.cancelled", batch_id=self.batch_id, opened=index)
                    break
                specs = await self._next_chunk(inputs, index)
                if not specs:
                    break
                if await engine.writer.call(partial(engine._opened, specs[-1].job_key)):
                    # Another engine given the batch opened this chunk already: check its ends
                    # against the log (another input under this batch id is refused) rather than
                    # build every job to find them opened.
                    ids = await self._found_opened(specs)
                    opened_here = False
                else:
                    ids = await engine._open(specs)
                    opened_here = engine.writer.opened_here(ids[0])
                index += len(specs)
                self.opened = max(self.opened, index)
                if joined:
                    ids.reverse()
                elif not opened_here:
                    # Another engine opened this chunk as this one tried (both were given the batch
                    # at once) and runs it in order: run it in an order of this engine's own, so the
                    # two seldom race for one job, and neither follows the other's steps.
                    self._shuffle(ids)
                await chunks.put(ids)
            if self.total is not None and index < self.total and not self.cancelled:
                raise InvalidInput(
                    "jobs",
                    f"gave {index} inputs when read again, {self.total} the first time: pass a "
                    "collection that can be read twice, or a one-shot iterator",
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the jobs opened before it settle first; then the caller gets it
            end = _End(error)
        await chunks.put(end)

    async def _found_opened(self, specs: list[JobRequest]) -> list[UUID]:
        engine, app = self._engine, self._engine.app
        ends = [specs[0], specs[-1]]
        await engine.writer.call(lambda: [app.matches_existing(app.build(spec)[0]) for spec in ends])
        ids = [job_id_for(spec.job_key) for spec in specs]
        engine._wanted.update(ids)  # this engine settles them too: its follower leaves them
        return ids

    def _cancelled(self, index: int) -> bool:
        """Whether the batch's job at `index` (the last opened) was cancelled: the batch then opens
        no more (a blocking store call). `cancel --batch` ends the jobs waiting to be funded, and the
        last chunk opened waits ahead of the jobs running."""
        return bool(self._engine.app.get_job(job_id_for(batch_job_key(self.batch_id, index))).cancelled)

    def _inputs(self) -> AsyncIterator[Mapping[str, Any]] | Iterator[Mapping[str, Any]]:
        jobs = self._jobs
        if isinstance(jobs, AsyncIterable):
            return aiter(jobs)
        return iter(jobs)

    async def _skip_opened(
        self, inputs: AsyncIterator[Mapping[str, Any]] | Iterator[Mapping[str, Any]], found: int
    ) -> None:
        """Pass over the inputs of the jobs opened already, checking the first and the last of them
        against the log (another input under this batch id is refused: `ConflictingOutcome`)."""
        checked: list[JobRequest] = []

        def take(index: int, job_input: Mapping[str, Any]) -> None:
            if index in (0, found - 1):
                checked.append(self._request(index, job_input))

        if isinstance(inputs, AsyncIterator):
            index = 0
            while index < found:
                try:
                    job_input = await anext(inputs)
                except StopAsyncIteration:
                    break
                take(index, job_input)
                index += 1
        else:

            def skip() -> None:
                for index, job_input in enumerate(islice(inputs, found)):
                    take(index, job_input)

            await asyncio.to_thread(skip) if found > IN_THREAD else skip()
        app = self._engine.app
        await self._engine.writer.call(lambda: [app.matches_existing(app.build(s)[0]) for s in checked])

    async def _next_chunk(
        self, inputs: AsyncIterator[Mapping[str, Any]] | Iterator[Mapping[str, Any]], index: int
    ) -> list[JobRequest]:
        """The requests of the next chunk's inputs, starting at `index` (validating and hashing is
        CPU work: off the event loop for a chunk of any size)."""
        if isinstance(inputs, AsyncIterator):
            taken: list[Mapping[str, Any]] = []
            while len(taken) < self.chunk_size:
                try:
                    taken.append(await anext(inputs))
                except StopAsyncIteration:
                    break
            if not taken:
                return []
            return await asyncio.to_thread(
                lambda: [self._request(index + n, job_input) for n, job_input in enumerate(taken)]
            )
        source = inputs

        def build() -> list[JobRequest]:
            return [
                self._request(index + n, job_input)
                for n, job_input in enumerate(islice(source, self.chunk_size))
            ]

        small = self.total is not None and self.total <= IN_THREAD
        return build() if small else await asyncio.to_thread(build)

    # ------------------------------------------------------------------ running

    async def _start_jobs(
        self,
        chunks: asyncio.Queue[list[UUID] | _End],
        results: asyncio.Queue[JobResult | _Failed | _End],
        slots: asyncio.Semaphore,
    ) -> None:
        """Start each opened job when a slot is free; when the chunks end, wait for the jobs still
        running and end the results (with the opener's error, if any)."""
        loop = asyncio.get_running_loop()
        while True:
            item = await chunks.get()
            if isinstance(item, _End):
                break
            for job_id in item:
                await slots.acquire()
                slot = Slot(slots, held=True)
                task = loop.create_task(self._settle(job_id, results, slot), name=f"batch-job-{job_id}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        if self._running:
            await asyncio.wait(set(self._running))
        await results.put(item)

    async def _settle(
        self, job_id: UUID, results: asyncio.Queue[JobResult | _Failed | _End], slot: Slot
    ) -> None:
        # The job's slot is given back while it waits for another engine's claim (the batch moves
        # on to jobs nobody holds), and taken again before its result is put out; the consumer
        # releases it when it takes the result.
        slot.enter()
        try:
            result = await self._engine.wait(job_id)
            self.totals.add_job(result.status, result.money, result.execution_ms)
            self.settled += 1
            if self._on_result is not None:
                self._on_result(result)
        except Exception as error:
            results.put_nowait(_Failed(error))
            return
        results.put_nowait(result)
