"""Every legal transition of the EscrowJob lifecycle, and a representative illegal one per state."""

from __future__ import annotations

from decimal import Decimal

import pytest

from podsettle.domain import ConflictingOutcome, EscrowJob, IllegalTransition, InvalidInput, State, Step
from podsettle.domain.digests import digest
from tests.jobs import (
    SPLIT,
    event_names,
    funded,
    opened,
    refunded,
    refunding,
    released,
    releasing,
    running,
)

OUTPUT = digest({"ok": True})


def test_open_records_opened_and_the_funding_intent() -> None:
    job = opened()
    assert job.state == State.FUNDING
    assert job.intent is not None and job.intent.step == Step.FUND and job.intent.attempts == 0
    assert job.intent.key == f"{job.job_key}:fund"
    assert event_names(job) == ["Opened", "FundingRequested"]
    assert job.budget == Decimal("0.500000")


def test_the_same_key_always_gives_the_same_job_id() -> None:
    assert opened(key="k-1").id == opened(key="k-1").id
    assert opened(key="k-1").id != opened(key="k-2").id


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("budget", {"budget": "-1"}),
        ("budget", {"budget": "0"}),
        ("budget", {"budget": 0.5}),
        ("bonus_pool", {"bonus_pool": "1.0000001"}),
        ("job_key", {"key": "has space"}),
    ],
)
def test_open_rejects_bad_input_naming_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput) as caught:
        opened(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_happy_path_funding_start_completion_release() -> None:
    job = opened()
    assert job.record_attempt(Step.FUND, "p1") == 1
    assert job.awaiting_outcome
    job.record_funded("esc_1", "0.50", SPLIT.fee, SPLIT.net)
    assert job.state == State.FUNDED
    assert job.intent is not None and job.intent.step == Step.START
    job.record_attempt(Step.START, "p1")
    job.record_started("rp-1")
    assert job.state == State.RUNNING and job.intent is None
    job.record_completed(OUTPUT, 1500, 40, "w-1", {"accuracy": "0.9"})
    assert job.state == State.RELEASING
    assert job.intent is not None and job.intent.step == Step.RELEASE
    job.record_attempt(Step.RELEASE, "p1")
    job.record_released(SPLIT.net, SPLIT.fee, SPLIT.referral_fee)
    assert job.state == State.RELEASED and job.is_terminal
    assert event_names(job) == [
        "Opened",
        "FundingRequested",
        "Attempted",
        "Funded",
        "StartRequested",
        "Attempted",
        "Started",
        "Completed",
        "ReleaseRequested",
        "Attempted",
        "Released",
    ]
    assert job.violations(quiescent=True) == []


def test_failure_path_refunds() -> None:
    job = running()
    job.record_failed("run", "FAILED", "CUDA out of memory")
    assert job.state == State.REFUNDING
    assert job.intent is not None and job.intent.step == Step.REFUND
    job.record_attempt(Step.REFUND, "p1")
    job.record_refunded("0.495", "0.005")
    assert job.state == State.REFUNDED and job.is_terminal
    assert job.violations(quiescent=True) == []


def test_start_failure_refunds_without_a_runpod_job() -> None:
    job = funded()
    job.record_attempt(Step.START, "p1")
    job.record_failed("start", None, "endpoint rejected the input")
    assert job.state == State.REFUNDING


def test_rejected_funding_is_terminal_and_moves_nothing() -> None:
    job = opened()
    job.record_attempt(Step.FUND, "p1")
    job.record_funding_rejected("insufficient_balance", 402)
    assert job.state == State.REJECTED and job.is_terminal
    assert job.escrow_id is None
    assert job.violations(quiescent=True) == []


def test_an_attempt_that_did_nothing_opens_the_intent_again_for_a_new_attempt() -> None:
    job = opened()
    job.record_attempt(Step.FUND, "p1")
    assert job.awaiting_outcome
    job.record_nothing_done(Step.FUND, 1, "RateLimited: slow down")
    assert job.intent is not None and job.intent.answered and not job.awaiting_outcome
    assert job.state == State.FUNDING
    job.record_nothing_done(Step.FUND, 1, "again")  # said once: a repeat records nothing
    assert [type(e).__name__ for e in job.collect_events()].count("NothingDone") == 1
    assert job.record_attempt(Step.FUND, "p2", after=1) == 2
    assert job.awaiting_outcome and not job.intent.answered
    job.record_nothing_done(Step.FUND, 1, "late answer of the first attempt")  # moot: ignored
    assert job.awaiting_outcome
    job.record_funded("esc_1", "0.50", "0.005", "0.495")
    assert job.state == State.FUNDED
    assert job.violations() == []


def test_cancel_of_a_running_job_asks_runpod_then_refunds() -> None:
    job = running()
    job.request_cancel("user asked")
    assert job.intent is not None and job.intent.step == Step.CANCEL
    job.request_cancel("user asked")  # repeated: no-op
    job.record_attempt(Step.CANCEL, "p1")
    job.record_failed("cancel", "CANCELLED", "user asked")
    assert job.state == State.REFUNDING


def test_cancel_before_funding_rejects_the_job_with_nothing_funded() -> None:
    job = opened()
    job.request_cancel("user asked")
    assert job.state == State.REJECTED and job.rests
    assert job.rejection == "cancelled before funding: user asked"
    assert job.escrow_id is None and job.money.funded == 0
    assert job.violations(quiescent=True) == []


def test_a_job_whose_escrow_is_being_created_cannot_be_cancelled_until_it_is_funded() -> None:
    job = opened()
    job.record_attempt(Step.FUND, "p1")
    with pytest.raises(ConflictingOutcome, match="being created"):
        job.request_cancel("user asked")
    assert job.state == State.FUNDING
    job.record_funded("esc_1", "0.50", "0.005", "0.495")
    job.request_cancel("user asked")  # funded, not submitted: fails at once, then refunds
    assert job.state == State.REFUNDING


def test_a_job_whose_create_certainly_did_nothing_can_be_cancelled_before_funding() -> None:
    job = opened()
    job.record_attempt(Step.FUND, "p1")
    job.record_nothing_done(Step.FUND, 1, "RateLimited: 429")
    job.request_cancel("user asked")
    assert job.state == State.REJECTED and job.cancelled and job.escrow_id is None


def test_cancel_before_submission_fails_at_once() -> None:
    job = funded()
    job.request_cancel("user asked")
    assert job.state == State.REFUNDING


def test_a_bonus_outcome_waits_for_the_operator_once_the_bonus_is_in_attention() -> None:
    """Found by the lifecycle state machine: a bonus award recorded while its release was in
    ATTENTION left the job in ATTENTION with no intent, which no operator could resolve."""
    job = released(bonus_pool="5")
    job.request_bonus(Decimal("0.80"), Decimal("0.92"), "5", Decimal("1.10"))
    job.record_attempt(Step.BONUS_FUND, "p1")
    job.raise_attention(Step.BONUS_FUND, "bonus create timed out")
    with pytest.raises(IllegalTransition):
        job.record_bonus_funded("esc_b1", "0.75", "0.0075", "0.7425")
    job.resolve("esc_b1 found in the dashboard", "op")
    job.record_bonus_funded("esc_b1", "0.75", "0.0075", "0.7425")
    job.record_attempt(Step.BONUS_RELEASE, "p1")
    job.raise_attention(Step.BONUS_RELEASE, "bonus release answered 500")
    with pytest.raises(IllegalTransition):
        job.record_bonus_awarded("0.7425", "0.0075", "0.001125")
    assert job.resolve("released, says the service", "op") == Step.BONUS_RELEASE
    job.record_bonus_awarded("0.7425", "0.0075", "0.001125")
    assert job.is_terminal and job.violations(quiescent=True) == []


def test_bonus_on_a_released_job_is_funded_then_released_once() -> None:
    job = released(bonus_pool="5")
    decision = job.request_bonus(Decimal("0.80"), Decimal("0.92"), "5", Decimal("1.10"))
    assert decision.amount == Decimal("0.75")
    assert job.intent is not None and job.intent.step == Step.BONUS_FUND
    assert not job.is_terminal
    job.record_attempt(Step.BONUS_FUND, "p1")
    job.record_bonus_funded("esc_b1", "0.75", "0.0075", "0.7425")
    assert job.intent is not None and job.intent.step == Step.BONUS_RELEASE
    job.record_attempt(Step.BONUS_RELEASE, "p1")
    job.record_bonus_awarded("0.7425", "0.0075", "0.001125")
    assert job.is_terminal and job.bonus_awarded is not None
    # The same award again answers the same decision and records nothing.
    again = job.request_bonus(Decimal("0.80"), Decimal("0.92"), "5", Decimal("1.10"))
    assert again.amount == decision.amount
    before = len(job.collect_events())
    assert before > 0 and job.collect_events() == []
    with pytest.raises(ConflictingOutcome, match="already granted"):
        job.request_bonus(Decimal("0.80"), Decimal("0.99"), "5", Decimal("1.10"))
    assert job.violations(quiescent=True) == []


def test_bonus_below_threshold_records_nothing() -> None:
    job = released()
    job.collect_events()
    decision = job.request_bonus(Decimal("0.80"), Decimal("0.85"), "5", Decimal("1.10"))
    assert not decision.granted and job.collect_events() == []


def test_bonus_pool_above_the_jobs_terms_is_refused() -> None:
    job = released(bonus_pool="1")
    with pytest.raises(ConflictingOutcome, match="exceeds the job's bonus terms"):
        job.request_bonus(Decimal("0.80"), Decimal("0.92"), "5", Decimal("1.10"))


def test_escrow_refunded_by_the_service_before_release() -> None:
    job = releasing()
    job.record_attempt(Step.RELEASE, "p1")
    job.record_refunded_by_service("0.495", "0.005", "escrow refunded by timeout before release")
    assert job.state == State.REFUNDED
    assert job.failure is not None and job.failure.stage == "release"
    assert job.violations(quiescent=True) == []


def test_attention_parks_the_job_until_an_operator_resolves_it() -> None:
    job = opened()
    job.record_attempt(Step.FUND, "p1")
    job.raise_attention(Step.FUND, "create timed out; v1 has no lookup", {"attempt": "1"})
    assert job.state == State.ATTENTION
    assert job.attention is not None and job.attention["step"] == "fund"
    with pytest.raises(IllegalTransition, match="waits for an operator"):
        job.record_attempt(Step.FUND, "p2")
    with pytest.raises(IllegalTransition, match="cannot record funded in state ATTENTION"):
        job.record_funded("esc_1", "0.50", SPLIT.fee, SPLIT.net)
    job.resolve("found esc_1 funded in the dashboard", "operator-ann")
    job.record_funded("esc_1", "0.50", SPLIT.fee, SPLIT.net)
    assert job.state == State.FUNDED
    assert job.intent is not None and job.intent.step == Step.START
    assert job.violations() == []


def test_attention_resolved_with_retry_reopens_the_intent() -> None:
    job = releasing()
    job.record_attempt(Step.RELEASE, "p1")
    job.raise_attention(Step.RELEASE, "release answered 500")
    job.resolve("escrow still funded on the service", "operator-ann", retry=True)
    assert job.state == State.RELEASING
    assert job.intent is not None and job.intent.attempts == 0


def test_attention_resolved_as_not_funded_rejects() -> None:
    job = opened()
    job.record_attempt(Step.FUND, "p1")
    job.raise_attention(Step.FUND, "lost response")
    job.resolve("no escrow was created", "operator-ann")
    job.record_funding_rejected("operator: no escrow was created")
    assert job.state == State.REJECTED


# ----------------------------------------------------------------- repeated and conflicting outcomes


def test_repeated_outcomes_are_no_ops() -> None:
    job = released()
    job.collect_events()
    job.record_funded("esc_0001", "0.50", SPLIT.fee, SPLIT.net)
    job.record_started("rp-1")
    job.record_completed(OUTPUT)
    job.record_released(SPLIT.net, SPLIT.fee, SPLIT.referral_fee)
    assert job.collect_events() == []
    failed = refunded()
    failed.collect_events()
    failed.record_failed("run", "FAILED", "CUDA out of memory")
    failed.record_refunded("0.50", "0")
    assert failed.collect_events() == []


@pytest.mark.parametrize(
    ("build", "command", "state", "words"),
    [
        (
            funded,
            lambda j: j.record_funded("esc_other", "0.50", SPLIT.fee, SPLIT.net),
            "FUNDED",
            "record funded",
        ),
        (running, lambda j: j.record_started("rp-2"), "RUNNING", "record started"),
        (releasing, lambda j: j.record_failed("run", "FAILED", "x"), "RELEASING", "record failed"),
        (refunding, lambda j: j.record_completed(OUTPUT), "REFUNDING", "record completed"),
        (released, lambda j: j.record_refunded("0.50", "0"), "RELEASED", "record refunded"),
        (refunded, lambda j: j.record_released(SPLIT.net, SPLIT.fee, "0"), "REFUNDED", "record released"),
    ],
)
def test_conflicting_outcomes_name_the_job_state_and_command(build, command, state, words) -> None:  # type: ignore[no-untyped-def]
    job = build()
    with pytest.raises(ConflictingOutcome) as caught:
        command(job)
    message = str(caught.value)
    assert str(job.id) in message and state in message and words in message


# ----------------------------------------------------------------- one illegal command per state


def _funding_job() -> EscrowJob:
    return opened()


def _attention_job() -> EscrowJob:
    job = opened()
    job.record_attempt(Step.FUND, "p")
    job.raise_attention(Step.FUND, "lost")
    return job


def _rejected_job() -> EscrowJob:
    job = opened()
    job.record_funding_rejected("insufficient_balance", 402)
    return job


@pytest.mark.parametrize(
    ("build", "command", "state"),
    [
        (_funding_job, lambda j: j.record_started("rp-1"), "FUNDING"),
        (funded, lambda j: j.record_completed(OUTPUT), "FUNDED"),
        (running, lambda j: j.record_released(SPLIT.net, SPLIT.fee, "0"), "RUNNING"),
        (releasing, lambda j: j.request_bonus(Decimal(1), Decimal(2), "1", Decimal("1.1")), "RELEASING"),
        (released, lambda j: j.request_cancel("late"), "RELEASED"),
        (refunding, lambda j: j.record_attempt(Step.RELEASE, "p"), "REFUNDING"),
        (refunded, lambda j: j.record_funding_rejected("late"), "REFUNDED"),
        (_rejected_job, lambda j: j.record_funded("esc_1", "0.50", SPLIT.fee, SPLIT.net), "REJECTED"),
        (_attention_job, lambda j: j.record_attempt(Step.FUND, "p"), "ATTENTION"),
    ],
)
def test_illegal_command_in_each_state(build, command, state) -> None:  # type: ignore[no-untyped-def]
    job = build()
    assert job.state == state
    before = job.version
    with pytest.raises(IllegalTransition) as caught:
        command(job)
    assert str(job.id) in str(caught.value) and state in str(caught.value)
    assert job.version == before  # nothing recorded


@pytest.mark.parametrize(
    ("amount", "fee", "net", "words"),
    [
        ("0.40", "0.004", "0.396", "budget is 0.500000"),
        ("0.50", "0.004", "0.496", "differ from the expected"),
        ("0.50", "0.005", "0.490", "differ from the expected"),
    ],
)
def test_funding_that_differs_from_the_terms_is_refused(amount: str, fee: str, net: str, words: str) -> None:
    job = opened()
    with pytest.raises(ConflictingOutcome, match=words):
        job.record_funded("esc_1", amount, fee, net)
    assert job.state == State.FUNDING


def test_release_must_account_for_the_whole_escrow() -> None:
    job = releasing()
    with pytest.raises(ConflictingOutcome, match="is not the funded"):
        job.record_released("0.49", "0.005", "0")
    job.record_released("0.40", "0.004", "0.0006", returned="0.096")  # a partial release
    assert job.state == State.RELEASED


def test_violations_find_a_broken_history() -> None:
    """The audit replays logs that did not come through the guards; violations() must see breakage."""
    job = releasing()
    job._released(
        to_payee=Decimal("0.495"), fee=Decimal("0.005"), referral_fee=Decimal(0), returned=Decimal(0)
    )
    job._released(
        to_payee=Decimal("0.495"), fee=Decimal("0.005"), referral_fee=Decimal(0), returned=Decimal(0)
    )
    assert "Released recorded 2 times" in job.violations()
    job2 = running()
    job2._released(
        to_payee=Decimal("0.495"), fee=Decimal("0.005"), referral_fee=Decimal(0), returned=Decimal(0)
    )
    assert "Released without Completed" in job2.violations()
    job3 = funded()
    assert job3.violations() == []
    assert "funded job left in FUNDED" in job3.violations(quiescent=True)


@pytest.mark.parametrize("build", [opened, funded, running, releasing, released, refunding, refunded])
def test_a_view_shows_the_job_as_it_is_and_does_not_follow_it(build) -> None:  # type: ignore[no-untyped-def]
    job = build()
    view = job.view()
    assert view.job_id == job.id
    for name in type(view)._fields[1:]:
        assert getattr(view, name) == getattr(job, name), name
    assert view.rests == (job.state in (State.RELEASED, State.REFUNDED) and job.intent is None)
    with pytest.raises(AttributeError):
        view.state = State.ATTENTION  # type: ignore[misc]
    if job.intent is not None:
        version = job.version
        job.record_attempt(job.intent.step, "p-view")
        assert job.version == version + 1
        assert view.version == version and view.intent is not None and view.intent.attempts == 0
