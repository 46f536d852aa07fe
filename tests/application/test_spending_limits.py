"""Spending limits (podsettle/limits.py): each limit refuses, naming its setting, before anything
is opened or funded; the day's total is counted from the event log, so a second engine on the same
store counts the first one's jobs; a repeated job is not new spending."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from podsettle.bootstrap import Engine
from podsettle.domain.escrow_job import job_id_for
from podsettle.domain.money import Money, to_money
from podsettle.limits import LimitRefused, Spend, SpendingGuard, SpendingLimits
from podsettle.settings import ConfigError, Settings

D = Decimal


def spend(amount: str = "0.50", *, endpoint: str = "echo", payee: str = "ag_worker", key: str = "") -> Spend:
    return Spend(
        job_id=job_id_for(key or f"job-{uuid.uuid4().hex}"),
        kind="job",
        payer="ag_payer",
        payee=payee,
        amount=to_money(amount),
        endpoint_id=endpoint,
    )


# ---------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("limits", "spends", "spent", "variable"),
    [
        (SpendingLimits(max_budget=D("1")), [spend("1.000001")], "0", "PODSETTLE_LIMIT_MAX_BUDGET"),
        (SpendingLimits(daily_total=D("2")), [spend("1.5")], "0.500001", "PODSETTLE_LIMIT_DAILY_TOTAL"),
        (SpendingLimits(daily_total=D("2")), [spend("1"), spend("1.01")], "0", "PODSETTLE_LIMIT_DAILY_TOTAL"),
        (SpendingLimits(endpoints=frozenset({"train"})), [spend()], "0", "PODSETTLE_LIMIT_ENDPOINTS"),
        (SpendingLimits(payees=frozenset({"ag_other"})), [spend()], "0", "PODSETTLE_LIMIT_PAYEES"),
    ],
)
def test_each_limit_refuses_naming_its_setting(
    limits: SpendingLimits, spends: list[Spend], spent: str, variable: str
) -> None:
    with pytest.raises(LimitRefused) as refused:
        limits.check(spends, D(spent))
    assert refused.value.limit == variable
    assert str(refused.value).startswith(f"refused by the spending limit {variable}: ")


def test_spends_within_every_limit_pass() -> None:
    limits = SpendingLimits(
        max_budget=D("1"), daily_total=D("2"), endpoints=frozenset({"echo"}), payees=frozenset({"ag_worker"})
    )
    limits.check([spend("1"), spend("0.5")], D("0.5"))  # exactly at both limits


def test_the_limits_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "PODSETTLE_LIMIT_MAX_BUDGET": "0.75",
            "PODSETTLE_LIMIT_DAILY_TOTAL": "10",
            "PODSETTLE_LIMIT_ENDPOINTS": "echo, train",
            "PODSETTLE_LIMIT_PAYEES": "ag_worker",
        }
    )
    limits = SpendingLimits.from_settings(settings)
    assert limits.to_json() == {
        "max_budget": "0.750000",
        "daily_total": "10.000000",
        "endpoints": ["echo", "train"],
        "payees": ["ag_worker"],
    }
    assert not SpendingLimits.from_settings(Settings()).active


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PODSETTLE_LIMIT_MAX_BUDGET", "-1"),
        ("PODSETTLE_LIMIT_DAILY_TOTAL", "1.0000001"),
        ("PODSETTLE_LIMIT_DAILY_TOTAL", "0"),
        ("PODSETTLE_LIMIT_ENDPOINTS", "echo,,train"),
    ],
)
def test_a_bad_limit_is_a_configuration_error_naming_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


# ---------------------------------------------------------------------------- on an engine


def payer_balance(engine: Engine) -> Decimal:
    ledger = engine.escrow.ledger  # type: ignore[attr-defined]
    balance: Decimal = ledger.balance(engine.payer)
    return balance


def log_length(engine: Engine) -> int:
    return engine.app.recorder.max_notification_id() or 0


async def guarded_job(
    engine: Engine, guard: SpendingGuard, budget: str, *, key: str, endpoint: str = "echo"
) -> object:
    """What a front end does: the job's spend admitted first, then the job run."""
    payee = engine.settings.payee_for(endpoint)
    item = Spend(job_id_for(key), "job", engine.payer, payee, Money(D(budget)), endpoint)
    with guard.admit([item]):
        return await engine.run_paid_job(endpoint, {"n": key}, budget, job_key=key)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine.in_process(f"sqlite:///{tmp_path / 'store.db'}", balance="100") as made:
        yield made


