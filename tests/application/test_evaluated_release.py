"""A release gated by an evaluator that is itself a paid job (`acceptance.evaluated_by`): when the
run completes, the engine opens the evaluator on another endpoint (the same payer, its own escrow
and fee, keyed by the evaluated job's key), waits for its score, records `Evaluated` on the job,
and releases at or above the threshold, refunds below it or when the evaluator gave no score. A
restart mid-evaluation waits on the same evaluator job; the audit replays the verdicts."""

from __future__ import annotations

import asyncio
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from podsettle import Engine, Settlements
from podsettle.adapters.ledger import Ledger
from podsettle.adapters.ledger_gateway import LedgerEscrow
from podsettle.domain import EscrowJob, InvalidInput
from podsettle.domain import acceptance as checks
from podsettle.domain.errors import ConflictingOutcome, JobNotFound
from podsettle.domain.escrow_job import Step
from podsettle.domain.money import Money
from podsettle.processor import ProcessorConfig
from podsettle.replay import audit
from podsettle.sandbox.inprocess_compute import InProcessCompute
from podsettle.settings import Settings
from tests.jobs import DEADLINE

PAYER, PAYEE = "ag_buyer", "ag_trainer"


def train(job: dict[str, Any]) -> dict[str, Any]:
    return {"adapter": "lora-r8", "accuracy": job["input"]["accuracy"]}


def score_by_accuracy(job: dict[str, Any]) -> dict[str, Any]:
    """Scores the candidate by the accuracy its run reported."""
    return {"score": float(job["input"]["metrics"]["accuracy"])}  # float-ok: a score, as JSON has it


def no_score(job: dict[str, Any]) -> dict[str, Any]:
    return {"verdict": "could not load the adapter"}  # fails its own check: no numeric score


ENDPOINTS = {"train": train, "eval": score_by_accuracy, "eval-broken": no_score}
GATE = checks.evaluated_by("eval", "0.20", "0.85")


def balances(engine: Engine) -> dict[str, D]:
    ledger: Ledger = engine.escrow.ledger  # type: ignore[attr-defined]
    return {account: ledger.balance(account) for account in (PAYER, PAYEE, "fees")}


def audited(app: Settlements) -> None:
    report = audit(app)
    assert report.ok, report.render()


def gated_engine(**options: Any) -> Engine:
    return Engine.in_process("memory", payer=PAYER, payee=PAYEE, endpoints=ENDPOINTS, **options)


async def test_a_score_at_the_threshold_releases_and_the_buyer_pays_the_evaluator_too() -> None:
    async with gated_engine() as engine:
        result = await engine.run_paid_job(
            "train", {"accuracy": 0.85}, "1.00", acceptance=GATE, job_key="lora-1"
        )
        assert result.paid and result.evaluation is not None
        verdict = result.evaluation
        assert (verdict.score, verdict.threshold, verdict.passed) == ("0.85", "0.85", True)
        evaluator = await engine.job(verdict.evaluator_job_id)
        assert evaluator.job_key == checks.evaluator_key("lora-1") and evaluator.paid
        assert evaluator.payer == result.payer == PAYER and evaluator.endpoint_id == "eval"
        # Two escrows, two fees: the job's 1.00 and the evaluator's 0.20, both released.
        assert balances(engine) == {
            PAYER: D("1000000") - D("1.20"),
            PAYEE: D("0.99") + D("0.198"),
            "fees": D("0.012"),
        }
        job = engine.app.get_job(result.job_id)
        assert job.evaluation is not None and job.state == "RELEASED"
        assert result.to_json()["evaluation"]["evaluator_job_id"] == verdict.evaluator_job_id
        audited(engine.app)


async def test_a_score_below_the_threshold_refunds_the_job_and_still_pays_the_evaluator() -> None:
    async with gated_engine() as engine:
        result = await engine.run_paid_job(
            "train", {"accuracy": 0.8499}, "1.00", acceptance=GATE, job_key="lora-2"
        )
        assert result.status == "refunded" and result.evaluation is not None
        assert (result.evaluation.score, result.evaluation.passed) == ("0.8499", False)
        assert result.reason == "score 0.8499 is below the threshold 0.85"
        evaluator = await engine.job(result.evaluation.evaluator_job_id)
        assert evaluator.paid  # it did its work: a low score is a score
        # The local ledger refunds the whole escrow; the evaluator's escrow is released.
        assert result.money.returned == D("1.00") and result.money.to_workers == 0
        assert balances(engine) == {PAYER: D("1000000") - D("0.20"), PAYEE: D("0.198"), "fees": D("0.002")}
        audited(engine.app)


async def test_an_evaluator_that_gives_no_score_is_refunded_and_so_is_the_job() -> None:
    gate = checks.evaluated_by("eval-broken", "0.20", "0.85")
    async with gated_engine() as engine:
        result = await engine.run_paid_job("train", {"accuracy": 0.99}, "1.00", acceptance=gate, job_key="l3")
        assert result.status == "refunded" and result.evaluation is not None
        assert result.evaluation.score is None and not result.evaluation.passed
        assert result.reason is not None and "gave no score" in result.reason
        evaluator = await engine.job(result.evaluation.evaluator_job_id)
        assert evaluator.status == "refunded" and evaluator.reason is not None
        assert "acceptance check failed" in evaluator.reason
        assert balances(engine) == {PAYER: D("1000000"), PAYEE: D(0), "fees": D(0)}  # both refunded
        audited(engine.app)


