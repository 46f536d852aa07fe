"""The operations behind the MCP tools, on one engine: run a job or a batch (waiting up to a bound,
then handing back the id to follow), cancel, award a bonus, and the reads.

Every money-moving operation is idempotent: a job's key (given, or derived from the arguments) and
a batch's id (likewise) name the same job again when a call is repeated after a client timeout,
and the engine opens a key once; a job's bonus is paid once. The operator's spending limits are
checked before anything is opened.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from podsettle.bootstrap import Engine
from podsettle.cli.console import open_views
from podsettle.domain.digests import canonical_json
from podsettle.domain.errors import InvalidInput
from podsettle.domain.escrow_job import check_id, job_id_for
from podsettle.domain.money import Money, fmt, to_money
from podsettle.engine import BatchResult, JobResult
from podsettle.limits import Spend, SpendingGuard, SpendingLimits
from podsettle.mcp.reads import Reads, job_with_timeline
from podsettle.settings import Settings
from podsettle.support.logs import get_logger

log = get_logger("podsettle.mcp")
T = TypeVar("T")
DEFAULT_WAIT_S = 30.0
MAX_WAIT_S = 600.0
Progress = Callable[[int, int, str], Awaitable[None]]


def engine_for(settings: Settings) -> Engine:
    """The engine the operator configured: the embedded sandbox (PODSETTLE_SANDBOX) or production."""
    if settings.sandbox:
        return Engine.sandbox(settings.store)
    return Engine.from_env(settings)


def derived_key(prefix: str, parts: Mapping[str, Any]) -> str:
    """A key that the same arguments always give: a repeated call names the same job or batch."""
    data = canonical_json(dict(parts), "arguments")
    return f"{prefix}-{hashlib.sha256(data).hexdigest()[:32]}"


class Service:
    """One engine and the read models of its store, started and closed with the server."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self._engine = engine
        self._reads: Reads | None = None
        self._guard: SpendingGuard | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the MCP service is not started")
        return self._engine

    @property
    def reads(self) -> Reads:
        if self._reads is None:
            raise RuntimeError("the MCP service is not started")
        return self._reads

    @property
    def guard(self) -> SpendingGuard:
        if self._guard is None:
            raise RuntimeError("the MCP service is not started")
        return self._guard

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._engine is None:
            self._engine = await asyncio.to_thread(engine_for, self.settings)
        engine = self._engine
        await engine.start()
        store = engine.settings.store
        # An in-memory store has no file to keep its views beside: they live in memory with it.
        views = None if store == "memory" else open_views(engine.app, store, self.settings.views)
        self._reads = Reads(engine.app, views)
        self._guard = SpendingGuard(
            SpendingLimits.from_settings(self.settings), engine.app, clock=engine.clock
        )

    async def aclose(self) -> None:
        """Stop: work still running is left to the next engine's recovery (nothing is lost)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._engine is not None:
            await self._engine.aclose()
        if self._reads is not None:
            self._reads.close()

    def _background(self, coroutine: Awaitable[T], name: str) -> asyncio.Task[T]:
        """A task that outlives the call that started it (until the server stops)."""
        task: asyncio.Task[T] = asyncio.ensure_future(coroutine)
        task.set_name(name)
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("mcp.background_failed", task=name, error=repr(finished.exception()))

        task.add_done_callback(done)
        return task

    # ------------------------------------------------------------------ running work

    def _payee(self, endpoint_id: str, payee: str | None) -> str:
        return self.engine.settings.payee_for(endpoint_id, payee)

    async def run_job(
        self,
        *,
        endpoint_id: str,
        job_input: Mapping[str, Any],
        budget: str,
        payee: str | None,
        referral: str | None,
        job_key: str | None,
        timeout_s: int | None,
        wait_s: float,
    ) -> dict[str, Any]:
        engine = self.engine
        check_id(endpoint_id, "endpoint_id")
        amount = to_money(budget, "budget", allow_zero=False)
        payee_ = self._payee(endpoint_id, payee)
        key = job_key or derived_key(
            "mcp",
            {
                "endpoint_id": endpoint_id,
                "input": dict(job_input),
                "budget": fmt(amount),
                "payee": payee_,
                "referral": referral,
                "timeout_s": timeout_s,
            },
        )
        check_id(key, "job_key")
        spend = Spend(job_id_for(key), "job", engine.payer, payee_, amount, endpoint_id)
        fresh = await asyncio.to_thread(self.guard.reserve, [spend])
        try:
            job_id = await engine.submit(
                endpoint_id,
                job_input,
                amount,
                payee=payee_,
                referral=referral,
                job_key=key,
                timeout_s=timeout_s,
            )
        except BaseException:
            self.guard.release(fresh)
            raise
        waiting = self._background(engine.wait(job_id), f"mcp-wait-{job_id}")
        done, _ = await asyncio.wait({waiting}, timeout=wait_s)
        if done:
            return {"done": True, "wait_s": wait_s, **waiting.result().to_json()}
        return {"done": False, "wait_s": wait_s, **_following(await engine.job(job_id))}

    async def run_batch(
        self,
        *,
        endpoint_id: str,
        inputs: Sequence[Mapping[str, Any]],
        budget_per_job: str,
        payee: str | None,
        batch_id: str | None,
        concurrency: int | None,
        timeout_s: int | None,
        wait_s: float,
        progress: Progress | None,
    ) -> dict[str, Any]:
        engine = self.engine
        check_id(endpoint_id, "endpoint_id")
        if not inputs:
            raise InvalidInput("inputs", "must hold at least one job input")
        amount = to_money(budget_per_job, "budget_per_job", allow_zero=False)
        payee_ = self._payee(endpoint_id, payee)
        batch = batch_id or derived_key(
            "mcp-batch",
            {
                "endpoint_id": endpoint_id,
                "inputs": [dict(item) for item in inputs],
                "budget": fmt(amount),
                "payee": payee_,
                "timeout_s": timeout_s,
            },
        )
        check_id(batch, "batch_id")
        # The engine keys a batch's jobs by the batch id and their place in it.
        spends = [
            Spend(job_id_for(f"{batch}-{index:06d}"), "job", engine.payer, payee_, amount, endpoint_id)
            for index in range(len(inputs))
        ]
        fresh = await asyncio.to_thread(self.guard.reserve, spends)
        total = len(inputs)
        settled = 0
        changed = asyncio.Event()

        def on_result(_: JobResult) -> None:
            nonlocal settled
            settled += 1
            changed.set()

        running = self._background(
            engine.run_batch(
                endpoint_id,
                [dict(item) for item in inputs],
                amount,
                payee=payee_,
                concurrency=concurrency,
                batch_id=batch,
                timeout_s=timeout_s,
                on_result=on_result,
            ),
            f"mcp-batch-{batch}",
        )

        def opened_or_not(task: asyncio.Task[BatchResult]) -> None:
            # A failed batch opened whole chunks at most (a list is validated whole first, so a bad
            # input opens nothing): the jobs that were opened are in the log, and the guard finds
            # those there.
            if task.cancelled() or task.exception() is not None:
                self.guard.release(fresh)

        running.add_done_callback(opened_or_not)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        reported = -1
        while not running.done():
            left = deadline - loop.time()
            if left <= 0:
                break
            changed.clear()
            if progress is not None and settled != reported:
                reported = settled
                await progress(settled, total, f"{settled} of {total} jobs settled")
            ticker = asyncio.ensure_future(changed.wait())
            await asyncio.wait({running, ticker}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            ticker.cancel()
        if running.done():
            result = running.result()  # raises the batch's error (bad input, a refused open)
            if progress is not None:
                await progress(total, total, f"{total} of {total} jobs settled")
            return {
                "done": True,
                "wait_s": wait_s,
                "batch_id": result.batch_id,
                "totals": result.totals.to_json(),
                "jobs": [_brief(r) for r in result.results],
            }
        states = await asyncio.to_thread(self.reads.jobs, batch_id=batch, state=None, limit=0)
        return {
            "done": False,
            "wait_s": wait_s,
            "batch_id": batch,
            "settled": settled,
            "jobs": total,
            "opened": states["count"] == total,
            "next": f"the batch keeps running: follow it with batch_totals(batch_id={batch!r}) "
            f"and list_jobs(batch_id={batch!r}); calling run_batch again with the same arguments "
            "waits for it again and never pays twice",
        }

    async def award_bonus(
        self, *, job_id: str, base_metric: str, achieved_metric: str, pool: str, threshold: str
    ) -> dict[str, Any]:
        engine = self.engine
        uid = _job_uuid(job_id)
        amount = to_money(pool, "pool")
        job = await asyncio.to_thread(engine.app.get_job, uid)
        spend = Spend(uid, "bonus", job.payer, job.payee, amount, job.endpoint_id)
        fresh = await asyncio.to_thread(self.guard.reserve, [spend] if amount > 0 else [])
        try:
            result = await engine.award_bonus(uid, base_metric, achieved_metric, amount, threshold=threshold)
        except BaseException:
            self.guard.release(fresh)
            raise
        if result.status == "none":
            self.guard.release(fresh)  # below the threshold: nothing was asked for
        return result.to_json()

    async def cancel(self, job_ids: Sequence[uuid.UUID], reason: str, wait_s: float) -> dict[str, Any]:
        """Ask each job to stop; a job past running (or not yet started) cannot be cancelled."""
        engine = self.engine
        tasks = {
            job_id: self._background(engine.cancel(job_id, reason), f"mcp-cancel-{job_id}")
            for job_id in job_ids
        }
        if tasks:
            await asyncio.wait(tasks.values(), timeout=wait_s)
        jobs = []
        for job_id, task in tasks.items():
            if task.done() and task.exception() is not None:
                error = task.exception()
                view = await asyncio.to_thread(engine.app.get_job, job_id)
                jobs.append(
                    {
                        "job_id": str(job_id),
                        "cancelled": False,
                        "state": str(view.state),
                        "status": str(view.view().status),
                        "why": str(error),
                    }
                )
            elif task.done():
                jobs.append({"cancelled": True, "done": True, **task.result().to_json()})
            else:
                jobs.append({"cancelled": True, "done": False, **_following(await engine.job(job_id))})
        return {
            "wait_s": wait_s,
            "cancelled": sum(1 for j in jobs if j["cancelled"]),
            "not_cancellable": sum(1 for j in jobs if not j["cancelled"]),
            "jobs": jobs,
        }

    async def cancel_job(self, job_id: str, reason: str, wait_s: float) -> dict[str, Any]:
        uid = _job_uuid(job_id)
        await asyncio.to_thread(self.engine.app.get_job, uid)  # JobNotFound for an unknown id
        return await self.cancel([uid], reason, wait_s)

    async def cancel_batch(self, batch_id: str, reason: str, wait_s: float) -> dict[str, Any]:
        check_id(batch_id, "batch_id")
        app = self.engine.app
        ids = await asyncio.to_thread(lambda: list(app.job_ids(batch_id=batch_id)))
        if not ids:
            raise InvalidInput("batch_id", f"no batch {batch_id!r} in this store")
        rows = await asyncio.to_thread(self.reads.jobs, batch_id=batch_id, state=None, limit=len(ids))
        resting = {row["job_id"] for row in rows["jobs"] if row["status"] in ("paid", "refunded", "rejected")}
        answer = await self.cancel([i for i in ids if str(i) not in resting], reason, wait_s)
        return {"batch_id": batch_id, "already_settled": len(resting), **answer}

    # ------------------------------------------------------------------ reads

    async def status(self, job_id: str | None, job_key: str | None) -> dict[str, Any]:
        if (job_id is None) == (job_key is None):
            raise InvalidInput("job_id", "give either job_id or job_key")
        uid = _job_uuid(job_id) if job_id is not None else job_id_for(check_id(job_key, "job_key") or "")
        data = await asyncio.to_thread(job_with_timeline, self.engine.app, uid)
        output = self.engine.processor.outputs.by_job.get(uid)
        return {**data, "output": output}

    async def limits(self) -> dict[str, Any]:
        guard = self.guard
        spent: Decimal = await asyncio.to_thread(guard.spent_today, self.engine.payer)
        return {
            "payer": self.engine.payer,
            "limits": guard.limits.to_json(),
            "spent_today": fmt(Money(spent)),
        }


def _job_uuid(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except (ValueError, TypeError):
        raise InvalidInput("job_id", f"{job_id!r} is not a job id (a UUID)") from None


def _brief(result: JobResult) -> dict[str, Any]:
    data = result.to_json()
    keep = ("job_id", "job_key", "status", "state", "budget", "to_workers", "fees", "returned", "reason")
    return {k: data.get(k) for k in keep}


_NEXT = {
    "in_flight": "the job keeps running: follow it with job_status",
    "refunding": "the escrow service returns the money on its own schedule: follow it with job_status",
    "attention": "an operator must look at it: see list_attention",
}


def _following(result: JobResult) -> dict[str, Any]:
    """A job that may not rest yet, with what the caller can do next."""
    data = result.to_json()
    data.pop("output", None)
    data["next"] = _NEXT.get(data["status"], "the job is settled")
    return data
