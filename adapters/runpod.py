"""RunPod serverless over HTTP: the `ComputeGateway` for the hosted contract (runpod-serverless.md).

What the engine can rely on:
- every response is validated (pydantic, unknown fields ignored); a body that does not match the
  contract (not JSON, no id, an unknown status) raises `BadResponse` with a clear message;
- reads that fail in a way worth retrying (timeouts, dropped connections, 5xx) raise `Unavailable`
  (adapters/http.py's table maps statuses and transport failures for both production clients);
  compute moves no money, so the engine may retry them and may re-submit a job (it may run twice);
- 429 is answered with backoff (Retry-After when given) and retried; a client-side limiter per
  endpoint and route keeps under the documented limits in the first place;
- `wait()` polls with capped exponential backoff and jitter, bounded by its timeout, and classifies
  the terminal state: only COMPLETED with output is a success, and the empty aggregate `[]` is no
  output (a generator handler without `return_aggregate_stream` ends COMPLETED with `[]`: its parts
  were only on `/stream`, so there is nothing to pay for);
- a status outside the six known ones (RunPod's docs also name `RUNNING`) is a job still running:
  its id is kept and polling goes on, with one warning per job naming the status. Only a status that
  is not a word at all is a `BadResponse`. So a runsync answering such a status is never submitted again;
- progress: an IN_PROGRESS status with an `output` carries the handler's `progress_update` payload;
  `wait(on_progress=...)` hands each distinct value to the caller once, never once per poll;
- streaming endpoints (`streaming=`, none by default: RunPod's API does not say which endpoints
  stream): `wait()` reads `/stream` instead of `/status` (one read a poll; each read answers the
  parts produced since the previous one, the service's cursor) until the job ended and nothing more
  came, then reads `/status` once. When that status's output is the empty aggregate, the job's output
  is the list of the parts `/stream` delivered (with `return_aggregate_stream` the status holds the
  same list). Jobs there are submitted through `/run`: a runsync answer would end the job before a
  single part was read, and a runsync result is kept for a minute only. Progress is not observed on
  streaming endpoints (`/stream` does not carry it);
- with a `SyncPolicy`, `submit()` uses `/runsync` with a bounded wait: a job that ends inside the
  wait comes back in the same round trip (and `wait()` returns it without polling), a longer one
  comes back `IN_QUEUE`/`IN_PROGRESS` with its id and `wait()` polls as usual. The price is that the
  run's id is known only when the runsync answers (at most the wait later): until then it cannot be
  cancelled, and an engine that crashes meanwhile submits the job again. So an endpoint whose jobs
  mostly outlast the wait goes back to `/run` (probing runsync now and then);
- the API key never appears in a repr, a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from podsettle.adapters.http import (
    Answer,
    HttpClient,
    Replier,
    Timeouts,
    TransportFailure,
    reason,
    status_error,
    transport_error,
)
from podsettle.adapters.limits import RateLimiter
from podsettle.adapters.ports import (
    RUNSYNC_READ_MARGIN_S,
    BadResponse,
    NotFound,
    ProgressCallback,
    RateLimited,
    Rejected,
    RunOutcome,
    RunState,
    RunStatus,
    Unauthorized,
    Unavailable,
)
from podsettle.support.logs import Redactor, get_logger

__all__ = [
    "BODY_LIMITS",
    "DEFAULT_BASE_URL",
    "DEFAULT_CLIENT_LIMITS",
    "MAX_INPUT_BYTES",
    "ClientLimit",
    "PollPolicy",
    "RunPodCompute",
    "SyncPolicy",
    "body_size",
    "classify_run",
    "input_json",
    "request_body",
]

log = get_logger(__name__)

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"
MAX_INPUT_BYTES = 10 * 1024 * 1024  # /run's documented body limit (the whole body, not just the input)
# The documented body limits per submitting route; a request over its route's limit is never sent.
BODY_LIMITS: dict[str, int] = {"run": MAX_INPUT_BYTES, "runsync": 20 * 1024 * 1024}
RUNSYNC_MIN_WAIT_MS = 1000  # the documented bounds of /runsync's ?wait=
RUNSYNC_MAX_WAIT_MS = 300_000
FINISHED_KEPT = 10_000  # terminal states from runsync answers not yet taken by wait()
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
# What a job status looks like: RunPod's are upper-case words (IN_QUEUE, RUNNING, ...). A status of
# that shape that the client does not know is a job still running; anything else is no status.
_STATUS_WORD = re.compile(r"^[A-Z][A-Z_]{0,39}$")
WARNED_KEPT = 10_000  # runs already warned about for an unknown status (one warning per run)
PROGRESS_SEEN_KEPT = 1_000  # distinct progress values remembered per wait (beyond: only the last one)
DEFAULT_TIMEOUT = Timeouts(connect=5.0, read=30.0, pool=30.0)
# The error statuses the contract documents (runpod-serverless.md); any other cannot be trusted.
CONTRACT_STATUSES = frozenset({400, 401, 403, 404, 413, 422, 429})


@dataclass(frozen=True)
class PollPolicy:
    """How `wait()` polls: the first read after `initial_s`, then `factor` times longer each time up
    to `max_s`; each delay is spread by +/- `jitter` (a fraction) so many waiters do not poll in step."""

    initial_s: float = 0.2
    factor: float = 2.0
    max_s: float = 5.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.factor < 1 or self.max_s < self.initial_s or not 0 <= self.jitter < 1:
            raise ValueError(
                "PollPolicy needs initial_s > 0, factor >= 1, max_s >= initial_s, 0 <= jitter < 1"
            )


@dataclass(frozen=True)
class SyncPolicy:
    """Submitting through `/runsync?wait=wait_ms` (the contract allows 1000..300000 ms).

    Per endpoint, the last `window` runsyncs are remembered; when fewer than `min_share` of them ended
    inside the wait, jobs there are long: submissions use `/run` (the id at once), and one in
    `probe_every` tries runsync again in case the jobs got shorter."""

    wait_ms: int = 1000
    window: int = 20
    min_share: float = 0.5
    probe_every: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.wait_ms, bool) or not isinstance(self.wait_ms, int):
            raise ValueError("SyncPolicy.wait_ms must be an integer number of milliseconds")
        if not RUNSYNC_MIN_WAIT_MS <= self.wait_ms <= RUNSYNC_MAX_WAIT_MS:
            raise ValueError(
                f"SyncPolicy.wait_ms must be between {RUNSYNC_MIN_WAIT_MS} and {RUNSYNC_MAX_WAIT_MS} ms"
            )
        if self.window < 1 or not 0 <= self.min_share <= 1 or self.probe_every < 1:
            raise ValueError("SyncPolicy needs window >= 1, 0 <= min_share <= 1 and probe_every >= 1")


@dataclass
class _SyncRecord:
    """Recent runsync outcomes of one endpoint (True: ended inside the wait)."""

    recent: deque[bool]
    skipped: int = 0


@dataclass(frozen=True)
class ClientLimit:
    """Client-side: at most `per_window` calls per `window_s` and `concurrent` in flight."""

    per_window: int
    concurrent: int
    window_s: float = 10.0


# 90 % of the documented per-endpoint limits (status and stream share theirs).
DEFAULT_CLIENT_LIMITS: dict[str, ClientLimit] = {
    "run": ClientLimit(900, 180),
    "runsync": ClientLimit(1800, 360),
    "status": ClientLimit(1800, 360),
    "cancel": ClientLimit(90, 18),
    "purge-queue": ClientLimit(2, 1),
}
_ROUTE_GROUP = {
    "run": "run",
    "runsync": "runsync",
    "status": "status",
    "stream": "status",  # /status and /stream share their limit
    "cancel": "cancel",
    "purge-queue": "purge-queue",
}


# ---------------------------------------------------------------------------------------- payloads


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Submitted(_Body):
    id: str = Field(min_length=1)
    status: str | None = None


class _StatusObject(_Body):
    id: str = Field(min_length=1)
    status: str
    delayTime: float | None = None
    executionTime: float | None = None
    output: Any = None
    error: Any = None
    workerId: str | None = None


class _StreamPart(_Body):
    output: Any = None


class _StreamAnswer(_Body):
    status: str
    stream: list[_StreamPart] = Field(default_factory=list)


class _HealthJobs(_Body):
    completed: int = 0
    failed: int = 0
    inProgress: int = 0
    inQueue: int = 0
    retried: int = 0


class _HealthWorkers(_Body):
    idle: int = 0
    running: int = 0
    # RunPod also reports workers that are starting, ready, throttled by capacity, or failing.
    initializing: int = 0
    ready: int = 0
    throttled: int = 0
    unhealthy: int = 0


class _Health(_Body):
    jobs: _HealthJobs
    workers: _HealthWorkers


class _Purged(_Body):
    removed: int
    status: str | None = None


_M = TypeVar("_M", bound=_Body)


# ---------------------------------------------------------------------------------------- outcome


def _error_summary(error: str) -> str:
    """A RunPod worker reports a handler exception as a JSON string; the message is what matters."""
    with contextlib.suppress(ValueError):
        parsed = json.loads(error)
        if isinstance(parsed, dict) and parsed.get("error_message"):
            kind = str(parsed.get("error_type", "")).removeprefix("<class '").removesuffix("'>")
            return f"{kind}: {parsed['error_message']}" if kind else str(parsed["error_message"])
    return error[:500]


def classify_run(state: RunState) -> RunOutcome:
    """A terminal state classified for the engine: only COMPLETED with delivered output succeeds
    (`RunState.delivered`: present, and not the empty aggregate `[]`)."""
    details = {"status": state.status.value}
    if state.error is not None:
        details["error"] = state.error
    if state.worker_id is not None:
        details["worker_id"] = state.worker_id
    status = state.status
    if status is RunStatus.COMPLETED and state.delivered:
        return RunOutcome(state, True, "completed", details)
    if status is RunStatus.COMPLETED and state.has_output:
        reason = (
            "completed with the empty aggregate [] as output: a generator handler without "
            "return_aggregate_stream, whose parts were only on /stream"
        )
    elif status is RunStatus.COMPLETED:
        reason = "completed without output"
        if state.error:
            reason += f": {_error_summary(state.error)}"
    elif status is RunStatus.FAILED:
        reason = f"failed: {_error_summary(state.error)}" if state.error else "failed without an error text"
    elif status is RunStatus.CANCELLED:
        reason = "cancelled" + (f": {state.error}" if state.error else "")
    elif status is RunStatus.TIMED_OUT:
        reason = "timed out: " + (_error_summary(state.error) if state.error else "executionTimeout exceeded")
    else:
        raise ValueError(f"{status.value} is not a terminal status")
    return RunOutcome(state, False, reason, details)


def not_found_outcome(run_id: str, last: RunState | None) -> RunOutcome:
    state = last or RunState(run_id=run_id, status=RunStatus.IN_QUEUE)
    return RunOutcome(
        state,
        False,
        "not found (404): the job's ttl expired or its result retention passed",
        {"status": "NOT_FOUND", "last_status": state.status.value},
    )


def deadline_outcome(run_id: str, last: RunState | None, timeout_s: float) -> RunOutcome:
    state = last or RunState(run_id=run_id, status=RunStatus.IN_QUEUE)
    return RunOutcome(
        state,
        False,
        "deadline passed",
        {"status": state.status.value, "timeout_s": f"{timeout_s:g}", "seen": str(last is not None).lower()},
    )


# ---------------------------------------------------------------------------------------- client


class RunPodCompute:
    """`ComputeGateway` over RunPod's serverless HTTP API (or the sandbox's emulator of it)."""

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        timeout: Timeouts = DEFAULT_TIMEOUT,
        poll: PollPolicy | None = None,
        limits: Mapping[str, ClientLimit] | None = None,
        max_rate_limit_retries: int = 5,
        max_connections: int = 100,
        max_input_bytes: int = MAX_INPUT_BYTES,
        replier: Replier | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sync: SyncPolicy | None = None,
        streaming: Collection[str] = (),
    ) -> None:
        """`streaming`: the endpoints whose handlers are generators read through `/stream` (their
        output is what `/stream` delivered); none by default."""
        if not api_key or not api_key.strip():
            raise Unauthorized("no RunPod API key given (set RUNPOD_API_KEY)")
        self.base_url = base_url.rstrip("/")
        self.poll = poll or PollPolicy()
        self.limits = dict(DEFAULT_CLIENT_LIMITS if limits is None else limits)
        self.max_rate_limit_retries = max_rate_limit_retries
        self.max_input_bytes = max_input_bytes
        self.requests_sent = 0  # every HTTP request made, for polling-efficiency figures
        self.sync = sync
        self.streaming = frozenset(streaming)
        for endpoint_id in self.streaming:
            _check_id(endpoint_id, "endpoint_id")
        self._warned: OrderedDict[str, None] = OrderedDict()
        self._streamed: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()
        self.runsync_finished = 0  # runsyncs that brought the result back in their own answer
        self._sync_records: dict[str, _SyncRecord] = {}
        self._finished: OrderedDict[tuple[str, str], RunState] = OrderedDict()
        self._key = SecretStr(api_key)
        self._redactor = Redactor([api_key])
        self._clock = clock
        self._rng = random.Random(seed)
        self._limiters: dict[tuple[str, str], tuple[RateLimiter, asyncio.Semaphore]] = {}
        self._client = HttpClient(
            self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeouts=timeout,
            max_connections=max_connections,
            replier=replier,
        )

    @property
    def longest_call_s(self) -> float:
        """The longest one submission can last (a runsync's wait included; see `Timeouts.longest_s`):
        a claim on a start must outlast it (the engine's claim lease), else a live engine's start is
        taken over and the job runs twice."""
        read = self._client.timeouts.read
        if self.sync is not None and read is not None:
            read = max(read, self.sync.wait_ms / 1000 + RUNSYNC_READ_MARGIN_S)
        return self._client.timeouts.longest_s(read)

    def __repr__(self) -> str:
        return f"RunPodCompute(base_url={self.base_url!r})"

    async def __aenter__(self) -> RunPodCompute:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------ the port

    async def submit(
        self,
        endpoint_id: str,
        job_input: bytes | dict[str, Any],
        *,
        execution_timeout_ms: int | None = None,
        ttl_ms: int | None = None,
        webhook: str | None = None,
        low_priority: bool = False,
    ) -> str:
        """`job_input` is the input's canonical JSON bytes (sent as they are, so the bytes the engine
        digested are the bytes RunPod receives) or a dict, encoded here."""
        _check_id(endpoint_id, "endpoint_id")
        body = request_body(
            input_json(job_input),
            execution_timeout_ms=execution_timeout_ms,
            ttl_ms=ttl_ms,
            webhook=webhook,
            low_priority=low_priority,
        )
        runsync = (
            self.sync is not None
            and endpoint_id not in self.streaming
            and self._use_runsync(endpoint_id, self.sync)
        )
        limit = BODY_LIMITS["runsync"] if runsync else self.max_input_bytes
        if len(body) > limit:
            route = "runsync" if runsync else "run"
            raise Rejected(
                f"body is {len(body)} bytes, over the {limit}-byte limit of /{route}; nothing was sent",
                code="input_too_large",
            )
        if runsync:
            assert self.sync is not None
            return await self._runsync(endpoint_id, body, self.sync)
        what = f"POST /{endpoint_id}/run"
        data = await self._request("POST", endpoint_id, "run", f"/{endpoint_id}/run", what, body=body)
        submitted = self._parse(_Submitted, data, what)
        return submitted.id

    def _use_runsync(self, endpoint_id: str, sync: SyncPolicy) -> bool:
        record = self._sync_records.get(endpoint_id)
        if record is None or len(record.recent) < min(sync.window, 5):
            return True
        if sum(record.recent) >= sync.min_share * len(record.recent):
            return True
        record.skipped += 1
        if record.skipped >= sync.probe_every:
            record.skipped = 0
            return True
        return False

    async def _runsync(self, endpoint_id: str, body: bytes, sync: SyncPolicy) -> str:
        """`POST /runsync?wait=`: the status object, terminal when the job ended inside the wait."""
        path = f"/{endpoint_id}/runsync?wait={sync.wait_ms}"
        what = f"POST /{endpoint_id}/runsync"
        # The answer may take the whole wait: the read timeout outlasts it by a margin, and no more
        # (an engine sharing the store takes over a start left unanswered past its claim lease).
        read = sync.wait_ms / 1000 + RUNSYNC_READ_MARGIN_S
        data = await self._request("POST", endpoint_id, "runsync", path, what, body=body, read_timeout=read)
        state = self._state(data, None, what)
        record = self._sync_records.get(endpoint_id)
        if record is None:
            record = self._sync_records[endpoint_id] = _SyncRecord(deque(maxlen=sync.window))
        record.recent.append(state.status.terminal)
        if state.status.terminal:
            self.runsync_finished += 1
            self._finished[(endpoint_id, state.run_id)] = state
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
        return state.run_id

    def body_and_limit(self, input_size: int, *, execution_timeout_ms: int, ttl_ms: int) -> tuple[int, int]:
        # /run's limit even with runsync configured: an endpoint may be moved back to /run.
        size = body_size(input_size, execution_timeout_ms=execution_timeout_ms, ttl_ms=ttl_ms)
        return size, self.max_input_bytes

    async def status(self, endpoint_id: str, run_id: str) -> RunState:
        _check_id(endpoint_id, "endpoint_id")
        _check_id(run_id, "run_id")
        what = f"GET /{endpoint_id}/status/{run_id}"
        data = await self._request("GET", endpoint_id, "status", f"/{endpoint_id}/status/{run_id}", what)
        return self._state(data, run_id, what)

    def take_finished(self, endpoint_id: str, run_id: str) -> RunOutcome | None:
        """The outcome a runsync answer already brought for this run (taken: asked once), else None.
        Lets a caller record the start and the outcome together instead of calling `wait()`."""
        finished = self._finished.pop((endpoint_id, run_id), None)
        return None if finished is None else classify_run(finished)

    async def wait(
        self,
        endpoint_id: str,
        run_id: str,
        *,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
    ) -> RunOutcome:
        finished = self._finished.pop((endpoint_id, run_id), None)
        if finished is not None:  # the runsync answer brought it: no need to ask again
            return classify_run(finished)
        if endpoint_id in self.streaming:
            return await self._wait_streaming(endpoint_id, run_id, timeout_s)
        progress = _Progress(on_progress)
        deadline = self._clock() + timeout_s
        delay = self.poll.initial_s
        last: RunState | None = None
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return deadline_outcome(run_id, last, timeout_s)
            pause = min(delay * (1 + self._rng.uniform(-self.poll.jitter, self.poll.jitter)), remaining)
            await asyncio.sleep(pause)
            delay = min(delay * self.poll.factor, self.poll.max_s)
            try:
                state = await self.status(endpoint_id, run_id)
            except NotFound:
                return not_found_outcome(run_id, last)
            except (Unavailable, RateLimited) as exc:
                log.warning(
                    "runpod.status_unavailable", endpoint_id=endpoint_id, run_id=run_id, error=str(exc)
                )
                continue
            last = state
            if state.status.terminal:
                return classify_run(state)
            if state.status is RunStatus.IN_PROGRESS and state.reported is None and state.has_output:
                await progress.seen(state.output)

    async def _wait_streaming(self, endpoint_id: str, run_id: str, timeout_s: float) -> RunOutcome:
        """`wait()` for a streaming endpoint: read `/stream` until the job ended and a read brought
        nothing more, then `/status` once for the rest of the status object."""
        # The parts read so far outlive this call: the service answers each part once, so a wait
        # that ends in an error and is called again goes on from them (in this process only).
        key = (endpoint_id, run_id)
        parts = self._streamed.pop(key, None) or []
        self._streamed[key] = parts
        while len(self._streamed) > FINISHED_KEPT:
            self._streamed.popitem(last=False)
        outcome = await self._read_stream(endpoint_id, run_id, timeout_s, parts)
        self._streamed.pop(key, None)
        return outcome

    async def _read_stream(
        self, endpoint_id: str, run_id: str, timeout_s: float, parts: list[Any]
    ) -> RunOutcome:
        deadline = self._clock() + timeout_s
        delay = self.poll.initial_s
        ended = False
        last: RunState | None = None
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return deadline_outcome(run_id, last, timeout_s)
            if not ended:  # once the job ended, what is left is read at once
                pause = min(delay * (1 + self._rng.uniform(-self.poll.jitter, self.poll.jitter)), remaining)
                await asyncio.sleep(pause)
                delay = min(delay * self.poll.factor, self.poll.max_s)
            try:
                status, new = await self.stream(endpoint_id, run_id)
                if ended and not new:
                    state = await self.status(endpoint_id, run_id)
                    break
            except NotFound:
                return not_found_outcome(run_id, last)
            except (Unavailable, RateLimited) as exc:
                log.warning(
                    "runpod.stream_unavailable", endpoint_id=endpoint_id, run_id=run_id, error=str(exc)
                )
                ended = False  # a failed read is not a reason to stop pausing
                continue
            parts.extend(new)
            last = RunState(run_id=run_id, status=status)
            ended = status.terminal
        if state.status is RunStatus.COMPLETED and parts and (not state.has_output or state.output == []):
            state = dataclasses.replace(state, output=parts, has_output=True)
        if not state.status.terminal:  # /stream said it ended; a status that says otherwise is odd
            raise BadResponse(
                f"GET /{endpoint_id}/status/{run_id}: {state.status.value} after /stream reported the end"
            )
        return classify_run(state)

    async def stream(self, endpoint_id: str, run_id: str) -> tuple[RunStatus, list[Any]]:
        """`GET /stream/{id}`: the job's status and the parts produced since the previous read (the
        service keeps the cursor: a part is answered once)."""
        _check_id(endpoint_id, "endpoint_id")
        _check_id(run_id, "run_id")
        what = f"GET /{endpoint_id}/stream/{run_id}"
        data = await self._request("GET", endpoint_id, "stream", f"/{endpoint_id}/stream/{run_id}", what)
        body = self._parse(_StreamAnswer, data, what)
        status = self._status(body.status, run_id, what)
        return status, [part.output for part in body.stream]

    async def cancel(self, endpoint_id: str, run_id: str) -> RunState:
        _check_id(endpoint_id, "endpoint_id")
        _check_id(run_id, "run_id")
        self._finished.pop((endpoint_id, run_id), None)
        what = f"POST /{endpoint_id}/cancel/{run_id}"
        data = await self._request("POST", endpoint_id, "cancel", f"/{endpoint_id}/cancel/{run_id}", what)
        return self._state(data, run_id, what)

    async def retry(self, endpoint_id: str, run_id: str) -> RunState:
        _check_id(endpoint_id, "endpoint_id")
        _check_id(run_id, "run_id")
        what = f"POST /{endpoint_id}/retry/{run_id}"
        data = await self._request("POST", endpoint_id, "retry", f"/{endpoint_id}/retry/{run_id}", what)
        return self._state(data, run_id, what)

    async def health(self, endpoint_id: str) -> dict[str, Any]:
        _check_id(endpoint_id, "endpoint_id")
        what = f"GET /{endpoint_id}/health"
        data = await self._request("GET", endpoint_id, "health", f"/{endpoint_id}/health", what)
        return self._parse(_Health, data, what).model_dump()

    async def purge_queue(self, endpoint_id: str) -> int:
        _check_id(endpoint_id, "endpoint_id")
        what = f"POST /{endpoint_id}/purge-queue"
        data = await self._request("POST", endpoint_id, "purge-queue", f"/{endpoint_id}/purge-queue", what)
        return self._parse(_Purged, data, what).removed

    # ------------------------------------------------------------------ HTTP

    def _limiter(self, endpoint_id: str, route: str) -> tuple[RateLimiter, asyncio.Semaphore] | None:
        group = _ROUTE_GROUP.get(route)
        limit = self.limits.get(group) if group else None
        if group is None or limit is None:
            return None
        key = (endpoint_id, group)
        pair = self._limiters.get(key)
        if pair is None:
            pair = self._limiters[key] = (
                RateLimiter(limit.per_window, limit.window_s, clock=self._clock),
                asyncio.Semaphore(limit.concurrent),
            )
        return pair

    async def _request(
        self,
        method: str,
        endpoint_id: str,
        route: str,
        path: str,
        what: str,
        *,
        body: bytes | None = None,
        read_timeout: float | None = None,
    ) -> Any:
        limiter = self._limiter(endpoint_id, route)
        headers = {"Content-Type": "application/json"} if body is not None else None
        attempt = 0
        while True:
            if limiter is not None:
                await limiter[0].acquire()
            async with limiter[1] if limiter is not None else contextlib.nullcontext():
                self.requests_sent += 1
                try:
                    response = await self._client.request(
                        method, path, content=body, headers=headers, read_timeout=read_timeout
                    )
                except TransportFailure as failure:
                    raise transport_error(failure, what, money=False, maybe=_may_have(route)) from failure
            if response.status != 429:
                return self._decode(response, what)
            retry_after = self._retry_after(response, attempt)
            if attempt >= self.max_rate_limit_retries:
                raise status_error(
                    429,
                    f"{what}: 429 Too Many Requests after {attempt + 1} attempts",
                    money=False,
                    contract=CONTRACT_STATUSES,
                    retry_after=retry_after,
                )
            log.warning(
                "runpod.rate_limited", request=what, retry_after=round(retry_after, 3), attempt=attempt
            )
            attempt += 1
            if limiter is not None:
                limiter[0].penalize(retry_after)
            else:
                await asyncio.sleep(retry_after)

    def _retry_after(self, response: Answer, attempt: int) -> float:
        header = response.headers.get("retry-after")
        if header is not None:
            with contextlib.suppress(ValueError):
                return min(max(float(header), 0.0), 60.0)
        base = min(self.poll.initial_s * (2.0**attempt), self.poll.max_s)
        return base * (1 + self._rng.uniform(0, self.poll.jitter))

    def _redact(self, text: str) -> str:
        return self._redactor.redact(text)

    def _server_says(self, response: Answer) -> str:
        text = response.text
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            if isinstance(parsed, dict) and "error" in parsed:
                text = str(parsed["error"])
        text = " ".join(self._redact(text).split())
        return f": {text[:300]}" if text else ""

    def _decode(self, response: Answer, what: str) -> Any:
        code = response.status
        if 200 <= code < 300:
            try:
                return response.json()
            except ValueError:
                kind = response.headers.get("content-type", "no content-type")
                snippet = self._redact(response.text[:80])
                raise BadResponse(
                    f"{what}: HTTP {code} with a body that is not JSON "
                    f"({kind}, {len(response.content)} bytes): {snippet!r}"
                ) from None
        # A 401's text may name the key; it says nothing the status does not.
        says = ": the RunPod API key was refused" if code == 401 else self._server_says(response)
        raise status_error(
            code, f"{what}: HTTP {reason(code)}{says}", money=False, contract=CONTRACT_STATUSES
        )

    def _parse(self, model: type[_M], data: Any, what: str) -> _M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
            )
            raise BadResponse(f"{what}: the response does not match the contract ({problems})") from None

    def _state(self, data: Any, run_id: str | None, what: str) -> RunState:
        """A status object; about `run_id` unless None (a runsync answer names a new job)."""
        body = self._parse(_StatusObject, data, what)
        if run_id is not None and body.id != run_id:
            raise BadResponse(f"{what}: the response is about job {body.id!r}, not {run_id!r}")
        status = self._status(body.status, body.id, what)
        error = body.error
        if error is not None and not isinstance(error, str):
            error = json.dumps(error)
        return RunState(
            run_id=body.id,
            status=status,
            output=body.output,
            has_output="output" in body.model_fields_set and body.output is not None,
            error=error,
            delay_ms=None if body.delayTime is None else round(body.delayTime),
            execution_ms=None if body.executionTime is None else round(body.executionTime),
            worker_id=body.workerId,
            reported=None if body.status == status.value else body.status,
        )

    def _status(self, word: str, run_id: str, what: str) -> RunStatus:
        """A known status; an unknown word is a job still running (warned about once per run)."""
        try:
            return RunStatus(word)
        except ValueError:
            pass
        if not _STATUS_WORD.match(word):
            raise BadResponse(f"{what}: {word[:40]!r} is not a job status")
        if run_id not in self._warned:
            self._warned[run_id] = None
            while len(self._warned) > WARNED_KEPT:
                self._warned.popitem(last=False)
            log.warning(
                "runpod.unknown_status",
                request=what,
                run_id=run_id,
                status=word,
                meaning="not one of the known statuses: taken as still running",
            )
        return RunStatus.IN_PROGRESS


class _Progress:
    """The progress values one `wait()` has seen: each distinct one goes to the callback once."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._seen: set[str] = set()
        self._last: str | None = None

    async def seen(self, value: Any) -> None:
        if self._callback is None:
            return
        try:
            key = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError):
            return  # not JSON (a NaN): nothing that could be recorded
        if key == self._last or key in self._seen:
            return
        self._last = key
        if len(self._seen) < PROGRESS_SEEN_KEPT:
            self._seen.add(key)
        await self._callback(value)


