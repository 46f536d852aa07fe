"""The fault simulation: hundreds of seeded runs with crashes, lost responses, 429s, 5xx, duplicates,
jobs executed twice and COMPLETED without output. After each run every invariant holds, the ledger
conserves money, no job has two escrows and no escrow is settled twice.

More seeds: PODSETTLE_FAULT_SEEDS=3000 make test.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path

import pytest

from podsettle.domain import State
from tests.fault_sim import (
    MINTED,
    PAYEE,
    PAYER,
    PublishedResult,
    SimResult,
    published_escrows,
    simulate,
    simulate_published,
)

SEEDS = int(os.environ.get("PODSETTLE_FAULT_SEEDS", "300"))
CHUNKS = 10


def check(result: SimResult) -> None:
    where = f"seed {result.seed} (faults: {result.faults})"
    ledger = result.ledger
    conservation = ledger.conservation()
    assert conservation.conserved, f"{where}: the ledger lost or made money: {conservation}"
    assert conservation.held == 0, f"{where}: money is still held in escrow: {conservation}"
    rows = ledger._conn.execute("SELECT key, status, meta FROM ledger_holds").fetchall()
    escrows_per_job: dict[str, list[str]] = {}
    for _key, status, meta in rows:
        job = json.loads(meta).get("job_id")
        kind = "bonus" if json.loads(meta).get("bonus") else "job"
        escrows_per_job.setdefault(f"{job}:{kind}", []).append(status)
    for job_kind, statuses in escrows_per_job.items():
        assert len(statuses) == 1, f"{where}: {job_kind} has {len(statuses)} escrows"
    paid_to_worker = Decimal(0)
    for job in result.jobs:
        assert job.violations(quiescent=True) == [], (
            f"{where}: job {job.id}: {job.violations(quiescent=True)}"
        )
        assert job.state in (State.RELEASED, State.REFUNDED, State.REJECTED), f"{where}: {job.summary()}"
        assert job.intent is None, f"{where}: {job.summary()}"
        if job.released:
            paid_to_worker += job.released.to_payee
            assert escrows_per_job[f"{job.id}:job"] == ["posted"]
        if job.refunded:
            assert escrows_per_job[f"{job.id}:job"] == ["voided"]
        if job.state == State.REJECTED:
            assert f"{job.id}:job" not in escrows_per_job
        if job.bonus_awarded:
            paid_to_worker += job.bonus_awarded.to_payee
            assert escrows_per_job[f"{job.id}:bonus"] == ["posted"]
    balances = {a.account_id: a.balance for a in conservation.accounts}
    assert balances[PAYEE] == paid_to_worker, f"{where}: the worker's balance differs from the log"
    assert balances[PAYER] <= MINTED


@pytest.mark.parametrize("chunk", range(CHUNKS))
async def test_fault_simulation(chunk: int, tmp_path: Path) -> None:
    seeds = range(chunk, SEEDS, CHUNKS)
    for seed in seeds:
        check(await simulate(seed, tmp_path))


async def test_a_v1_like_escrow_parks_unknown_creates_for_an_operator(tmp_path: Path) -> None:
    """Without idempotency keys or lookup, a lost create response cannot be resolved by the engine."""
    parked = 0
    for seed in range(40):
        result = await simulate(10_000 + seed, tmp_path, v1_like=True)
        check(result)
        parked += result.operator_resolutions
    assert parked > 0, "no run exercised the ATTENTION path"


def check_published(result: PublishedResult) -> None:
    """Nothing locked for good by the engine's choice, nothing paid twice, every job settled (or in
    ATTENTION with a reason), and the worker's balance on the service is what the log paid."""
    where = f"published seed {result.seed} (faults: {result.faults})"
    state = result.sandbox
    assert state.ledger.conservation().conserved, f"{where}: the service's ledger lost or made money"
    with state.ledger.transaction() as tx:
        statuses = [
            row[0]
            for row in tx.execute("SELECT status FROM sandbox_escrows WHERE creator_id = ?", (result.payer,))
        ]
    assert "disputed" not in statuses, f"{where}: an escrow was disputed: locked for good"
    assert not {"funded", "completed"} & set(statuses), f"{where}: money still held: {statuses}"
    paid = Decimal(0)
    for job in result.jobs:
        assert job.violations(quiescent=True) == [], f"{where}: {job.violations(quiescent=True)}"
        escrows = published_escrows(state, job.job_key)
        mine = [e for e in escrows if not e["description"].startswith("Perf")]
        bonuses = [e for e in escrows if e["description"].startswith("Perf")]
        assert len(mine) <= 1 and len(bonuses) <= 1, f"{where}: {job.job_key} funded twice: {escrows}"
        if job.released:
            paid += job.released.to_payee
            assert mine[0]["status"] == "released", f"{where}: {job.summary()} vs {mine}"
        if job.refunded:
            assert mine[0]["status"] == "refunded", f"{where}: {job.summary()} vs {mine}"
        if job.bonus_awarded:
            paid += job.bonus_awarded.to_payee
            assert bonuses[0]["status"] == "released", f"{where}: {job.summary()} vs {bonuses}"
        if job.state == State.ATTENTION:
            assert job.attention and job.attention.get("reason"), f"{where}: {job.summary()}"
            continue
        assert job.state in (State.RELEASED, State.REFUNDED, State.REJECTED), f"{where}: {job.summary()}"
        assert job.intent is None, f"{where}: {job.summary()}"
        if job.state == State.REJECTED:
            assert mine == [], f"{where}: a rejected job has an escrow"
    assert state.ledger.balance(result.worker) == paid, (
        f"{where}: the worker was paid other than the log says"
    )


PUBLISHED_SEEDS = int(os.environ.get("PODSETTLE_PUBLISHED_SEEDS", "24"))


@pytest.mark.parametrize("chunk", range(3))
async def test_fault_simulation_v1_as_published(chunk: int, tmp_path: Path) -> None:
    """v1 as published: disputes never resolved, one rate-limit bucket shared with a neighbour, the
    timeout sweep every 5 minutes on the service's clock; the refund path is the sweep."""
    refunded_by_sweep = rate_limited = 0
    for seed in range(chunk, PUBLISHED_SEEDS, 3):
        result = await simulate_published(seed, tmp_path)
        check_published(result)
        refunded_by_sweep += result.sweeps_waited
        rate_limited += result.rate_limited
    assert refunded_by_sweep > 0, "no run waited for the timeout sweep"
    assert rate_limited > 0, "no run met the shared rate-limit bucket"
