"""Spending limits for agents, set by the operator and enforced before anything is funded.

Four limits, each unset by default (Settings: `PODSETTLE_LIMIT_*`):

- `PODSETTLE_LIMIT_MAX_BUDGET`: the largest budget of one job (and the largest bonus pool);
- `PODSETTLE_LIMIT_DAILY_TOTAL`: what one payer may commit in a UTC day: the budgets of the jobs it
  opened that day (the escrow's commission is taken out of a budget, so it is counted with it) and
  the bonuses it asked for that day, whatever became of them (a refund returns the money, but the
  limit caps what an agent may put at risk per day);
- `PODSETTLE_LIMIT_ENDPOINTS`, `PODSETTLE_LIMIT_PAYEES`: the endpoints jobs may run on and the
  workers they may pay.

The rules (`SpendingLimits.check`) are pure. The day's total is counted from the event log
(`DailySpend`, which follows the log's Opened and BonusRequested events), so every process sharing
a store counts the same jobs. A job or bonus that is already in the log (a call repeated after a
client timeout) is not new spending and is never refused for the day's total it is part of.

`SpendingGuard.admit` checks a set of spends and reserves them until their events are in the log,
so that concurrent calls in one process cannot both pass on the same remaining allowance. Calls in
different processes are not serialised: together they may pass the daily total by what they open
at the same moment.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

from eventsourcing.utils import get_topic

from podsettle.application import Settlements
from podsettle.domain import EscrowJob
from podsettle.domain.errors import DomainError, JobNotFound
from podsettle.domain.money import ZERO, Money, fmt
from podsettle.projections.follower import LogFollower
from podsettle.settings import ENVIRONMENT, Settings

SpendKind = Literal["job", "bonus"]
_OPENED = get_topic(EscrowJob.Opened)
_BONUS = get_topic(EscrowJob.BonusRequested)


class LimitRefused(DomainError):
    """A spend the operator's limits do not allow; `limit` names the setting (its variable)."""

    def __init__(self, limit: str, reason: str) -> None:
        self.limit = limit
        self.reason = reason
        super().__init__(f"refused by the spending limit {limit}: {reason}; nothing was opened or funded")


@dataclass(frozen=True)
class Spend:
    """One job or bonus about to be funded: `job_id` is the job's (the same for its bonus)."""

    job_id: uuid.UUID
    kind: SpendKind
    payer: str
    payee: str
    amount: Money
    endpoint_id: str | None = None


@dataclass(frozen=True)
class SpendingLimits:
    """The operator's limits; None is no limit of that kind."""

    max_budget: Decimal | None = None
    daily_total: Decimal | None = None
    endpoints: frozenset[str] | None = None
    payees: frozenset[str] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SpendingLimits:
        return cls(
            max_budget=settings.limit_max_budget,
            daily_total=settings.limit_daily_total,
            endpoints=settings.limit_endpoints,
            payees=settings.limit_payees,
        )

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_budget, self.daily_total, self.endpoints, self.payees))

    def to_json(self) -> dict[str, Any]:
        return {
            "max_budget": None if self.max_budget is None else fmt(self.max_budget),
            "daily_total": None if self.daily_total is None else fmt(self.daily_total),
            "endpoints": None if self.endpoints is None else sorted(self.endpoints),
            "payees": None if self.payees is None else sorted(self.payees),
        }

    def check(self, spends: Sequence[Spend], spent_today: Decimal = ZERO) -> None:
        """Raise `LimitRefused` naming the first limit that `spends` (all new) would break, given
        what their payer already committed today."""
        for spend in spends:
            endpoint = spend.endpoint_id
            if self.endpoints is not None and endpoint is not None and endpoint not in self.endpoints:
                raise LimitRefused(
                    _var("limit_endpoints"),
                    f"endpoint {endpoint!r} is not one of {', '.join(sorted(self.endpoints))}",
                )
            if self.payees is not None and spend.payee not in self.payees:
                raise LimitRefused(
                    _var("limit_payees"),
                    f"payee {spend.payee!r} is not one of {', '.join(sorted(self.payees))}",
                )
            if self.max_budget is not None and spend.amount > self.max_budget:
                what = "budget" if spend.kind == "job" else "bonus pool"
                raise LimitRefused(
                    _var("limit_max_budget"),
                    f"the {what} of {fmt(spend.amount)} USDC is over the {fmt(self.max_budget)} USDC "
                    "allowed per job",
                )
        if self.daily_total is not None and spends:
            asked = Decimal(sum((s.amount for s in spends), ZERO))
            if spent_today + asked > self.daily_total:
                left = max(ZERO, self.daily_total - spent_today)
                raise LimitRefused(
                    _var("limit_daily_total"),
                    f"{fmt(asked)} USDC asked, {fmt(spent_today)} of the {fmt(self.daily_total)} USDC "
                    f"allowed today (UTC) already committed, {fmt(left)} left",
                )


