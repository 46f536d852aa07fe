"""The job writer: a store failure reaches the callers of the failed save and leaves the writer
serving."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from podsettle import Settlements
from podsettle.application import JobSpec
from podsettle.domain import State, Step
from podsettle.domain.digests import digest
from podsettle.writer import JobWriter
from tests.jobs import DEADLINE


def spec(key: str) -> JobSpec:
    return JobSpec(
        job_key=key,
        endpoint_id="echo",
        input_digest=digest({"key": key}),
        payer="ag_payer",
        payee="ag_worker",
        budget="0.25",
        deadline=DEADLINE,
    )


async def test_a_store_error_reaches_the_callers_and_the_writer_keeps_serving() -> None:
    app = Settlements("memory")
    save_all = app.save_all
    failures: list[int] = []

    def locked_once(aggregates: Any) -> None:
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("database is locked")
        save_all(aggregates)

    app.save_all = locked_once  # type: ignore[method-assign]
    writer = JobWriter(app)
    with pytest.raises(sqlite3.OperationalError):
        await asyncio.wait_for(writer.open([spec("a")]), 5)
    assert writer.known_version(app.build(spec("a"))[0].id) == 0  # never saved: not known
    (job_id,) = await asyncio.wait_for(writer.open([spec("a")]), 5)
    claimed, view = await asyncio.wait_for(writer.claim(job_id, Step.FUND, "p1", after=0, at=DEADLINE), 5)
    assert claimed == 1 and view.state == State.FUNDING
    await writer.aclose()
    assert app.get_job(job_id).intent is not None
