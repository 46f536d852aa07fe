"""A simulated RunPod serverless endpoint: queue, workers, handlers, policy and injected faults.

The core shared by the HTTP emulator (`runpod_emulator`) and `InProcessCompute`: one
`EndpointRuntime` per endpoint keeps the jobs, runs them on a fixed number of worker tasks the way
a RunPod worker runs a handler (sync handlers in a thread, async handlers and generators on the
loop), measures delayTime and executionTime, enforces executionTimeout, ttl and result retention,
and injects faults. Every random decision comes from generators seeded by (seed, endpoint id), so
the same submissions in the same order replay the same faults and the same job ids.

What a RunPod worker does with a handler (runpod-python 1.12's `rp_job`/`rp_scale`), and so this one:
- a dict result's `error` key fails the job with that text (the rest of the dict is the output); an
  exception fails it with a JSON string of error_type, error_message, error_traceback, hostname,
  worker_id and runpod_version; `refresh_worker: True` in a dict result asks for a fresh worker;
- a generator's parts go to `/stream` as they come; the job's final output is the list of parts only
  when the `start` config says `return_aggregate_stream: True`, otherwise `[]`. A part that is a
  dict with a truthy `error` ends the job FAILED with that text; an exception inside the generator
  gives `"handler: <message> \ntraceback: <traceback>"`;
- `concurrency_modifier(current)` (starting from 1) says how many jobs one worker takes at once;
  the new value is taken when the worker has no job in flight (RunPod resizes only then);
- `refresh_worker`: after each job the worker stops taking jobs, lets its jobs end, and imports its
  worker file afresh (health shows it `initializing` meanwhile; `unhealthy` if the import fails);
- `progress_update(job, p)` while a job runs makes its status IN_PROGRESS with `output: p`; the
  status object carries `executionTime` while the job runs, and `retries` once it ran again;
- the job a handler receives holds `id` and `input`, plus `s3Config` and `webhookV2` when the
  request had them.

No HTTP and no server framework here: importing this module stays light.
"""

from __future__ import annotations

import asyncio
import heapq
import importlib.metadata
import inspect
import json
import math
import random
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from podsettle.adapters.ports import RunStatus
from podsettle.sandbox.handlers import BUILTIN_HANDLERS, Handler, resolve_handler
from podsettle.sandbox.worker_file import (
    ConcurrencyModifier,
    SandboxJob,
    WorkerFileError,
    WorkerSpec,
    install_progress_hook,
    is_worker_path,
    load_worker,
)
from podsettle.support.logs import get_logger

log = get_logger(__name__)

Clock = Callable[[], float]
HttpFault = Literal["429", "5xx", "drop"]

# The contract's defaults and bounds (runpod-serverless.md).
DEFAULT_EXECUTION_TIMEOUT_MS = 600_000
DEFAULT_TTL_MS = 24 * 3600 * 1000
MAX_POLICY_MS = 7 * 24 * 3600 * 1000
RUN_RETENTION_S = 30 * 60.0
RUNSYNC_RETENTION_S = 60.0
JOB_ROUTES = ("run", "runsync", "status", "status-sync", "stream", "cancel", "retry", "purge-queue", "health")


