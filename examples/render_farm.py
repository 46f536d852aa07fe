"""Render farm: frames split into tiles, one paid job per tile; a failed tile is refunded and run
again on a second endpoint, each attempt its own escrow with its own fee.

    python examples/render_farm.py [STORE]     (default: a store in a new temporary folder)

Two endpoints, each paying its own worker: `render-spot`, cheap spot GPUs that fail now and then
(examples/workers/spot_render_worker.py), and the sandbox's built-in `render`, reliable. Every tile
goes to the spot workers first; `engine.retry` runs a refunded tile again as a new job linked to
the first (`retry_of`), up to MAX_ATTEMPTS attempts in all. On the Purple Flea escrow a refund keeps
the 1% commission, so a failed attempt still costs its fee: it shows in the totals.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from podsettle import Engine, JobResult, Totals, batch_totals

SPOT_WORKER = Path(__file__).parent / "workers" / "spot_render_worker.py"
FRAMES, TILES_PER_FRAME = 2, 4
BUDGET_PER_TILE = "0.20"  # USDC per attempt (the hosted escrow's minimum is 0.10)
MAX_ATTEMPTS = 3  # the first on render-spot, then up to two more on render
FALLBACK = "render"


@dataclass
class Farm:
    """The recipe's outcome, for its test."""

    tiles: list[list[JobResult]]  # per tile, its attempts in order
    totals: Totals
    payouts: dict[str, Decimal]  # per worker agent
    workers: dict[str, str]  # endpoint -> its worker agent
    ledger: dict[str, Any]
    payer: str
    store: str


async def render_tile(engine: Engine, first: JobResult) -> list[JobResult]:
    attempts = [first]
    while attempts[-1].status == "refunded" and len(attempts) < MAX_ATTEMPTS:
        # A new job (its own escrow and fee) with the same input, on the reliable endpoint.
        attempts.append(await engine.retry(attempts[-1].job_id, FALLBACK))
    return attempts


async def main(store: str | None = None) -> Farm:
    store = store or f"sqlite:///{tempfile.mkdtemp(prefix='podsettle-render-')}/render.db"
    endpoints = {"render-spot": str(SPOT_WORKER)}
    async with Engine.sandbox(store, endpoints=endpoints, payees=["render-spot", FALLBACK]) as engine:
        tiles = [{"frame": f, "tile": t} for f in range(FRAMES) for t in range(TILES_PER_FRAME)]
        batch = await engine.run_batch("render-spot", tiles, BUDGET_PER_TILE, batch_id="frames-0-1")
        per_tile = await asyncio.gather(*(render_tile(engine, first) for first in batch.results))
        everything = [attempt for attempts in per_tile for attempt in attempts]
        payouts: dict[str, Decimal] = defaultdict(Decimal)
        for attempt in everything:
            payouts[attempt.payee] += attempt.money.to_workers
        farm = Farm(
            per_tile,
            batch_totals(everything),
            dict(payouts),
            dict(engine.settings.payees),
            engine.sandbox_server.ledger(),  # GET /sandbox/ledger
            engine.payer,
            store,
        )
    report(farm)
    return farm


def report(farm: Farm) -> None:
    for attempts in farm.tiles:
        tile = attempts[0].job_key
        trail = " -> ".join(f"{a.endpoint_id} {a.status}" for a in attempts)
        print(f"{tile}: {trail}")
    for endpoint, worker in farm.workers.items():
        print(f"worker {worker} ({endpoint}): {farm.payouts.get(worker, Decimal(0))} USDC")
    t = farm.totals
    print(
        f"{t.jobs} attempts for {len(farm.tiles)} tiles: {t.paid_jobs} paid, {t.refunded_jobs} refunded; "
        f"funded {t.funded}, to workers {t.to_workers}, fees {t.fees}, returned {t.returned}"
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