@pytest.mark.parametrize(
    ("limits", "budget", "endpoint", "variable"),
    [
        (SpendingLimits(max_budget=D("0.50")), "0.60", "echo", "PODSETTLE_LIMIT_MAX_BUDGET"),
        (SpendingLimits(daily_total=D("0.50")), "0.60", "echo", "PODSETTLE_LIMIT_DAILY_TOTAL"),
        (SpendingLimits(endpoints=frozenset({"train"})), "0.50", "echo", "PODSETTLE_LIMIT_ENDPOINTS"),
        (SpendingLimits(payees=frozenset({"ag_someone"})), "0.50", "echo", "PODSETTLE_LIMIT_PAYEES"),
    ],
)
async def test_a_refused_job_leaves_the_ledger_and_the_log_unchanged(
    engine: Engine, limits: SpendingLimits, budget: str, endpoint: str, variable: str
) -> None:
    await engine.start()
    guard = SpendingGuard(limits, engine.app)
    before = (payer_balance(engine), log_length(engine))
    with pytest.raises(LimitRefused) as refused:
        await guarded_job(engine, guard, budget, key="refused-1", endpoint=endpoint)
    assert refused.value.limit == variable
    assert (payer_balance(engine), log_length(engine)) == before


async def test_the_daily_total_counts_todays_jobs_from_the_log_and_a_repeat_is_not_new(
    engine: Engine,
) -> None:
    guard = SpendingGuard(SpendingLimits(daily_total=D("1.00")), engine.app)
    first = await guarded_job(engine, guard, "0.60", key="day-1")
    assert guard.spent_today(engine.payer) == D("0.60")
    # The same job again (a client that timed out): not new, so not refused, and not paid twice.
    again = await guarded_job(engine, guard, "0.60", key="day-1")
    assert again.job_id == first.job_id and again.paid  # type: ignore[attr-defined]
    before = payer_balance(engine)
    with pytest.raises(LimitRefused, match=r"0\.400000 left"):
        await guarded_job(engine, guard, "0.50", key="day-2")
    assert payer_balance(engine) == before
    await guarded_job(engine, guard, "0.40", key="day-3")  # exactly what is left
    assert guard.spent_today(engine.payer) == D("1.00")
    # Tomorrow (UTC) the allowance is whole again.
    tomorrow = SpendingGuard(guard.limits, engine.app, clock=lambda: datetime.now(UTC) + timedelta(days=1))
    assert tomorrow.spent_today(engine.payer) == D("0")


async def test_a_second_engine_on_the_same_store_counts_the_first_ones_jobs(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    limits = SpendingLimits(daily_total=D("1.00"))
    async with Engine.in_process(store, balance="100", ledger_path=str(tmp_path / "ledger.db")) as one:
        await guarded_job(one, SpendingGuard(limits, one.app), "0.70", key="shared-1")
    async with Engine.in_process(store, balance="100", ledger_path=str(tmp_path / "ledger.db")) as two:
        guard = SpendingGuard(limits, two.app)
        assert guard.spent_today(two.payer) == D("0.70")
        with pytest.raises(LimitRefused, match="PODSETTLE_LIMIT_DAILY_TOTAL"):
            await guarded_job(two, guard, "0.40", key="shared-2")


async def test_admitted_spends_are_reserved_until_they_are_logged(engine: Engine) -> None:
    await engine.start()
    guard = SpendingGuard(SpendingLimits(daily_total=D("1.00")), engine.app)
    first = [spend("0.60", payee=engine.settings.payee or "")]
    first = [Spend(s.job_id, s.kind, engine.payer, s.payee, s.amount, s.endpoint_id) for s in first]
    assert guard.reserve(first) == first
    second = Spend(job_id_for("other"), "job", engine.payer, "ag_worker", Money(D("0.50")), "echo")
    with pytest.raises(LimitRefused):  # the first is not in the log yet, but it is counted
        guard.reserve([second])
    guard.release(first)  # never opened
    assert guard.reserve([second]) == [second]


async def test_a_bonus_pool_counts_against_the_limits_once(engine: Engine) -> None:
    guard = SpendingGuard(SpendingLimits(max_budget=D("1"), daily_total=D("3")), engine.app)
    paid = await guarded_job(engine, guard, "0.50", key="bonus-1")
    job_id = paid.job_id  # type: ignore[attr-defined]
    payee = engine.settings.payee or ""
    too_big = Spend(job_id, "bonus", engine.payer, payee, Money(D("2")), None)
    with pytest.raises(LimitRefused, match=r"bonus pool of 2\.000000 USDC"):
        guard.reserve([too_big])
    pool = Spend(job_id, "bonus", engine.payer, payee, Money(D("1")), None)
    with guard.admit([pool]):
        bonus = await engine.award_bonus(job_id, "0.80", "0.96", "1")
    assert bonus.status == "awarded"
    assert guard.spent_today(engine.payer) == D("0.50") + bonus.bonus_gross
    assert guard.reserve([pool]) == []  # asked already: not new spending
