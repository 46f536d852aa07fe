"""The EscrowJob aggregate: one RunPod job, its escrow, and the saga that settles it.

Read it next to the lifecycle table of DESIGN.md. Each outcome command checks the state, records
the outcome and, in the same save, the next intent. Processors carry out intents; they never decide
what comes next.

The `@event(EventClass)` methods are the apply logic and run again on replay (and in the audit).
They only record facts, without guards, so that the audit can replay any log, even a broken one,
and then ask `violations()` what is wrong with it. The guards live in the public commands, which
record an event with `trigger_event(EventClass, **fields)`: the library then runs the `@event`
method of that class. (Calling the decorated method instead does the same, with two signature
inspections more per event, which showed in the engine's profile.)

Changing an event: stored events are never rewritten (each is sealed over its stored bytes, and the
seal is checked over those bytes before any upcast). A change to an event's fields raises its
`class_version` by one and adds a static `upcast_vN_vN+1(state)` that turns the stored dict of the
previous version into the new one: a default for a new field, never an invented money amount. Every
stored topic names this module and class (`podsettle.domain.escrow_job:EscrowJob.Funded`): moving
the file or renaming a class keeps the old topic resolvable with `register_topic`.
`tests/replay/test_old_logs.py` audits the log podsettle 0.1.0 wrote and must pass unchanged (CHANGELOG.md).
"""

from __future__ import annotations

import operator
import re
import uuid
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, NamedTuple

from eventsourcing.domain import Aggregate, event

from podsettle.domain import rules
from podsettle.domain.acceptance import EVALUATED, score_text
from podsettle.domain.digests import canonical_json, digest_bytes
from podsettle.domain.errors import ClaimLost, ConflictingOutcome, IllegalTransition, InvalidInput
from podsettle.domain.lifecycle import State, Status, rests, status_of
from podsettle.domain.money import ZERO, Money, fmt, to_money

# Progress a running job reports: at most this many values are recorded per job (a handler may report
# thousands; the log keeps a bounded trace, the first ones), each value's JSON text only up to
# PROGRESS_TEXT_MAX characters (a longer one is recorded by its digest and size alone).
MAX_PROGRESS = 32
PROGRESS_TEXT_MAX = 256
JOB_NAMESPACE = uuid.UUID("6f1c1d5e-8a4b-4f0e-9a57-2f6f3c1e7b11")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$")
# How a failed job's escrow comes back to the payer, chosen when the job opens (`EscrowJob.refund_method`):
# "timeout" waits for the v1 service's sweep (the only path the published service completes: the
# escrow's timeout plus up to 5 minutes, the commission kept); "dispute" asks Purple Flea's staff
# (the published service has no route that resolves a dispute); "cancel" is a service's own cancel
# route (seed dialect, local ledger: the whole amount back at once).
REFUND_METHODS = ("timeout", "dispute", "cancel")
# Jobs recorded before the choice was (refund_method None) are refunded by the path that returns
# money on the published service.
DEFAULT_REFUND_METHOD = "timeout"


class Step(StrEnum):
    """An effect the engine carries out for an intent."""

    FUND = "fund"  # create (and fund) the escrow
    START = "start"  # submit the job to RunPod
    CANCEL = "cancel"  # cancel the job on RunPod
    RELEASE = "release"  # release the escrow to the payee
    REFUND = "refund"  # return the escrow to the payer
    BONUS_FUND = "bonus_fund"  # create the bonus escrow
    BONUS_RELEASE = "bonus_release"  # release the bonus escrow
    # Open the evaluator job that scores the output and wait for its score (the evaluator is its own
    # paid job with its own escrow: this step moves no money of this job's escrow).
    EVALUATE = "evaluate"

    @property
    def moves_money(self) -> bool:
        return self not in (Step.START, Step.CANCEL, Step.EVALUATE)


# The rejection of a job cancelled while it waited to be funded starts with these words.
CANCELLED_BEFORE_FUNDING = "cancelled before funding"


class Intent(NamedTuple):
    """An effect that is wanted: its step, its stable idempotency key, and the attempts made so far.
    (Immutable; a named tuple because the aggregate makes one for every intent and attempt.)"""

    step: Step
    key: str
    attempts: int = 0
    claimed_by: str | None = None  # the processor that made the last attempt, and when
    claimed_at: datetime | None = None
    # The last attempt certainly did nothing (`NothingDone`): the next one needs no confirmation.
    answered: bool = False


class Funding(NamedTuple):
    """The job's escrow: the amount it holds, and the service's fee and the net it announced."""

    escrow_id: str
    amount: Decimal
    fee: Decimal
    net: Decimal


class Release(NamedTuple):
    """How a released escrow was split (to_payee + fee + returned is the funded amount)."""

    to_payee: Decimal
    fee: Decimal
    referral_fee: Decimal  # the referrer's share of `fee`
    returned: Decimal  # back with the payer, after a partial release


class Refund(NamedTuple):
    """How a refunded escrow was split (returned + fee_kept is the funded amount)."""

    returned: Decimal
    fee_kept: Decimal


class Failure(NamedTuple):
    stage: str  # start, run, output, acceptance, cancel, release
    runpod_status: str | None
    reason: str


class Progress(NamedTuple):
    """A progress value a running job reported: its canonical JSON's digest, the JSON text itself
    when short (else None), its size in bytes, and when the engine saw it."""

    digest: str
    value: str | None
    size: int
    at: datetime | None


class Metering(NamedTuple):
    """What a metered job delivered and earns: `items` counted off its output, `payout` =
    min(budget, items x price_per_item) rounded down (the release pays it; the rest goes back)."""

    items: int
    payout: Decimal


class Evaluation(NamedTuple):
    """The evaluator job's verdict on an output gated by `acceptance.evaluated_by`: its job id, the
    score it reported (None when the evaluator gave none: it failed and was refunded), the threshold
    and whether the output passed (score at or above the threshold)."""

    evaluator_job_id: str
    score: str | None
    threshold: str
    passed: bool
    reason: str


def evaluation_passes(score: str | None, threshold: str) -> bool:
    """The gate's rule: a score at or above the threshold passes; no score never passes."""
    return score is not None and Decimal(score) >= Decimal(threshold)


class BonusTerms(NamedTuple):
    """What a granted bonus was computed from (as the BonusRequested event has them)."""

    pool: Decimal
    base_metric: str
    achieved_metric: str
    threshold: str


class BonusFunding(NamedTuple):
    escrow_id: str
    amount: Decimal
    fee: Decimal
    net: Decimal


class BonusAward(NamedTuple):
    """How the released bonus escrow was split (to_payee + fee is the amount)."""

    amount: Decimal
    to_payee: Decimal
    fee: Decimal
    referral_fee: Decimal


