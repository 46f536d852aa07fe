"""Writes the release-0.1.0 fixture: an event store and its export as podsettle 0.1.0 wrote them.

Run it with podsettle 0.1.0 installed (revision 28f344a, the last release before the layered
package layout), never with a later revision: the point of the fixture is that it was written by
the release. From a checkout of that revision, with its dev dependencies installed:

    python make_fixture.py OUT_DIR

It writes into OUT_DIR (which must not hold a store yet):
- store.db: the SQLite event store of `podsettle demo --json` (a training sweep settled on the
  embedded sandbox: paid, refunded and a performance bonus), then, on the same store, one job whose
  budget is above the payer's balance (REJECTED) and one whose escrow create answer was lost (v1
  has no lookup: ATTENTION), resolved by an operator who found the escrow funded, then resumed
  and paid;
- export.jsonl: `podsettle export` of that store (hash-chained JSON Lines);
- expected.json: the release's own figures for that store: `podsettle replay --json` (event and
  job counts, zero findings), `podsettle jobs --json` counted per state, and `podsettle totals
  --json`, overall and for each batch.

The read model the CLI builds next to the store (store.db.views) is removed at the end: a reader
rebuilds it from the log.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

DEMO_JOBS = 24
DEMO_SEED = 7
OPERATOR = "operator-fixture"


def podsettle(*args: str) -> str:
    """Runs the release's own command line; its stdout."""
    command = [sys.executable, "-c", "from podsettle.cli import main; main()", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"podsettle {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


async def extra_jobs(store: str) -> dict[str, Any]:
    """A REJECTED job, and an ATTENTION job an operator resolves, on the demo's store."""
    from podsettle.application import Settlements
    from podsettle.engine import Engine
    from podsettle.reconcile_cli import resolve_job

    async with Engine.sandbox(store, dialect="v1", balance="100", seed=DEMO_SEED) as engine:
        sandbox = engine.sandbox_server
        assert sandbox is not None
        rejected = await engine.run_paid_job(
            "echo", {"prompt": "too dear"}, budget="500", job_key="fixture-rejected"
        )
        assert rejected.status == "rejected", rejected.to_json()
        # The escrow service does the create and the answer is lost: v1 has no lookup by key, so
        # the engine parks the job for an operator instead of risking a second escrow.
        fault = {"route": "create", "mode": "drop_after", "count": 1}
        async with httpx.AsyncClient(timeout=10) as admin:
            (await admin.post(f"{sandbox.url}/sandbox/faults", json=fault)).raise_for_status()
        parked = await engine.run_paid_job(
            "echo", {"prompt": "answer lost"}, budget="0.50", job_key="fixture-attention"
        )
        assert parked.status == "attention", parked.to_json()
        # The operator finds the escrow on the service's dashboard (here: the sandbox's own table)
        # and records it, as `podsettle reconcile --resolve JOB --outcome funded:ESCROW` does.
        with sandbox.app.escrow.state.escrow.ledger.transaction() as tx:
            (escrow_id,) = tx.execute(
                "SELECT escrow_id FROM sandbox_escrows ORDER BY created_at DESC LIMIT 1"
            ).fetchone()
        resolved = resolve_job(
            Settlements(store),
            str(parked.job_id),
            f"found {escrow_id} funded",
            f"funded:{escrow_id}",
            OPERATOR,
        )
        assert resolved["state"] == "FUNDED", resolved
        resumed = await engine.resume()
        paid = await engine.wait(parked.job_id)
        assert paid.status == "paid", (paid.to_json(), [r.to_json() for r in resumed])
        return {
            "rejected": rejected.to_json(),
            "attention_resolved": paid.to_json(),
            "escrow_found_by_operator": escrow_id,
        }


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python make_fixture.py OUT_DIR")
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "store.db"
    if path.exists():
        raise SystemExit(f"{path} exists: the fixture is written once, into an empty directory")
    url = f"sqlite:///{path}"
    demo_args = ("--jobs", str(DEMO_JOBS), "--seed", str(DEMO_SEED), "--store", str(path))
    demo = json.loads(podsettle("demo", "--json", *demo_args))
    if not demo["audit"]["ok"]:
        raise SystemExit("the demo's own audit failed")
    extras = asyncio.run(extra_jobs(url))
    for suffix in (".views", ".views-wal", ".views-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)  # the CLI rebuilds the read model below
    replay = json.loads(podsettle("replay", "--json", "--store", url))
    if not replay["ok"]:
        raise SystemExit(f"the release's audit of the store failed: {replay['findings']}")
    rows = json.loads(podsettle("jobs", "--json", "--store", url))
    batches = sorted({row["batch_id"] for row in rows if row["batch_id"]})
    expected = {
        "written_by": "podsettle 0.1.0 (revision 28f344a)",
        "events": replay["events"],
        "jobs": replay["jobs"],
        "last_position": replay["last_position"],
        "states": dict(sorted(Counter(row["state"] for row in rows).items())),
        "totals": json.loads(podsettle("totals", "--json", "--store", url)),
        "batch_totals": {
            batch: json.loads(podsettle("totals", "--json", "--batch", batch, "--store", url))
            for batch in batches
        },
        "demo_batch": demo["batch"]["batch_id"],
        "demo_audit_events": demo["audit"]["events"],
        "extra_jobs": extras,
    }
    exported = podsettle("export", "--out", str(out / "export.jsonl"), "--store", url)
    expected["export"] = exported.strip().splitlines()[0].replace(str(out) + "/", "")
    expected["export_running_hash"] = exported.split("running hash:")[1].split()[0]
    for suffix in (".views", ".views-wal", ".views-shm", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    (out / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"events": expected["events"], "jobs": expected["jobs"], "states": expected["states"]}))


if __name__ == "__main__":
    main()
