"""The dashboard in a real browser: headless Chromium opens `podsettle serve` on a store the demo
filled; the page shows the projections' figures, a job's timeline in order, and follows a batch that
another process runs on the same store without being reloaded. Screenshots are left in pytest's
temporary folder (their paths are printed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from podsettle.application import Settlements
from podsettle.projections import ReadModel
from podsettle.sandbox.app import Sandbox
from podsettle.sandbox.runpod_worker import EndpointConfig, Faults
from tests.web.browser import Browser
from tests.web.conftest import Served, clean_env, fill_with_demo, start_serve, stop_serve

SHOWN_TOTALS = """JSON.stringify(Object.fromEntries(
    [...document.querySelectorAll('[data-total]')].map(n => [n.dataset.total, n.textContent])))"""


def table(selector: str) -> str:
    """A table body's cells as text, row by row (a JSON string)."""
    return f"""JSON.stringify([...document.querySelectorAll('{selector} tbody tr')].map(
        tr => [...tr.cells].map(td => td.textContent)))"""


def projections(store: str) -> ReadModel:
    """The store's read model, built afresh here from its log."""
    model = ReadModel(Settlements(store), None)
    model.catch_up()
    return model


def show(browser: Browser, served: Served, position: int) -> None:
    """Open the dashboard and wait until what it shows is of the log's `position`."""
    browser.open(served.url + "/")
    browser.wait_for(f"document.body.dataset.position === '{position}'")


def test_the_page_shows_the_projections_figures(browser: Browser, served: Served, artifacts: Path) -> None:
    model = projections(served.store)
    totals = model.batch_totals().to_json()
    assert totals["jobs"] == 12 and totals["paid_jobs"] > 0 and totals["refunded_jobs"] > 0
    show(browser, served, model.position)

    shown = json.loads(browser.evaluate(SHOWN_TOTALS))
    assert len(shown) == 12
    assert shown == {name: str(totals[name]) for name in shown}

    earnings = json.loads(browser.evaluate(table("#earnings")))
    expected = [e.to_json() for e in sorted(model.earnings(), key=lambda e: (-e.to_workers, e.payee))]
    assert earnings == [
        [e["payee"], str(e["jobs"]), str(e["paid_jobs"]), e["to_workers"], e["bonus_net"], e["still_held"]]
        for e in expected
    ]
    jobs = json.loads(browser.evaluate(table("#jobs")))
    rows = {row.job_id[:8]: row for row in model.jobs()}
    assert len(jobs) == totals["jobs"] == len(rows)
    for cells in jobs:
        row = rows[cells[0]]
        assert cells[3:] == [
            row.state.lower(),
            *(f"{amount:.6f}" for amount in (row.budget, row.to_workers, row.returned, row.still_held)),
        ]
    batches = json.loads(browser.evaluate(table("#batches")))
    assert [(b[0], b[1], b[6], b[7]) for b in batches] == [
        (key, str(t.jobs), f"{t.to_workers:.6f}", f"{t.spent:.6f}") for key, t in model.batches().items()
    ]
    attention = json.loads(browser.evaluate(table("#attention")))
    assert len(attention) == len(model.jobs(state="ATTENTION"))
    # The chart's end is the money settled so far: the totals' own figures.
    assert browser.evaluate("document.getElementById('chart-to-workers').textContent") == totals["to_workers"]
    assert browser.evaluate("document.getElementById('chart-returned').textContent") == totals["returned"]
    assert browser.evaluate("document.querySelectorAll('#chart svg path[data-series]').length") == 2

    shot = browser.screenshot(artifacts / "dashboard.png")
    print(f"dashboard screenshot: {shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_timeline_of_a_job_shows_its_events_in_order(
    browser: Browser, served: Served, artifacts: Path
) -> None:
    model = projections(served.store)
    # The job with the longest history: the one that earned the bonus.
    longest = max(model.jobs(), key=lambda row: row.version)
    events = list(Settlements(served.store).events.get(Settlements._uuid(longest.job_id)))
    assert len(events) == longest.version > 10
    show(browser, served, model.position)

    browser.evaluate(f"document.querySelector(\"button[data-job-id='{longest.job_id}']\").click()")
    shown = browser.wait_for(
        f"""document.getElementById('timeline').dataset.jobId === '{longest.job_id}'
        && JSON.stringify([...document.querySelectorAll('#timeline li')].map(
            li => [Number(li.dataset.version), li.dataset.event]))"""
    )
    assert json.loads(shown) == [[e.originator_version, type(e).__name__] for e in events]
    assert [v for v, _ in json.loads(shown)] == list(range(1, longest.version + 1))
    assert json.loads(shown)[0][1] == "Opened" and json.loads(shown)[-1][1] == "BonusAwarded"

    shot = browser.screenshot(artifacts / "dashboard-timeline.png")
    print(f"dashboard screenshot with a timeline: {shot}")


