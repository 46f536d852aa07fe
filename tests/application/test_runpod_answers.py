"""The engine on RunPod's real answers (the HTTP adapter on a scripted RunPod, the local ledger for the
escrow): a RUNNING status mid-job is followed to its end with one submission, a generator's empty
aggregate is refunded, a streaming endpoint is paid for what `/stream` delivered, and each distinct
progress value becomes one Progressed event that the audit, the export and `status` show."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from podsettle import Settlements
from podsettle.adapters.chain import SEALS
from podsettle.adapters.runpod import PollPolicy, RunPodCompute, SyncPolicy
from podsettle.bootstrap import Engine
from podsettle.cli import app as cli
from podsettle.domain import EscrowJob
from podsettle.replay import audit, audit_export, export
from tests.runpod_replies import RUN_ID, Script, status, stream

FAST = PollPolicy(initial_s=0.001, factor=1.0, max_s=0.001, jitter=0.0)
LISTS_PASS = {"kind": "json_schema", "schema": {"type": "array"}}  # a check on lists


def compute(script: Script, **options: Any) -> RunPodCompute:
    return RunPodCompute("rpa_test", base_url="https://runpod.test/v2", replier=script, poll=FAST, **options)


async def settle(store: Path, gateway: RunPodCompute, endpoint: str, **submit: Any) -> Any:
    async with Engine.in_process(f"sqlite:///{store}", compute=gateway) as engine:
        job_id = await engine.submit(endpoint, {"prompt": "hi"}, "0.50", **submit)
        return await engine.wait(job_id)


def events_of(store: Path, job_id: Any) -> list[EscrowJob.Event]:
    app = Settlements(f"sqlite:///{store}")
    try:
        return list(app.repository.event_store.get(job_id))
    finally:
        app.close()


def audited(store: Path, tmp_path: Path) -> None:
    app = Settlements(f"sqlite:///{store}")
    try:
        report = audit(app)
        assert report.ok, report.render()
        export(app, tmp_path / "log.jsonl")
    finally:
        app.close()
    exported = audit_export(tmp_path / "log.jsonl", seals=SEALS)
    assert exported.ok, exported.render()


async def test_a_running_status_on_the_runsync_path_is_followed_with_one_submission(tmp_path: Path) -> None:
    script = Script(
        runsync=[status("RUNNING")],
        status=[status("RUNNING")] * 4 + [status("COMPLETED", output={"frame": 1}, workerId="w1")],
    )
    result = await settle(tmp_path / "s.db", compute(script, sync=SyncPolicy()), "echo")
    assert result.status == "paid" and result.output == {"frame": 1} and result.runpod_job_id == RUN_ID
    assert script.count("runsync") == 1 and script.count("run") == 0  # submitted once
    assert script.count("cancel") == 0
    audited(tmp_path / "s.db", tmp_path)


async def test_a_generator_without_aggregation_is_refunded_as_a_run_without_output(tmp_path: Path) -> None:
    # The client decides (the run brought nothing), before any acceptance check is asked.
    script = Script(run=[status("IN_QUEUE")], status=[status("IN_PROGRESS"), status("COMPLETED", output=[])])
    result = await settle(tmp_path / "s.db", compute(script), "gen", acceptance=LISTS_PASS)
    assert result.status == "refunded" and result.money.to_workers == 0
    assert result.reason is not None and "empty aggregate" in result.reason
    audited(tmp_path / "s.db", tmp_path)


async def test_a_streaming_endpoint_is_paid_for_what_stream_delivered(tmp_path: Path) -> None:
    script = Script(
        run=[status("IN_QUEUE")],
        stream=[
            stream("IN_PROGRESS", "a"),
            stream("IN_PROGRESS", "b"),
            stream("COMPLETED", "c"),
            stream("COMPLETED"),
        ],
        status=[status("COMPLETED", output=[])],
    )
    gateway = compute(script, streaming=["gen"], sync=SyncPolicy())
    result = await settle(tmp_path / "s.db", gateway, "gen", acceptance=LISTS_PASS)
    assert result.status == "paid" and result.output == ["a", "b", "c"]
    assert script.count("run") == 1 and script.count("runsync") == 0


async def test_three_progress_values_over_many_polls_are_three_events(tmp_path: Path) -> None:
    answers = [status("IN_QUEUE")] * 3
    for pct in (10, 50, 90):
        answers += [status("IN_PROGRESS", output={"pct": pct}, executionTime=pct)] * 6
    answers += [status("IN_PROGRESS", output={"pct": 50})]  # an old value read again
    answers += [status("COMPLETED", output={"done": True})]
    script = Script(run=[status("IN_QUEUE")], status=answers)
    store = tmp_path / "s.db"
    result = await settle(store, compute(script), "echo")
    assert result.status == "paid"
    assert script.count("status") == len(answers) == 23
    names = [type(event).__name__ for event in events_of(store, result.job_id)]
    assert names.count("Progressed") == 3
    assert names.index("Started") < names.index("Progressed") and names.index("Completed") > max(
        i for i, name in enumerate(names) if name == "Progressed"
    )
    audited(store, tmp_path)

    runner = CliRunner()
    shown = runner.invoke(cli, ["status", str(result.job_id), "--store", f"sqlite:///{store}", "--json"])
    assert shown.exit_code == 0, shown.output
    progress = json.loads(shown.stdout)["progress"]
    assert [item["value"] for item in progress] == ['{"pct":10}', '{"pct":50}', '{"pct":90}']
    human = runner.invoke(cli, ["status", str(result.job_id), "--store", f"sqlite:///{store}"])
    assert human.exit_code == 0 and "progress" in human.stdout and '{"pct":90}' in human.stdout


WORKERS = Path(__file__).parents[1] / "data" / "runpod_workers"


async def test_a_real_generator_worker_on_the_sandbox_is_refunded_unless_its_stream_is_read(
    tmp_path: Path,
) -> None:
    """End to end: RunPod's documented generator file (no `return_aggregate_stream`) ends COMPLETED
    with `[]` in the sandbox as on RunPod; the engine refunds it, and pays it once it reads `/stream`."""
    text = {"text": "one two three"}
    endpoints = {"gen": str(WORKERS / "stream_worker.py")}
    async with Engine.sandbox(f"sqlite:///{tmp_path / 'a.db'}", endpoints=endpoints) as engine:
        refunded = await engine.run_paid_job("gen", text, "0.50", acceptance=LISTS_PASS)
    assert refunded.status == "refunded" and "empty aggregate" in (refunded.reason or "")
    async with Engine.sandbox(
        f"sqlite:///{tmp_path / 'b.db'}", endpoints=endpoints, streaming=["gen"]
    ) as engine:
        paid = await engine.run_paid_job("gen", text, "0.50", acceptance=LISTS_PASS)
    assert paid.status == "paid"
    assert paid.output == [{"token": "one"}, {"token": "two"}, {"token": "three"}]
