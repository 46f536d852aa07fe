"""A RunPod serverless emulator: the hosted HTTP contract (runpod-serverless.md) served by Starlette.

`create_runpod_app()` serves, under `/v2/{endpoint_id}/`:

    POST run | runsync          GET|POST status/{id} | stream/{id}       GET status-sync/{id}
    POST cancel/{id} | retry/{id} | purge-queue          GET health

with `Authorization: Bearer <any non-empty key>` or the bare key (as the docs' curl examples send it;
401 otherwise), the documented per-route rate limits (429), body limits (413), queues and workers per
endpoint (see `runpod_worker`), webhooks with the documented retries, and per-endpoint fault
injection.

What RunPod's SDKs and docs establish, and so the emulator does:
- `/runsync` ids are `sync-<uuid>-u1` (`/run` ids `<uuid>-u1`); an unfinished `/runsync` answers 200
  with `{id, status}`, and the JS SDK then long-polls `status-sync`;
- long polls: `GET status/{id}?wait=ms`, `GET status-sync/{id}?wait=ms` (default 90000) and
  `GET stream/{id}?wait=ms` answer as soon as the job ends or changes (status, a progress update, a
  stream part; for `stream`, an unread part), at most `wait` ms later (0..300000); without `wait`
  `status` and `stream` answer at once;
- `/stream` hands each part out once (one cursor per job) as `{"status", "stream": [{"output"}]}`;
- a request's `s3Config` and `webhookV2` are handed to the handler's job as they came;
- `/health` counts workers as idle, initializing, ready, running, throttled and unhealthy.

Admin routes (bearer auth, never faulted or rate limited) change a running emulator:

    GET|POST|DELETE /v2/{endpoint_id}/_faults   read / merge changes into / reset the endpoint's Faults
    GET  /v2/{endpoint_id}/_jobs/{job_id}       a job's internals: executions, completions, fault plan
    PUT  /v2/{endpoint_id}/_endpoint            mount an endpoint: {"handler": "pkg.mod:func" or the path
                                                of a RunPod worker file or folder, "workers": n,
                                                "faults": {...}, "return_aggregate_stream"?: bool,
                                                "refresh_worker"?: bool}; a worker file's own
                                                `start` config wins over the last two

`app.state.runpod` is the `EmulatorState` (endpoints, request counts, webhook deliveries).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from podsettle.sandbox.handlers import Handler
from podsettle.sandbox.runpod_worker import (
    Clock,
    EndpointConfig,
    EndpointRuntime,
    Faults,
    JobRecord,
    PolicyBounds,
    PolicyError,
    RunPodState,
)
from podsettle.support.logs import get_logger

__all__ = ["EmulatorState", "EndpointConfig", "Faults", "PolicyBounds", "RouteLimit", "create_runpod_app"]

log = get_logger(__name__)

MAX_RUN_BYTES = 10 * 1024 * 1024
MAX_RUNSYNC_BYTES = 20 * 1024 * 1024
RUNSYNC_DEFAULT_WAIT_MS = 90_000
STATUS_SYNC_DEFAULT_WAIT_MS = 90_000
MAX_LONG_POLL_MS = 300_000


@dataclass(frozen=True)
class RouteLimit:
    """At most `per_window` requests per window (10 s) and `concurrent` in flight, per endpoint."""

    per_window: int
    concurrent: int


# The contract's limits, by route group (status and stream share theirs).
DOCUMENTED_LIMITS: dict[str, RouteLimit] = {
    "run": RouteLimit(1000, 200),
    "runsync": RouteLimit(2000, 400),
    "status": RouteLimit(2000, 400),
    "cancel": RouteLimit(100, 20),
    "purge-queue": RouteLimit(2, 2),
}
ROUTE_GROUP = {
    "run": "run",
    "runsync": "runsync",
    "status": "status",
    "status-sync": "status",
    "stream": "status",
    "cancel": "cancel",
    "purge-queue": "purge-queue",
}


@dataclass(frozen=True)
class WebhookAttempt:
    job_id: str
    url: str
    attempt: int
    status_code: int | None
    error: str | None
    payload: dict[str, Any]


class _DroppedResponse(Response):
    """Starts a response and never finishes it: the server closes the connection mid-body, so the
    client sees a dropped response although the request took effect."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"id": ', "more_body": True})