def _var(name: str) -> str:
    return ENVIRONMENT[name]


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


@dataclass
class DailySpend:
    """What each payer committed per UTC day, counted from `app`'s log (read on from where it
    stopped at each call). Not thread-safe: `SpendingGuard` calls it under its lock."""

    app: Settlements
    page_size: int = 1000
    position: int = 0
    _days: dict[tuple[str, date], Decimal] = field(default_factory=dict)

    def catch_up(self) -> set[uuid.UUID]:
        """Count the events written since the last call; the ids (job ids, and `bonus_id` of bonus
        requests) counted now."""
        counted: set[uuid.UUID] = set()
        follower = LogFollower(self.app.recorder, topics=[_OPENED, _BONUS], page_size=self.page_size)
        for page in follower.pages_after(self.position):
            for note in page.notifications:
                event: Any = self.app.mapper.to_domain_event(note)
                day = event.timestamp.astimezone(UTC).date()
                job_id = _uuid(note.originator_id)
                if note.topic == _OPENED:
                    payer, amount, key = event.payer, event.budget, job_id
                else:
                    opened: EscrowJob = self.app.repository.get(job_id, version=1)
                    payer, amount, key = opened.payer, event.amount, bonus_id(job_id)
                self._days[(payer, day)] = self._days.get((payer, day), ZERO) + amount
                counted.add(key)
            self.position = page.position
        return counted

    def spent(self, payer: str, day: date) -> Decimal:
        return self._days.get((payer, day), ZERO)

    def forget_before(self, day: date) -> None:
        """Drop the tallies of days before `day` (a long-running server keeps only what it asks)."""
        for key in [k for k in self._days if k[1] < day]:
            del self._days[key]


def bonus_id(job_id: uuid.UUID) -> uuid.UUID:
    """The id a job's bonus request is counted under (a job has at most one bonus)."""
    return uuid.uuid5(job_id, "bonus")


class SpendingGuard:
    """The operator's limits applied to a store's log: `admit` checks spends before they are
    opened and holds them as reserved until their events are in the log."""

    def __init__(
        self,
        limits: SpendingLimits,
        app: Settlements,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.limits = limits
        self.app = app
        self.clock = clock
        self.daily = DailySpend(app)
        self._lock = threading.Lock()
        # Admitted spends whose events are not in the log yet: id -> (payer, day, amount).
        self._reserved: dict[uuid.UUID, tuple[str, date, Decimal]] = {}

    def _is_new(self, spend: Spend) -> bool:
        """The spend is not in the log yet (a repeated call finds its job, or its bonus, there)."""
        try:
            job = self.app.get_job(spend.job_id)
        except JobNotFound:
            return True
        return spend.kind == "bonus" and job.bonus_terms is None

    def spent_today(self, payer: str) -> Decimal:
        """What `payer` committed today (UTC): in the log, and admitted here but not yet logged."""
        with self._lock:
            return self._spent(payer, self.clock().astimezone(UTC).date())

    def _spent(self, payer: str, day: date) -> Decimal:
        for key in self.daily.catch_up():
            self._reserved.pop(key, None)
        self.daily.forget_before(day)
        reserved = sum((a for p, d, a in self._reserved.values() if p == payer and d == day), ZERO)
        return self.daily.spent(payer, day) + reserved

    def reserve(self, spends: Sequence[Spend]) -> list[Spend]:
        """Check `spends` against the limits (raises `LimitRefused`); returns the new ones (those
        not already in the log), reserved until their events are logged or `release` forgets them.
        Reads the store: call it off the event loop (`asyncio.to_thread`)."""
        if not self.limits.active or not spends:
            return list(spends)
        day = self.clock().astimezone(UTC).date()
        with self._lock:
            fresh = [s for s in spends if self._key(s) not in self._reserved and self._is_new(s)]
            for payer in {s.payer for s in fresh}:
                self.limits.check([s for s in fresh if s.payer == payer], self._spent(payer, day))
            for spend in fresh:
                self._reserved[self._key(spend)] = (spend.payer, day, spend.amount)
        return fresh

    @contextmanager
    def admit(self, spends: Sequence[Spend]) -> Iterator[list[Spend]]:
        """`reserve`, and `release` if the body raises (it opened nothing)."""
        fresh = self.reserve(spends)
        try:
            yield fresh
        except BaseException:
            self.release(fresh)
            raise

    def release(self, spends: Sequence[Spend]) -> None:
        """Forget the reservations of spends that were not opened after all."""
        with self._lock:
            for spend in spends:
                self._reserved.pop(self._key(spend), None)

    @staticmethod
    def _key(spend: Spend) -> uuid.UUID:
        return spend.job_id if spend.kind == "job" else bonus_id(spend.job_id)