class JobMoney(NamedTuple):
    """Where one job's money is: funded = to_workers + fees + returned + still_held.

    `funded` counts every escrow the payer funded for the job (its own and its bonus escrow);
    `still_held` what those escrows hold until they are released or refunded (also while the job waits
    for an operator). The bonus amounts are a part of `to_workers` and `fees`, named apart."""

    funded: Decimal
    to_workers: Decimal
    fees: Decimal  # release fees, refund fees kept and bonus fees
    returned: Decimal
    still_held: Decimal
    referral_fees: Decimal  # the referrer's share of `fees`
    bonus_gross: Decimal
    bonus_fees: Decimal
    bonus_net: Decimal


NO_MONEY = JobMoney(ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO)


def money_of(
    funded_amount: Decimal | None,
    released: Release | None,
    refunded: Refund | None,
    bonus_funded: BonusFunding | None,
    bonus_awarded: BonusAward | None,
) -> JobMoney:
    """A job's money from its settlement facts (those of a `JobView` or of the aggregate)."""
    if funded_amount is None:
        return NO_MONEY
    funded: Decimal = funded_amount
    to_workers: Decimal = ZERO
    fees: Decimal = ZERO
    returned: Decimal = ZERO
    held: Decimal = ZERO
    referral: Decimal = ZERO
    if released is not None:
        to_workers, fees, referral, returned = released
    elif refunded is not None:
        returned, fees = refunded
    else:
        held = funded_amount
    gross: Decimal = ZERO
    bonus_fee: Decimal = ZERO
    bonus_net: Decimal = ZERO
    if bonus_funded is not None:
        funded += bonus_funded.amount
        if bonus_awarded is None:
            held += bonus_funded.amount
        else:
            gross, bonus_net, bonus_fee = bonus_awarded.amount, bonus_awarded.to_payee, bonus_awarded.fee
            to_workers += bonus_net
            fees += bonus_fee
            referral += bonus_awarded.referral_fee
    return JobMoney(funded, to_workers, fees, returned, held, referral, gross, bonus_fee, bonus_net)


class JobView(NamedTuple):
    """A consistent, immutable snapshot of a job, for code that must not hold the aggregate itself
    (it may be changed by another thread while it is read). A named tuple: the writer takes one after
    every command, and building a frozen dataclass of 35 fields cost more than the command itself. Its
    fields are the aggregate's attributes of the same names (`job_id` is the aggregate's `id`); the
    settlement facts are the named tuples above, None until they happen."""

    job_id: uuid.UUID
    job_key: str
    batch_id: str | None
    endpoint_id: str
    input_digest: str
    payer: str
    payee: str
    budget: Money
    referral: str | None
    acceptance: dict[str, Any]
    deadline: datetime
    state: State
    intent: Intent | None
    escrow_id: str | None
    funded_amount: Money | None
    fee: Decimal | None
    net: Decimal | None
    rejection: str | None
    runpod_job_id: str | None
    failure: Failure | None
    released: Release | None
    refunded: Refund | None
    cancel_reason: str | None
    attention: dict[str, str] | None
    state_before_attention: State | None
    output_digest: str | None
    execution_ms: int | None
    delay_ms: int | None
    worker_id: str | None
    metrics: dict[str, str]
    progress: tuple[Progress, ...]
    bonus_amount: Money | None
    bonus_escrow_id: str | None
    bonus_funded: BonusFunding | None
    bonus_awarded: BonusAward | None
    # The escrow dialect whose fee rule the job's figures follow, and how a refund is asked for
    # (REFUND_METHODS); both None for a job recorded before they were.
    dialect: str | None
    refund_method: str | None
    price_per_item: Money | None
    retry_of: str | None
    metering: Metering | None
    evaluation: Evaluation | None
    version: int

    @property
    def rests(self) -> bool:
        """Nothing more happens to the job without an operator or a new command."""
        return rests(self.state, self.intent)

    @property
    def status(self) -> Status:
        return status_of(self.state)

    @property
    def warnings(self) -> list[str]:
        """What the caller should know though nothing is wrong with the money (not ATTENTION)."""
        return warnings_of(self.referral, self.released)

    @property
    def funding(self) -> Funding | None:
        """The job's escrow, once it is funded."""
        if self.escrow_id is None or self.funded_amount is None or self.fee is None or self.net is None:
            return None
        return Funding(self.escrow_id, self.funded_amount, self.fee, self.net)

    @property
    def money(self) -> JobMoney:
        return money_of(
            self.funded_amount, self.released, self.refunded, self.bonus_funded, self.bonus_awarded
        )

    @property
    def payout(self) -> Decimal:
        """What the release pays out of the escrow: all of it, or a metered job's earned part."""
        return release_amount(self.funded_amount, self.metering)


def release_amount(funded_amount: Decimal | None, metering: Metering | None) -> Decimal:
    """What a release takes out of the escrow (fee included): the funded amount, or what a metered
    job earned; the escrow's rest goes back to the payer."""
    if metering is not None:
        return metering.payout
    return funded_amount if funded_amount is not None else ZERO


# The values of a view, read from the aggregate in one call (the acceptance dict is never changed in
# place, so the view shares it rather than copying it).
_VIEW_VALUES = operator.attrgetter("id", *JobView._fields[1:])


def job_id_for(job_key: str) -> uuid.UUID:
    """Jobs are identified by the caller's key, so opening the same job twice finds the first."""
    return uuid.uuid5(JOB_NAMESPACE, job_key)


def check_id(value: object, field: str, *, optional: bool = False) -> str | None:
    if value is None or value == "":
        if optional:
            return None
        raise InvalidInput(field, "is required")
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidInput(
            field, f"{value!r} is not a valid id (letters, digits and _.:@/- only, at most 128 characters)"
        )
    return value


