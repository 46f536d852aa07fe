"""The Bounty aggregate: an amount the payer reserves for the first pod whose reported metric reaches
a target, and the escrow that pays it to the winner once.

The hosted escrow fixes its payee when it is created, and the winner is unknown while the pods race,
so no escrow exists during the race: `Posted` records the reservation (the engine counts it against
the payer's budget until the bounty is paid or expires), `Claimed` records the winner and opens the
payout, which is an escrow created for the winner's payee (`PayoutFunded`) and released (`Paid`).
A bounty is claimed at most once, so it is paid at most once: a second claim, even one whose report
is as early, finds the first and changes nothing. `Expired` gives the reservation back.

As in `EscrowJob`, the guards live in the commands and the `@event` methods only record facts, so
that the audit can replay any log and ask `violations()` what is wrong with it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, NamedTuple

from eventsourcing.domain import Aggregate, event

from podsettle.domain import rules
from podsettle.domain.errors import ConflictingOutcome, IllegalTransition, InvalidInput
from podsettle.domain.escrow_job import check_id
from podsettle.domain.money import ZERO, Money, fmt, to_money

BOUNTY_NAMESPACE = uuid.UUID("0d7f6a52-3c1e-4b8e-8f6e-5a1b9c2d4e70")


class BountyState(StrEnum):
    POSTED = "POSTED"  # reserved; the pods race
    CLAIMED = "CLAIMED"  # a winner is recorded; its payout escrow is being created
    FUNDED = "FUNDED"  # the payout escrow holds the amount for the winner; being released
    PAID = "PAID"
    EXPIRED = "EXPIRED"  # nobody reached the target in time: the reservation is given back
    ATTENTION = "ATTENTION"  # the payout could not be made before the deadline: an operator looks


class PayoutStep(StrEnum):
    CREATE = "payout_create"
    RELEASE = "payout_release"


class Claim(NamedTuple):
    runpod_job_id: str
    pod: str
    payee: str
    value: str  # the metric as reported (exact decimal text)
    reported_at: datetime


class Report(NamedTuple):
    """A pod's report that reached the target, as the claim considers it."""

    runpod_job_id: str
    pod: str
    payee: str
    value: Decimal
    at: datetime


def bounty_id_for(bounty_key: str) -> uuid.UUID:
    return uuid.uuid5(BOUNTY_NAMESPACE, bounty_key)


def winner(reports: list[Report]) -> Report:
    """The earliest report wins; a tie goes to the smaller RunPod job id."""
    return min(reports, key=lambda r: (r.at, r.runpod_job_id))


