"""The job's dialect decides which figures it accepts, and the audit rechecks them by the same rule."""

from __future__ import annotations

from decimal import Decimal

import pytest

from podsettle.domain import ConflictingOutcome, EscrowJob, InvalidInput, Step
from podsettle.domain.digests import digest
from tests.jobs import DEADLINE

D = Decimal


def _opened(dialect: str | None, **kwargs: object) -> EscrowJob:
    job = EscrowJob.open(
        job_key=f"job-{dialect}-{len(kwargs)}",
        endpoint_id="echo",
        input_digest=digest({"p": 1}),
        payer="ag_payer",
        payee="ag_worker",
        budget=D("0.100450"),
        deadline=DEADLINE,
        dialect=dialect,
        **kwargs,  # type: ignore[arg-type]
    )
    job.record_attempt(Step.FUND, "test")
    return job


def test_a_v1_job_records_the_services_figures_and_refuses_half_up_ones() -> None:
    job = _opened("v1")
    with pytest.raises(ConflictingOutcome, match=r"0\.001004 / 0\.099446"):
        job.record_funded("esc_1", D("0.100450"), D("0.001005"), D("0.099445"))
    job.record_funded("esc_1", D("0.100450"), D("0.001004"), D("0.099446"))
    assert job.violations() == []


def test_the_audit_rechecks_the_funded_figures_by_the_jobs_rule() -> None:
    job = _opened("v1")
    job._funded("esc_1", D("0.100450"), D("0.001005"), D("0.099445"))  # as a tampered log would say
    assert any("v1 rule's 0.001004 / 0.099446" in found for found in job.violations())
    seed = _opened("seed")
    seed._funded("esc_2", D("0.100450"), D("0.001005"), D("0.099445"))
    assert seed.violations() == []


def test_the_refund_path_is_recorded_and_named_in_the_refund_request() -> None:
    job = _opened("v1", refund_method="dispute")
    job.record_funded("esc_1", D("0.100450"), D("0.001004"), D("0.099446"))
    job.record_failed("start", None, "no start")
    assert job.refund_method == "dispute"
    assert job.collect_events()[-1].method == "dispute"  # type: ignore[attr-defined]
    with pytest.raises(InvalidInput, match="refund_method"):
        _opened("v1", refund_method="wire")
    with pytest.raises(InvalidInput, match="dialect"):
        _opened("v2")
