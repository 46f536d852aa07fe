"""The MCP tools: what an agent needs to pay for GPU work through podsettle.

Each tool has a typed input schema whose descriptions tell an agent what to pass; amounts are
strings (USDC, at most 6 decimal places). Bad input, a refused spending limit, an unknown job or a
service failure come back as a tool error naming the field or the limit. The tools are thin: the
work is in `Service` (service.py) on the engine's public API and the read models.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any, Literal, TypeVar

from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from pydantic import Field
from pydantic import ValidationError as PydanticValidationError

from podsettle.adapters.ports import GatewayError
from podsettle.domain.errors import DomainError
from podsettle.mcp.service import DEFAULT_WAIT_S, MAX_WAIT_S, Service
from podsettle.settings import ConfigError, describe
from podsettle.support.logs import get_logger

log = get_logger("podsettle.mcp")
T = TypeVar("T")

INSTRUCTIONS = """podsettle pays GPU workers for RunPod serverless jobs through escrow: a job's budget is \
escrowed before it runs, released to the worker when its output passes, refunded when it fails.
Amounts are USDC strings with at most 6 decimal places ("0.50"). Tools that run work wait up to \
wait_s seconds; when the work outlasts that they return its id and state, and job_status, \
list_jobs and batch_totals follow it. Repeating a call with the same arguments (or the same \
job_key / batch_id) never pays twice. The operator may set spending limits (see spending_limits); \
a refused call names the limit and nothing is funded."""

Amount = Annotated[
    str,
    Field(
        pattern=r"^\s*\d{1,10}(\.\d{1,6})?\s*$",
        description='USDC as a decimal string with at most 6 places, e.g. "0.50" (never a float)',
    ),
]
Metric = Annotated[
    str, Field(pattern=r"^\s*-?\d+(\.\d+)?\s*$", description='a number as a string, e.g. "0.92"')
]
EndpointId = Annotated[str, Field(min_length=1, max_length=128, description="the RunPod endpoint id")]
JobId = Annotated[str, Field(min_length=1, max_length=64, description="a job's id (a UUID) from run_job")]
BatchId = Annotated[str, Field(min_length=1, max_length=128, description="a batch's id from run_batch")]
Payee = Annotated[
    str | None,
    Field(description="the worker agent to pay (ag_...); default: the operator's configured payee"),
]
WaitS = Annotated[
    float,
    Field(
        ge=0,
        le=MAX_WAIT_S,
        description=f"seconds to wait for the work to settle before answering with its id and state "
        f"(default {DEFAULT_WAIT_S:g}, at most {MAX_WAIT_S:g}); the work goes on either way",
    ),
]
TimeoutS = Annotated[
    int | None,
    Field(ge=5, le=7 * 24 * 3600, description="how long RunPod may take before the job is refunded, in s"),
]
Reason = Annotated[str, Field(max_length=200, description="why, recorded with the job")]
StateName = Literal[
    "opened",
    "funding",
    "funded",
    "running",
    "completed",
    "releasing",
    "released",
    "failed",
    "refunding",
    "refunded",
    "rejected",
    "attention",
]


async def answer(work: Awaitable[T]) -> T:
    """The tool's result, or a tool error an agent can act on (never a traceback, never a secret)."""
    try:
        return await work
    except (DomainError, ConfigError, GatewayError) as error:
        raise ToolError(f"{type(error).__name__}: {error}") from None
    except PydanticValidationError as error:
        raise ToolError(describe(error)) from None