class EmulatorState(RunPodState):
    """The emulator's endpoints plus what tests and benchmarks inspect."""

    def __init__(
        self,
        endpoints: Mapping[str, EndpointConfig | str | Handler] | None,
        *,
        seed: int,
        clock: Clock | None,
        policy_bounds: PolicyBounds | None,
        sync_handlers_in_thread: bool,
        rate_limits: Mapping[str, RouteLimit],
        rate_limit_window_s: float,
        webhook_retries: int,
        webhook_retry_interval_s: float,
        webhook_timeout_s: float,
    ) -> None:
        super().__init__(
            endpoints,
            seed=seed,
            clock=clock,
            policy_bounds=policy_bounds,
            sync_handlers_in_thread=sync_handlers_in_thread,
        )
        self.on_terminal = self._schedule_webhook
        self.rate_limits = dict(rate_limits)
        self.rate_limit_window_s = rate_limit_window_s
        self.webhook_retries = webhook_retries
        self.webhook_retry_interval_s = webhook_retry_interval_s
        self.webhook_timeout_s = webhook_timeout_s
        self.requests: Counter[str] = Counter()
        self.webhook_attempts: list[WebhookAttempt] = []
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self._in_flight: Counter[tuple[str, str]] = Counter()
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        self._webhook_client: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ rate limits

    def admit(self, endpoint_id: str, route: str) -> tuple[str, float] | None:
        """None when the request may proceed, else why it is refused (429) and when to come back."""
        group = ROUTE_GROUP.get(route)
        limit = self.rate_limits.get(group) if group else None
        if group is None or limit is None:
            return None
        key = (endpoint_id, group)
        if self._in_flight[key] >= limit.concurrent:
            return f"too many concurrent /{group} requests (limit {limit.concurrent})", 0.1
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = deque()
        now = time.monotonic()
        while window and window[0] <= now - self.rate_limit_window_s:
            window.popleft()
        if len(window) >= limit.per_window:
            message = (
                f"rate limit exceeded: /{group} allows {limit.per_window} requests "
                f"per {self.rate_limit_window_s:g} s"
            )
            return message, max(window[0] + self.rate_limit_window_s - now, 0.001)
        window.append(now)
        return None

    def enter(self, endpoint_id: str, route: str) -> tuple[str, str] | None:
        group = ROUTE_GROUP.get(route)
        if group is None:
            return None
        key = (endpoint_id, group)
        self._in_flight[key] += 1
        return key

    def leave(self, key: tuple[str, str] | None) -> None:
        if key is not None:
            self._in_flight[key] -= 1

    # ------------------------------------------------------------------ webhooks

    def _schedule_webhook(self, job: JobRecord, payload: dict[str, Any]) -> None:
        if job.webhook is None:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(job.id, job.webhook, payload))
        self._webhook_tasks.add(task)
        task.add_done_callback(self._webhook_tasks.discard)

    async def _deliver(self, job_id: str, url: str, payload: dict[str, Any]) -> None:
        if self._webhook_client is None:
            self._webhook_client = httpx.AsyncClient(timeout=self.webhook_timeout_s)
        for attempt in range(1, self.webhook_retries + 2):
            status_code: int | None = None
            error: str | None = None
            try:
                response = await self._webhook_client.post(url, json=payload)
                status_code = response.status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            self.webhook_attempts.append(WebhookAttempt(job_id, url, attempt, status_code, error, payload))
            if status_code == 200:
                return
            log.info(
                "runpod_emulator.webhook_failed", job_id=job_id, attempt=attempt, status_code=status_code
            )
            if attempt <= self.webhook_retries:
                await asyncio.sleep(self.webhook_retry_interval_s)

    async def aclose(self) -> None:
        for task in list(self._webhook_tasks):
            task.cancel()
        await super().aclose()
        if self._webhook_client is not None:
            await self._webhook_client.aclose()
            self._webhook_client = None


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


def _authorized(request: Request) -> bool:
    """`Bearer <key>` or the bare key: the docs' curl examples send `authorization: $RUNPOD_API_KEY`."""
    value = request.headers.get("authorization", "").strip()
    scheme, _, key = value.partition(" ")
    if scheme.lower() == "bearer":
        return bool(key.strip())
    return bool(value) and " " not in value