def input_json(job_input: bytes | dict[str, Any]) -> bytes:
    """The input as the JSON bytes to send: bytes are taken as they are (the engine's canonical
    form; only their outer braces are checked, re-parsing megabytes would cost more than sending),
    a dict is encoded. Raises `Rejected` for anything that is not a JSON object."""
    if isinstance(job_input, bytes):
        if not (job_input.startswith(b"{") and job_input.endswith(b"}")):
            raise Rejected("input must be the JSON bytes of an object", code="invalid_input")
        return job_input
    if not isinstance(job_input, dict):
        raise Rejected("input must be a JSON object (a dict)", code="invalid_input")
    try:
        return json.dumps(job_input, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise Rejected(f"input is not JSON serializable: {exc}", code="invalid_input") from None


def request_body(
    input_bytes: bytes,
    *,
    execution_timeout_ms: int | None = None,
    ttl_ms: int | None = None,
    webhook: str | None = None,
    low_priority: bool = False,
) -> bytes:
    """The body of a /run or /runsync request: the input's bytes untouched, then the envelope."""
    return b'{"input":' + input_bytes + _envelope(execution_timeout_ms, ttl_ms, webhook, low_priority)


def body_size(
    input_size: int,
    *,
    execution_timeout_ms: int | None = None,
    ttl_ms: int | None = None,
    webhook: str | None = None,
    low_priority: bool = False,
) -> int:
    """How many bytes `request_body` makes of an input of `input_size` bytes (pure: for checking a
    job against `BODY_LIMITS` before anything is recorded or funded)."""
    return (
        len(b'{"input":') + input_size + len(_envelope(execution_timeout_ms, ttl_ms, webhook, low_priority))
    )


def _envelope(
    execution_timeout_ms: int | None, ttl_ms: int | None, webhook: str | None, low_priority: bool
) -> bytes:
    rest: dict[str, Any] = {}
    policy: dict[str, Any] = {}
    for name, value in (("executionTimeout", execution_timeout_ms), ("ttl", ttl_ms)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise Rejected(
                    f"policy.{name} must be a positive integer of milliseconds", code="invalid_policy"
                )
            policy[name] = value
    if low_priority:
        policy["lowPriority"] = True
    if policy:
        rest["policy"] = policy
    if webhook is not None:
        if not webhook.startswith(("http://", "https://")):
            raise Rejected("webhook must be an http(s) URL", code="invalid_webhook")
        rest["webhook"] = webhook
    return b"," + json.dumps(rest, separators=(",", ":")).encode()[1:] if rest else b"}"


def _check_id(value: str, name: str) -> None:
    if not isinstance(value, str) or not _ID.match(value):
        raise Rejected(
            f"{name} must be 1-200 letters, digits, '.', '_' or '-', got {value!r}", code=f"invalid_{name}"
        )


def _may_have(route: str) -> str:
    return "the job may have been queued" if route in ("run", "runsync") else ""