async def test_a_restart_mid_evaluation_waits_on_the_same_evaluator_job(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow_eval(job: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return score_by_accuracy(job)

    ledger = Ledger(None)
    with ledger.transaction() as tx:
        tx.open_account(PAYER)
        tx.open_account(PAYEE)
    ledger.mint(PAYER, "100", key="mint")
    escrow = LedgerEscrow(ledger, payer=PAYER)
    compute = InProcessCompute({"train": train, "eval": slow_eval})
    store = f"sqlite:///{tmp_path / 'store.db'}"
    settings = Settings(store=store, payer=PAYER, payee=PAYEE)

    def engine(name: str) -> Engine:
        config = ProcessorConfig(processor_id=name, claim_lease_s=0.0, retry_cap_s=0.05)
        return Engine.in_process(
            store, escrow=escrow, compute=compute, settings=settings, payer=PAYER, processor=config
        )

    first = engine("first")
    await first.start()
    job_id = await first.submit("train", {"accuracy": 0.9}, "1.00", acceptance=GATE, job_key="lora-4")
    for _ in range(500):
        view = await first.job(job_id)
        if view.view.intent is not None and view.view.intent.step == Step.EVALUATE:
            break
        await asyncio.sleep(0.01)
    evaluator_id = EscrowJob.create_id(checks.evaluator_key("lora-4"))
    for _ in range(500):
        try:
            if (await first.job(evaluator_id)).state == "RUNNING":
                break
        except JobNotFound:
            pass  # the evaluator is not opened yet
        await asyncio.sleep(0.01)
    assert (await first.job(evaluator_id)).state == "RUNNING"
    first.abandon()  # dies while the evaluator runs: the gate's intent and the evaluator are in the log

    release.set()
    async with engine("second") as second:
        result = await second.wait(job_id)
        assert result.paid and result.evaluation is not None
        assert result.evaluation.evaluator_job_id == str(evaluator_id)
        assert (result.evaluation.score, result.evaluation.passed) == ("0.9", True)
        jobs = second.app.list_jobs()
        assert sorted(j.job_key for j in jobs) == ["lora-4", "lora-4:eval"]  # one evaluator, not two
        assert [j.counts.get("Evaluated", 0) for j in jobs if j.job_key == "lora-4"] == [1]
        assert ledger.balance(PAYER) == D("100") - D("1.20")
        assert ledger.balance(PAYEE) == D("0.99") + D("0.198")
        audited(second.app)
    await escrow.aclose()
    await compute.aclose()


def test_the_gate_is_data_the_job_records_and_refuses_nonsense() -> None:
    assert GATE == {
        "kind": "evaluated",
        "endpoint": "eval",
        "budget": "0.200000",
        "threshold": "0.85",
        "metric": "score",
    }
    assert checks.validate(GATE) == GATE
    with pytest.raises(InvalidInput):
        checks.evaluated_by("", "0.20", "0.85")
    with pytest.raises(InvalidInput):
        checks.evaluated_by("eval", "0", "0.85")
    with pytest.raises(InvalidInput):
        checks.evaluated_by("eval", "0.20", "high")


def gated_job(key: str = "lora-x") -> EscrowJob:
    job = EscrowJob.open(
        job_key=key,
        endpoint_id="train",
        input_digest="d" * 64,
        payer=PAYER,
        payee=PAYEE,
        budget=Money(D("1.000000")),
        deadline=DEADLINE,
        acceptance=dict(GATE),
        dialect="v1",
    )
    job.record_attempt(Step.FUND, "p")
    job.record_funded("esc_1", "1.00", "0.01", "0.99")
    job.record_attempt(Step.START, "p")
    job.record_started("rp_1")
    job.record_completed("o" * 64, metrics={"accuracy": "0.9"})
    return job


def test_a_completed_gated_job_waits_for_its_evaluation_and_records_the_verdict_once() -> None:
    job = gated_job()
    assert job.intent is not None and job.intent.step == Step.EVALUATE and job.state == "COMPLETED"
    job.record_attempt(Step.EVALUATE, "p")
    job.record_evaluated("ev-1", "0.91")
    assert job.intent is not None and job.intent.step == Step.RELEASE
    job.record_evaluated("ev-1", "0.91")  # the same verdict again: nothing new
    assert job.counts["Evaluated"] == 1
    with pytest.raises(ConflictingOutcome):
        job.record_evaluated("ev-1", "0.10")
    assert job.violations() == []


def test_the_audit_finds_a_verdict_that_contradicts_its_score() -> None:
    job = gated_job()
    job.record_attempt(Step.EVALUATE, "p")
    job.trigger_event(
        EscrowJob.Evaluated,
        evaluator_job_id="ev-1",
        score="0.10",
        threshold="0.85",
        passed=True,
        reason="forged",
    )
    assert "evaluation of score 0.10 against 0.85 recorded as passed" in job.violations()


async def test_an_evaluator_waiting_for_an_operator_parks_the_job_in_attention() -> None:
    stuck = gated_job("someone-elses-evaluator")
    stuck.raise_attention(Step.EVALUATE, "stuck for the test", {})

    async def evaluator_in_attention(view: Any) -> Any:
        return stuck.view()

    async with gated_engine() as engine:
        engine.processor.evaluator = evaluator_in_attention
        result = await engine.run_paid_job("train", {"accuracy": 0.9}, "1.00", acceptance=GATE, job_key="l5")
        assert result.status == "attention" and result.attention is not None
        assert result.attention["step"] == "evaluate" and result.evaluation is None
        assert result.attention["evaluator_job_id"] == str(stuck.id)
        assert result.money.still_held == D("1.00")  # nothing released or refunded: an operator decides

        # Once the evaluator is settled, the operator's retry has the job read its verdict.
        engine.processor.evaluator = engine._run_evaluator
        await engine.writer.execute(
            result.job_id, lambda job: job.resolve("evaluator settled", "ops", retry=True)
        )
        after = await engine.wait(result.job_id)
        assert after.paid and after.evaluation is not None and after.evaluation.score == "0.9"
        audited(engine.app)
