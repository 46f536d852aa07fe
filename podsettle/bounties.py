"""Training bounties: one reserved amount, several pods racing for it, the winner paid once.

    bounty_id = await engine.post_bounty("train", "5.00", target="0.9")
    result = await engine.race_bounty(bounty_id, [Pod("pod-a", {"seed": 1}), Pod("pod-b", {"seed": 2})])

How the money moves, and why:

- Posting records the reservation (`Bounty.Posted`) in the event log; no escrow exists yet, because
  the hosted escrow fixes its payee when it is created and the winner is not known. The engine counts
  the reservation against the payer's budget (`Settings.payer_budget`, PODSETTLE_PAYER_BUDGET: see
  `Commitments`) until the bounty is paid or expires, so no other job can spend it meanwhile.
- The pods run as plain RunPod jobs (no escrow of their own: a losing pod is not paid). Each report
  that reaches the target, a progress value (`runpod.serverless.progress_update`) or the final
  output, is a candidate; the claim takes the earliest of those in hand, a tie going to the smaller
  RunPod job id. The bounty is claimed at most once (the aggregate refuses a second claim), so it is
  paid at most once; the other pods are cancelled on RunPod.
- The claim opens the payout: an escrow created for the winner's payee and released at once (each
  call recorded as an attempt before it is made). A 402 (the payer's balance is short) or 429 (rate
  limited) did nothing and is retried until the bounty's deadline; after it, the bounty waits in
  ATTENTION with the reason, its reservation still counted, for an operator.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import get_topic

from podsettle.adapters.ports import (
    AmountMismatch,
    BadResponse,
    ComputeGateway,
    Conflict,
    EscrowGateway,
    EscrowStatus,
    Forbidden,
    GatewayError,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    Rejected,
    Unauthorized,
    Unavailable,
)
from podsettle.application import Settlements
from podsettle.domain import EscrowJob
from podsettle.domain.bounty import Bounty, BountyState, Claim, PayoutStep, Report
from podsettle.domain.digests import canonical_json
from podsettle.domain.errors import DomainError, InvalidInput
from podsettle.domain.money import ZERO, fmt
from podsettle.domain.rules import split
from podsettle.projections.follower import LogFollower
from podsettle.support.logs import get_logger

log = get_logger("podsettle.bounties")
MAX_RACE_RETRIES = 20


class BudgetExceeded(DomainError):
    """Opening this job or posting this bounty would commit more than the payer's budget."""

    def __init__(self, asked: Decimal, committed: Decimal, budget: Decimal) -> None:
        self.asked, self.committed, self.budget = asked, committed, budget
        super().__init__(
            f"{fmt(asked)} USDC asked, {fmt(committed)} of the payer's budget of {fmt(budget)} USDC "
            f"already committed (jobs and reserved bounties); nothing was opened"
        )


@dataclass(frozen=True)
class Pod:
    """One racer: its name, the input its RunPod job gets, and who is paid if it wins (the
    engine's default payee when None)."""

    name: str
    job_input: Mapping[str, Any]
    payee: str | None = None


@dataclass(frozen=True)
class BountyResult:
    bounty_id: uuid.UUID
    bounty_key: str
    state: BountyState
    amount: Decimal
    winner: Claim | None
    losers: tuple[str, ...]
    escrow_id: str | None
    to_payee: Decimal
    fee: Decimal
    reason: str | None  # why it expired or waits for an operator

    @property
    def paid(self) -> bool:
        return self.state == BountyState.PAID

    @classmethod
    def of(cls, bounty: Bounty) -> BountyResult:
        to_payee, fee, _ = bounty.paid or (ZERO, ZERO, ZERO)
        reason = bounty.attention["reason"] if bounty.attention else bounty.expiry
        return cls(
            bounty.id,
            bounty.bounty_key,
            bounty.state,
            bounty.amount,
            bounty.claim,
            bounty.losers,
            bounty.escrow_id,
            to_payee,
            fee,
            reason,
        )


# ---------------------------------------------------------------------------------- the budget