class Bounty(Aggregate):
    class Event(Aggregate.Event):
        class_version = 1

    class Posted(Aggregate.Created):
        class_version = 1
        bounty_key: str
        payer: str
        endpoint_id: str
        amount: Decimal
        metric: str
        target: str
        deadline: datetime

    class Entered(Event):
        pod: str
        runpod_job_id: str
        payee: str

    class Claimed(Event):
        runpod_job_id: str
        pod: str
        payee: str
        value: str
        reported_at: datetime
        considered: int  # reports that had reached the target when the claim was made
        losers: list[str]  # the RunPod jobs of the other pods, cancelled and not paid

    class Attempted(Event):
        step: str
        attempt: int
        reason: str  # why the previous attempt did nothing ("" for the first)

    class PayoutFunded(Event):
        escrow_id: str
        amount: Decimal
        fee: Decimal
        net: Decimal

    class Paid(Event):
        escrow_id: str
        to_payee: Decimal
        fee: Decimal
        referral_fee: Decimal

    class Expired(Event):
        reason: str

    class AttentionRaised(Event):
        step: str
        reason: str

    @staticmethod
    def create_id(bounty_key: str) -> uuid.UUID:
        return bounty_id_for(bounty_key)

    @event(Posted)
    def __init__(
        self,
        bounty_key: str,
        payer: str,
        endpoint_id: str,
        amount: Money,
        metric: str,
        target: str,
        deadline: datetime,
    ) -> None:
        self.bounty_key = bounty_key
        self.payer = payer
        self.endpoint_id = endpoint_id
        self.amount = amount
        self.metric = metric
        self.target = target
        self.deadline = deadline
        self.state = BountyState.POSTED
        self.pods: dict[str, tuple[str, str]] = {}  # runpod job id -> (pod, payee)
        self.claim: Claim | None = None
        self.losers: tuple[str, ...] = ()
        self.step: PayoutStep | None = None
        self.attempts = 0
        self.escrow_id: str | None = None
        self.funded: tuple[Decimal, Decimal, Decimal] | None = None  # amount, fee, net
        self.paid: tuple[Decimal, Decimal, Decimal] | None = None  # to_payee, fee, referral_fee
        self.expiry: str | None = None
        self.attention: dict[str, str] | None = None
        self.counts: dict[str, int] = {}
        self.order_violations: list[str] = []

    @classmethod
    def post(
        cls,
        *,
        bounty_key: str,
        payer: str,
        endpoint_id: str,
        amount: object,
        metric: str,
        target: object,
        deadline: datetime,
    ) -> Bounty:
        check_id(bounty_key, "bounty_key")
        check_id(payer, "payer")
        check_id(endpoint_id, "endpoint_id")
        if not metric or not metric.isidentifier():
            raise InvalidInput("metric", f"{metric!r} is not a metric name")
        if deadline.tzinfo is None:
            raise InvalidInput("deadline", "must carry a time zone")
        amount_ = to_money(amount, "amount", allow_zero=False)
        target_ = rules.to_metric(str(target), "target")
        return cls(
            bounty_key=bounty_key,
            payer=payer,
            endpoint_id=endpoint_id,
            amount=amount_,
            metric=metric,
            target=str(target_),
            deadline=deadline,
        )

    # ------------------------------------------------------------------ helpers

    @property
    def reserved(self) -> Decimal:
        """What the payer has set aside for this bounty and not yet paid out or got back (a bounty
        waiting in ATTENTION stays reserved)."""
        return ZERO if self.state in (BountyState.PAID, BountyState.EXPIRED) else self.amount

    @property
    def rests(self) -> bool:
        return self.state in (BountyState.PAID, BountyState.EXPIRED, BountyState.ATTENTION)

    def reaches(self, value: Decimal) -> bool:
        return value >= Decimal(self.target)

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def _seen(self, name: str) -> bool:
        return self.counts.get(name, 0) > 0

    def _guard(self, command: str, *allowed: BountyState) -> None:
        if self.state not in allowed:
            raise IllegalTransition(self.id, self.state, command, "")

    # ------------------------------------------------------------------ the race

    def enter(self, pod: str, runpod_job_id: str, payee: str) -> None:
        """A pod joined the race as a RunPod job (recorded once per job)."""
        check_id(pod, "pod")
        check_id(runpod_job_id, "runpod_job_id")
        check_id(payee, "payee")
        if runpod_job_id in self.pods:
            return
        if payee == self.payer:
            raise InvalidInput("payee", "must differ from the payer")
        self._guard("enter the race", BountyState.POSTED)
        self.trigger_event(self.Entered, pod=pod, runpod_job_id=runpod_job_id, payee=payee)

    @event(Entered)
    def _entered(self, pod: str, runpod_job_id: str, payee: str) -> None:
        self._order(self.state == BountyState.POSTED, "Entered after the race ended")
        self.pods[runpod_job_id] = (pod, payee)

    def claim_with(self, reports: list[Report]) -> Claim | None:
        """Claim the bounty for the best of `reports` that reached the target (earliest, then the
        smaller RunPod job id). Once claimed, later claims change nothing: returns the claim."""
        if self.claim is not None:
            return self.claim
        if self.state != BountyState.POSTED:
            return None
        good = [r for r in reports if self.reaches(r.value) and r.at <= self.deadline]
        if not good:
            return None
        for report in good:
            if report.runpod_job_id not in self.pods:
                raise InvalidInput("runpod_job_id", f"{report.runpod_job_id!r} did not enter this bounty")
        best = winner(good)
        pod, payee = self.pods[best.runpod_job_id]
        self.trigger_event(
            self.Claimed,
            runpod_job_id=best.runpod_job_id,
            pod=pod,
            payee=payee,
            value=str(best.value),
            reported_at=best.at,
            considered=len(good),
            losers=sorted(j for j in self.pods if j != best.runpod_job_id),
        )
        return self.claim

    @event(Claimed)
    def _claimed(
        self,
        runpod_job_id: str,
        pod: str,
        payee: str,
        value: str,
        reported_at: datetime,
        considered: int,
        losers: list[str],
    ) -> None:
        self._count("Claimed")
        self._order(self.state == BountyState.POSTED, "Claimed when the bounty was not open")
        self._order(runpod_job_id in self.pods, "Claimed by a pod that never entered")
        self.claim = Claim(runpod_job_id, pod, payee, value, reported_at)
        self.losers = tuple(losers)
        self.state = BountyState.CLAIMED
        self.step = PayoutStep.CREATE
        self.attempts = 0

    def expire(self, reason: str) -> None:
        """Nobody reached the target: the reservation goes back to the payer."""
        if self.state == BountyState.EXPIRED:
            return
        self._guard("expire", BountyState.POSTED)
        self.trigger_event(self.Expired, reason=reason)

    @event(Expired)
    def _expired(self, reason: str) -> None:
        self._count("Expired")
        self._order(not self._seen("Claimed"), "Expired after Claimed")
        self.expiry = reason
        self.state = BountyState.EXPIRED

    # ------------------------------------------------------------------ the payout

    def record_attempt(self, step: PayoutStep, reason: str = "") -> int:
        """The engine is about to call the escrow for `step` (recorded before the call)."""
        if self.step != step or self.state not in (BountyState.CLAIMED, BountyState.FUNDED):
            raise IllegalTransition(self.id, self.state, f"attempt {step}", "no such payout step is open")
        self.trigger_event(self.Attempted, step=str(step), attempt=self.attempts + 1, reason=reason)
        return self.attempts

    @event(Attempted)
    def _attempted(self, step: str, attempt: int, reason: str) -> None:
        self._order(self.step == step, f"{step} attempted without that step open")
        self.attempts = attempt

    def record_funded(self, escrow_id: str, amount: object, fee: object, net: object) -> None:
        check_id(escrow_id, "escrow_id")
        amount_, fee_, net_ = to_money(amount, "amount"), to_money(fee, "fee"), to_money(net, "net")
        if self.funded is not None:
            if (self.escrow_id, *self.funded) == (escrow_id, amount_, fee_, net_):
                return
            raise ConflictingOutcome(self.id, self.state, "record payout funded", "already funded")
        self._guard("record payout funded", BountyState.CLAIMED)
        split = rules.split(amount_)
        if amount_ != self.amount or (fee_, net_) != (split.fee, split.net):
            raise ConflictingOutcome(
                self.id,
                self.state,
                "record payout funded",
                f"escrow holds {fmt(amount_)} (fee {fmt(fee_)}), the bounty is {fmt(self.amount)}",
            )
        self.trigger_event(self.PayoutFunded, escrow_id=escrow_id, amount=amount_, fee=fee_, net=net_)

    @event(PayoutFunded)
    def _payout_funded(self, escrow_id: str, amount: Decimal, fee: Decimal, net: Decimal) -> None:
        self._count("PayoutFunded")
        self._order(self._seen("Claimed"), "PayoutFunded without Claimed")
        self.escrow_id = escrow_id
        self.funded = (amount, fee, net)
        self.state = BountyState.FUNDED
        self.step = PayoutStep.RELEASE
        self.attempts = 0

    def record_paid(self, to_payee: object, fee: object, referral_fee: object) -> None:
        to_payee_, fee_ = to_money(to_payee, "to_payee"), to_money(fee, "fee")
        referral_ = to_money(referral_fee, "referral_fee")
        if self.paid is not None:
            if self.paid == (to_payee_, fee_, referral_):
                return
            raise ConflictingOutcome(self.id, self.state, "record paid", "a different payout was recorded")
        self._guard("record paid", BountyState.FUNDED)
        if to_payee_ + fee_ != self.amount:
            raise ConflictingOutcome(
                self.id, self.state, "record paid", "payee share + fee is not the bounty"
            )
        self.trigger_event(
            self.Paid, escrow_id=self.escrow_id or "", to_payee=to_payee_, fee=fee_, referral_fee=referral_
        )

    @event(Paid)
    def _paid(self, escrow_id: str, to_payee: Decimal, fee: Decimal, referral_fee: Decimal) -> None:
        self._count("Paid")
        self._order(self._seen("PayoutFunded"), "Paid without PayoutFunded")
        self._order(escrow_id == self.escrow_id, "Paid from another escrow than the payout's")
        self.paid = (to_payee, fee, referral_fee)
        self.state = BountyState.PAID
        self.step = None

    def raise_attention(self, reason: str) -> None:
        if self.state == BountyState.ATTENTION:
            return
        if self.step is None:
            raise IllegalTransition(self.id, self.state, "raise attention", "no payout step is open")
        self.trigger_event(self.AttentionRaised, step=str(self.step), reason=reason)

    @event(AttentionRaised)
    def _attention_raised(self, step: str, reason: str) -> None:
        self._order(self._seen("Claimed"), "AttentionRaised without Claimed")
        self.attention = {"step": step, "reason": reason}
        self.state = BountyState.ATTENTION

    # ------------------------------------------------------------------ audit

    def _order(self, ok: bool, rule: str) -> None:
        if not ok:
            self.order_violations.append(rule)

    def violations(self, *, quiescent: bool = False) -> list[str]:
        """Every rule this bounty's history breaks (empty when it is sound)."""
        found = list(self.order_violations)
        for name in ("Claimed", "PayoutFunded", "Paid", "Expired"):
            if self.counts.get(name, 0) > 1:
                found.append(f"bounty {name} recorded {self.counts[name]} times")
        if self._seen("Paid") and self._seen("Expired"):
            found.append("bounty both Paid and Expired")
        if self.claim is not None:
            if Decimal(self.claim.value) < Decimal(self.target):
                found.append(f"bounty claimed with {self.claim.value}, below the target {self.target}")
            if self.claim.reported_at > self.deadline:
                found.append("bounty claimed by a report after its deadline")
        if self.funded is not None:
            amount, fee, net = self.funded
            if amount != self.amount:
                found.append(f"payout escrow {fmt(amount)} is not the reserved {fmt(self.amount)}")
            if fee + net != amount:
                found.append("payout fee + net is not its amount")
        if self.paid is not None:
            to_payee, fee, referral = self.paid
            if to_payee + fee != self.amount:
                found.append("bounty paid + fee is not the reserved amount")
            if referral > fee:
                found.append("bounty referral share above the fee")
        if quiescent and self.state in (BountyState.CLAIMED, BountyState.FUNDED):
            found.append(f"bounty left in {self.state} with its payout in flight")
        return found

    def summary(self) -> dict[str, Any]:
        claim = self.claim
        return {
            "bounty_id": str(self.id),
            "bounty_key": self.bounty_key,
            "state": str(self.state),
            "amount": fmt(self.amount),
            "metric": self.metric,
            "target": self.target,
            "winner": None
            if claim is None
            else claim._asdict() | {"reported_at": claim.reported_at.isoformat()},
            "escrow_id": self.escrow_id,
        }


BOUNTY_TOPIC_PREFIX = "podsettle.domain.bounty:Bounty."
BountyReport = Report  # the public name (`from podsettle import BountyReport`)