async def _json_body(request: Request, max_bytes: int | None = None) -> Any:
    body = await request.body()
    if max_bytes is not None and len(body) > max_bytes:
        raise _HTTPProblem(
            413, f"the request body is {len(body)} bytes; this route accepts at most {max_bytes}"
        )
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise _HTTPProblem(400, "the request body is not valid JSON") from None


class _HTTPProblem(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        self.status_code = status_code
        self.message = message
        super().__init__(message)


def _wait_ms(request: Request, default: int) -> int:
    raw = request.query_params.get("wait")
    if raw is None:
        return default
    try:
        wait = int(raw)
    except ValueError:
        raise _HTTPProblem(400, "'wait' must be an integer number of milliseconds") from None
    return min(max(wait, 0), MAX_LONG_POLL_MS)


def _job_or_404(runtime: EndpointRuntime, job_id: str) -> JobRecord:
    job = runtime.get(job_id)
    if job is None:
        raise _HTTPProblem(404, f"request {job_id} does not exist (unknown, or its ttl or retention passed)")
    return job


def create_runpod_app(
    *,
    endpoints: Mapping[str, EndpointConfig | str | Handler] | None = None,
    seed: int = 0,
    clock: Clock | None = None,
    policy_bounds: PolicyBounds | None = None,
    rate_limits: Mapping[str, RouteLimit] | None = None,
    rate_limit_window_s: float = 10.0,
    webhook_retries: int = 2,
    webhook_retry_interval_s: float = 10.0,
    webhook_timeout_s: float = 10.0,
    max_run_bytes: int = MAX_RUN_BYTES,
    max_runsync_bytes: int = MAX_RUNSYNC_BYTES,
    runsync_default_wait_ms: int = RUNSYNC_DEFAULT_WAIT_MS,
    sync_handlers_in_thread: bool = True,
) -> Starlette:
    """The emulator app. `endpoints` add to (or override) the built-in demo endpoints (an endpoint is
    an `EndpointConfig`, a handler, `"package.module:function"` or a worker file's path); `rate_limits`
    default to the documented ones (pass `{}` for none); `clock` (seconds, monotonic) drives ttl,
    retention, delayTime and executionTime."""
    state = EmulatorState(
        endpoints,
        seed=seed,
        clock=clock,
        policy_bounds=policy_bounds,
        sync_handlers_in_thread=sync_handlers_in_thread,
        rate_limits=DOCUMENTED_LIMITS if rate_limits is None else rate_limits,
        rate_limit_window_s=rate_limit_window_s,
        webhook_retries=webhook_retries,
        webhook_retry_interval_s=webhook_retry_interval_s,
        webhook_timeout_s=webhook_timeout_s,
    )

    Action = Callable[[Request, EndpointRuntime], Awaitable[Response]]

    def job_route(route: str, action: Action) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            state.requests[route] += 1
            if not _authorized(request):
                return _error(401, "Unauthorized: send 'Authorization: Bearer <api key>'")
            endpoint_id = request.path_params["endpoint_id"]
            runtime = state.endpoint(endpoint_id)
            if runtime is None:
                return _error(404, f"endpoint {endpoint_id} does not exist")
            fault = runtime.http_fault(route)
            if fault == "429":
                retry_after = f"{runtime.faults.retry_after_s:g}"
                return _error(429, "Too many requests (injected)", {"Retry-After": retry_after})
            if fault == "5xx":
                return Response(
                    "<html><body><h1>502 Bad Gateway</h1></body></html>", 502, media_type="text/html"
                )
            refused = state.admit(endpoint_id, route)
            if refused is not None:
                return _error(429, refused[0], {"Retry-After": f"{refused[1]:.3f}"})
            key = state.enter(endpoint_id, route)
            try:
                response = await action(request, runtime)
            except _HTTPProblem as problem:
                response = _error(problem.status_code, problem.message)
            finally:
                state.leave(key)
            if fault == "drop":
                return _DroppedResponse()
            return response

        return endpoint

    def submit(request: Request, runtime: EndpointRuntime, body: Any, *, sync: bool) -> JobRecord:
        if not isinstance(body, dict) or "input" not in body:
            raise _HTTPProblem(400, "the body must be a JSON object with an 'input' field")
        policy = body.get("policy") or {}
        webhook = body.get("webhook")
        extras = {name: body[name] for name in ("s3Config", "webhookV2") if body.get(name) is not None}
        if not isinstance(policy, dict):
            raise _HTTPProblem(400, "'policy' must be an object")
        if webhook is not None and not isinstance(webhook, str):
            raise _HTTPProblem(400, "'webhook' must be a URL string")
        try:
            return runtime.submit(
                body["input"],
                execution_timeout_ms=policy.get("executionTimeout"),
                ttl_ms=policy.get("ttl"),
                low_priority=bool(policy.get("lowPriority", False)),
                webhook=webhook,
                sync=sync,
                extras=extras,
            )
        except PolicyError as exc:
            raise _HTTPProblem(400, str(exc)) from None

    async def run(request: Request, runtime: EndpointRuntime) -> Response:
        job = submit(request, runtime, await _json_body(request, max_run_bytes), sync=False)
        return JSONResponse({"id": job.id, "status": job.status.value})

    async def runsync(request: Request, runtime: EndpointRuntime) -> Response:
        job = submit(request, runtime, await _json_body(request, max_runsync_bytes), sync=True)
        try:
            wait_ms = int(request.query_params.get("wait", runsync_default_wait_ms))
        except ValueError:
            raise _HTTPProblem(400, "'wait' must be an integer number of milliseconds") from None
        await runtime.wait_terminal(job, min(max(wait_ms, 1000), 300_000) / 1000.0)
        return JSONResponse(job.payload())

    async def status(request: Request, runtime: EndpointRuntime) -> Response:
        return await long_poll_status(request, runtime, _wait_ms(request, 0))

    async def status_sync(request: Request, runtime: EndpointRuntime) -> Response:
        return await long_poll_status(request, runtime, _wait_ms(request, STATUS_SYNC_DEFAULT_WAIT_MS))

    async def long_poll_status(request: Request, runtime: EndpointRuntime, wait_ms: int) -> Response:
        job_id = request.path_params["job_id"]
        job = _job_or_404(runtime, job_id)
        if wait_ms:
            await runtime.wait_change(job, wait_ms / 1000.0)
            job = _job_or_404(runtime, job_id)
        return JSONResponse(job.payload())

    async def stream(request: Request, runtime: EndpointRuntime) -> Response:
        job_id = request.path_params["job_id"]
        job = _job_or_404(runtime, job_id)
        wait_ms = _wait_ms(request, 0)
        if wait_ms:
            await runtime.wait_stream(job, wait_ms / 1000.0)
            job = _job_or_404(runtime, job_id)
        return JSONResponse({"status": job.status.value, "stream": runtime.take_stream(job)})

    async def cancel(request: Request, runtime: EndpointRuntime) -> Response:
        job = _job_or_404(runtime, request.path_params["job_id"])
        runtime.cancel(job)
        return JSONResponse({"id": job.id, "status": job.status.value})

    async def retry(request: Request, runtime: EndpointRuntime) -> Response:
        job = _job_or_404(runtime, request.path_params["job_id"])
        try:
            runtime.retry(job)
        except PolicyError as exc:
            raise _HTTPProblem(400, str(exc)) from None
        return JSONResponse({"id": job.id, "status": job.status.value})

    async def purge_queue(request: Request, runtime: EndpointRuntime) -> Response:
        return JSONResponse({"removed": runtime.purge(), "status": "completed"})

    async def health(request: Request, runtime: EndpointRuntime) -> Response:
        return JSONResponse(runtime.health())

    def admin_route(action: Action) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not _authorized(request):
                return _error(401, "Unauthorized: send 'Authorization: Bearer <api key>'")
            endpoint_id = request.path_params["endpoint_id"]
            runtime = state.endpoint(endpoint_id)
            if runtime is None:
                return _error(404, f"endpoint {endpoint_id} does not exist")
            try:
                return await action(request, runtime)
            except _HTTPProblem as problem:
                return _error(problem.status_code, problem.message)

        return endpoint

    async def faults(request: Request, runtime: EndpointRuntime) -> Response:
        if request.method == "POST":
            changes = await _json_body(request)
            if not isinstance(changes, dict):
                raise _HTTPProblem(400, "send a JSON object of fault options to change")
            try:
                runtime.set_faults(**changes)
            except ValidationError as exc:
                raise _HTTPProblem(400, f"invalid faults: {exc.errors(include_url=False)}") from None
            log.info("runpod_emulator.faults_changed", endpoint_id=runtime.endpoint_id, changes=changes)
        elif request.method == "DELETE":
            runtime.faults = Faults()
        return JSONResponse(runtime.faults.model_dump())

    async def job_internals(request: Request, runtime: EndpointRuntime) -> Response:
        job = runtime.jobs.get(request.path_params["job_id"])
        if job is None:
            raise _HTTPProblem(404, "no such job (or it is gone)")
        plan = job.plan
        return JSONResponse(
            {
                **job.payload(),
                "executions": job.executions,
                "completions": job.completions,
                "attempt": job.attempt,
                "webhook": job.webhook,
                "plan": {
                    "latency_s": plan.latency_s,
                    "fail": plan.fail,
                    "no_output": plan.no_output,
                    "duplicate": plan.duplicate,
                    "stuck": plan.stuck,
                    "webhook_lost": plan.webhook_lost,
                },
            }
        )

    async def mount(request: Request) -> Response:
        if not _authorized(request):
            return _error(401, "Unauthorized: send 'Authorization: Bearer <api key>'")
        try:
            body = await _json_body(request)
        except _HTTPProblem as problem:
            return _error(problem.status_code, problem.message)
        if not isinstance(body, dict) or not isinstance(body.get("handler"), str):
            return _error(
                400,
                "send {'handler': 'package.module:function' or 'path/to/worker.py', "
                "'workers'?: n, 'faults'?: {...}}",
            )
        endpoint_id = request.path_params["endpoint_id"]
        try:
            config = EndpointConfig(
                handler=body["handler"],
                workers=int(body.get("workers", 4)),
                faults=Faults.model_validate(body.get("faults") or {}),
                return_aggregate_stream=bool(body.get("return_aggregate_stream", False)),
                refresh_worker=bool(body.get("refresh_worker", False)),
            )
            # A worker file is imported here, and its module-level code may take a while (a model
            # load): off the event loop, so the other endpoints keep answering.
            runtime = await asyncio.to_thread(state.make_endpoint, endpoint_id, config)
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        state.mount(runtime)
        spec = runtime.spec
        return JSONResponse(
            {
                "endpoint_id": endpoint_id,
                "handler": body["handler"],
                "workers": config.workers,
                "return_aggregate_stream": spec.return_aggregate_stream,
                "concurrency_modifier": spec.concurrency_modifier is not None,
                "refresh_worker": spec.refresh_worker,
            }
        )

    prefix = "/v2/{endpoint_id}"
    routes = [
        Route(f"{prefix}/run", job_route("run", run), methods=["POST"]),
        Route(f"{prefix}/runsync", job_route("runsync", runsync), methods=["POST"]),
        Route(f"{prefix}/status/{{job_id}}", job_route("status", status), methods=["GET", "POST"]),
        Route(
            f"{prefix}/status-sync/{{job_id}}", job_route("status-sync", status_sync), methods=["GET", "POST"]
        ),
        Route(f"{prefix}/stream/{{job_id}}", job_route("stream", stream), methods=["GET", "POST"]),
        Route(f"{prefix}/cancel/{{job_id}}", job_route("cancel", cancel), methods=["POST"]),
        Route(f"{prefix}/retry/{{job_id}}", job_route("retry", retry), methods=["POST"]),
        Route(f"{prefix}/purge-queue", job_route("purge-queue", purge_queue), methods=["POST"]),
        Route(f"{prefix}/health", job_route("health", health), methods=["GET"]),
        Route(f"{prefix}/_faults", admin_route(faults), methods=["GET", "POST", "DELETE"]),
        Route(f"{prefix}/_jobs/{{job_id}}", admin_route(job_internals), methods=["GET"]),
        Route(f"{prefix}/_endpoint", mount, methods=["PUT"]),
    ]
    app = Starlette(routes=routes)
    app.state.runpod = state
    return app
