"""The Settlements application on each store: opening jobs and batches, outcomes, queries, races."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from podsettle import ClaimLost, JobNotFound, Settlements
from podsettle.adapters.persistence import StoreConfigError, store_from_url
from podsettle.domain import ConflictingOutcome, InvalidInput, State, Step
from podsettle.domain.digests import digest
from podsettle.domain.rules import split
from podsettle.writer import JobWriter, run_command
from tests.histories import act
from tests.jobs import DEADLINE
from tests.jobs import request as spec

POSTGRES_URL = os.environ.get("PODSETTLE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2):
            return True
    except Exception:
        return False


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settlements]:
    if request.param == "memory":
        yield Settlements("memory")
    elif request.param == "sqlite":
        yield Settlements(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        if not _postgres_available():
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432, and CI needs it")
            pytest.skip("PostgreSQL is not reachable")
        # A schema of its own per test keeps runs independent.
        schema = f"t_{uuid.uuid4().hex[:12]}"
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        application = Settlements(POSTGRES_URL, env={"POSTGRES_SCHEMA": schema, "CREATE_TABLE": "y"})
        yield application
        application.close()
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_open_settle_and_query_a_job(app: Settlements) -> None:
    job_id = app.open_job(spec("job-1"))
    parts = split(Decimal("0.50"))  # type: ignore[arg-type]
    assert act(app, job_id, lambda j: j.record_attempt(Step.FUND, "p1")) == 1
    act(app, job_id, lambda j: j.record_funded("esc_1", Decimal("0.50"), parts.fee, parts.net))
    act(app, job_id, lambda j: j.record_attempt(Step.START, "p1"))
    act(app, job_id, lambda j: j.record_started("rp-1"))
    act(app, job_id, lambda j: j.record_completed(digest("out"), 10, 1, "w", {"accuracy": "0.9"}))
    act(app, job_id, lambda j: j.record_attempt(Step.RELEASE, "p1"))
    act(app, job_id, lambda j: j.record_released(parts.net, parts.fee, parts.referral_fee, Decimal(0)))
    job = app.get_job(str(job_id))
    assert job.state == State.RELEASED
    assert job.released == (parts.net, parts.fee, parts.referral_fee, Decimal(0))
    assert job.metrics == {"accuracy": "0.9"}
    assert app.find_job("job-1").id == job_id
    assert job.summary()["to_workers"] == "0.495000"


def test_open_is_idempotent_by_key_and_refuses_a_different_job_under_the_same_key(app: Settlements) -> None:
    first = app.open_job(spec("same"))
    assert app.open_job(spec("same")) == first
    assert app.get_job(first).version == 2  # Opened + FundingRequested, once
    with pytest.raises(ConflictingOutcome, match="opened a different job"):
        app.open_job(spec("same", budget="0.60"))


def test_a_batch_opens_atomically_and_lists_by_batch_and_state(app: Settlements) -> None:
    ids = app.open_jobs([spec(f"b1-{i}", batch="b1") for i in range(5)])
    app.open_job(spec("other", batch="b2"))
    assert list(app.job_ids(batch_id="b1")) == ids
    act(app, ids[0], lambda j: j.record_funding_rejected("insufficient_balance", 402))
    assert [j.id for j in app.list_jobs(state="rejected")] == [ids[0]]
    assert len(app.list_jobs(state=State.FUNDING, batch_id="b1")) == 4
    assert len(app.list_jobs()) == 6


def test_a_batch_with_one_bad_job_opens_nothing(app: Settlements) -> None:
    with pytest.raises(InvalidInput, match="budget"):
        app.open_jobs([spec("ok-1", batch="b3"), spec("bad", batch="b3", budget="-1")])
    assert list(app.job_ids(batch_id="b3")) == []


def test_missing_job_and_bad_id(app: Settlements) -> None:
    with pytest.raises(JobNotFound):
        app.get_job(uuid.uuid4())
    with pytest.raises(InvalidInput, match="job_id"):
        app.get_job("not-a-uuid")


async def test_a_claim_lost_to_another_processor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = Settlements(url), Settlements(url)
    job_id = one.open_job(spec("race"))
    read = two.get_job
    raced: list[bool] = []

    def read_then_lose_the_race(job_id: uuid.UUID) -> object:
        job = read(job_id)
        if not raced:  # the other processor claims between our read and save
            raced.append(True)
            act(one, job_id, lambda j: j.record_attempt(Step.FUND, "p1"))
        return job

    monkeypatch.setattr(two, "get_job", read_then_lose_the_race)
    writer = JobWriter(two)
    with pytest.raises(ClaimLost, match="another processor claimed fund"):
        await writer.claim(job_id, Step.FUND, "p2", after=0, at=DEADLINE)
    await writer.aclose()
    # The group save lost the race; applied again to a fresh copy, the claim is lost.
    assert (writer.stats.regroups, writer.stats.fallbacks) == (1, 0)
    job = one.get_job(job_id)
    assert job.intent is not None and job.intent.attempts == 1


async def test_a_claim_whose_own_save_loses_the_race_is_lost_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = Settlements(url), Settlements(url)
    job_id = one.open_job(spec("race"))
    before = two.get_job(job_id).version
    act(one, job_id, lambda j: j.record_attempt(Step.FUND, "p1"))
    # `two` keeps reading the job as it was before that claim, so even the writer's fresh copy
    # passes the claim's own check: only the save finds the other claim.
    monkeypatch.setattr(two, "get_job", lambda job_id: two.repository.get(job_id, version=before))
    writer = JobWriter(two)
    with pytest.raises(ClaimLost, match="another processor claimed fund"):
        await writer.claim(job_id, Step.FUND, "p2", after=0, at=DEADLINE)
    await writer.aclose()
    assert writer.stats.fallbacks == 1
    job = one.get_job(job_id)
    assert job.intent is not None and job.intent.attempts == 1 and job.intent.claimed_by == "p1"


async def test_outcomes_recorded_by_two_writers_converge(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = Settlements(url), Settlements(url)
    job_id = one.open_job(spec("converge"))
    parts = split(Decimal("0.50"))  # type: ignore[arg-type]
    await run_command(one, job_id, lambda j: j.record_funded("esc_1", Decimal("0.50"), parts.fee, parts.net))
    # the same outcome: a no-op
    await run_command(two, job_id, lambda j: j.record_funded("esc_1", Decimal("0.50"), parts.fee, parts.net))
    job = one.get_job(job_id)
    assert job.counts["Funded"] == 1
    with pytest.raises(ConflictingOutcome):
        await run_command(
            two, job_id, lambda j: j.record_funded("esc_2", Decimal("0.50"), parts.fee, parts.net)
        )


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sqlite:///", "needs a file path"),
        ("sqlite:////no/such/folder/x.db", "does not exist"),
        ("mysql://root@localhost/x", "is not a store"),
        ("postgresql://user:hunter2@/", "needs a host"),
    ],
)
def test_bad_store_urls_are_explained(url: str, words: str) -> None:
    with pytest.raises(StoreConfigError, match=words) as caught:
        store_from_url(url)
    assert "PODSETTLE_STORE" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_store_url_never_keeps_the_password() -> None:
    store = store_from_url("postgresql://app:s3cret@db.example:6543/settle")
    assert "s3cret" not in store.url and "s3cret" not in repr(store.url)
    assert store.env["POSTGRES_PORT"] == "6543" and store.kind == "postgres"