_OPENED, _REJECTED = get_topic(EscrowJob.Opened), get_topic(EscrowJob.FundingRejected)
_REFUNDED, _RELEASED = get_topic(EscrowJob.Refunded), get_topic(EscrowJob.Released)
_BONUS = get_topic(EscrowJob.BonusRequested)
_POSTED, _EXPIRED = get_topic(Bounty.Posted), get_topic(Bounty.Expired)


@dataclass
class Commitments:
    """What one payer has committed, counted from the event log: every job's budget from its opening
    (less what came back: a rejected funding, a refund, the unspent part of a release), every bonus
    granted, and every bounty's amount from its posting until it expires. Paid amounts and fees stay
    counted: the budget is what the payer entrusts to the engine over the store's life, and a
    reserved bounty is a part of it that no job may take. Read on from where it stopped each call."""

    app: Settlements
    payer: str
    position: int = 0
    committed: Decimal = ZERO
    _mine: set[uuid.UUID] = field(default_factory=set)

    def catch_up(self) -> Decimal:
        topics = [_OPENED, _REJECTED, _REFUNDED, _RELEASED, _BONUS, _POSTED, _EXPIRED]
        follower = LogFollower(self.app.recorder, topics=topics, page_size=1000)
        for page in follower.pages_after(self.position):
            for note in page.notifications:
                event: Any = self.app.mapper.to_domain_event(note)
                owner = note.originator_id
                owner = owner if isinstance(owner, uuid.UUID) else uuid.UUID(str(owner))
                if note.topic in (_OPENED, _POSTED):
                    if event.payer == self.payer:
                        self._mine.add(owner)
                        self.committed += event.budget if note.topic == _OPENED else event.amount
                elif owner not in self._mine:
                    continue
                elif note.topic == _REJECTED:
                    self.committed -= self.app.repository.get(owner, version=1).budget
                elif note.topic in (_REFUNDED, _RELEASED):
                    self.committed -= event.returned
                elif note.topic == _BONUS:
                    self.committed += event.amount
                elif note.topic == _EXPIRED:
                    self.committed -= self.app.repository.get(owner, version=1).amount
            self.position = page.position
        return self.committed


class BudgetGuard:
    """Admits new spending against `budget` (None: no budget, nothing is refused). Holds a lock from
    the check until the spending is in the log, so concurrent calls of one engine cannot both pass
    on the same remainder (engines in other processes are not serialised with it)."""

    def __init__(
        self, app: Settlements, payer: str, budget: Decimal | None, call: Callable[..., Any]
    ) -> None:
        self.budget = budget
        self.commitments = Commitments(app, payer)
        self._call = call  # runs a store function on the store thread
        self._lock = asyncio.Lock()

    async def committed(self) -> Decimal:
        value: Decimal = await self._call(self.commitments.catch_up)
        return value

    async def admit(self, asked: Decimal, record: Callable[[], Awaitable[Any]], *, new: bool = True) -> Any:
        """Check `asked` against what is left, then `record` it (under the lock)."""
        if self.budget is None or not new:
            return await record()
        async with self._lock:
            committed = await self.committed()
            if committed + asked > self.budget:
                raise BudgetExceeded(asked, committed, self.budget)
            return await record()


# ---------------------------------------------------------------------------------- the saga


