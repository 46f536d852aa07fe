"""RunPod as it really answers: statuses the client does not know, generator endpoints (the empty
aggregate `[]`, parts read from `/stream`) and progress updates, through the adapter's `replier=` fake."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from podsettle.adapters.http import Answer
from podsettle.adapters.ports import BadResponse, RunStatus
from podsettle.adapters.runpod import PollPolicy, RunPodCompute, SyncPolicy
from tests.runpod_replies import RUN_ID, Script, status, stream

KEY = "rpa_SECRET_KEY_0123456789"
FAST = PollPolicy(initial_s=0.001, factor=1.0, max_s=0.001, jitter=0.0)


def client(script: Script, **options: Any) -> RunPodCompute:
    return RunPodCompute(KEY, base_url="https://runpod.test/v2", replier=script, poll=FAST, **options)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


# ------------------------------------------------------------------------------ unknown statuses


async def test_a_running_status_mid_job_is_followed_to_its_end_with_one_warning(
    logs: list[dict[str, Any]],
) -> None:
    script = Script(
        status=[
            status("IN_QUEUE"),
            status("RUNNING"),
            status("RUNNING"),
            status("RUNNING"),
            status("COMPLETED", output={"ok": 1}, workerId="w1"),
        ]
    )
    async with client(script) as compute:
        outcome = await compute.wait("echo", RUN_ID, timeout_s=5)
    assert outcome.succeeded and outcome.state.output == {"ok": 1}
    assert script.count("status") == 5
    warnings = [entry for entry in logs if entry["event"] == "runpod.unknown_status"]
    assert len(warnings) == 1 and warnings[0]["status"] == "RUNNING" and warnings[0]["run_id"] == RUN_ID


async def test_an_unknown_status_reads_as_in_progress_and_keeps_the_service_word() -> None:
    script = Script(status=[status("RUNNING", executionTime=12)])
    async with client(script) as compute:
        state = await compute.status("echo", RUN_ID)
    assert (state.status, state.reported, state.status.terminal) == (RunStatus.IN_PROGRESS, "RUNNING", False)
    known = Script(status=[status("IN_PROGRESS")])
    async with client(known) as compute:
        assert (await compute.status("echo", RUN_ID)).reported is None


async def test_a_runsync_answering_running_keeps_its_id_and_is_never_submitted_again() -> None:
    script = Script(
        runsync=[status("RUNNING")],
        status=[status("RUNNING"), status("COMPLETED", output="done")],
    )
    async with client(script, sync=SyncPolicy(wait_ms=1000)) as compute:
        run_id = await compute.submit("echo", {"prompt": "hi"})
        outcome = await compute.wait("echo", run_id, timeout_s=5)
    assert run_id == RUN_ID and outcome.succeeded and outcome.state.output == "done"
    assert script.count("runsync") == 1 and script.count("run") == 0


@pytest.mark.parametrize("word", ["running", "", "IN PROGRESS", "X" * 41, "<b>"])
async def test_a_status_that_is_not_a_word_is_still_a_bad_response(word: str) -> None:
    script = Script(status=[status(word)])
    async with client(script) as compute:
        with pytest.raises(BadResponse, match="is not a job status"):
            await compute.status("echo", RUN_ID)


# ------------------------------------------------------------------------------ the empty aggregate


async def test_completed_with_the_empty_aggregate_is_no_output() -> None:
    script = Script(status=[status("COMPLETED", output=[], executionTime=40)])
    async with client(script) as compute:
        outcome = await compute.wait("gen", RUN_ID, timeout_s=5)
    assert not outcome.succeeded
    assert outcome.reason.startswith("completed with the empty aggregate []")
    assert script.count("stream") == 0  # not a streaming endpoint: /stream is never read


async def test_a_runsync_answer_with_the_empty_aggregate_is_no_output_either() -> None:
    script = Script(runsync=[status("COMPLETED", output=[])])
    async with client(script, sync=SyncPolicy()) as compute:
        run_id = await compute.submit("gen", {"n": 3})
        taken = compute.take_finished("gen", run_id)
    assert taken is not None and not taken.succeeded and "empty aggregate" in taken.reason


async def test_a_non_empty_list_is_still_an_output() -> None:
    script = Script(status=[status("COMPLETED", output=[0])])
    async with client(script) as compute:
        assert (await compute.wait("gen", RUN_ID, timeout_s=5)).succeeded


# ------------------------------------------------------------------------------ streaming endpoints


async def test_a_streaming_endpoint_pays_for_what_stream_delivered() -> None:
    script = Script(
        run=[{"id": RUN_ID, "status": "IN_QUEUE"}],
        stream=[
            stream("IN_QUEUE"),
            stream("IN_PROGRESS", "a"),
            stream("RUNNING"),
            stream("IN_PROGRESS", "b", {"c": 1}),
            stream("COMPLETED", "d"),  # the job ended with a part not read yet
            stream("COMPLETED"),
        ],
        status=[status("COMPLETED", output=[], executionTime=900, workerId="w7")],
    )
    # Streaming endpoints submit through /run even when runsync is the policy.
    async with client(script, streaming=["gen"], sync=SyncPolicy()) as compute:
        run_id = await compute.submit("gen", {"n": 4})
        outcome = await compute.wait("gen", run_id, timeout_s=5)
    assert outcome.succeeded and outcome.state.output == ["a", "b", {"c": 1}, "d"]
    assert (outcome.state.execution_ms, outcome.state.worker_id) == (900, "w7")
    assert script.count("runsync") == 0 and script.count("run") == 1
    assert script.count("stream") == 6 and script.count("status") == 1


async def test_a_streaming_endpoint_with_an_aggregate_keeps_the_status_output() -> None:
    script = Script(
        stream=[stream("IN_PROGRESS", 1), stream("COMPLETED", 2), stream("COMPLETED")],
        status=[status("COMPLETED", output=[1, 2])],
    )
    async with client(script, streaming=["gen"]) as compute:
        outcome = await compute.wait("gen", RUN_ID, timeout_s=5)
    assert outcome.succeeded and outcome.state.output == [1, 2]


async def test_a_streaming_job_that_delivered_nothing_is_no_output() -> None:
    script = Script(
        stream=[stream("IN_PROGRESS"), stream("COMPLETED")], status=[status("COMPLETED", output=[])]
    )
    async with client(script, streaming=["gen"]) as compute:
        outcome = await compute.wait("gen", RUN_ID, timeout_s=5)
    assert not outcome.succeeded and "empty aggregate" in outcome.reason


async def test_a_failed_streaming_job_stays_failed_whatever_it_streamed() -> None:
    script = Script(
        stream=[stream("IN_PROGRESS", "a"), stream("FAILED")],
        status=[status("FAILED", error="boom")],
    )
    async with client(script, streaming=["gen"]) as compute:
        outcome = await compute.wait("gen", RUN_ID, timeout_s=5)
    assert not outcome.succeeded and outcome.reason == "failed: boom"


async def test_a_stream_that_answers_404_is_not_found() -> None:
    script = Script(stream=[stream("IN_PROGRESS", "a"), Answer.of(404, json={"error": "gone"})])
    async with client(script, streaming=["gen"]) as compute:
        outcome = await compute.wait("gen", RUN_ID, timeout_s=5)
    assert not outcome.succeeded and outcome.details["status"] == "NOT_FOUND"


# ------------------------------------------------------------------------------ progress


async def test_each_distinct_progress_value_is_reported_once_however_many_polls() -> None:
    answers = [status("IN_QUEUE")]
    for value in ({"pct": 10}, {"pct": 40}, {"pct": 90}):
        answers += [status("IN_PROGRESS", output=value)] * 5
        answers += [status("IN_PROGRESS")]  # a read between updates shows no output
    answers += [status("IN_PROGRESS", output={"pct": 40})]  # an old value again
    answers += [status("COMPLETED", output={"result": 1})]
    script = Script(status=answers)
    seen: list[Any] = []

    async def on_progress(value: Any) -> None:
        seen.append(value)

    async with client(script) as compute:
        outcome = await compute.wait("echo", RUN_ID, timeout_s=5, on_progress=on_progress)
    assert outcome.succeeded and outcome.state.output == {"result": 1}
    assert seen == [{"pct": 10}, {"pct": 40}, {"pct": 90}]
    assert script.count("status") == len(answers)


async def test_progress_is_only_read_from_in_progress_statuses() -> None:
    script = Script(
        status=[
            status("IN_QUEUE", output="queued?"),
            status("RUNNING", output="odd"),
            status("COMPLETED", output="final"),
        ]
    )
    seen: list[Any] = []

    async def on_progress(value: Any) -> None:
        seen.append(value)

    async with client(script) as compute:
        await compute.wait("echo", RUN_ID, timeout_s=5, on_progress=on_progress)
    assert seen == []


def test_a_streaming_endpoint_must_be_a_valid_id() -> None:
    with pytest.raises(Exception, match="endpoint_id"):
        RunPodCompute(KEY, streaming=["bad id"])


async def test_a_streaming_wait_that_failed_goes_on_from_the_parts_already_read() -> None:
    script = Script(
        stream=[stream("IN_PROGRESS", "a"), stream("COMPLETED", "b"), stream("COMPLETED")],
        status=[status("IN_PROGRESS"), status("COMPLETED", output=[])],  # the first read is odd
    )
    async with client(script, streaming=["gen"]) as compute:
        with pytest.raises(BadResponse, match="after /stream reported the end"):
            await compute.wait("gen", RUN_ID, timeout_s=5)
        outcome = await compute.wait("gen", RUN_ID, timeout_s=5)  # the engine watches again
    assert outcome.succeeded and outcome.state.output == ["a", "b"]
