"""Every MCP tool called by the SDK's own client over stdio and over StreamableHTTP: a paid job and
its timeline, bad input answered as a tool error naming the field, a repeated call (after a wait
that ran out, as after a client timeout) that does not pay twice, a batch with progress
notifications, cancelling, a bonus, the audit, and the spending limits refusing before anything
is funded."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from podsettle.application import Settlements
from tests.mcp.conftest import Client, Connect

pytestmark = pytest.mark.timeout(180)
TOOLS = {
    "run_job",
    "run_batch",
    "job_status",
    "list_jobs",
    "batch_totals",
    "earnings",
    "award_bonus",
    "cancel_job",
    "cancel_batch",
    "run_audit",
    "list_attention",
    "spending_limits",
}
D = Decimal


async def until(client: Client, check: Any, what: str, timeout_s: float = 20.0) -> Any:
    """Call `check(client)` until it returns something true."""
    for _ in range(int(timeout_s / 0.1)):
        found = await check(client)
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def log_length(store: str) -> int:
    app = Settlements(store)
    try:
        return app.recorder.max_notification_id() or 0
    finally:
        app.close()


async def test_every_tool_has_a_described_typed_schema(connect: Connect) -> None:
    async with connect() as client:
        tools = (await client.session.list_tools()).tools
    assert {tool.name for tool in tools} == TOOLS
    for tool in tools:
        assert tool.description and len(tool.description) > 40, tool.name
        for name, schema in tool.inputSchema.get("properties", {}).items():
            assert schema.get("description"), f"{tool.name}.{name} has no description"
    run_job = next(tool for tool in tools if tool.name == "run_job").inputSchema
    assert run_job["properties"]["budget"]["type"] == "string"  # amounts as strings
    assert set(run_job["required"]) == {"endpoint_id", "input", "budget"}


async def test_a_paid_job_its_timeline_its_bonus_and_the_reads(connect: Connect) -> None:
    async with connect() as client:
        paid = await client.call("run_job", endpoint_id="echo", input={"prompt": "hi"}, budget="0.50")
        assert paid["done"] and paid["status"] == "paid" and paid["output"] == {"prompt": "hi"}
        assert (paid["budget"], paid["to_workers"], paid["fees"]) == ("0.500000", "0.495000", "0.005000")

        status = await client.call("job_status", job_id=paid["job_id"])
        events = [item["event"] for item in status["timeline"]]
        assert events[:2] == ["Opened", "FundingRequested"] and "Funded" in events
        assert events.index("Funded") < events.index("Started") < events.index("Completed")
        assert events[-1] == "Released"
        assert [item["version"] for item in status["timeline"]] == list(range(1, len(events) + 1))
        assert status["timeline"][0]["data"]["budget"] == "0.500000"
        by_key = await client.call("job_status", job_key=paid["job_key"])
        assert by_key["job_id"] == paid["job_id"] and by_key["timeline"] == status["timeline"]

        bonus = await client.call(
            "award_bonus", job_id=paid["job_id"], base_metric="0.80", achieved_metric="0.96", pool="1"
        )
        assert bonus["status"] == "awarded" and bonus["bonus_gross"] == "0.200000"
        again = await client.call(
            "award_bonus", job_id=paid["job_id"], base_metric="0.80", achieved_metric="0.96", pool="1"
        )
        assert again["escrow_id"] == bonus["escrow_id"]  # the same bonus: paid once

        failed = await client.call("run_job", endpoint_id="fail", input={"message": "boom"}, budget="0.25")
        assert failed["status"] == "refunded" and "boom" in (failed["reason"] or "")

        released = await client.call("list_jobs", state="released")
        assert [job["job_id"] for job in released["jobs"]] == [paid["job_id"]]
        assert (await client.call("list_jobs"))["count"] == 2
        totals = (await client.call("batch_totals"))["totals"]
        assert (totals["jobs"], totals["paid_jobs"], totals["refunded_jobs"]) == (2, 1, 1)
        assert totals["bonus_gross"] == "0.200000"  # one bonus, not two
        workers = (await client.call("earnings"))["workers"]
        assert [(w["paid_jobs"], w["to_workers"]) for w in workers] == [(1, "0.693000")]
        assert (await client.call("list_attention"))["count"] == 0
        audit = await client.call("run_audit")
        assert audit["ok"] and audit["jobs"] == 2
        limits = await client.call("spending_limits")
        assert limits["spent_today"] == "0.950000"  # 0.50 + 0.25 + the 0.20 bonus


async def test_bad_input_is_a_tool_error_naming_the_field(connect: Connect) -> None:
    async with connect() as client:
        before = log_length(client.store)
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("run_job", {"endpoint_id": "echo", "input": {}, "budget": "0.5x"}, "budget"),
            ("run_job", {"endpoint_id": "echo", "input": {}, "budget": "0.1234567"}, "budget"),
            ("run_job", {"endpoint_id": "echo", "input": {}, "budget": "0.001"}, "budget"),
            ("run_job", {"endpoint_id": "echo", "input": [1], "budget": "0.50"}, "input"),
            ("run_job", {"input": {}, "budget": "0.50"}, "endpoint_id"),
            ("run_job", {"endpoint_id": "no such!", "input": {}, "budget": "0.50"}, "endpoint_id"),
            ("run_job", {"endpoint_id": "echo", "input": {}, "budget": "0.50", "wait_s": -1}, "wait_s"),
            ("run_batch", {"endpoint_id": "echo", "inputs": [], "budget_per_job": "0.1"}, "inputs"),
            ("job_status", {"job_id": "not-a-uuid"}, "job_id"),
            ("job_status", {}, "job_id"),
            ("list_jobs", {"state": "bogus"}, "state"),
            ("award_bonus", {"job_id": "x", "base_metric": "a", "achieved_metric": "1"}, "job_id"),
            ("cancel_batch", {"batch_id": "nothing-here"}, "batch_id"),
        ]
        for tool, arguments, field in cases:
            message = await client.error(tool, **arguments)
            assert field in message, f"{tool}({arguments}): {message}"
        assert "not found" in await client.error("job_status", job_id="00000000-0000-0000-0000-000000000000")
        assert log_length(client.store) == before  # nothing was recorded


async def test_a_call_repeated_after_its_wait_ran_out_does_not_pay_twice(connect: Connect) -> None:
    async with connect() as client:
        arguments = {"endpoint_id": "sleep", "input": {"seconds": 1.5}, "budget": "0.40"}
        first = await client.call("run_job", **arguments, wait_s=0)
        assert not first["done"] and first["status"] == "in_flight" and "job_status" in first["next"]
        second = await client.call("run_job", **arguments, wait_s=60)  # the client's retry
        assert second["done"] and second["status"] == "paid" and second["job_id"] == first["job_id"]
        third = await client.call("run_job", **arguments)
        assert third["job_id"] == first["job_id"] and third["status"] == "paid"
        totals = (await client.call("batch_totals"))["totals"]
        assert (totals["jobs"], totals["funded"], totals["to_workers"]) == (1, "0.400000", "0.396000")
        # An explicit key is another job with the same input.
        other = await client.call("run_job", **arguments, job_key="second-run")
        assert other["job_id"] != first["job_id"]
        if client.engine is not None:  # over HTTP the sandbox's ledger is in this process
            ledger = client.engine.sandbox_server.ledger()
            assert ledger["conserved"]


async def test_a_batch_reports_progress_and_resumes_without_paying_twice(connect: Connect) -> None:
    async with connect() as client:
        seen: list[tuple[float, float | None, str | None]] = []

        async def progress(done: float, total: float | None, message: str | None) -> None:
            seen.append((done, total, message))

        arguments = {
            "endpoint_id": "sleep",
            "inputs": [{"seconds": 0.2, "n": n} for n in range(6)],
            "budget_per_job": "0.10",
            "concurrency": 2,
        }
        result = await client.session.call_tool("run_batch", arguments, progress_callback=progress)
        assert not result.isError
        assert len(seen) >= 3 and seen[-1][:2] == (6, 6)
        assert [done for done, _, _ in seen] == sorted(done for done, _, _ in seen)
        assert all(total == 6 for _, total, _ in seen)
        batch = await client.call("run_batch", **arguments)  # the same batch again
        assert batch["done"] and batch["totals"]["paid_jobs"] == 6
        totals = (await client.call("batch_totals", batch_id=batch["batch_id"]))["totals"]
        assert (totals["jobs"], totals["funded"]) == (6, "0.600000")
        listed = await client.call("list_jobs", batch_id=batch["batch_id"], state="released", limit=4)
        assert (listed["count"], listed["shown"]) == (6, 4)


async def test_cancel_a_running_job_and_a_running_batch(connect: Connect) -> None:
    async with connect() as client:
        job = await client.call(
            "run_job", endpoint_id="sleep", input={"seconds": 60}, budget="0.30", wait_s=0
        )

        async def running(c: Client) -> bool:
            return (await c.call("job_status", job_id=job["job_id"]))["state"] == "RUNNING"

        await until(client, running, "the job to run")
        cancelled = await client.call("cancel_job", job_id=job["job_id"], wait_s=60)
        assert cancelled["cancelled"] == 1 and cancelled["jobs"][0]["status"] == "refunded"
        again = await client.call("cancel_job", job_id=job["job_id"], wait_s=5)
        assert again["not_cancellable"] == 1 and again["jobs"][0]["status"] == "refunded"

        batch = await client.call(
            "run_batch",
            endpoint_id="sleep",
            inputs=[{"seconds": 60, "n": n} for n in range(3)],
            budget_per_job="0.20",
            wait_s=0,
        )
        assert not batch["done"]
        batch_id = batch["batch_id"]

        async def all_running(c: Client) -> bool:
            return (await c.call("list_jobs", batch_id=batch_id, state="running"))["count"] == 3

        await until(client, all_running, "the batch to run")
        stopped = await client.call("cancel_batch", batch_id=batch_id, wait_s=60)
        assert (stopped["cancelled"], stopped["not_cancellable"]) == (3, 0)
        totals = (await client.call("batch_totals", batch_id=batch_id))["totals"]
        assert (totals["refunded_jobs"], totals["to_workers"]) == (3, "0.000000")


async def test_spending_limits_refuse_before_anything_is_funded(connect: Connect) -> None:
    limits = {
        "PODSETTLE_LIMIT_MAX_BUDGET": "1",
        "PODSETTLE_LIMIT_DAILY_TOTAL": "1.50",
        "PODSETTLE_LIMIT_ENDPOINTS": "echo",
    }
    async with connect(**limits) as client:

        async def refused(tool: str, variable: str, **arguments: Any) -> None:
            before = log_length(client.store)
            ledger = client.engine.sandbox_server.ledger() if client.engine else None
            message = await client.error(tool, **arguments)
            assert f"spending limit {variable}" in message, message
            assert log_length(client.store) == before  # nothing opened
            if client.engine is not None:
                assert client.engine.sandbox_server.ledger() == ledger  # nothing funded

        await refused("run_job", "PODSETTLE_LIMIT_MAX_BUDGET", endpoint_id="echo", input={}, budget="1.01")
        await refused("run_job", "PODSETTLE_LIMIT_ENDPOINTS", endpoint_id="sleep", input={}, budget="0.10")
        paid = await client.call("run_job", endpoint_id="echo", input={"n": 1}, budget="1")
        assert paid["status"] == "paid"
        await refused(
            "run_job", "PODSETTLE_LIMIT_DAILY_TOTAL", endpoint_id="echo", input={"n": 2}, budget="0.6"
        )
        await refused(
            "run_batch",
            "PODSETTLE_LIMIT_DAILY_TOTAL",
            endpoint_id="echo",
            inputs=[{"n": 3}, {"n": 4}],
            budget_per_job="0.30",
        )
        await refused(
            "award_bonus",
            "PODSETTLE_LIMIT_DAILY_TOTAL",
            job_id=paid["job_id"],
            base_metric="0.80",
            achieved_metric="0.96",
            pool="1",
        )
        repeat = await client.call("run_job", endpoint_id="echo", input={"n": 1}, budget="1")
        assert repeat["job_id"] == paid["job_id"]  # the same job: not new spending, not refused
        assert (await client.call("spending_limits"))["spent_today"] == "1.000000"

    async with connect(PODSETTLE_LIMIT_PAYEES="ag_allowed") as client:
        await refused("run_job", "PODSETTLE_LIMIT_PAYEES", endpoint_id="echo", input={}, budget="0.10")