class EscrowJob(Aggregate):
    """A RunPod job paid through escrow."""

    class Event(Aggregate.Event):
        class_version = 1

    class Opened(Aggregate.Created):
        class_version = 2
        job_key: str
        batch_id: str | None
        endpoint_id: str
        input_digest: str
        payer: str
        payee: str
        budget: Decimal
        referral: str | None
        acceptance: dict[str, Any]
        bonus_pool: Decimal | None
        deadline: datetime
        dialect: str | None
        refund_method: str | None
        # A metered job's price per delivered item (None: the whole budget on success), and the key
        # of the refunded job this one runs again (None: a first attempt).
        price_per_item: Decimal | None
        retry_of: str | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            """Release 0.1.0 recorded none of these: its figures were checked with the exact half-up
            rule (dialect None keeps that rule), its refunds follow the default path, and its jobs
            were unmetered first attempts."""
            state["dialect"] = None
            state["refund_method"] = None
            state["price_per_item"] = None
            state["retry_of"] = None

    class FundingRequested(Event):
        key: str

    class Attempted(Event):
        step: str
        attempt: int
        processor: str
        at: datetime | None

    class NothingDone(Event):
        """The attempt certainly did nothing: nothing was sent (the service could not be reached,
        no rate-limit slot), or the service refused it before acting (a 429)."""

        step: str
        attempt: int
        reason: str

    class Funded(Event):
        escrow_id: str
        amount: Decimal
        fee: Decimal
        net: Decimal

    class FundingRejected(Event):
        reason: str
        status_code: int | None

    class StartRequested(Event):
        key: str

    class Started(Event):
        runpod_job_id: str
        attempt: int

    class CancelRequested(Event):
        key: str
        reason: str

    class Progressed(Event):
        digest: str
        value: str | None
        size: int
        at: datetime | None

    class Completed(Event):
        output_digest: str
        execution_ms: int | None
        delay_ms: int | None
        worker_id: str | None
        metrics: dict[str, str]

    class Metered(Event):
        items: int
        payout: Decimal

    class Failed(Event):
        stage: str
        runpod_status: str | None
        reason: str

    class ReleaseRequested(Event):
        key: str
        method: str

    class RefundRequested(Event):
        key: str
        method: str

    class Released(Event):
        to_payee: Decimal
        fee: Decimal
        referral_fee: Decimal
        returned: Decimal

    class Refunded(Event):
        returned: Decimal
        fee_kept: Decimal

    class BonusRequested(Event):
        key: str
        amount: Decimal
        pool: Decimal
        base_metric: str
        achieved_metric: str
        threshold: str

    class BonusFunded(Event):
        escrow_id: str
        amount: Decimal
        fee: Decimal
        net: Decimal

    class BonusAwarded(Event):
        escrow_id: str
        amount: Decimal
        to_payee: Decimal
        fee: Decimal
        referral_fee: Decimal

    class EvaluationRequested(Event):
        key: str

    class Evaluated(Event):
        evaluator_job_id: str
        score: str | None
        threshold: str
        passed: bool
        reason: str

    class AttentionRaised(Event):
        step: str
        reason: str
        known: dict[str, str]

    class Resolved(Event):
        step: str
        finding: str
        operator: str
        retry: bool

    # ------------------------------------------------------------------ opening

    @staticmethod
    def create_id(job_key: str) -> uuid.UUID:
        return job_id_for(job_key)

    @event(Opened)
    def __init__(
        self,
        job_key: str,
        batch_id: str | None,
        endpoint_id: str,
        input_digest: str,
        payer: str,
        payee: str,
        budget: Money,
        referral: str | None,
        acceptance: dict[str, Any],
        bonus_pool: Money | None,
        deadline: datetime,
        dialect: str | None,
        refund_method: str | None,
        price_per_item: Money | None = None,
        retry_of: str | None = None,
    ) -> None:
        self.job_key = job_key
        self.batch_id = batch_id
        self.endpoint_id = endpoint_id
        self.input_digest = input_digest
        self.payer = payer
        self.payee = payee
        self.budget = budget
        self.referral = referral
        self.acceptance = acceptance
        self.bonus_pool = bonus_pool
        self.deadline = deadline
        self.dialect = dialect
        self.refund_method = refund_method
        self.price_per_item = price_per_item
        self.retry_of = retry_of
        self.metering: Metering | None = None
        self.evaluation: Evaluation | None = None
        self.state = State.OPENED
        self.intent: Intent | None = None
        self.state_before_attention: State | None = None
        self.attention: dict[str, str] | None = None
        # Settlement facts.
        self.escrow_id: str | None = None
        self.funded_amount: Money | None = None
        self.fee: Decimal | None = None
        self.net: Decimal | None = None
        self.rejection: str | None = None
        self.runpod_job_id: str | None = None
        self.start_attempt = 0
        self.output_digest: str | None = None
        self.execution_ms: int | None = None
        self.delay_ms: int | None = None
        self.worker_id: str | None = None
        self.metrics: dict[str, str] = {}
        self.progress: tuple[Progress, ...] = ()
        self.failure: Failure | None = None
        self.released: Release | None = None
        self.refunded: Refund | None = None
        self.cancel_reason: str | None = None
        # Bonus.
        self.bonus_amount: Money | None = None
        self.bonus_terms: BonusTerms | None = None
        self.bonus_escrow_id: str | None = None
        self.bonus_funded: BonusFunding | None = None
        self.bonus_awarded: BonusAward | None = None
        # Facts for the audit: counted, and checked in order as they were applied.
        self.counts: dict[str, int] = {}
        self.order_violations: list[str] = []

    @classmethod
    def open(
        cls,
        *,
        job_key: str,
        endpoint_id: str,
        input_digest: str,
        payer: str,
        payee: str,
        budget: Money,
        deadline: datetime,
        batch_id: str | None = None,
        referral: str | None = None,
        acceptance: dict[str, Any] | None = None,
        bonus_pool: Money | None = None,
        dialect: str | None = None,
        refund_method: str | None = DEFAULT_REFUND_METHOD,
        price_per_item: Money | None = None,
        retry_of: str | None = None,
    ) -> EscrowJob:
        """Open a job and, in the same save, ask for its escrow to be funded. The amounts arrive
        parsed (`JobRequest`); they are checked again only as the job's invariants (positive, 6 places).
        `dialect` names the fee rule the service's figures must follow (rules.py); `refund_method`
        how a refund will be asked for, whichever engine carries it out (REFUND_METHODS)."""
        check_id(job_key, "job_key")
        check_id(endpoint_id, "endpoint_id")
        check_id(payer, "payer")
        check_id(payee, "payee")
        check_id(batch_id, "batch_id", optional=True)
        check_id(referral, "referral", optional=True)
        if payer == payee:
            raise InvalidInput("payee", "must differ from the payer")
        if not re.fullmatch(r"[0-9a-f]{64}", input_digest or ""):
            raise InvalidInput("input_digest", "must be a sha256 hex digest")
        if deadline.tzinfo is None:
            raise InvalidInput("deadline", "must carry a time zone")
        if dialect is not None and dialect not in rules.DIALECTS:
            raise InvalidInput("dialect", f"must be one of {', '.join(rules.DIALECTS)}, not {dialect!r}")
        if refund_method is not None and refund_method not in REFUND_METHODS:
            raise InvalidInput(
                "refund_method", f"must be one of {', '.join(REFUND_METHODS)}, not {refund_method!r}"
            )
        amount = to_money(budget, "budget", allow_zero=False)
        pool = None if bonus_pool is None else to_money(bonus_pool, "bonus_pool")
        price = None
        if price_per_item is not None:
            price = to_money(price_per_item, "price_per_item", allow_zero=False)
        check_id(retry_of, "retry_of", optional=True)
        job = cls(
            job_key=job_key,
            batch_id=batch_id,
            endpoint_id=endpoint_id,
            input_digest=input_digest,
            payer=payer,
            payee=payee,
            budget=amount,
            referral=referral or None,
            acceptance=dict(acceptance or {"kind": "non_empty"}),
            bonus_pool=pool,
            deadline=deadline,
            dialect=dialect,
            refund_method=refund_method,
            price_per_item=price,
            retry_of=retry_of or None,
        )
        job.trigger_event(cls.FundingRequested, key=f"{job_key}:fund")
        return job

    # ------------------------------------------------------------------ helpers

    @property
    def job_id(self) -> uuid.UUID:
        return self.id

    @property
    def is_terminal(self) -> bool:
        """The job rests in a terminal state (not waiting for an operator)."""
        return self.state != State.ATTENTION and rests(self.state, self.intent)

    @property
    def rests(self) -> bool:
        """Nothing more happens to the job without an operator or a new command."""
        return rests(self.state, self.intent)

    @property
    def money(self) -> JobMoney:
        return money_of(
            self.funded_amount, self.released, self.refunded, self.bonus_funded, self.bonus_awarded
        )

    @property
    def cancelled(self) -> bool:
        """Someone cancelled the job: before it was funded, before it was submitted, or on RunPod."""
        return (
            self.cancel_reason is not None
            or (self.rejection or "").startswith(CANCELLED_BEFORE_FUNDING)
            or (self.failure is not None and self.failure.stage == "cancel")
        )

    @property
    def awaiting_outcome(self) -> bool:
        """An intent has been attempted and its outcome is not recorded yet."""
        return self.intent is not None and self.intent.attempts > 0 and not self.intent.answered

    def _guard(self, command: str, *allowed: State, detail: str = "") -> None:
        if self.state not in allowed:
            raise IllegalTransition(self.id, self.state, command, detail)

    def _refuse_during_attention(self, command: str) -> None:
        # A bonus runs on a RELEASED job, so the state guards of the other outcomes do not stop it:
        # an outcome found while parked is recorded after `resolve`, in the same save.
        if self.state == State.ATTENTION:
            raise IllegalTransition(self.id, self.state, command, "resolve the attention first")

    def _evaluation_passed(self) -> bool:
        return self.evaluation is not None and self.evaluation.passed

    def _conflict(self, command: str, detail: str) -> ConflictingOutcome:
        return ConflictingOutcome(self.id, self.state, command, detail)

    def _count(self, name: str) -> int:
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.counts[name]

    def _seen(self, name: str) -> bool:
        return self.counts.get(name, 0) > 0

    def _order(self, ok: bool, rule: str) -> None:
        if not ok:
            self.order_violations.append(rule)

    # ------------------------------------------------------------------ attempts

    def record_attempt(
        self, step: Step, processor: str, *, after: int | None = None, at: datetime | None = None
    ) -> int:
        """A processor claims the current intent and is about to make its call. Returns the attempt.

        `after` is the number of attempts the processor saw when it decided to make this one: if
        another processor has made one since, the claim is lost (`ClaimLost`) rather than taken as
        the next attempt, so that two processors never both make the call."""
        if self.intent is None or self.intent.step != step:
            raise IllegalTransition(self.id, self.state, f"attempt {step}", "no such intent is open")
        if self.state == State.ATTENTION:
            raise IllegalTransition(self.id, self.state, f"attempt {step}", "the job waits for an operator")
        if after is not None and self.intent.attempts != after:
            raise ClaimLost(self.id, step)
        attempt = self.intent.attempts + 1
        self.trigger_event(self.Attempted, step=str(step), attempt=attempt, processor=processor, at=at)
        return attempt

    @event(Attempted)
    def _attempted(self, step: str, attempt: int, processor: str, at: datetime | None) -> None:
        if self.intent is not None and self.intent.step == step:
            self.intent = Intent(self.intent.step, self.intent.key, attempt, processor, at)
        else:
            self.order_violations.append(f"{step} attempted without an open intent")
        if step == Step.START:
            self.start_attempt = attempt

    def record_nothing_done(self, step: Step, attempt: int, reason: str) -> None:
        """Attempt `attempt` of the open intent certainly did nothing (nothing was sent, or a 429):
        the intent is open again, and whoever carries it on makes a new attempt instead of asking
        the service what became of this one (which the published service cannot answer for a
        create). Moot, and not recorded, when another attempt or an outcome came since."""
        intent = self.intent
        if intent is None or intent.step != step or intent.attempts != attempt or intent.answered:
            return
        if self.state == State.ATTENTION:
            return
        self.trigger_event(self.NothingDone, step=str(step), attempt=attempt, reason=reason)

    @event(NothingDone)
    def _nothing_done(self, step: str, attempt: int, reason: str) -> None:
        if self.intent is not None and self.intent.step == step:
            self.intent = self.intent._replace(answered=True)
        else:
            self.order_violations.append(f"{step}: nothing done without an open intent")

    # ------------------------------------------------------------------ funding

    @event(FundingRequested)
    def _funding_requested(self, key: str) -> None:
        self.state = State.FUNDING
        self.intent = Intent(Step.FUND, key)

    def record_funded(self, escrow_id: str, amount: object, fee: object, net: object) -> None:
        """The escrow exists and holds the budget. Next: start the job on RunPod."""
        check_id(escrow_id, "escrow_id")
        amount_ = to_money(amount, "amount")
        fee_ = to_money(fee, "fee")
        net_ = to_money(net, "net")
        if self.escrow_id is not None:
            same = (self.escrow_id, self.funded_amount, self.fee, self.net) == (
                escrow_id,
                amount_,
                fee_,
                net_,
            )
            if same:
                return
            raise self._conflict("record funded", f"already funded by escrow {self.escrow_id}")
        self._guard("record funded", State.FUNDING)
        if amount_ != self.budget:
            raise self._conflict(
                "record funded", f"escrow holds {fmt(amount_)}, budget is {fmt(self.budget)}"
            )
        expected = rules.split(amount_, dialect=self.dialect)
        if (fee_, net_) != (expected.fee, expected.net):
            raise self._conflict(
                "record funded",
                f"fee {fmt(fee_)} / net {fmt(net_)} differ from the expected "
                f"{fmt(expected.fee)} / {fmt(expected.net)}",
            )
        self.trigger_event(self.Funded, escrow_id=escrow_id, amount=amount_, fee=fee_, net=net_)
        self.trigger_event(self.StartRequested, key=f"{self.job_key}:start")

    @event(Funded)
    def _funded(self, escrow_id: str, amount: Money, fee: Decimal, net: Decimal) -> None:
        self._count("Funded")
        self.escrow_id = escrow_id
        self.funded_amount = amount
        self.fee = fee
        self.net = net
        self.state = State.FUNDED
        self.intent = None

    def record_funding_rejected(self, reason: str, status_code: int | None = None) -> None:
        """The escrow service refused the escrow; no money moved. Terminal."""
        if self.state == State.REJECTED:
            if self.rejection == reason:
                return
            raise self._conflict("record funding rejected", f"already rejected: {self.rejection}")
        self._guard("record funding rejected", State.FUNDING)
        self.trigger_event(self.FundingRejected, reason=reason, status_code=status_code)

    @event(FundingRejected)
    def _funding_rejected(self, reason: str, status_code: int | None) -> None:
        self.rejection = reason
        self.state = State.REJECTED
        self.intent = None

    # ------------------------------------------------------------------ compute

    @event(StartRequested)
    def _start_requested(self, key: str) -> None:
        self.intent = Intent(Step.START, key)

    def record_started(self, runpod_job_id: str) -> None:
        """RunPod accepted the job."""
        check_id(runpod_job_id, "runpod_job_id")
        if self.runpod_job_id is not None:
            if self.runpod_job_id == runpod_job_id:
                return
            raise self._conflict("record started", f"already started as RunPod job {self.runpod_job_id}")
        self._guard("record started", State.FUNDED)
        self.trigger_event(self.Started, runpod_job_id=runpod_job_id, attempt=max(self.start_attempt, 1))

    @event(Started)
    def _started(self, runpod_job_id: str, attempt: int) -> None:
        self._count("Started")
        self._order(self._seen("Funded"), "Started without Funded")
        self.runpod_job_id = runpod_job_id
        self.state = State.RUNNING
        self.intent = None

    def request_cancel(self, reason: str) -> None:
        """Cancel a job: one still waiting to be funded ends REJECTED with nothing funded (no call
        was made); a funded one not yet submitted fails at once; a running one is cancelled on
        RunPod, and its failure then refunds the escrow. A job whose escrow is being created cannot
        be cancelled until the create's outcome is known (`Conflict`)."""
        if self.intent is not None and self.intent.step == Step.CANCEL:
            return
        if self.state == State.FUNDING and self.intent is not None:
            if self.intent.attempts and not self.intent.answered:
                raise self._conflict("cancel", "its escrow is being created: cancel it once it is funded")
            self.record_funding_rejected(f"{CANCELLED_BEFORE_FUNDING}: {reason}")
            return
        if self.state == State.FUNDED and self.intent is not None and self.intent.attempts == 0:
            # Nothing was submitted yet: fail it here, no RunPod call needed.
            self.record_failed(stage="cancel", runpod_status=None, reason=reason)
            return
        self._guard("cancel", State.RUNNING)
        self.trigger_event(self.CancelRequested, key=f"{self.job_key}:cancel", reason=reason)

    @event(CancelRequested)
    def _cancel_requested(self, key: str, reason: str) -> None:
        self.cancel_reason = reason
        self.intent = Intent(Step.CANCEL, key)

    def record_progress(self, value: Any, at: datetime | None = None) -> bool:
        """A running job reported progress (`value`, any JSON). Recorded once per distinct value and
        at most MAX_PROGRESS times per job; a value seen before, one beyond the bound, or one that
        arrives when the run is no longer RUNNING (a poll that raced its end) records nothing.
        Returns whether it was recorded."""
        if self.state != State.RUNNING or len(self.progress) >= MAX_PROGRESS:
            return False
        text = canonical_json(value, "progress")
        value_digest = digest_bytes(text)
        if any(seen.digest == value_digest for seen in self.progress):
            return False
        short = text.decode() if len(text) <= PROGRESS_TEXT_MAX else None
        self.trigger_event(self.Progressed, digest=value_digest, value=short, size=len(text), at=at)
        return True

    @event(Progressed)
    def _progressed(self, digest: str, value: str | None, size: int, at: datetime | None) -> None:
        self._order(self._seen("Started"), "Progressed without Started")
        self._order(not (self._seen("Completed") or self._seen("Failed")), "Progressed after the run ended")
        self._order(all(seen.digest != digest for seen in self.progress), "the same Progressed twice")
        self.progress = (*self.progress, Progress(digest, value, size, at))

    def record_completed(
        self,
        output_digest: str,
        execution_ms: int | None = None,
        delay_ms: int | None = None,
        worker_id: str | None = None,
        metrics: dict[str, str] | None = None,
        items: int | None = None,
    ) -> None:
        """RunPod finished with output that passed the acceptance check. Next: release, or, for a
        job gated by an evaluator (`acceptance.evaluated_by`), its evaluation.

        A metered job (`price_per_item`) also records the `items` its output delivered and what they
        earn; it is released for that much, and an output that earns nothing is a failure
        (`record_failed`), not a completion."""
        if self.output_digest is not None:
            if self.output_digest == output_digest:
                return
            raise self._conflict("record completed", "a different output was already accepted")
        if self.failure is not None:
            raise self._conflict("record completed", f"the job already failed ({self.failure.reason})")
        self._guard("record completed", State.RUNNING)
        payout: Money | None = None
        if self.price_per_item is not None:
            if items is None:
                raise InvalidInput("items", "a metered job's completion must say how many items it delivered")
            payout = rules.metered_payout(self.budget, self.price_per_item, items)
            if payout == 0:
                raise self._conflict("record completed", f"{items} items earn nothing: record a failure")
        self.trigger_event(
            self.Completed,
            output_digest=output_digest,
            execution_ms=execution_ms,
            delay_ms=delay_ms,
            worker_id=worker_id,
            metrics=dict(metrics or {}),
        )
        if payout is not None:
            self.trigger_event(self.Metered, items=items, payout=payout)
        if self.acceptance.get("kind") == EVALUATED:
            self.trigger_event(self.EvaluationRequested, key=f"{self.job_key}:evaluate")
            return
        self.trigger_event(self.ReleaseRequested, key=f"{self.job_key}:release", method="release")

    @event(Completed)
    def _completed(
        self,
        output_digest: str,
        execution_ms: int | None,
        delay_ms: int | None,
        worker_id: str | None,
        metrics: dict[str, str],
    ) -> None:
        self._count("Completed")
        self._order(self._seen("Started"), "Completed without Started")
        self.output_digest = output_digest
        self.execution_ms = execution_ms
        self.delay_ms = delay_ms
        self.worker_id = worker_id
        self.metrics = metrics
        self.state = State.COMPLETED
        self.intent = None

    @event(Metered)
    def _metered(self, items: int, payout: Decimal) -> None:
        self._count("Metered")
        self._order(self._seen("Completed"), "Metered without Completed")
        self._order(self.price_per_item is not None, "Metered on a job without a price per item")
        self.metering = Metering(items, payout)

    @event(EvaluationRequested)
    def _evaluation_requested(self, key: str) -> None:
        self._order(self._seen("Completed"), "EvaluationRequested without Completed")
        self.intent = Intent(Step.EVALUATE, key)

    def record_evaluated(self, evaluator_job_id: str, score: object | None, reason: str = "") -> None:
        """The evaluator job ended: its score (None when it gave none) against the job's threshold.
        At or above it, next: release; below it, or without a score, next: refund."""
        score_ = None if score is None else score_text(score)
        threshold = str(self.acceptance.get("threshold", ""))
        passed = evaluation_passes(score_, threshold)
        if not reason:
            reason = (
                "the evaluator gave no score"
                if score_ is None
                else f"score {score_} {'meets' if passed else 'is below'} the threshold {threshold}"
            )
        if self.evaluation is not None:
            if self.evaluation == (evaluator_job_id, score_, threshold, passed, reason):
                return
            raise self._conflict("record evaluated", "a different evaluation was already recorded")
        self._guard("record evaluated", State.COMPLETED)
        if self.intent is None or self.intent.step != Step.EVALUATE:
            raise self._conflict("record evaluated", "the job is not waiting for an evaluation")
        self.trigger_event(
            self.Evaluated,
            evaluator_job_id=evaluator_job_id,
            score=score_,
            threshold=threshold,
            passed=passed,
            reason=reason,
        )
        if passed:
            self.trigger_event(self.ReleaseRequested, key=f"{self.job_key}:release", method="release")
        else:
            self.trigger_event(
                self.RefundRequested, key=f"{self.job_key}:refund", method=self.refund_method or "refund"
            )

    @event(Evaluated)
    def _evaluated(
        self, evaluator_job_id: str, score: str | None, threshold: str, passed: bool, reason: str
    ) -> None:
        self._count("Evaluated")
        self._order(self._seen("Completed"), "Evaluated without Completed")
        self._order(self.acceptance.get("kind") == EVALUATED, "Evaluated on a job without an evaluator")
        self.evaluation = Evaluation(evaluator_job_id, score, threshold, passed, reason)
        self.intent = None

    def record_failed(self, stage: str, runpod_status: str | None, reason: str) -> None:
        """The job did not succeed (RunPod failure, timeout, cancel, no output, rejected output).

        Next: refund the escrow.
        """
        if self.failure is not None:
            if self.failure == (stage, runpod_status, reason):
                return
            raise self._conflict("record failed", f"already failed: {self.failure.reason}")
        if self.output_digest is not None:
            raise self._conflict("record failed", "the job already completed")
        self._guard("record failed", State.FUNDED, State.RUNNING)
        self.trigger_event(self.Failed, stage=stage, runpod_status=runpod_status, reason=reason)
        # The method the job was opened with: the log says how the refund is asked for.
        self.trigger_event(
            self.RefundRequested, key=f"{self.job_key}:refund", method=self.refund_method or "refund"
        )

    @event(Failed)
    def _failed(self, stage: str, runpod_status: str | None, reason: str) -> None:
        self._count("Failed")
        self.failure = Failure(stage, runpod_status, reason)
        self.state = State.FAILED
        self.intent = None

    # ------------------------------------------------------------------ settlement

    @event(ReleaseRequested)
    def _release_requested(self, key: str, method: str) -> None:
        self.state = State.RELEASING
        self.intent = Intent(Step.RELEASE, key)

    def record_released(
        self, to_payee: object, fee: object, referral_fee: object, returned: object = ZERO
    ) -> None:
        """The escrow was released: the payee has `to_payee`, the service kept `fee`."""
        to_payee_ = to_money(to_payee, "to_payee")
        fee_ = to_money(fee, "fee")
        referral_ = to_money(referral_fee, "referral_fee")
        returned_ = to_money(returned, "returned")
        if self.released is not None:
            if self.released == (to_payee_, fee_, referral_, returned_):
                return
            raise self._conflict("record released", "a different release was already recorded")
        if self.refunded is not None:
            raise self._conflict("record released", "the escrow was already refunded")
        self._guard("record released", State.RELEASING)
        if to_payee_ + fee_ + returned_ != self.funded_amount:
            raise self._conflict(
                "record released",
                f"{fmt(to_payee_)} to the payee + {fmt(fee_)} fee + {fmt(returned_)} returned "
                f"is not the funded {fmt(self.funded_amount or ZERO)}",
            )
        if referral_ > fee_:
            raise self._conflict("record released", "the referral share exceeds the fee")
        self.trigger_event(
            self.Released, to_payee=to_payee_, fee=fee_, referral_fee=referral_, returned=returned_
        )

    @event(Released)
    def _released(self, to_payee: Decimal, fee: Decimal, referral_fee: Decimal, returned: Decimal) -> None:
        self._count("Released")
        self._order(self._seen("Completed"), "Released without Completed")
        self._order(
            self.acceptance.get("kind") != EVALUATED or self._evaluation_passed(),
            "Released without a passing Evaluated",
        )
        self._order(self._seen("Funded"), "Released without Funded")
        self._order(not self._seen("Refunded"), "Released after Refunded")
        self.released = Release(to_payee, fee, referral_fee, returned)
        self.state = State.RELEASED
        self.intent = None

    @event(RefundRequested)
    def _refund_requested(self, key: str, method: str) -> None:
        self.state = State.REFUNDING
        self.intent = Intent(Step.REFUND, key)

    def record_refunded(self, returned: object, fee_kept: object) -> None:
        """The escrow's money is back with the payer, less any fee the service kept."""
        returned_ = to_money(returned, "returned")
        fee_kept_ = to_money(fee_kept, "fee_kept")
        if self.refunded is not None:
            if self.refunded == (returned_, fee_kept_):
                return
            raise self._conflict("record refunded", "a different refund was already recorded")
        if self.released is not None:
            raise self._conflict("record refunded", "the escrow was already released")
        self._guard("record refunded", State.REFUNDING)
        if returned_ + fee_kept_ != self.funded_amount:
            raise self._conflict(
                "record refunded",
                f"{fmt(returned_)} returned + {fmt(fee_kept_)} kept is not the funded "
                f"{fmt(self.funded_amount or ZERO)}",
            )
        self.trigger_event(self.Refunded, returned=returned_, fee_kept=fee_kept_)

    @event(Refunded)
    def _refunded(self, returned: Decimal, fee_kept: Decimal) -> None:
        self._count("Refunded")
        self._order(
            self._seen("Failed") or (self.evaluation is not None and not self.evaluation.passed),
            "Refunded without Failed or a failing Evaluated",
        )
        self._order(self._seen("Funded"), "Refunded without Funded")
        self._order(not self._seen("Released"), "Refunded after Released")
        self.refunded = Refund(returned, fee_kept)
        self.state = State.REFUNDED
        self.intent = None

    def record_refunded_by_service(self, returned: object, fee_kept: object, reason: str) -> None:
        """The escrow service returned the money on its own (timeout sweep) before a release.

        The job cannot be paid any more: it is recorded as failed at the release stage and refunded.
        """
        if self.refunded is not None:
            self.record_refunded(returned, fee_kept)
            return
        self._guard("record refunded by service", State.RELEASING, State.REFUNDING)
        returned_, fee_kept_ = to_money(returned, "returned"), to_money(fee_kept, "fee_kept")
        if returned_ + fee_kept_ != self.funded_amount:
            # Checked before anything is recorded: a command either records all or nothing.
            raise self._conflict(
                "record refunded by service",
                f"{fmt(returned_)} returned + {fmt(fee_kept_)} kept is not the funded "
                f"{fmt(self.funded_amount or ZERO)}",
            )
        if self.state == State.RELEASING:
            self.trigger_event(self.Failed, stage="release", runpod_status=None, reason=reason)
            self.trigger_event(self.RefundRequested, key=f"{self.job_key}:refund", method="service")
        self.record_refunded(returned, fee_kept)

    # ------------------------------------------------------------------ bonus

    def request_bonus(
        self, base_metric: Decimal, achieved_metric: Decimal, pool: object, threshold: Decimal
    ) -> rules.BonusDecision:
        """Grant the product page's performance bonus on a released job, once."""
        pool_ = to_money(pool, "pool")
        decision = rules.bonus(base_metric, achieved_metric, pool_, threshold)
        if self.bonus_amount is not None:
            if self.bonus_amount == decision.amount and self.bonus_terms == (
                pool_,
                str(base_metric),
                str(achieved_metric),
                str(threshold),
            ):
                return decision
            raise self._conflict("award bonus", f"a bonus of {fmt(self.bonus_amount)} was already granted")
        self._guard("award bonus", State.RELEASED, detail="a bonus is paid only on a released job")
        if self.bonus_pool is not None and pool_ > self.bonus_pool:
            raise self._conflict(
                "award bonus", f"pool {fmt(pool_)} exceeds the job's bonus terms of {fmt(self.bonus_pool)}"
            )
        if decision.granted:
            self.trigger_event(
                self.BonusRequested,
                key=f"{self.job_key}:bonus",
                amount=decision.amount,
                pool=pool_,
                base_metric=str(base_metric),
                achieved_metric=str(achieved_metric),
                threshold=str(threshold),
            )
        return decision

    @event(BonusRequested)
    def _bonus_requested(
        self, key: str, amount: Money, pool: Decimal, base_metric: str, achieved_metric: str, threshold: str
    ) -> None:
        self._order(self._seen("Released"), "BonusRequested without Released")
        self.bonus_amount = amount
        self.bonus_terms = BonusTerms(pool, base_metric, achieved_metric, threshold)
        self.intent = Intent(Step.BONUS_FUND, key)

    def record_bonus_funded(self, escrow_id: str, amount: object, fee: object, net: object) -> None:
        check_id(escrow_id, "escrow_id")
        amount_, fee_, net_ = to_money(amount, "amount"), to_money(fee, "fee"), to_money(net, "net")
        if self.bonus_escrow_id is not None:
            if self.bonus_funded == (escrow_id, amount_, fee_, net_):
                return
            raise self._conflict("record bonus funded", f"already funded by escrow {self.bonus_escrow_id}")
        self._refuse_during_attention("record bonus funded")
        if self.intent is None or self.intent.step != Step.BONUS_FUND:
            raise IllegalTransition(self.id, self.state, "record bonus funded", "no bonus is being funded")
        expected = rules.split(amount_, dialect=self.dialect)
        if amount_ != self.bonus_amount or (fee_, net_) != (expected.fee, expected.net):
            raise self._conflict(
                "record bonus funded",
                f"bonus escrow {fmt(amount_)} (fee {fmt(fee_)}) differs from the granted "
                f"{fmt(self.bonus_amount or ZERO)} (fee {fmt(expected.fee)})",
            )
        self.trigger_event(self.BonusFunded, escrow_id=escrow_id, amount=amount_, fee=fee_, net=net_)

    @event(BonusFunded)
    def _bonus_funded(self, escrow_id: str, amount: Decimal, fee: Decimal, net: Decimal) -> None:
        self._count("BonusFunded")
        self.bonus_escrow_id = escrow_id
        self.bonus_funded = BonusFunding(escrow_id, amount, fee, net)
        self.intent = Intent(Step.BONUS_RELEASE, f"{self.job_key}:bonus_release")

    def record_bonus_awarded(self, to_payee: object, fee: object, referral_fee: object) -> None:
        to_payee_, fee_ = to_money(to_payee, "to_payee"), to_money(fee, "fee")
        referral_ = to_money(referral_fee, "referral_fee")
        if self.bonus_awarded is not None:
            awarded = self.bonus_awarded
            if (awarded.to_payee, awarded.fee, awarded.referral_fee) == (to_payee_, fee_, referral_):
                return
            raise self._conflict("record bonus awarded", "a different bonus payment was already recorded")
        self._refuse_during_attention("record bonus awarded")
        if self.intent is None or self.intent.step != Step.BONUS_RELEASE or self.bonus_funded is None:
            raise IllegalTransition(self.id, self.state, "record bonus awarded", "no bonus escrow to release")
        if to_payee_ + fee_ != self.bonus_funded.amount:
            raise self._conflict("record bonus awarded", "payee share + fee is not the bonus escrow's amount")
        self.trigger_event(
            self.BonusAwarded,
            escrow_id=self.bonus_escrow_id or "",
            amount=self.bonus_funded.amount,
            to_payee=to_payee_,
            fee=fee_,
            referral_fee=referral_,
        )

    @event(BonusAwarded)
    def _bonus_awarded(
        self, escrow_id: str, amount: Decimal, to_payee: Decimal, fee: Decimal, referral_fee: Decimal
    ) -> None:
        self._count("BonusAwarded")
        self._order(self._seen("Released"), "BonusAwarded without Released")
        self.bonus_awarded = BonusAward(amount, to_payee, fee, referral_fee)
        self.intent = None

    # ------------------------------------------------------------------ attention

    def raise_attention(self, step: Step, reason: str, known: dict[str, str] | None = None) -> None:
        """Park an ambiguous outcome for an operator; nothing more happens to the job until resolved."""
        if self.state == State.ATTENTION:
            return
        if self.intent is None or self.intent.step != step:
            raise IllegalTransition(
                self.id, self.state, f"raise attention on {step}", "no such intent is open"
            )
        self.trigger_event(self.AttentionRaised, step=str(step), reason=reason, known=dict(known or {}))

    @event(AttentionRaised)
    def _attention_raised(self, step: str, reason: str, known: dict[str, str]) -> None:
        self._count("AttentionRaised")
        self.state_before_attention = self.state
        self.attention = {"step": step, "reason": reason, **known}
        self.state = State.ATTENTION

    def resolve(self, finding: str, operator: str, *, retry: bool = False) -> Step:
        """An operator settles an ATTENTION job with what they found.

        The job returns to the state it was in, so the outcome that the operator found (funded, not
        funded, released, refunded) is then recorded with the ordinary command, in the same save.
        With `retry`, the intent is executed again: only for an operator who checked that the first
        call had no effect.
        """
        self._guard("resolve", State.ATTENTION)
        if not finding.strip():
            raise InvalidInput("finding", "is required")
        check_id(operator, "operator")
        assert self.intent is not None  # an ATTENTION job always has the intent it stopped on
        step = self.intent.step
        self.trigger_event(self.Resolved, step=str(step), finding=finding, operator=operator, retry=retry)
        return step

    @event(Resolved)
    def _resolved(self, step: str, finding: str, operator: str, retry: bool) -> None:
        self._count("Resolved")
        self.state = self.state_before_attention or self.state
        self.state_before_attention = None
        self.attention = None
        if retry and self.intent is not None:
            self.intent = Intent(self.intent.step, self.intent.key)

    # ------------------------------------------------------------------ audit

    def violations(self, *, quiescent: bool = False) -> list[str]:
        """Every invariant of DESIGN.md that this job's history breaks (empty when it is sound).

        `quiescent` adds the rule that holds only when no engine is working: every funded job ends
        released, refunded or in ATTENTION.
        """
        found = list(self.order_violations)
        for name in (
            "Funded",
            "Released",
            "Refunded",
            "Completed",
            "Metered",
            "Failed",
            "BonusFunded",
            "BonusAwarded",
            "Evaluated",
        ):
            if self.counts.get(name, 0) > 1:
                found.append(f"{name} recorded {self.counts[name]} times")
        if self._seen("Released") and self._seen("Refunded"):
            found.append("both Released and Refunded")
        failed_before_release = self.failure is not None and self.failure.stage != "release"
        if self._seen("Completed") and self._seen("Failed") and failed_before_release:
            found.append("both Completed and Failed")
        funded = self.funded_amount
        if funded is not None:
            if funded != self.budget:
                found.append(f"funded {fmt(funded)} is not the budget {fmt(self.budget)}")
            if self.fee is not None and self.net is not None and self.fee + self.net != funded:
                found.append("fee + net is not the funded amount")
            expected = rules.split(funded, dialect=self.dialect)
            if (self.fee, self.net) != (expected.fee, expected.net):
                found.append(
                    f"funded fee {fmt(self.fee or ZERO)} / net {fmt(self.net or ZERO)} are not the "
                    f"{self.dialect or 'exact'} rule's {fmt(expected.fee)} / {fmt(expected.net)}"
                )
        if self.metering is not None and self.price_per_item is not None:
            items, payout = self.metering
            if payout != rules.metered_payout(self.budget, self.price_per_item, items):
                found.append(
                    f"metered payout {fmt(payout)} is not min(budget, {items} items x "
                    f"{fmt(self.price_per_item)})"
                )
        if self.released is not None:
            release = self.released
            if funded is None or release.to_payee + release.fee + release.returned != funded:
                found.append("released to payee + fee + returned is not the funded amount")
            # A metered job's release pays exactly what it earned. (An unmetered one may be released
            # in part by an operator's settlement: its split is checked above.)
            earned = release_amount(funded, self.metering)
            if self.price_per_item is not None and self.metering is None:
                found.append("a metered job released without its Metered count")
            elif self.metering is not None and release.to_payee + release.fee != earned:
                found.append(
                    f"released {fmt(release.to_payee + release.fee)} (payee + fee), not the "
                    f"{fmt(earned)} the job earned"
                )
            if release.referral_fee > release.fee:
                found.append("referral share above the fee")
        if self.evaluation is not None:
            verdict = self.evaluation
            if verdict.passed != evaluation_passes(verdict.score, verdict.threshold):
                found.append(
                    f"evaluation of score {verdict.score} against {verdict.threshold} recorded as "
                    f"{'passed' if verdict.passed else 'failed'}"
                )
            if verdict.threshold != str(self.acceptance.get("threshold", "")):
                found.append("evaluated against another threshold than the job's")
        if self.refunded is not None:
            refund = self.refunded
            if funded is None or refund.returned + refund.fee_kept != funded:
                found.append("refunded + fee kept is not the funded amount")
        if len(self.progress) > MAX_PROGRESS:
            found.append(f"Progressed recorded {len(self.progress)} times, over the bound of {MAX_PROGRESS}")
        if self.bonus_amount is not None:
            terms = self.bonus_terms
            if terms is not None and self.bonus_amount > terms.pool:
                found.append("bonus above its pool")
            if self.bonus_pool is not None and self.bonus_amount > self.bonus_pool:
                found.append("bonus above the job's bonus terms")
        if self.bonus_awarded is not None:
            award = self.bonus_awarded
            if self.bonus_amount is None or award.amount != self.bonus_amount:
                found.append("bonus awarded differs from the bonus granted")
            if award.to_payee + award.fee != award.amount:
                found.append("bonus paid + fee is not the bonus amount")
        if (
            quiescent
            and self._seen("Funded")
            and self.state
            not in (
                State.RELEASED,
                State.REFUNDED,
                State.ATTENTION,
            )
        ):
            found.append(f"funded job left in {self.state}")
        if quiescent and self.state == State.RELEASED and self.intent is not None:
            found.append(f"bonus left in flight at {self.intent.step}")
        return found

    def view(self) -> JobView:
        return JobView._make(_VIEW_VALUES(self))

    def summary(self) -> dict[str, Any]:
        """The job as plain data (amounts as strings), for reports and JSON output."""
        return job_json(self.view())


