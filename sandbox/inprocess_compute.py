"""`InProcessCompute`: the compute port served by the emulator's endpoints, without HTTP.

The same handlers, queues, workers, policy and fault options as the sandbox's RunPod emulator
(`runpod_worker`), called directly: for the engine's benchmarks and fast seeded fault simulations.
HTTP faults surface as the exceptions `RunPodCompute` raises for them (429 -> `RateLimited`,
5xx -> `Unavailable`, a dropped response -> `Unavailable` after the call took effect). `wait()` is
woken by the job itself instead of polling, so it costs no reads and suffers no HTTP faults (the
HTTP adapter's `wait()` absorbs those too).

Deterministic with a seed: job ids, fault decisions and the built-in handlers' draws depend only on
the seed and the order of submissions per endpoint.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from podsettle.adapters.ports import (
    NotFound,
    ProgressCallback,
    RateLimited,
    Rejected,
    RunOutcome,
    RunState,
    Unavailable,
)
from podsettle.adapters.runpod import (
    MAX_INPUT_BYTES,
    body_size,
    classify_run,
    deadline_outcome,
    input_json,
    not_found_outcome,
    request_body,
)
from podsettle.sandbox.runpod_worker import (
    Clock,
    EndpointConfig,
    EndpointRuntime,
    JobRecord,
    PolicyBounds,
    PolicyError,
    RunPodState,
)

__all__ = ["InProcessCompute", "WebhookSink"]

WebhookSink = Callable[[str, dict[str, Any]], Awaitable[None] | None]


def _snapshot(job: JobRecord) -> RunState:
    """The status object's fields (a running job's progress as its output, its executionTime so far)."""
    payload = job.payload()
    return RunState(
        run_id=job.id,
        status=job.status,
        output=job.output,
        has_output=job.has_output,
        error=job.error,
        delay_ms=job.delay_ms,
        execution_ms=payload.get("executionTime"),
        worker_id=job.worker_id,
    )


class InProcessCompute:
    """A `ComputeGateway` that runs RunPod worker handlers in this process.

    `endpoints` add to (or override) the built-in demo endpoints. Sync handlers run on the loop by
    default (fastest for zero-latency handlers); pass `sync_handlers_in_thread=True` for handlers that
    block. `webhook_sink(url, payload)` receives the webhook a job asked for (none are sent otherwise).
    """

    def __init__(
        self,
        endpoints: Mapping[str, EndpointConfig] | None = None,
        *,
        seed: int = 0,
        clock: Clock | None = None,
        policy_bounds: PolicyBounds | None = None,
        sync_handlers_in_thread: bool = False,
        max_input_bytes: int = MAX_INPUT_BYTES,
        webhook_sink: WebhookSink | None = None,
    ) -> None:
        self.max_input_bytes = max_input_bytes
        self.calls: Counter[str] = Counter()
        self._webhook_sink = webhook_sink
        self._webhook_tasks: set[asyncio.Future[Any]] = set()
        self.state = RunPodState(
            endpoints,
            seed=seed,
            clock=clock,
            policy_bounds=policy_bounds,
            sync_handlers_in_thread=sync_handlers_in_thread,
            on_terminal=self._deliver_webhook if webhook_sink is not None else None,
        )

    def __repr__(self) -> str:
        return f"InProcessCompute(endpoints={sorted(self.state.endpoints)!r}, seed={self.state.seed})"

    async def __aenter__(self) -> InProcessCompute:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def set_faults(self, endpoint_id: str, **changes: Any) -> None:
        """Change an endpoint's fault options now (the names of `Faults`)."""
        self._runtime(endpoint_id).set_faults(**changes)

    # ------------------------------------------------------------------ the port

    def body_and_limit(self, input_size: int, *, execution_timeout_ms: int, ttl_ms: int) -> tuple[int, int]:
        size = body_size(input_size, execution_timeout_ms=execution_timeout_ms, ttl_ms=ttl_ms)
        return size, self.max_input_bytes

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
        """As `RunPodCompute.submit`: canonical input bytes or a dict; the /run body's limit holds."""
        runtime = self._runtime(endpoint_id)
        encoded = input_json(job_input)
        size = len(
            request_body(
                encoded,
                execution_timeout_ms=execution_timeout_ms,
                ttl_ms=ttl_ms,
                webhook=webhook,
                low_priority=low_priority,
            )
        )
        if size > self.max_input_bytes:
            raise Rejected(
                f"body is {size} bytes, over the {self.max_input_bytes}-byte limit of /run; nothing was sent",
                code="input_too_large",
            )
        dropped = self._http_fault(runtime, "run")
        try:
            job = runtime.submit(
                json.loads(encoded),  # the handler gets its own copy, as over the wire
                execution_timeout_ms=execution_timeout_ms,
                ttl_ms=ttl_ms,
                low_priority=low_priority,
                webhook=webhook,
            )
        except PolicyError as exc:
            raise Rejected(str(exc), status_code=400, code="invalid_policy") from None
        if dropped:
            raise Unavailable(
                f"POST /{endpoint_id}/run: response dropped (injected); the job may have been queued"
            )
        return job.id

    async def status(self, endpoint_id: str, run_id: str) -> RunState:
        runtime = self._runtime(endpoint_id)
        dropped = self._http_fault(runtime, "status")
        job = self._job(runtime, run_id)
        if dropped:
            raise Unavailable(f"GET /{endpoint_id}/status/{run_id}: response dropped (injected)")
        return _snapshot(job)

    async def wait(
        self,
        endpoint_id: str,
        run_id: str,
        *,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
    ) -> RunOutcome:
        """Woken by the job's end, not by polls. `on_progress` is accepted for the port and not
        called: no status read happens here to see a progress value in."""
        runtime = self._runtime(endpoint_id)
        job = runtime.get(run_id)
        if job is None:
            return not_found_outcome(run_id, None)
        if await runtime.wait_terminal(job, timeout_s):
            return classify_run(_snapshot(job))
        if runtime.get(run_id) is None:
            return not_found_outcome(run_id, _snapshot(job))
        return deadline_outcome(run_id, _snapshot(job), timeout_s)

    async def cancel(self, endpoint_id: str, run_id: str) -> RunState:
        runtime = self._runtime(endpoint_id)
        dropped = self._http_fault(runtime, "cancel")
        job = self._job(runtime, run_id)
        runtime.cancel(job)
        if dropped:
            raise Unavailable(f"POST /{endpoint_id}/cancel/{run_id}: response dropped (injected)")
        return RunState(run_id=job.id, status=job.status)

    async def retry(self, endpoint_id: str, run_id: str) -> RunState:
        runtime = self._runtime(endpoint_id)
        dropped = self._http_fault(runtime, "retry")
        job = self._job(runtime, run_id)
        try:
            runtime.retry(job)
        except PolicyError as exc:
            raise Rejected(str(exc), status_code=400) from None
        if dropped:
            raise Unavailable(f"POST /{endpoint_id}/retry/{run_id}: response dropped (injected)")
        return RunState(run_id=job.id, status=job.status)

    async def health(self, endpoint_id: str) -> dict[str, Any]:
        runtime = self._runtime(endpoint_id)
        self._http_fault(runtime, "health")
        return runtime.health()

    async def purge_queue(self, endpoint_id: str) -> int:
        runtime = self._runtime(endpoint_id)
        self._http_fault(runtime, "purge-queue")
        return runtime.purge()

    async def aclose(self) -> None:
        for task in list(self._webhook_tasks):
            task.cancel()
        await self.state.aclose()

    # ------------------------------------------------------------------ internals

    def _runtime(self, endpoint_id: str) -> EndpointRuntime:
        runtime = self.state.endpoint(endpoint_id)
        if runtime is None:
            raise NotFound(f"endpoint {endpoint_id} does not exist")
        return runtime

    def _job(self, runtime: EndpointRuntime, run_id: str) -> JobRecord:
        job = runtime.get(run_id)
        if job is None:
            raise NotFound(
                f"/{runtime.endpoint_id}: request {run_id} does not exist "
                "(unknown, or its ttl or retention passed)"
            )
        return job

    def _http_fault(self, runtime: EndpointRuntime, route: str) -> bool:
        """Raises what a 429 or 5xx would; True when the response is to be dropped after the call."""
        self.calls[route] += 1
        fault = runtime.http_fault(route)
        if fault == "429":
            raise RateLimited(
                f"/{runtime.endpoint_id}/{route}: 429 Too Many Requests (injected)", retry_after=0.0
            )
        if fault == "5xx":
            raise Unavailable(f"/{runtime.endpoint_id}/{route}: server error 502 (injected)")
        return fault == "drop"

    def _deliver_webhook(self, job: JobRecord, payload: dict[str, Any]) -> None:
        if self._webhook_sink is None or job.webhook is None:
            return
        result = self._webhook_sink(job.webhook, payload)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._webhook_tasks.add(task)
            task.add_done_callback(self._webhook_tasks.discard)
