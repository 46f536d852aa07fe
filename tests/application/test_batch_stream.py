"""Batches of any size: jobs opened in chunks (each whole or not at all), results streamed as they
rest, a batch run again continuing after its last chunk, and nothing per job left in the engine."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from podsettle.batches import BadBatchInput
from podsettle.bootstrap import Engine
from podsettle.domain.errors import ConflictingOutcome, InvalidInput
from podsettle.engine import JobResult


def payer_balance(engine: Engine) -> Decimal:
    ledger = engine.escrow.ledger  # type: ignore[attr-defined]
    accounts = {a.account_id: a.balance for a in ledger.conservation().accounts}
    balance: Decimal = accounts[engine.payer]
    return balance


async def broken_source(jobs: int, fail_at: int) -> AsyncIterator[dict[str, Any]]:
    """Job inputs from a source that breaks (a lost connection) when asked for input `fail_at`."""
    for n in range(jobs):
        if n == fail_at:
            raise ConnectionError("the source of the inputs went away")
        yield {"n": n}


def batch_jobs(engine: Engine, batch_id: str) -> list[Any]:
    return engine.app.list_jobs(batch_id=batch_id)


async def test_a_source_that_breaks_leaves_whole_chunks_and_the_batch_continues_after_them(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'store.db'}"
    async with Engine.in_process(store, balance="100") as engine:
        stream = engine.stream_batch(
            "echo", broken_source(25, fail_at=13), "0.50", batch_id="b", chunk_size=5, concurrency=3
        )
        settled: list[JobResult] = []
        with pytest.raises(ConnectionError, match="went away"):
            async for result in stream:
                settled.append(result)
        # The chunk being read when the source broke was never opened; the two before it were,
        # whole, and their jobs settled before the error reached the caller.
        assert stream.opened == 10 and len(batch_jobs(engine, "b")) == 10
        assert sorted(r.job_key for r in settled) == [f"b-{n:06d}" for n in range(10)]
        assert all(r.paid for r in settled) and stream.totals.paid_jobs == 10
        assert payer_balance(engine) == Decimal("95")

    async with Engine.in_process(store, balance="100") as engine:
        again = engine.stream_batch(
            "echo", ({"n": n} for n in range(25)), "0.50", batch_id="b", chunk_size=5, concurrency=3
        )
        keys = [result.job_key async for result in again]
        # The ten opened jobs are found, not opened again (their results come back), the rest opened.
        assert again.resumed == 10 and again.opened == 25
        assert sorted(keys) == [f"b-{n:06d}" for n in range(25)]
        assert again.totals.paid_jobs == 25 and len(batch_jobs(engine, "b")) == 25
        assert sum(1 for job in batch_jobs(engine, "b") if job.escrow_id) == 25


async def test_a_batch_run_again_with_other_inputs_under_its_id_is_refused() -> None:
    async with Engine.in_process("memory", balance="100") as engine:
        await engine.run_batch("echo", [{"n": n} for n in range(4)], "0.50", batch_id="b", chunk_size=2)
        before = payer_balance(engine)
        with pytest.raises(ConflictingOutcome, match="opened a different job"):
            await engine.run_batch("echo", [{"n": n + 100} for n in range(6)], "0.50", batch_id="b")
        assert len(batch_jobs(engine, "b")) == 4 and payer_balance(engine) == before


async def test_results_come_as_jobs_rest_long_before_a_large_batch_is_opened() -> None:
    async with Engine.in_process("memory", balance="10000") as engine:
        stream = engine.stream_batch(
            "echo", ({"n": n} for n in range(3000)), "0.10", chunk_size=100, concurrency=16
        )
        opened_at_first: int | None = None
        count = 0
        async for _ in stream:
            if opened_at_first is None:
                opened_at_first = stream.opened
            count += 1
        assert count == 3000 and stream.totals.paid_jobs == 3000
        # At most `concurrency` jobs run, and the opening keeps only a chunk or two ahead of them.
        assert opened_at_first is not None and opened_at_first <= 16 + 3 * 100


async def test_nothing_per_job_stays_in_the_engine_once_a_batch_has_rested() -> None:
    async with Engine.in_process("memory", balance="10000") as engine:
        engine.writer.cache_size = 100  # the bound of the versions the writer remembers
        stream = engine.stream_batch("echo", ({"n": n} for n in range(600)), "0.10", chunk_size=50)
        async for result in stream:
            assert result.paid
        del result
        held = engine.per_job_state()
        assert held.pop("versions") <= 100
        assert held == dict.fromkeys(held, 0)
        gc.collect()
        assert not any(isinstance(o, JobResult) for o in gc.get_objects())
        totals = stream.totals
        assert (totals.jobs, totals.paid_jobs, totals.funded) == (600, 600, Decimal("60.000000"))
        assert totals.to_workers + totals.fees == totals.funded


async def test_a_bad_input_of_a_collection_opens_nothing_and_is_named_by_its_place() -> None:
    class Inputs:
        """A sized collection read twice: validated whole before anything is opened."""

        def __len__(self) -> int:
            return 500

        def __iter__(self) -> Iterator[dict[str, Any]]:
            return ({"v": float("nan") if n == 420 else n} for n in range(500))

    async with Engine.in_process("memory", balance="1000") as engine:
        with pytest.raises(BadBatchInput, match=r"jobs\[420\]\.job_input\.v") as raised:
            async for _ in engine.stream_batch("echo", Inputs(), "0.50", chunk_size=50):
                pass
        assert raised.value.index == 420
        assert engine.app.list_jobs() == []


async def test_a_bad_input_in_a_one_shot_stream_stops_the_opening_after_the_jobs_before_it_settle() -> None:
    def inputs() -> Iterator[dict[str, Any]]:
        for n in range(30):
            yield {"v": float("nan") if n == 12 else n}

    async with Engine.in_process("memory", balance="1000") as engine:
        stream = engine.stream_batch("echo", inputs(), "0.50", batch_id="s", chunk_size=5)
        paid = 0
        with pytest.raises(BadBatchInput, match=r"jobs\[12\]"):
            async for result in stream:
                paid += result.paid
        assert paid == 10 and len(batch_jobs(engine, "s")) == 10


async def test_a_sized_source_that_cannot_be_read_twice_is_refused_not_taken_as_empty() -> None:
    class Once:
        def __init__(self) -> None:
            self.inputs = iter([{"n": n} for n in range(5)])

        def __len__(self) -> int:
            return 5

        def __iter__(self) -> Iterator[dict[str, Any]]:
            return self.inputs

    async with Engine.in_process("memory", balance="100") as engine:
        with pytest.raises(InvalidInput, match="gave 0 inputs when read again, 5 the first time"):
            await engine.run_batch("echo", Once(), "0.50")
        assert engine.app.list_jobs() == []