# The events after which a job rests (`rests` holds), when no other event followed them: the engine's
# recovery reads them off the log without loading the jobs.
RESTING_EVENTS = (
    EscrowJob.Released,
    EscrowJob.Refunded,
    EscrowJob.FundingRejected,
    EscrowJob.BonusAwarded,
    EscrowJob.AttentionRaised,
)


def warnings_of(referral: str | None, released: Release | None) -> list[str]:
    """A referral code the service ignored: the release paid no referrer its share (the service
    matches only its agents' `ref_` codes, and says nothing when a code matches none)."""
    if referral and released is not None and released.referral_fee == 0 and released.fee > 0:
        return [f"referral code {referral!r} earned no share: the escrow service ignored it"]
    return []


def reason_of(view: JobView) -> str | None:
    """Why the job is not (yet) paid: the operator's question, the failure, or the rejection."""
    if view.attention:
        return view.attention.get("reason")
    if view.failure is not None:
        return view.failure.reason
    if view.evaluation is not None and not view.evaluation.passed:
        return view.evaluation.reason
    return view.rejection


def job_json(view: JobView) -> dict[str, Any]:
    """A job in the words of every JSON output (`run`, `status`, `jobs`): its status, and where its
    money is under the names of the totals (amounts as strings with 6 places)."""
    data: dict[str, Any] = {
        "job_id": str(view.job_id),
        "job_key": view.job_key,
        "batch_id": view.batch_id,
        "endpoint_id": view.endpoint_id,
        "payer": view.payer,
        "payee": view.payee,
        "status": str(view.status),
        "state": str(view.state),
        "budget": fmt(view.budget),
        "escrow_id": view.escrow_id,
        "runpod_job_id": view.runpod_job_id,
    }
    data.update({name: fmt(value) for name, value in zip(JobMoney._fields, view.money, strict=True)})
    data["reason"] = reason_of(view)
    data["warnings"] = view.warnings
    data["attention"] = view.attention
    data["intent"] = None if view.intent is None else str(view.intent.step)
    data["progress"] = progress_json(view)
    data["evaluation"] = None if view.evaluation is None else view.evaluation._asdict()
    data["version"] = view.version
    return data


def progress_json(view: JobView) -> list[dict[str, Any]]:
    """The progress values the job reported, in the order they were seen (the `status` timeline)."""
    return [
        {
            "at": None if item.at is None else item.at.isoformat(),
            "value": item.value,
            "size": item.size,
            "digest": item.digest,
        }
        for item in view.progress
    ]