class Faults(BaseModel):
    """Faults injected into one endpoint. Rates are probabilities per job (or per request for the
    HTTP faults); `*_next` counts answer the next N requests that way (a burst)."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(default=0.0, ge=0, description="extra time every execution takes")
    latency_jitter_ms: float = Field(default=0.0, ge=0, description="plus a uniform draw in [0, jitter]")
    slow_rate: float = Field(
        default=0.0, ge=0, le=1, description="probability of a slow execution (the tail)"
    )
    slow_ms: float = Field(default=0.0, ge=0, description="extra time of a slow execution")
    failure_rate: float = Field(default=0.0, ge=0, le=1, description="job FAILED: the worker crashed")
    no_output_rate: float = Field(default=0.0, ge=0, le=1, description="COMPLETED without output")
    duplicate_rate: float = Field(default=0.0, ge=0, le=1, description="job executed twice")
    stuck_rate: float = Field(default=0.0, ge=0, le=1, description="job stays IN_QUEUE, never picked up")
    webhook_drop_rate: float = Field(default=0.0, ge=0, le=1, description="the job's webhook is never sent")
    http_429_rate: float = Field(default=0.0, ge=0, le=1)
    http_5xx_rate: float = Field(default=0.0, ge=0, le=1)
    drop_rate: float = Field(default=0.0, ge=0, le=1, description="request done, response dropped")
    retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After of an injected 429")
    http_429_next: int = Field(default=0, ge=0)
    http_5xx_next: int = Field(default=0, ge=0)
    drop_next: int = Field(default=0, ge=0)
    http_routes: list[str] | None = Field(
        default=None, description="routes the HTTP faults apply to (e.g. ['run', 'status']); None: all"
    )


@dataclass
class EndpointConfig:
    """One endpoint: its handler, workers and faults.

    `handler` is a callable, `"package.module:function"`, or the path of a RunPod worker file (or of
    its folder), imported the way `worker_file` does: the file's own `start` config then replaces
    `return_aggregate_stream`, `concurrency_modifier` and `refresh_worker` given here."""

    handler: str | Handler
    workers: int = 4
    faults: Faults = field(default_factory=Faults)
    result_retention_s: float = RUN_RETENTION_S
    runsync_retention_s: float = RUNSYNC_RETENTION_S
    default_execution_timeout_ms: int = DEFAULT_EXECUTION_TIMEOUT_MS
    default_ttl_ms: int = DEFAULT_TTL_MS
    return_aggregate_stream: bool = False
    concurrency_modifier: ConcurrencyModifier | None = None
    refresh_worker: bool = False


def endpoint_config(value: EndpointConfig | str | Handler) -> EndpointConfig:
    """An endpoint's config from what a caller may pass: a config, a handler, or a worker file's path."""
    if isinstance(value, EndpointConfig):
        return value
    return EndpointConfig(handler=value)


def worker_spec(config: EndpointConfig) -> WorkerSpec:
    """What the endpoint's workers run. A worker file is imported here (seconds, for a file that loads
    a model at import): call it off the event loop."""
    if is_worker_path(config.handler):
        return load_worker(str(config.handler))
    try:
        handler = resolve_handler(config.handler)
    except ValueError as exc:
        raise WorkerFileError(str(exc)) from None
    install_progress_hook()  # a handler module that imported runpod may call progress_update
    return WorkerSpec(
        handler=handler,
        return_aggregate_stream=config.return_aggregate_stream,
        concurrency_modifier=config.concurrency_modifier,
        refresh_worker=config.refresh_worker,
    )


@dataclass(frozen=True)
class PolicyBounds:
    """Accepted ranges of `policy.executionTimeout` and `policy.ttl` in ms (the contract's by default;
    tests lower the minimums to run short)."""

    min_execution_timeout_ms: int = 5_000
    max_execution_timeout_ms: int = MAX_POLICY_MS
    min_ttl_ms: int = 10_000
    max_ttl_ms: int = MAX_POLICY_MS


class PolicyError(ValueError):
    """A submission's policy is outside the accepted bounds."""


@dataclass(slots=True)
class JobPlan:
    """What the faults decided for one job, drawn at submission."""

    latency_s: float = 0.0
    fail: bool = False
    no_output: bool = False
    duplicate: bool = False
    stuck: bool = False
    webhook_lost: bool = False


@dataclass(slots=True, eq=False)
class JobRecord:
    id: str
    endpoint_id: str
    input: Any
    submitted_at: float
    execution_timeout_s: float
    ttl_deadline: float
    retention_s: float
    webhook: str | None = None
    low_priority: bool = False
    plan: JobPlan = field(default_factory=JobPlan)
    status: RunStatus = RunStatus.IN_QUEUE
    output: Any = None
    has_output: bool = False
    error: str | None = None
    started_at: float | None = None
    delay_ms: int | None = None
    execution_ms: int | None = None
    worker_id: str | None = None
    attempt: int = 0
    queued: bool = False
    executions: int = 0
    completions: int = 0
    expires_at: float = 0.0
    task: asyncio.Task[None] | None = None
    stream: list[Any] = field(default_factory=list)
    stream_cursor: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    changes: int = 0
    clock: Clock | None = None

    def payload(self) -> dict[str, Any]:
        """The status object of the contract (`executionTime` grows while the job runs)."""
        body: dict[str, Any] = {"id": self.id, "status": self.status.value}
        if self.delay_ms is not None:
            body["delayTime"] = self.delay_ms
        if self.execution_ms is not None:
            body["executionTime"] = self.execution_ms
        elif self.status is RunStatus.IN_PROGRESS and self.started_at is not None and self.clock is not None:
            body["executionTime"] = max(0, round((self.clock() - self.started_at) * 1000))
        if self.retries:
            body["retries"] = self.retries
        if self.worker_id is not None:
            body["workerId"] = self.worker_id
        if self.has_output:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


@dataclass(slots=True)
class _Result:
    status: RunStatus
    output: Any = None
    has_output: bool = False
    error: str | None = None
    refresh: bool = False


