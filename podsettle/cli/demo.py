"""`podsettle demo`: the main job on the embedded default.

A sandbox of both services runs in this process on loopback HTTP; the engine (the same adapters as
production) settles a hyper-parameter sweep of training jobs on a SQLite event log: some runs crash,
some miss the accuracy the acceptance check asks for and are refunded, the best run earns the
performance bonus. Then the totals, the worker's earnings, and the audit's verdict.

The demo writes into any store (`--store`, a store URL) that is empty or holds only earlier demos'
batches (their ids start with `demo-`); a SQLite file of earlier demos is started afresh (its
escrow ids come from the seeded sandbox and would repeat), a PostgreSQL database of them is refused
like any other store with events: the demo deletes nothing it did not write.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from eventsourcing.utils import get_topic

BASELINE = Decimal("0.80")
DEMO_BATCH = "demo-"


def prepare_store(url: str, source: str, *, env: Mapping[str, str] | None = None) -> None:
    """Make `url` ready for the demo, or raise `StoreConfigError` (naming `source`) when it holds
    events the demo did not write, or earlier demos' events in a store the demo cannot start afresh."""
    from podsettle.adapters.persistence import StoreConfigError, store_from_url
    from podsettle.application import Settlements
    from podsettle.domain import EscrowJob
    from podsettle.projections.follower import LogFollower

    store = store_from_url(url, source)
    path = store.sqlite_path
    if store.kind == "popo" or (path is not None and not path.exists()):
        return
    app = Settlements(store, env=env)
    try:
        if not app.recorder.max_notification_id():
            return
        opened = LogFollower(app.recorder, topics=[get_topic(EscrowJob.Opened)], page_size=500)
        batches = {
            getattr(app.mapper.to_domain_event(note), "batch_id", None) or ""
            for page in opened.pages_after(0)
            for note in page.notifications
        }
    finally:
        app.close()
    if not batches or not all(batch.startswith(DEMO_BATCH) for batch in batches):
        raise StoreConfigError(
            f"{source}: {store.url} holds events the demo did not write; give the demo an empty store"
        )
    if path is None:
        raise StoreConfigError(
            f"{source}: {store.url} holds an earlier demo's events; give the demo an empty database "
            "(it starts afresh only its own SQLite files)"
        )
    for suffix in ("", "-wal", "-shm", ".views", ".views-wal", ".views-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def sweep(jobs: int, seed: int) -> list[dict[str, Any]]:
    """Targets from 0.70 to 0.98: the runs below 0.80 miss the acceptance threshold."""
    return [
        {"target": round(0.70 + 0.28 * index / max(1, jobs - 1), 4), "seed": seed * 1000 + index, "epochs": 3}
        for index in range(jobs)
    ]


async def run_demo(store: str, *, jobs: int, seed: int, json_output: bool) -> bool:
    from podsettle.adapters.chain import SEALS
    from podsettle.bootstrap import Engine
    from podsettle.cli.console import err, open_views, out, print_earnings, print_totals, progress
    from podsettle.domain import acceptance
    from podsettle.projections import ReadModel
    from podsettle.replay import audit
    from podsettle.sandbox.runpod_worker import EndpointConfig, Faults

    train = EndpointConfig(
        handler="podsettle.sandbox.handlers:train",
        workers=8,
        faults=Faults(failure_rate=0.12, latency_ms=40.0, latency_jitter_ms=60.0),
    )
    engine = Engine.sandbox(
        store,
        seed=seed,
        endpoints={"train": train},
        sandbox_options={"escrow_options": {"dispute_review": "refund"}},
    )
    interactive = not json_output and sys.stderr.isatty()
    async with engine:
        if not json_output:
            out.print(f"sandbox on {engine.sandbox_server.url}; event log {store}")
            # The published service keeps disputes for ever and allows 20 creates a minute.
            out.print("sandbox relaxed for the demo: rate limits lifted, disputes reviewed at once")
        with progress(jobs, "training sweep", enabled=interactive) as advance:
            batch = await engine.run_batch(
                "train",
                sweep(jobs, seed),
                per_job_budget="0.50",
                acceptance=acceptance.metric_at_least("accuracy", BASELINE),
                bonus_pool="5",
                concurrency=8,
                batch_id=f"{DEMO_BATCH}{uuid.uuid4().hex[:12]}",
                on_result=lambda _: advance(),
            )
        paid = [r for r in batch.results if r.paid and isinstance(r.output, dict)]
        best = max(paid, key=lambda r: Decimal(str(r.output["accuracy"])), default=None)
        bonus = None
        if best is not None:
            bonus = await engine.award_bonus(best.job_id, BASELINE, str(best.output["accuracy"]), pool="5")
        ledger = engine.sandbox_server.ledger()
    app = engine.app
    model = ReadModel(app, open_views(app, store))
    model.catch_up()
    earnings = model.earnings()
    report = audit(app, read_model=model, seals=SEALS)
    if json_output:
        print(
            json.dumps(
                {
                    "store": store,
                    "batch": batch.to_json(),
                    "bonus": bonus.to_json() if bonus else None,
                    "earnings": [e.to_json() for e in earnings],
                    "ledger_conserved": ledger["conserved"],
                    "audit": report.to_json(),
                },
                indent=2,
                default=str,
            )
        )
    else:
        print_totals(batch.totals, title=f"batch {batch.batch_id}")
        if bonus is not None:
            winner = best.job_key if best else ""
            out.print(f"bonus for {winner}: {bonus.bonus_gross:f} USDC ({bonus.reason}), {bonus.status}")
        print_earnings(earnings)
        out.print(f"sandbox ledger conserves money: {'yes' if ledger['conserved'] else 'NO'}")
        out.print(report.render())
        # The command on a line of its own, never wrapped: it is meant to be copied whole.
        err.print("audit it again any time:")
        err.print(f"  podsettle replay --store {store}", soft_wrap=True)
    return bool(report.ok and ledger["conserved"])
