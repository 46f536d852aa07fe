"""One totals type: for random histories, cut off at random points so that jobs are left in every
state, the money adds up (funded = to_workers + fees + returned + still_held), each amount is the sum
over the jobs, and the engine's batch totals and the read model's totals are equal."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podsettle import Settlements
from podsettle.domain import ZERO, EscrowJob, JobMoney, State, Status, status_of
from podsettle.engine import JobResult, batch_totals
from podsettle.projections import ReadModel, Totals
from tests.histories import OUTCOMES, Plan, open_job, steps

# A job and how many of its saves happen (a slice end: None for all of them).
jobs = st.lists(
    st.tuples(
        st.sampled_from(OUTCOMES),
        st.sampled_from(["0.10", "0.50", "2.345678", "999.999999"]),
        st.sampled_from(["b1", "b2", None]),
        # None: every save; a few saves short of the end leaves escrows held (the job's or the bonus').
        st.none() | st.integers(0, 12) | st.integers(-3, -1),
    ),
    min_size=1,
    max_size=10,
)


def settle(
    app: Settlements, drawn: list[tuple[str, str, str | None, int | None]], tag: str
) -> list[EscrowJob]:
    opened = []
    for index, (outcome, budget, batch, cut) in enumerate(drawn):
        plan = Plan(f"{tag}-{index}", outcome, budget, batch)
        job = open_job(plan)
        app.save(job)
        for save in steps(plan)[:cut]:
            for command in save:
                command(job)
            app.save(job)
        opened.append(app.get_job(job.id))
    return opened


def held_by_escrows(job: EscrowJob) -> Decimal:
    """What the job's escrows hold, read off its facts as an escrow service's ledger would have it."""
    held = ZERO
    if job.escrow_id is not None and job.released is None and job.refunded is None:
        held += job.funded_amount or ZERO
    if job.bonus_funded is not None and job.bonus_awarded is None:
        held += job.bonus_funded.amount
    return held


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=jobs, tag=st.integers(0, 2**32))
def test_totals_add_up_and_the_engine_and_the_read_model_agree(
    drawn: list[tuple[str, str, str | None, int | None]], tag: int
) -> None:
    app = Settlements("memory")
    settled = settle(app, drawn, f"t{tag}")
    model = ReadModel(app)
    model.catch_up()
    from_rows = model.batch_totals()
    from_results = batch_totals(JobResult.of(job.view()) for job in settled)
    assert from_results == from_rows  # one type, the same sums
    for totals in (from_rows, from_results):
        assert totals.funded == totals.to_workers + totals.fees + totals.returned + totals.still_held
        assert totals.balanced
        for name in JobMoney._fields:
            assert getattr(totals, name) == sum((getattr(job.money, name) for job in settled), ZERO), name
        assert totals.still_held == sum((held_by_escrows(job) for job in settled), ZERO)
        assert totals.funded == sum(
            ((job.funded_amount or ZERO) + (job.bonus_funded.amount if job.bonus_funded else ZERO))
            for job in settled
        )
        assert totals.bonus_gross == totals.bonus_net + totals.bonus_fees
        assert totals.spent == totals.to_workers + totals.fees
        assert (
            totals.jobs
            == len(settled)
            == (
                totals.paid_jobs
                + totals.refunded_jobs
                + totals.rejected_jobs
                + totals.attention_jobs
                + totals.in_flight_jobs
            )
        )
        assert totals.paid_jobs == sum(1 for job in settled if job.state == State.RELEASED)
        assert totals.attention_jobs == sum(1 for job in settled if job.state == State.ATTENTION)
        data = totals.to_json()
        for name in (*JobMoney._fields, "spent"):
            assert isinstance(data[name], str) and len(data[name].split(".")[1]) == 6, name
    # Per batch too: the batches' totals add up to the whole.
    per_batch = model.batches()
    assert sum((t.funded for t in per_batch.values()), ZERO) == from_rows.funded
    assert sum((t.still_held for t in per_batch.values()), ZERO) == from_rows.still_held


def test_money_locked_in_an_attention_job_is_still_held() -> None:
    app = Settlements("memory")
    [job] = settle(app, [("attention_left", "0.50", "b1", None)], "parked")
    assert job.state == State.ATTENTION and job.escrow_id is not None
    totals = batch_totals([JobResult.of(job.view())])
    assert (totals.attention_jobs, totals.funded, totals.still_held) == (1, Decimal("0.5"), Decimal("0.5"))
    assert totals.to_workers == totals.fees == totals.returned == 0


def test_a_bonus_escrow_funded_but_not_released_is_held_and_its_award_is_named() -> None:
    app = Settlements("memory")
    plan = Plan("bonus-held", "bonus", "1", "b1")
    saves = steps(plan)  # the last two: attempt the bonus release, record it
    [held] = settle(app, [("bonus", "1", "b1", len(saves) - 2)], "bh")
    assert held.bonus_funded is not None and held.bonus_awarded is None
    money = held.money
    assert money.still_held == held.bonus_funded.amount
    assert money.funded == Decimal("1") + held.bonus_funded.amount
    [paid] = settle(app, [("bonus", "1", "b1", None)], "bp")
    assert paid.bonus_awarded is not None
    money = paid.money
    award = paid.bonus_awarded
    assert (money.bonus_gross, money.bonus_net, money.bonus_fees) == (award.amount, award.to_payee, award.fee)
    assert money.to_workers == paid.released.to_payee + award.to_payee  # type: ignore[union-attr]
    assert money.still_held == 0


def test_the_status_of_every_state_is_one_of_the_callers_words() -> None:
    assert {status_of(state) for state in State} == set(Status)
    assert status_of(State.REFUNDING) == Status.REFUNDING
    totals = Totals()
    for status in Status:
        totals.add_job(status, JobMoney(*[ZERO] * len(JobMoney._fields)), None)
    # A job the escrow service refunds on its own schedule is still on its way.
    assert (totals.jobs, totals.in_flight_jobs) == (len(Status), 2)