def build_server(
    service: Service,
    *,
    path: str = "/mcp",
    security: TransportSecuritySettings | None = None,
) -> FastMCP:
    """The MCP server with podsettle's tools on `service` (started and closed by the caller)."""
    server = FastMCP(
        "podsettle",
        instructions=INSTRUCTIONS,
        streamable_http_path=path,
        transport_security=security,
        log_level="WARNING",
    )
    money = ToolAnnotations(
        readOnlyHint=False, destructiveHint=False, idempotentHint=True, openWorldHint=True
    )
    reading = ToolAnnotations(readOnlyHint=True, openWorldHint=False)

    @server.tool(annotations=money)
    async def run_job(
        endpoint_id: EndpointId,
        input: Annotated[
            dict[str, Any], Field(description="the job input: a JSON object RunPod gets as `input`")
        ],
        budget: Amount,
        payee: Payee = None,
        referral: Annotated[str | None, Field(description="a referral code for the escrow")] = None,
        job_key: Annotated[
            str | None,
            Field(
                max_length=128,
                description="idempotency key: the same key is the same job, paid at most once. Default: "
                "derived from the arguments (so the same input, budget and payee is one job; pass a "
                "new key to run the same input again)",
            ),
        ] = None,
        timeout_s: TimeoutS = None,
        wait_s: WaitS = DEFAULT_WAIT_S,
    ) -> dict[str, Any]:
        """Run one paid GPU job: escrow the budget, run the job on the RunPod endpoint, pay the worker
        when its output passes or refund when it fails. Answers with the job (status paid, refunded,
        rejected, attention or in_flight, where the money is, the output); when the job outlasts
        wait_s, with its job_id and state to follow with job_status. Subject to the spending limits."""
        return await answer(
            service.run_job(
                endpoint_id=endpoint_id,
                job_input=input,
                budget=budget,
                payee=payee,
                referral=referral,
                job_key=job_key,
                timeout_s=timeout_s,
                wait_s=wait_s,
            )
        )

    @server.tool(annotations=money)
    async def run_batch(
        endpoint_id: EndpointId,
        inputs: Annotated[
            list[dict[str, Any]],
            Field(min_length=1, max_length=1000, description="the job inputs, one JSON object per job"),
        ],
        budget_per_job: Amount,
        ctx: Context,  # type: ignore[type-arg]
        payee: Payee = None,
        batch_id: Annotated[
            str | None,
            Field(
                max_length=100,
                description="idempotency key of the batch: the same id resumes it and never pays a job "
                "twice. Default: derived from the arguments",
            ),
        ] = None,
        concurrency: Annotated[int | None, Field(ge=1, le=256, description="jobs in flight at once")] = None,
        timeout_s: TimeoutS = None,
        wait_s: WaitS = DEFAULT_WAIT_S,
    ) -> dict[str, Any]:
        """Run a batch of paid GPU jobs in parallel, each escrowed, paid or refunded on its own;
        sends progress notifications (jobs settled of the total) while it runs. Answers with the
        batch's totals and each job's status; when the batch outlasts wait_s, with its batch_id to
        follow with batch_totals and list_jobs. Subject to the spending limits (all jobs together)."""

        async def progress(done: int, total: int, message: str) -> None:
            await ctx.report_progress(done, total, message)

        return await answer(
            service.run_batch(
                endpoint_id=endpoint_id,
                inputs=inputs,
                budget_per_job=budget_per_job,
                payee=payee,
                batch_id=batch_id,
                concurrency=concurrency,
                timeout_s=timeout_s,
                wait_s=wait_s,
                progress=progress,
            )
        )

    @server.tool(annotations=reading)
    async def job_status(
        job_id: Annotated[str | None, Field(description="the job's id (a UUID); or give job_key")] = None,
        job_key: Annotated[str | None, Field(description="the job's idempotency key; or give job_id")] = None,
    ) -> dict[str, Any]:
        """One job now: its status and state, where its money is, why it is not paid (if so), and its
        timeline (every event in order, with what it recorded)."""
        return await answer(service.status(job_id, job_key))

    @server.tool(annotations=reading)
    async def list_jobs(
        batch_id: Annotated[str | None, Field(description="only this batch's jobs")] = None,
        state: Annotated[StateName | None, Field(description="only jobs in this state")] = None,
        limit: Annotated[int, Field(ge=1, le=1000, description="at most this many jobs")] = 100,
    ) -> dict[str, Any]:
        """The jobs, in the order they were opened, by batch and state, with where their money is."""
        return await answer(_thread(service.reads.jobs, batch_id=batch_id, state=state, limit=limit))

    @server.tool(annotations=reading)
    async def batch_totals(
        batch_id: Annotated[str | None, Field(description="one batch; default: every job")] = None,
    ) -> dict[str, Any]:
        """Totals: jobs paid, refunded, rejected, in flight; money funded, to workers, fees, returned
        and still held."""
        return await answer(_thread(service.reads.totals, batch_id))

    @server.tool(annotations=reading)
    async def earnings() -> dict[str, Any]:
        """What each worker earned (released escrows and bonuses), and what each endpoint cost."""
        return await answer(_thread(service.reads.earnings))

    @server.tool(annotations=money)
    async def award_bonus(
        job_id: JobId,
        base_metric: Annotated[str, Field(description='the baseline metric, e.g. "0.80"')],
        achieved_metric: Annotated[str, Field(description='what the worker achieved, e.g. "0.92"')],
        pool: Amount = "5",
        threshold: Metric = "1.10",
    ) -> dict[str, Any]:
        """Pay a paid job's worker a performance bonus, once per job: only when achieved >= threshold x
        baseline, then min(pool x (achieved - baseline) / baseline, pool) USDC. Repeating it never
        pays twice. The pool is subject to the spending limits."""
        return await answer(
            service.award_bonus(
                job_id=job_id,
                base_metric=base_metric,
                achieved_metric=achieved_metric,
                pool=pool,
                threshold=threshold,
            )
        )

    @server.tool(annotations=ToolAnnotations(destructiveHint=True, idempotentHint=True))
    async def cancel_job(
        job_id: JobId,
        reason: Reason = "cancelled by an agent",
        wait_s: WaitS = DEFAULT_WAIT_S,
    ) -> dict[str, Any]:
        """Cancel a running job on RunPod and refund its escrow. A job that is still being funded,
        or already finished, cannot be cancelled: the answer says why."""
        return await answer(service.cancel_job(job_id, reason, wait_s))

    @server.tool(annotations=ToolAnnotations(destructiveHint=True, idempotentHint=True))
    async def cancel_batch(
        batch_id: BatchId,
        reason: Reason = "batch cancelled by an agent",
        wait_s: WaitS = DEFAULT_WAIT_S,
    ) -> dict[str, Any]:
        """Cancel every running job of a batch and refund their escrows; says for each job not yet
        settled whether it was cancelled, or why not."""
        return await answer(service.cancel_batch(batch_id, reason, wait_s))

    @server.tool(annotations=reading)
    async def run_audit() -> dict[str, Any]:
        """Audit the whole history: replay every event, check every invariant and the hash chains,
        compare the read models. ok is false on any violation (first_bad says where)."""
        return await answer(_thread(service.reads.audit))

    @server.tool(annotations=reading)
    async def list_attention() -> dict[str, Any]:
        """The jobs waiting for an operator (an outcome the engine could not know), with what is known
        about each."""
        return await answer(_thread(service.reads.attention))

    @server.tool(annotations=reading)
    async def spending_limits() -> dict[str, Any]:
        """The operator's spending limits for this payer, and what it committed today (UTC)."""
        return await answer(service.limits())

    return server


async def _thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(function, *args, **kwargs)