class Bounties:
    """Posts bounties, runs their races and pays their winners (the engine's `*_bounty` methods)."""

    def __init__(
        self,
        app: Settlements,
        escrow: EscrowGateway,
        compute: ComputeGateway,
        *,
        payer: str,
        call: Callable[[Callable[[], Any]], Awaitable[Any]],
        clock: Callable[[], datetime],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry_s: float = 0.05,
        retry_cap_s: float = 5.0,
    ) -> None:
        self.app, self.escrow, self.compute = app, escrow, compute
        self.payer, self.clock, self.sleep = payer, clock, sleep
        self._call = call
        self.retry_s, self.retry_cap_s = retry_s, retry_cap_s
        self._paying: dict[uuid.UUID, asyncio.Lock] = {}

    # ------------------------------------------------------------------ the store

    def _get(self, bounty_id: uuid.UUID) -> Bounty:
        try:
            bounty: Bounty = self.app.repository.get(bounty_id)
        except AggregateNotFoundError:
            raise InvalidInput("bounty_id", f"no bounty {bounty_id}") from None
        return bounty

    async def load(self, bounty_id: uuid.UUID) -> Bounty:
        bounty: Bounty = await self._call(lambda: self._get(bounty_id))
        return bounty

    async def execute(self, bounty_id: uuid.UUID, command: Callable[[Bounty], Any]) -> tuple[Any, Bounty]:
        """Apply `command` to a fresh copy and save it; a save that lost a race is redone."""

        def run() -> tuple[Any, Bounty]:
            for _ in range(MAX_RACE_RETRIES):
                bounty = self._get(bounty_id)
                result = command(bounty)
                try:
                    self.app.save(bounty)
                except IntegrityError:
                    continue
                return result, bounty
            raise RuntimeError(f"bounty {bounty_id}: gave up after {MAX_RACE_RETRIES} concurrent updates")

        outcome: tuple[Any, Bounty] = await self._call(run)
        return outcome

    async def post(self, bounty: Bounty) -> uuid.UUID:
        """Save a new bounty; the same key posted again with the same terms finds the first."""

        def run() -> uuid.UUID:
            try:
                self.app.save(bounty)
            except IntegrityError:
                existing = self._get(bounty.id)
                terms = ("payer", "endpoint_id", "amount", "metric", "target")
                if any(getattr(existing, t) != getattr(bounty, t) for t in terms):
                    raise InvalidInput("bounty_key", f"{bounty.bounty_key!r} posted other terms") from None
            return bounty.id

        bounty_id: uuid.UUID = await self._call(run)
        return bounty_id

    # ------------------------------------------------------------------ the race

    async def race(self, bounty_id: uuid.UUID, pods: Sequence[Pod], default_payee: str) -> BountyResult:
        """Run the pods, claim the bounty for the first that reaches the target, cancel the others,
        pay the winner; or let the bounty expire when none does before its deadline."""
        bounty = await self.load(bounty_id)
        if bounty.state != BountyState.POSTED:
            return await self.pay(bounty_id)
        if not pods or len({p.name for p in pods}) != len(pods):
            raise InvalidInput("pods", "give at least one pod, each with its own name")
        remaining = (bounty.deadline - self.clock()).total_seconds()
        if remaining < 5:
            await self.execute(bounty_id, lambda b: b.expire("less than 5 s left before the deadline"))
            return BountyResult.of(await self.load(bounty_id))
        timeout_ms = int(remaining * 1000)

        async def submit(pod: Pod) -> tuple[Pod, str]:
            body = canonical_json(dict(pod.job_input), "job_input")
            run_id = await self.compute.submit(
                bounty.endpoint_id, body, execution_timeout_ms=timeout_ms, ttl_ms=timeout_ms + 60_000
            )
            return pod, run_id

        started = await asyncio.gather(*(submit(pod) for pod in pods))

        def enter_all(b: Bounty) -> None:
            for pod, run_id in started:
                b.enter(pod.name, run_id, pod.payee or default_payee)

        await self.execute(bounty_id, enter_all)
        reports: asyncio.Queue[Report | None] = asyncio.Queue()

        def offer(pod: Pod, run_id: str, value: Any) -> None:
            number = _metric(value, bounty.metric)
            if number is not None and bounty.reaches(number):
                reports.put_nowait(Report(run_id, pod.name, pod.payee or default_payee, number, self.clock()))

        async def watch(pod: Pod, run_id: str) -> None:
            async def on_progress(value: Any) -> None:
                offer(pod, run_id, value)

            try:
                outcome = await self.compute.wait(
                    bounty.endpoint_id, run_id, timeout_s=remaining, on_progress=on_progress
                )
                if outcome.succeeded:
                    offer(pod, run_id, outcome.state.output)
            except GatewayError as error:  # a pod RunPod lost: out of the race
                log.warning(
                    "bounty.pod_lost", bounty_id=str(bounty_id), runpod_job_id=run_id, error=str(error)
                )
            finally:
                reports.put_nowait(None)

        watchers = [asyncio.ensure_future(watch(pod, run_id)) for pod, run_id in started]
        claim: Claim | None = None
        ended = 0
        try:
            while claim is None and ended < len(watchers):
                left = (bounty.deadline - self.clock()).total_seconds()
                try:
                    first = await asyncio.wait_for(reports.get(), timeout=max(left, 0.0))
                except TimeoutError:
                    break
                # Everything already reported is considered together: a tie is broken by time, then id.
                batch = [first]
                while not reports.empty():
                    batch.append(reports.get_nowait())
                ended += sum(1 for item in batch if item is None)
                candidates = [item for item in batch if item is not None]
                if candidates:
                    claim, _ = await self.execute(bounty_id, partial(Bounty.claim_with, reports=candidates))
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        if claim is None:
            reason = "no pod reached the target" if ended >= len(watchers) else "the deadline passed"
            await self.execute(bounty_id, lambda b: b.expire(reason))
            for _, run_id in started:
                await self._cancel(bounty.endpoint_id, run_id)
            return BountyResult.of(await self.load(bounty_id))
        for _, run_id in started:
            if run_id != claim.runpod_job_id:
                await self._cancel(bounty.endpoint_id, run_id)
        return await self.pay(bounty_id)

    async def _cancel(self, endpoint_id: str, run_id: str) -> None:
        try:
            await self.compute.cancel(endpoint_id, run_id)
        except GatewayError as error:  # best effort: a loser is not paid whether or not it stops
            log.warning("bounty.cancel_failed", runpod_job_id=run_id, error=str(error))

    async def claim(self, bounty_id: uuid.UUID, reports: Sequence[Report]) -> BountyResult:
        """Claim with reports gathered elsewhere (a worker reporting out of band), then pay."""
        await self.execute(bounty_id, lambda b: b.claim_with(list(reports)))
        return await self.pay(bounty_id)

    # ------------------------------------------------------------------ the payout

    async def pay(self, bounty_id: uuid.UUID) -> BountyResult:
        """Carry the claimed bounty's payout to its end: paid, or ATTENTION past the deadline."""
        lock = self._paying.setdefault(bounty_id, asyncio.Lock())
        async with lock:  # one payout loop per bounty in this engine
            bounty = await self.load(bounty_id)
            if bounty.attempts > 0:
                bounty = await self._confirm(bounty)
            reason = ""
            delay = self.retry_s
            while bounty.state in (BountyState.CLAIMED, BountyState.FUNDED):
                step = bounty.step
                assert step is not None
                _, bounty = await self.execute(
                    bounty_id, partial(Bounty.record_attempt, step=step, reason=reason)
                )
                try:
                    command = await (
                        self._create(bounty) if step == PayoutStep.CREATE else self._release(bounty)
                    )
                except (RateLimited, Rejected, Unavailable) as error:
                    # Certainly did nothing (a 402, a 429, a request never sent): again, until the deadline.
                    code = getattr(error, "status_code", None) or (
                        429 if isinstance(error, RateLimited) else None
                    )
                    reason = f"{step}: {type(error).__name__} {code or ''}: {error}".strip()
                    if self.clock() >= bounty.deadline:
                        problem = f"past the deadline; last: {reason}"
                        _, bounty = await self.execute(
                            bounty_id, partial(Bounty.raise_attention, reason=problem)
                        )
                        break
                    wait = max(
                        delay, getattr(error, "retry_after", 0.0) if isinstance(error, RateLimited) else 0.0
                    )
                    left = (bounty.deadline - self.clock()).total_seconds()
                    await self.sleep(min(wait, max(left, 0.0)))
                    delay = min(delay * 2, self.retry_cap_s)
                    continue
                except (OutcomeUnknown, BadResponse) as error:
                    log.warning("bounty.outcome_unknown", bounty_id=str(bounty_id), error=str(error))
                    bounty = await self._confirm(bounty)
                    continue
                _, bounty = await self.execute(bounty_id, command)
            self._paying.pop(bounty_id, None)
            return BountyResult.of(bounty)

    async def _create(self, bounty: Bounty) -> Callable[[Bounty], Any]:
        assert bounty.claim is not None
        refused: tuple[str, ...] = ()
        try:
            receipt = await self.escrow.create(
                key=f"{bounty.bounty_key}:payout",
                payee=bounty.claim.payee,
                amount=bounty.amount,
                description=f"Training bounty {bounty.bounty_key} won by {bounty.claim.pod}",
                timeout_hours=1,
                metadata={"bounty_id": str(bounty.id), "runpod_job_id": bounty.claim.runpod_job_id},
            )
        except Rejected as error:
            if error.status_code in (402, 429):
                raise
            refused = (f"payout escrow refused: {error}",)
        except (Unauthorized, Forbidden, AmountMismatch) as error:
            refused = (f"payout escrow refused: {type(error).__name__}: {error}",)
        if refused:
            return lambda b: b.raise_attention(refused[0])
        escrow_id, amount, fee, net = receipt.escrow_id, receipt.amount, receipt.fee, receipt.net
        return lambda b: b.record_funded(escrow_id, amount, fee, net)

    async def _release(self, bounty: Bounty) -> Callable[[Bounty], Any]:
        assert bounty.escrow_id is not None
        try:
            settlement = await self.escrow.release(
                bounty.escrow_id, key=f"{bounty.bounty_key}:payout_release", expected=split(bounty.amount)
            )
        except Rejected as error:
            if error.status_code in (402, 429):
                raise
            problem = f"payout release refused: {error}"
            return lambda b: b.raise_attention(problem)
        except (Conflict, NotFound, Unauthorized, Forbidden, AmountMismatch) as error:
            found = await self._confirm_release(bounty)
            if found is not None:
                return found
            problem = f"payout release refused: {type(error).__name__}: {error}"
            return lambda b: b.raise_attention(problem)
        to_payee, fee, referral = settlement.to_payee, settlement.fee, settlement.referral_fee
        return lambda b: b.record_paid(to_payee, fee, referral)

    async def _confirm_release(self, bounty: Bounty) -> Callable[[Bounty], Any] | None:
        assert bounty.escrow_id is not None
        view = await self.escrow.get(bounty.escrow_id)
        if view.status != EscrowStatus.RELEASED:
            return None
        to_payee, fee = view.net, view.fee
        return lambda b: b.record_paid(to_payee, fee, ZERO)

    async def _confirm(self, bounty: Bounty) -> Bounty:
        """An attempt whose outcome is not known (a crash, a lost answer): ask the service."""
        if bounty.state == BountyState.FUNDED:
            # Releasing one escrow twice cannot pay twice: look, else the loop releases again.
            try:
                found = await self._confirm_release(bounty)
            except GatewayError:
                found = None
            return (await self.execute(bounty.id, found))[1] if found is not None else bounty
        if bounty.state != BountyState.CLAIMED:
            return bounty
        try:
            view = await self.escrow.find_by_key(f"{bounty.bounty_key}:payout")
        except (NotImplementedError, GatewayError):
            problem = "a payout escrow may have been created: find it by the bounty's id in its metadata"
            return (await self.execute(bounty.id, lambda b: b.raise_attention(problem)))[1]
        if view is None:
            return bounty  # nothing was created: the loop creates it
        escrow_id, amount, fee, net = view.escrow_id, view.amount, view.fee, view.net
        return (await self.execute(bounty.id, lambda b: b.record_funded(escrow_id, amount, fee, net)))[1]


def _metric(value: Any, name: str) -> Decimal | None:
    """The metric out of a report (a progress value or an output): a dict's number, exactly."""
    if not isinstance(value, Mapping):
        return None
    raw = value.get(name)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str | Decimal):
        return None
    try:
        number = Decimal(repr(raw) if isinstance(raw, float) else str(raw))  # float-ok: a metric, not money
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def bounty_deadline(now: datetime, deadline_s: float) -> datetime:
    if not 5 <= deadline_s <= 7 * 24 * 3600:
        raise InvalidInput("deadline_s", f"must be between 5 s and 7 days, got {deadline_s}")
    return now + timedelta(seconds=deadline_s)
