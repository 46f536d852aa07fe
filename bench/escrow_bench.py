"""Escrow throughput: create+release pairs per second through the Purple Flea adapter against the
sandbox over loopback HTTP, and ledger operations per second in process.

    .venv/bin/python bench/escrow_bench.py [--pairs 1000] [--concurrency 16] [--ledger-ops 5000]

Prints one line per figure, each with the same run's baseline and the ratio between them:
- adapter pairs/s against raw httpx GETs to /health per second (the server's ceiling for one request;
  a pair is two money-moving requests, each a SQLite transaction on the server);
- ledger hold+post pairs/s (file in WAL mode, one `BEGIN IMMEDIATE` transaction per operation) against
  a raw sqlite3 loop of one-row insert transactions on the same kind of file;
- LedgerEscrow (the in-process gateway) create+release pairs/s.
The documented rate limits are switched off on both sides: they would cap creates at 20 a minute and
measure the limiter, not the code.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from podsettle.adapters.ledger import Ledger
from podsettle.adapters.ledger_gateway import LedgerEscrow
from podsettle.adapters.purpleflea import purple_flea
from podsettle.domain.money import to_money
from podsettle.domain.rules import split
from podsettle.sandbox.escrow_server import create_escrow_app
from podsettle.sandbox.http_server import BackgroundServer
from podsettle.support.logs import configure_logging

UNLIMITED = {"create": 10**9, "complete": 10**9, "release": 10**9, "dispute": 10**9, "cancel": 10**9}
AMOUNT = to_money("0.50")
EXPECTED = split(AMOUNT, referred=False)


async def _bounded(concurrency: int, count: int, one: Callable[[int], Awaitable[None]]) -> float:
    semaphore = asyncio.Semaphore(concurrency)

    async def guarded(n: int) -> None:
        async with semaphore:
            await one(n)

    started = time.perf_counter()
    await asyncio.gather(*(guarded(n) for n in range(count)))
    return time.perf_counter() - started


async def health_baseline(base_url: str, count: int, concurrency: int) -> float:
    async with httpx.AsyncClient(
        base_url=base_url, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def one(_: int) -> None:
            response = await client.get("/health")
            response.raise_for_status()

        return count / await _bounded(concurrency, count, one)


async def adapter_pairs(base_url: str, payer_key: str, worker: str, pairs: int, concurrency: int) -> float:
    async with purple_flea(
        base_url, payer_key=payer_key, rate_limits=UNLIMITED, max_connections=concurrency
    ) as escrow:

        async def one(n: int) -> None:
            receipt = await escrow.create(
                key=f"bench-{n}:fund", payee=worker, amount=AMOUNT, description="bench job", timeout_hours=1
            )
            await escrow.release(receipt.escrow_id, key=f"bench-{n}:release", expected=EXPECTED)

        return pairs / await _bounded(concurrency, pairs, one)


def sqlite_baseline(path: Path, count: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, key TEXT UNIQUE, amount INTEGER)")
    started = time.perf_counter()
    for n in range(count):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO rows (key, amount) VALUES (?, ?)", (f"k{n}", 500_000))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return count / elapsed


def ledger_pairs(path: Path, pairs: int) -> float:
    ledger = Ledger(str(path))
    ledger.open_account("payer")
    ledger.open_account("payee")
    ledger.mint("payer", "1000000", key="bench-mint")
    started = time.perf_counter()
    for n in range(pairs):
        hold = ledger.hold(key=f"h{n}", payer="payer", amount=AMOUNT)
        ledger.post(hold.hold_id, key=f"p{n}", payee="payee", net=EXPECTED.net, fee=EXPECTED.fee)
    elapsed = time.perf_counter() - started
    if not ledger.conservation().conserved:
        raise SystemExit("the ledger did not conserve money")
    ledger.close()
    return pairs / elapsed


async def ledger_gateway_pairs(path: Path, pairs: int) -> float:
    ledger = Ledger(str(path))
    ledger.open_account("payer")
    ledger.open_account("payee")
    ledger.mint("payer", "1000000", key="bench-mint")
    escrow = LedgerEscrow(ledger, payer="payer")
    started = time.perf_counter()
    for n in range(pairs):
        receipt = await escrow.create(
            key=f"g{n}:fund", payee="payee", amount=AMOUNT, description="bench job", timeout_hours=1
        )
        await escrow.release(receipt.escrow_id, key=f"g{n}:release", expected=EXPECTED)
    elapsed = time.perf_counter() - started
    ledger.close()
    return pairs / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=1000, help="create+release pairs over HTTP")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--ledger-ops", type=int, default=5000, help="hold+post pairs in process")
    args = parser.parse_args(argv)
    configure_logging(level="WARNING", force=True)

    with tempfile.TemporaryDirectory(prefix="podsettle-escrow-bench-") as tmp:
        folder = Path(tmp)
        app = create_escrow_app(ledger_path=str(folder / "sandbox.db"), rate_limits=UNLIMITED)
        with BackgroundServer(app) as server:
            _, payer_key = app.state.escrow.create_agent(to_money("1000000"))
            worker, _ = app.state.escrow.create_agent()
            baseline = asyncio.run(health_baseline(server.url, args.pairs * 2, args.concurrency))
            pairs = asyncio.run(adapter_pairs(server.url, payer_key, worker, args.pairs, args.concurrency))
            conserved = app.state.escrow.ledger.conservation().conserved
        if not conserved:
            raise SystemExit("the sandbox ledger did not conserve money")
        print(
            f"adapter over HTTP: {pairs:,.1f} create+release pairs/s ({args.pairs} pairs, concurrency "
            f"{args.concurrency}, sandbox on a WAL file, its rate limits lifted); "
            f"baseline raw GET /health: {baseline:,.1f} req/s; "
            f"ratio {pairs * 2 / baseline:.2f} (requests per second in pairs / baseline)"
        )
        raw = sqlite_baseline(folder / "raw.db", args.ledger_ops * 2)
        ops = ledger_pairs(folder / "ledger.db", args.ledger_ops)
        print(
            f"ledger in process: {ops * 2:,.0f} ops/s ({ops:,.0f} hold+post pairs/s, "
            f"{args.ledger_ops} pairs, WAL file); baseline raw sqlite3 one-insert transactions: "
            f"{raw:,.0f} tx/s; ratio {ops * 2 / raw:.2f}"
        )
        gateway = asyncio.run(ledger_gateway_pairs(folder / "gateway.db", args.ledger_ops))
        print(
            f"LedgerEscrow in process: {gateway:,.0f} create+release pairs/s; "
            f"ratio to the HTTP adapter {gateway / pairs:.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