def _runpod_version() -> str:
    try:
        return importlib.metadata.version("runpod")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _error_text(err: BaseException, worker_id: str) -> str:
    """The error text a RunPod worker reports for a handler exception (a JSON string). On RunPod the
    hostname and worker id come from the pod's environment; here both are the emulated worker's id."""
    return json.dumps(
        {
            "error_type": str(type(err)),
            "error_message": str(err),
            "error_traceback": traceback.format_exc(),
            "hostname": worker_id,
            "worker_id": worker_id,
            "runpod_version": _runpod_version(),
        }
    )


def _json_safe(result: _Result) -> _Result:
    if result.has_output:
        try:
            json.dumps(result.output, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return _Result(RunStatus.FAILED, error=f"the handler's output is not JSON serializable: {exc}")
    return result


def shape_result(returned: Any) -> _Result:
    """What a worker makes of a handler's return value (runpod's `run_job`): an `error` key fails
    the job with that text; an `error` that is not a string shows up as COMPLETED without output
    (a failure mode users report); None or an empty dict is COMPLETED without output; a truthy
    `refresh_worker` key asks for a fresh worker after the job."""
    if isinstance(returned, dict):
        output = dict(returned)
        error = output.pop("error", None)
        refresh = bool(output.pop("refresh_worker", None))
        if error:
            if isinstance(error, str):
                return _Result(RunStatus.FAILED, output or None, bool(output), error, refresh)
            return _Result(RunStatus.COMPLETED, refresh=refresh)
        if not output:
            return _Result(RunStatus.COMPLETED, refresh=refresh)
        return _Result(RunStatus.COMPLETED, output, True, refresh=refresh)
    if returned is None:
        return _Result(RunStatus.COMPLETED)
    return _Result(RunStatus.COMPLETED, returned, True)


@dataclass(eq=False)
class _Worker:
    """One emulated worker: the spec it runs (its own after a refresh) and what health reports."""

    id: str
    spec: WorkerSpec
    state: Literal["idle", "running", "initializing", "unhealthy"] = "idle"
    refresh_due: bool = False


_QueueItem = tuple[int, int, str, int]  # (priority, sequence, job id, attempt)


class EndpointRuntime:
    """One simulated endpoint. Use from one event loop; workers start with the first job."""

    def __init__(
        self,
        endpoint_id: str,
        config: EndpointConfig,
        *,
        seed: int = 0,
        clock: Clock = time.monotonic,
        policy_bounds: PolicyBounds | None = None,
        sync_handlers_in_thread: bool = True,
        on_terminal: Callable[[JobRecord, dict[str, Any]], None] | None = None,
        spec: WorkerSpec | None = None,
    ) -> None:
        if config.workers < 1:
            raise ValueError(f"endpoint {endpoint_id!r} needs at least one worker")
        self.endpoint_id = endpoint_id
        self.config = config
        self.spec = spec if spec is not None else worker_spec(config)
        self.handler = self.spec.handler
        self.faults = config.faults
        self.policy_bounds = policy_bounds or PolicyBounds()
        self._clock = clock
        self._sync_in_thread = sync_handlers_in_thread
        self._on_terminal = on_terminal
        self._ids = random.Random(f"{seed}/{endpoint_id}/ids")
        self._plans = random.Random(f"{seed}/{endpoint_id}/jobs")
        self._http = random.Random(f"{seed}/{endpoint_id}/http")
        # A worker file's handler is user code that may block: it always runs in a thread.
        self._sync_in_thread = sync_handlers_in_thread or self.spec.from_file
        self.jobs: dict[str, JobRecord] = {}
        self.in_queue: set[str] = set()
        self.in_progress: set[str] = set()
        self.counters = {"completed": 0, "failed": 0, "retried": 0}
        self._worker_states: list[_Worker] = []
        self._expiry: list[tuple[float, int, str]] = []
        self._seq = 0
        self._queue: asyncio.PriorityQueue[_QueueItem] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ faults

    def set_faults(self, **changes: Any) -> Faults:
        """Change some fault options now (validated); returns the faults in force."""
        self.faults = Faults.model_validate({**self.faults.model_dump(), **changes})
        return self.faults

    def http_fault(self, route: str) -> HttpFault | None:
        """The HTTP fault (if any) this request to `route` suffers. Seeded per endpoint."""
        f = self.faults
        if f.http_routes is not None and route not in f.http_routes:
            return None
        if f.http_429_next:
            self.faults = f.model_copy(update={"http_429_next": f.http_429_next - 1})
            return "429"
        if f.http_5xx_next:
            self.faults = f.model_copy(update={"http_5xx_next": f.http_5xx_next - 1})
            return "5xx"
        if f.drop_next:
            self.faults = f.model_copy(update={"drop_next": f.drop_next - 1})
            return "drop"
        if f.http_429_rate and self._http.random() < f.http_429_rate:
            return "429"
        if f.http_5xx_rate and self._http.random() < f.http_5xx_rate:
            return "5xx"
        if f.drop_rate and self._http.random() < f.drop_rate:
            return "drop"
        return None

    def _plan(self) -> JobPlan:
        f = self.faults
        rng = self._plans
        # Always the same number of draws per job, so one fault's rate does not shift the others.
        draws = [rng.random() for _ in range(8)]
        latency = f.latency_ms + draws[0] * f.latency_jitter_ms
        if draws[1] < f.slow_rate:
            latency += f.slow_ms
        return JobPlan(
            latency_s=latency / 1000.0,
            fail=draws[2] < f.failure_rate,
            no_output=draws[3] < f.no_output_rate,
            duplicate=draws[4] < f.duplicate_rate,
            stuck=draws[5] < f.stuck_rate,
            webhook_lost=draws[6] < f.webhook_drop_rate,
        )

    # ------------------------------------------------------------------ jobs

    @property
    def running_workers(self) -> int:
        return sum(1 for worker in self._worker_states if worker.state == "running")

    def new_id(self, *, sync: bool = False) -> str:
        """A job id as RunPod makes them: `<uuid4>-u1`, `sync-<uuid4>-u1` for a /runsync job."""
        job_id = f"{uuid.UUID(int=self._ids.getrandbits(128), version=4)}-u1"
        return f"sync-{job_id}" if sync else job_id

    def _policy_ms(self, value: Any, name: str, default: int, low: int, high: int) -> int:
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise PolicyError(f"policy.{name} must be an integer number of milliseconds")
        if not low <= value <= high:
            raise PolicyError(f"policy.{name} must be between {low} and {high} ms, got {int(value)}")
        return int(value)

    def submit(
        self,
        job_input: Any,
        *,
        execution_timeout_ms: Any = None,
        ttl_ms: Any = None,
        low_priority: bool = False,
        webhook: str | None = None,
        sync: bool = False,
        extras: dict[str, Any] | None = None,
    ) -> JobRecord:
        """Queues a job. `extras` (the request's `s3Config`, `webhookV2`) reach the handler's job."""
        bounds = self.policy_bounds
        timeout_ms = self._policy_ms(
            execution_timeout_ms,
            "executionTimeout",
            self.config.default_execution_timeout_ms,
            bounds.min_execution_timeout_ms,
            bounds.max_execution_timeout_ms,
        )
        ttl = self._policy_ms(ttl_ms, "ttl", self.config.default_ttl_ms, bounds.min_ttl_ms, bounds.max_ttl_ms)
        now = self._clock()
        self._expire_due(now)
        job = JobRecord(
            id=self.new_id(sync=sync),
            endpoint_id=self.endpoint_id,
            input=job_input,
            submitted_at=now,
            execution_timeout_s=timeout_ms / 1000.0,
            ttl_deadline=now + ttl / 1000.0,
            retention_s=self.config.runsync_retention_s if sync else self.config.result_retention_s,
            webhook=webhook,
            low_priority=low_priority,
            plan=self._plan(),
            extras=dict(extras or {}),
            clock=self._clock,
        )
        job.expires_at = job.ttl_deadline
        self.jobs[job.id] = job
        self._schedule_expiry(job)
        self.in_queue.add(job.id)
        if not job.plan.stuck:
            self._enqueue(job)
        return job

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown or gone (ttl passed, result retention passed)."""
        job = self.jobs.get(job_id)
        if job is not None and job.expires_at <= self._clock():
            self._remove(job)
            return None
        return job

    def cancel(self, job: JobRecord) -> None:
        if job.status.terminal:
            return
        self._leave_active(job)
        job.queued = False
        job.status = RunStatus.CANCELLED
        job.attempt += 1
        if job.task is not None and not job.task.done():
            job.task.cancel()
        self._settle(job)

    def retry(self, job: JobRecord) -> None:
        if job.status not in (RunStatus.FAILED, RunStatus.TIMED_OUT):
            raise PolicyError(f"only FAILED or TIMED_OUT jobs can be retried; this one is {job.status.value}")
        job.status = RunStatus.IN_QUEUE
        job.output, job.has_output, job.error = None, False, None
        job.started_at = job.delay_ms = job.execution_ms = None
        job.worker_id = None
        job.expires_at = job.ttl_deadline
        job.stream.clear()
        job.stream_cursor = 0
        job.retries += 1
        self.counters["retried"] += 1
        self.in_queue.add(job.id)
        self._enqueue(job)

    def purge(self) -> int:
        """Cancels every job still waiting in the queue; returns how many."""
        removed = 0
        for job_id in list(self.in_queue):
            job = self.jobs.get(job_id)
            if job is not None and job.status is RunStatus.IN_QUEUE:
                self.cancel(job)
                job.error = "removed from the queue by purge-queue"
                removed += 1
        return removed

    def health(self) -> dict[str, Any]:
        """Jobs by status and workers by state. Workers start with the first job; until then all
        count as idle and ready. `throttled` is always 0 (the emulator never runs out of GPUs)."""
        self._expire_due(self._clock())
        states = Counter(worker.state for worker in self._worker_states)
        started = len(self._worker_states)
        idle = states["idle"] + max(self.config.workers - started, 0)
        return {
            "jobs": {
                "completed": self.counters["completed"],
                "failed": self.counters["failed"],
                "inProgress": len(self.in_progress),
                "inQueue": len(self.in_queue),
                "retried": self.counters["retried"],
            },
            "workers": {
                "idle": idle,
                "initializing": states["initializing"],
                "ready": idle,
                "running": states["running"],
                "throttled": 0,
                "unhealthy": states["unhealthy"],
            },
        }

    def take_stream(self, job: JobRecord) -> list[dict[str, Any]]:
        """The partial outputs produced since the last stream read (the cursor is the job's: RunPod
        hands each part out once)."""
        chunks = job.stream[job.stream_cursor :]
        job.stream_cursor = len(job.stream)
        return [{"output": chunk} for chunk in chunks]

    async def wait_terminal(self, job: JobRecord, timeout_s: float) -> bool:
        """Waits until the job is terminal (True), is gone or `timeout_s` passed (False)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not job.status.terminal:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or job.id not in self.jobs:
                return False
            await self.wait_change(job, remaining)
        return job.id in self.jobs

    async def wait_change(self, job: JobRecord, timeout_s: float) -> None:
        """Waits until the job changes (a status, a progress update, a stream part), is gone, or
        `timeout_s` passed: what a long poll (`?wait=`) waits for."""
        if job.status.terminal or job.id not in self.jobs or timeout_s <= 0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        job.waiters.append(future)
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass
        finally:
            if future in job.waiters:
                job.waiters.remove(future)

    async def wait_stream(self, job: JobRecord, timeout_s: float) -> None:
        """Waits until the job has an unread stream part, ends, is gone, or `timeout_s` passed."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while job.stream_cursor >= len(job.stream) and not job.status.terminal and job.id in self.jobs:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            await self.wait_change(job, remaining)

    async def aclose(self) -> None:
        if self._loop is asyncio.get_running_loop():  # tasks of a closed loop are gone with it
            for task in self._workers:
                task.cancel()
            for job in self.jobs.values():
                if job.task is not None and not job.task.done():
                    job.task.cancel()
            if self._workers:
                await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._queue = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ internals

    def _enqueue(self, job: JobRecord) -> None:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:
            self._restart_on(loop)
        assert self._queue is not None
        job.queued = True
        self._seq += 1
        self._queue.put_nowait((1 if job.low_priority else 0, self._seq, job.id, job.attempt))

    def _restart_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Workers live on the loop that queued the first job; when a caller comes from another loop
        (the first one closed: a test per loop), the queue and workers start again there."""
        stale = self._queue is not None
        self._loop = loop
        self._queue = asyncio.PriorityQueue()
        self._workers = []
        self._worker_states = []
        self._start_workers()
        if stale:
            for waiting in sorted(self.jobs.values(), key=lambda j: j.submitted_at):
                if waiting.queued:
                    self._seq += 1
                    self._queue.put_nowait(
                        (1 if waiting.low_priority else 0, self._seq, waiting.id, waiting.attempt)
                    )

    def _start_workers(self) -> None:
        for n in range(self.config.workers):
            worker_id = f"{self.endpoint_id}-w{n}-{uuid.UUID(int=self._ids.getrandbits(128)).hex[:8]}"
            worker = _Worker(worker_id, self.spec)
            self._worker_states.append(worker)
            self._workers.append(asyncio.create_task(self._work(worker), name=worker_id))

    def _schedule_expiry(self, job: JobRecord) -> None:
        self._seq += 1
        heapq.heappush(self._expiry, (job.expires_at, self._seq, job.id))

    def _expire_due(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, _, job_id = heapq.heappop(self._expiry)
            job = self.jobs.get(job_id)
            if job is not None and job.expires_at <= now:
                self._remove(job)

    def _remove(self, job: JobRecord) -> None:
        self.jobs.pop(job.id, None)
        self._leave_active(job)
        job.queued = False
        job.attempt += 1
        if job.task is not None and not job.task.done():
            job.task.cancel()
        self._wake(job)

    def _leave_active(self, job: JobRecord) -> None:
        self.in_queue.discard(job.id)
        self.in_progress.discard(job.id)

    def _wake(self, job: JobRecord) -> None:
        """The job changed: every long poll waiting on it answers now."""
        job.changes += 1
        for future in job.waiters:
            if not future.done():
                future.set_result(None)
        job.waiters.clear()

    def _settle(self, job: JobRecord) -> None:
        """Bookkeeping once a job reached a terminal status."""
        now = self._clock()
        job.expires_at = min(job.ttl_deadline, now + job.retention_s)
        self._schedule_expiry(job)
        self._wake(job)

    def _concurrency(self, worker: _Worker, current: int) -> int:
        modifier = worker.spec.concurrency_modifier
        if modifier is None:
            return current
        try:
            wanted = modifier(current)
        except Exception as exc:
            log.warning(
                "runpod_worker.concurrency_modifier_failed", endpoint_id=self.endpoint_id, error=str(exc)
            )
            return current
        if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
            log.warning("runpod_worker.concurrency_ignored", endpoint_id=self.endpoint_id, value=repr(wanted))
            return current
        return wanted

    async def _work(self, worker: _Worker) -> None:
        """One worker: takes up to its concurrency of jobs at once; with refresh_worker, imports its
        worker file afresh after each job before it takes another."""
        assert self._queue is not None
        queue = self._queue
        running: set[asyncio.Future[bool]] = set()
        getter: asyncio.Task[_QueueItem] | None = None
        held: _QueueItem | None = None
        concurrency = self._concurrency(worker, 1)
        try:
            while True:
                if worker.refresh_due and not running:
                    if not await self._refresh(worker):
                        return  # unhealthy: the fresh import failed; this worker takes no more jobs
                    concurrency = self._concurrency(worker, concurrency)
                if held is not None and not worker.refresh_due:
                    item, held = held, None
                    self._take(worker, item, running)
                    continue
                if getter is None and not worker.refresh_due and len(running) < concurrency:
                    getter = asyncio.ensure_future(queue.get())
                waiting: set[asyncio.Future[Any]] = set(running)
                if getter is not None:
                    waiting.add(getter)
                if not waiting:
                    continue
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done & running:
                    running.discard(task)
                    if _asked_refresh(task) or worker.spec.refresh_worker:
                        worker.refresh_due = True
                if getter is not None and getter in done:
                    item, getter = getter.result(), None
                    if worker.refresh_due:
                        held = item
                    else:
                        self._take(worker, item, running)
                elif getter is not None and worker.refresh_due:
                    getter.cancel()
                    getter = None
                worker.state = "running" if running else "idle"
                if not running and not worker.refresh_due:
                    concurrency = self._concurrency(worker, concurrency)
        finally:
            if getter is not None:
                getter.cancel()
            for task in running:
                task.cancel()

    def _take(self, worker: _Worker, item: _QueueItem, running: set[asyncio.Future[bool]]) -> None:
        _, _, job_id, attempt = item
        job = self.jobs.get(job_id)
        if job is None or not job.queued or job.attempt != attempt:
            return
        if job.expires_at <= self._clock():
            self._remove(job)
            return
        job.queued = False
        worker.state = "running"
        task = asyncio.ensure_future(self._execute(job, worker, attempt))
        job.task = task  # type: ignore[assignment]
        task.add_done_callback(lambda done: _clear_task(job, done))
        running.add(task)

    async def _refresh(self, worker: _Worker) -> bool:
        """A fresh import of the worker file (in a thread: imports may block); False if it failed."""
        worker.state = "initializing"
        spec = worker.spec
        try:
            if spec.path is not None:
                loop = asyncio.get_running_loop()
                path = spec.path
                worker.spec = await loop.run_in_executor(None, lambda: load_worker(path, previous=spec))
        except WorkerFileError as exc:
            log.warning(
                "runpod_worker.refresh_failed",
                endpoint_id=self.endpoint_id,
                worker_id=worker.id,
                error=str(exc),
            )
            worker.state = "unhealthy"
            return False
        worker.refresh_due = False
        worker.state = "idle"
        return True

    async def _execute(self, job: JobRecord, worker: _Worker, attempt: int) -> bool:
        """Runs one job; True when its result asked for a fresh worker (`refresh_worker`)."""
        now = self._clock()
        self.in_queue.discard(job.id)
        self.in_progress.add(job.id)
        job.status = RunStatus.IN_PROGRESS
        job.worker_id = worker.id
        job.started_at = now
        job.delay_ms = round((now - job.submitted_at) * 1000)
        job.execution_ms = None
        job.output, job.has_output, job.error = None, False, None
        job.executions += 1
        self._wake(job)
        plan = job.plan
        try:
            result = await asyncio.wait_for(self._run(job, worker, plan, attempt), job.execution_timeout_s)
        except TimeoutError:
            result = _Result(
                RunStatus.TIMED_OUT,
                error=f"execution exceeded executionTimeout ({round(job.execution_timeout_s * 1000)} ms)",
            )
        if job.attempt != attempt or job.status is not RunStatus.IN_PROGRESS:
            return False  # cancelled or expired meanwhile
        if plan.no_output and result.status is RunStatus.COMPLETED:
            result = _Result(RunStatus.COMPLETED)
        self._publish(job, result, streamed=_is_generator(worker.spec.handler))
        if plan.duplicate and job.executions == 1:
            # The platform lost track of the worker and runs the job again: the first result is
            # visible (and its webhook sent) until a worker picks the job up a second time.
            job.attempt += 1
            job.retries += 1
            self.in_queue.add(job.id)
            self._enqueue(job)
        return result.refresh

    def _handler_job(self, job: JobRecord, attempt: int) -> SandboxJob:
        loop = asyncio.get_running_loop()

        def on_progress(progress: Any) -> None:
            # progress_update sends from a thread of its own, as the SDK does
            loop.call_soon_threadsafe(self._progress, job, attempt, progress)

        return SandboxJob({"id": job.id, "input": job.input, **job.extras}, on_progress)

    def _progress(self, job: JobRecord, attempt: int, progress: Any) -> None:
        """A running job's progress update: IN_PROGRESS with the progress as its output."""
        if job.attempt != attempt or job.status is not RunStatus.IN_PROGRESS:
            return  # the job ended (or ran again) before the update arrived: RunPod drops it too
        try:
            json.dumps(progress, allow_nan=False)
        except (TypeError, ValueError):
            log.warning("runpod_worker.progress_not_json", endpoint_id=self.endpoint_id, job_id=job.id)
            return
        job.output, job.has_output = progress, True
        self._wake(job)

    async def _run(self, job: JobRecord, worker: _Worker, plan: JobPlan, attempt: int) -> _Result:
        if plan.latency_s > 0:
            await asyncio.sleep(plan.latency_s)
        if plan.fail:
            return _Result(RunStatus.FAILED, error="worker exited unexpectedly (injected failure)")
        spec = worker.spec
        request = self._handler_job(job, attempt)
        try:
            if _is_generator(spec.handler):
                return await self._run_generator(job, spec, request)
            if inspect.iscoroutinefunction(spec.handler):
                returned = await spec.handler(request)
            elif self._sync_in_thread:
                loop = asyncio.get_running_loop()
                returned = await loop.run_in_executor(self._thread_pool(), spec.handler, request)
            else:
                returned = spec.handler(request)
            if inspect.isawaitable(returned):
                returned = await returned
        except asyncio.CancelledError:
            raise
        except Exception as err:
            return _Result(RunStatus.FAILED, error=_error_text(err, worker.id))
        return _json_safe(shape_result(returned))

    async def _run_generator(self, job: JobRecord, spec: WorkerSpec, request: dict[str, Any]) -> _Result:
        partials: list[Any] = []

        def add(partial: Any) -> _Result | None:
            if _failed_partial(partial):
                return _Result(RunStatus.FAILED, error=str(partial["error"]))
            partials.append(partial)
            job.stream.append(partial)
            self._wake(job)
            return None

        try:
            if inspect.isasyncgenfunction(spec.handler):
                async for partial in spec.handler(request):
                    if (failed := add(partial)) is not None:
                        return failed
            else:
                generator = spec.handler(request)
                loop = asyncio.get_running_loop()
                done = object()
                while True:
                    if self._sync_in_thread:
                        partial = await loop.run_in_executor(self._thread_pool(), next, generator, done)
                    else:
                        partial = next(generator, done)
                    if partial is done:
                        break
                    if (failed := add(partial)) is not None:
                        return failed
        except asyncio.CancelledError:
            raise
        except Exception as err:
            return _Result(RunStatus.FAILED, error=f"handler: {err} \ntraceback: {traceback.format_exc()}")
        # Without return_aggregate_stream a RunPod worker reports `[]`: the parts are on /stream only.
        return _json_safe(
            _Result(RunStatus.COMPLETED, partials if spec.return_aggregate_stream else [], True)
        )

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            # Threads start on demand: room for every worker taking many jobs at once.
            self._executor = ThreadPoolExecutor(
                max_workers=max(self.config.workers * 16, 32), thread_name_prefix=f"runpod-{self.endpoint_id}"
            )
        return self._executor

    def _publish(self, job: JobRecord, result: _Result, *, streamed: bool) -> None:
        now = self._clock()
        self.in_progress.discard(job.id)
        job.status = result.status
        job.output, job.has_output, job.error = result.output, result.has_output, result.error
        job.execution_ms = round((now - (job.started_at or now)) * 1000)
        job.completions += 1
        if result.has_output and not streamed:
            job.stream.append(result.output)
        if result.status is RunStatus.COMPLETED:
            self.counters["completed"] += 1
        else:
            self.counters["failed"] += 1
        self._settle(job)
        if self._on_terminal is not None and job.webhook and not job.plan.webhook_lost:
            self._on_terminal(job, job.payload())


def _is_generator(handler: Handler) -> bool:
    return inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler)


def _asked_refresh(task: asyncio.Future[bool]) -> bool:
    """Whether a finished job's result asked for a fresh worker; a cancelled job (cancel, ttl) did not."""
    if task.cancelled():
        return False
    error = task.exception()
    if error is not None:
        log.error("runpod_worker.job_crashed", error=f"{type(error).__name__}: {error}")
        return False
    return task.result()


def _clear_task(job: JobRecord, task: asyncio.Future[Any]) -> None:
    if job.task is task:
        job.task = None


def _failed_partial(partial: Any) -> bool:
    return isinstance(partial, dict) and bool(partial.get("error"))


def builtin_endpoints(workers: int = 4) -> dict[str, EndpointConfig]:
    """The demo endpoints the sandbox always serves."""
    return {
        name: EndpointConfig(handler=handler, workers=workers) for name, handler in BUILTIN_HANDLERS.items()
    }


class RunPodState:
    """Every simulated endpoint of one emulator (or one `InProcessCompute`), by endpoint id.

    `endpoints` map an id to an `EndpointConfig`, a handler, `"package.module:function"`, or the path
    of a RunPod worker file (or its folder): one mechanism for every way of mounting a handler."""

    def __init__(
        self,
        endpoints: Mapping[str, EndpointConfig | str | Handler] | None = None,
        *,
        seed: int = 0,
        clock: Clock | None = None,
        policy_bounds: PolicyBounds | None = None,
        sync_handlers_in_thread: bool = True,
        on_terminal: Callable[[JobRecord, dict[str, Any]], None] | None = None,
    ) -> None:
        self.seed = seed
        self.clock: Clock = clock or time.monotonic
        self.policy_bounds = policy_bounds or PolicyBounds()
        self._sync_in_thread = sync_handlers_in_thread
        self.on_terminal = on_terminal
        self.endpoints: dict[str, EndpointRuntime] = {}
        for endpoint_id, config in {**builtin_endpoints(), **(endpoints or {})}.items():
            self.add_endpoint(endpoint_id, config)

    def make_endpoint(self, endpoint_id: str, config: EndpointConfig | str | Handler) -> EndpointRuntime:
        """An endpoint's runtime, not mounted yet. Imports a worker file: call it off the event loop."""
        if not endpoint_id or not all(c.isalnum() or c in "-_" for c in endpoint_id):
            raise ValueError(f"an endpoint id uses letters, digits, '-' and '_', got {endpoint_id!r}")
        return EndpointRuntime(
            endpoint_id,
            endpoint_config(config),
            seed=self.seed,
            clock=self.clock,
            policy_bounds=self.policy_bounds,
            sync_handlers_in_thread=self._sync_in_thread,
            on_terminal=self._notify,
        )

    def mount(self, runtime: EndpointRuntime) -> EndpointRuntime:
        """Mounts (or replaces) an endpoint. A replaced endpoint's workers keep their jobs' loop."""
        self.endpoints[runtime.endpoint_id] = runtime
        return runtime

    def add_endpoint(self, endpoint_id: str, config: EndpointConfig | str | Handler) -> EndpointRuntime:
        """Mounts (or replaces) an endpoint."""
        return self.mount(self.make_endpoint(endpoint_id, config))

    def _notify(self, job: JobRecord, payload: dict[str, Any]) -> None:
        if self.on_terminal is not None:
            self.on_terminal(job, payload)

    def endpoint(self, endpoint_id: str) -> EndpointRuntime | None:
        return self.endpoints.get(endpoint_id)

    def set_faults(self, endpoint_id: str, **changes: Any) -> Faults:
        return self.endpoints[endpoint_id].set_faults(**changes)

    def reset_faults(self, endpoint_id: str) -> Faults:
        runtime = self.endpoints[endpoint_id]
        runtime.faults = Faults()
        return runtime.faults

    def find_job(self, job_id: str) -> JobRecord | None:
        for runtime in self.endpoints.values():
            job = runtime.jobs.get(job_id)
            if job is not None:
                return job
        return None

    async def aclose(self) -> None:
        for runtime in self.endpoints.values():
            await runtime.aclose()