@pytest.mark.slow
def test_the_page_follows_a_batch_run_by_another_process(
    browser: Browser, tmp_path: Path, artifacts: Path
) -> None:
    store = fill_with_demo(tmp_path / "live")
    served = start_serve(store)
    endpoint = EndpointConfig(handler="podsettle.sandbox.handlers:sleep", workers=2, faults=Faults())
    limits = {"create": 10_000, "complete": 10_000, "release": 10_000, "dispute": 10_000}
    escrow = {"dispute_review": "refund", "rate_limits": limits}
    try:
        with Sandbox(endpoints={"slow": endpoint}, escrow_options=escrow) as sandbox:
            before = projections(store)
            show(browser, served, before.position)
            initial = json.loads(browser.evaluate(SHOWN_TOTALS))
            browser.evaluate("window.notReloaded = true")

            jobs = tmp_path / "jobs.jsonl"
            jobs.write_text("".join(json.dumps({"seconds": 0.3, "n": n}) + "\n" for n in range(24)))
            payer, worker = sandbox.create_agent("50"), sandbox.create_agent("0")
            env = clean_env(
                PODSETTLE_STORE=store,
                PODSETTLE_ESCROW_URL=sandbox.url,
                PF_API_KEY=payer.api_key,
                PODSETTLE_PAYER=payer.agent_id,
                PODSETTLE_PAYEE=worker.agent_id,
                RUNPOD_API_KEY="sandbox-key",
                RUNPOD_ENDPOINT_BASE_URL=sandbox.runpod_url,
                PODSETTLE_ESCROW_RATE_LIMITS="create=10000,release=10000,dispute=10000",
                PODSETTLE_JOB_TIMEOUT_S="60",
            )
            batch = subprocess.Popen(
                [
                    *(sys.executable, "-m", "podsettle.cli", "batch", str(jobs), "--endpoint", "slow"),
                    *("--budget", "0.25", "--concurrency", "2", "--batch-id", "live", "--json"),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            seen: list[dict[str, Any]] = []
            while batch.poll() is None:
                seen.append(json.loads(browser.evaluate(SHOWN_TOTALS)))
                time.sleep(0.1)
            out, err = batch.communicate()
            unpaid = [(r["state"], r["reason"]) for r in json.loads(out)["jobs"] if r["status"] != "paid"]
            assert batch.returncode == 0, (unpaid, err)
            assert json.loads(out)["totals"]["paid_jobs"] == 24

            after = projections(store)
            browser.wait_for(f"document.body.dataset.position === '{after.position}'")
            final = json.loads(browser.evaluate(SHOWN_TOTALS))
            totals = after.batch_totals().to_json()
            assert final == {name: str(totals[name]) for name in final}
            assert int(final["paid_jobs"]) == int(initial["paid_jobs"]) + 24
            # While the batch ran the page showed it part done: more jobs, fewer of them paid.
            paid_before, paid_after = int(initial["paid_jobs"]), int(final["paid_jobs"])
            midway = [s for s in seen if paid_before < int(s["paid_jobs"]) < paid_after]
            assert midway, seen[-3:]
            assert any(int(s["in_flight_jobs"]) > 0 for s in seen)
            assert browser.evaluate("window.notReloaded === true")
            batches = browser.evaluate("[...document.querySelector('#batch-filter').options].map(o=>o.value)")
            assert "live" in batches
            shot = browser.screenshot(artifacts / "dashboard-live.png")
            print(f"dashboard screenshot after the batch: {shot}")
    finally:
        stop_serve(served)
