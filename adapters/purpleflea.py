"""The escrow port over Purple Flea's HTTP API (contracts/purpleflea-escrow.md).

`PurpleFleaEscrow` holds the flow both dialects share; one subclass per dialect holds its routes, and
`purple_flea(dialect=...)` builds the one named:

- `"v1"` (`PurpleFleaV1`), the routes the published server implements: `POST /escrow/create`,
  `/escrow/complete/{id}`, `/escrow/release/{id}`, `/escrow/dispute/{id}`, `GET /escrow/{id}`. It has
  no idempotency key, no lookup by key and no cancel: money comes back to the payer only through the
  timeout sweep (the escrow's timeout plus up to 5 minutes, the commission kept; the default) or, after
  a dispute, through Purple Flea's staff (the published service has no route that resolves one), so
  `refund()` asks for it by the job's recorded method (`method`, else `refund_method`) and reports the
  refund only once a read shows the escrow `refunded`, raising `EscrowPending` until then. Its amounts
  follow the service's float arithmetic (rules.py, dialect "v1"). `verify_payer()` tells whether the
  key belongs to an agent without being able to fund anything (contracts/purpleflea-escrow.md).
- `"seed"` (`PurpleFleaSeed`), the routes of the product page: `POST /api/escrow/create|release|cancel`.
  Its responses carry no amounts and it has no read route, so the adapter computes the split itself
  from the fee rules, `get()` raises NotImplementedError, and after a create nothing is read back.
  `cancel` returns the whole amount to the payer (no commission). To build the refund's `Settlement`
  the adapter remembers the amount of each escrow it created; after a restart, tell it with `expect()`.

Every response is validated with pydantic (unknown fields such as `_info` ignored). Amounts arrive as
JSON numbers; the raw text is parsed with `parse_float=Decimal`, so a float never holds them. An
amount that is not valid money (negative, more than 6 decimals, not a number) makes the body
untrustworthy; valid amounts that differ from the dialect's `rules.split` raise `AmountMismatch`. A
referral code that is not in the service's own form (`ref_` and 8 hex digits) is refused before sending:
the service would ignore it without a word.

What the engine can act on (statuses and transport failures map through adapters/http.py's table):
- create: 400/402/404 `Rejected` (nothing moved); 401 `Unauthorized`; 403 `Forbidden`;
  429 `RateLimited` (nothing moved); a timeout after sending, a dropped connection, a 5xx or a 2xx
  whose body cannot be trusted `OutcomeUnknown` (never retried here). A connection that could not
  even be opened (connect error or timeout, pool timeout) sent nothing: `Unavailable`.
- release/refund: 409 reads the escrow: already in the wanted state gives the `Settlement`, else
  `Conflict(status=<what the read found>)`; 404 `NotFound`; the rest as for create.
- get: 5xx, timeouts and connection errors `Unavailable` (retryable); a body that breaks the
  contract `BadResponse`; 404 `NotFound`.

A client-side `RateLimiter` per route keeps under the documented limits (create 20/min, complete
30/min, release 30/min, dispute 10/min; `rate_limits` overrides them). API keys never appear in the
repr, in log lines or in exception messages: any echo of a key in a server message is redacted.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Self, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr, ValidationError

from podsettle.adapters.http import (
    Answer,
    HttpClient,
    Replier,
    Timeouts,
    TransportFailure,
    status_error,
    transport_error,
)
from podsettle.adapters.limits import RateLimiter
from podsettle.adapters.ports import (
    AmountMismatch,
    BadResponse,
    Conflict,
    EscrowCapabilities,
    EscrowPending,
    EscrowReceipt,
    EscrowStatus,
    EscrowView,
    GatewayError,
    OutcomeUnknown,
    Rejected,
    Settlement,
    Unauthorized,
    Unavailable,
)
from podsettle.domain.errors import InvalidAmount
from podsettle.domain.money import MAX_AMOUNT, ZERO, Money, fmt, to_money
from podsettle.domain.rules import FeeSplit, is_referral_code, referral_fee, split
from podsettle.support.logs import Redactor, get_logger

log = get_logger(__name__)

Dialect = Literal["v1", "seed"]
RefundMethod = Literal["dispute", "timeout"]

DEFAULT_BASE_URL = "https://escrow.purpleflea.com"
# The create route's documented limits (checked here before sending, and by the engine's edge
# before a job is recorded): an amount of at least 0.10 USD, a description of at least 3 characters,
# timeout_hours 1..720, and a v1 counterparty that is an agent id.
MIN_AMOUNT = Money(Decimal("0.100000"))
MIN_DESCRIPTION_CHARS = 3
MAX_TIMEOUT_HOURS = 720
# How long a 402 on create stands for the payer's balance: later creates of as much or more are not
# sent meanwhile (money may come back from a refund, or the payer may be topped up).
SHORT_BALANCE_HOLD_S = 60.0
SERVICE_MINIMUMS: dict[str, Any] = {
    "min_amount": MIN_AMOUNT,
    "min_description_chars": MIN_DESCRIPTION_CHARS,
    "referral_codes": True,
}
DEFAULT_RATE_LIMITS: dict[str, int] = {
    "create": 20,
    "complete": 30,
    "release": 30,
    "dispute": 10,
    "cancel": 30,
}
DEFAULT_TIMEOUT = Timeouts(connect=5.0, read=20.0, pool=10.0)
# The error statuses the contract documents (contracts/purpleflea-escrow.md); any other cannot be trusted.
CONTRACT_STATUSES = frozenset({400, 401, 402, 403, 404, 408, 409, 429})
CREATE_OVERRIDES: dict[int, type[GatewayError]] = {404: Rejected}  # the payee does not exist

# ---------------------------------------------------------------------------------------- models


def _amount(value: Any) -> Money:
    """A JSON number (already parsed to int or Decimal) that is a valid USDC amount."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValueError(f"must be a JSON number, not {type(value).__name__}")
    try:
        return to_money(value)
    except InvalidAmount as e:
        raise ValueError(e.reason.removeprefix(f"{value!r} ").removeprefix(f"'{value}' ")) from None


Amount = Annotated[Decimal, BeforeValidator(_amount)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ErrorBody(_Model):
    error: str
    message: str | None = None


class CreatedV1(_Model):
    escrow_id: str
    amount_usd: Amount
    commission_usd: Amount
    net_to_counterparty: Amount
    status: EscrowStatus
    creator_id: str | None = None
    counterparty_id: str | None = None
    auto_release_at: datetime | None = None


class ReleasedV1(_Model):
    escrow_id: str
    status: Literal["released"]
    amount_released: Amount
    commission: Amount
    referral_commission: Amount = ZERO
    counterparty_id: str | None = None


class EscrowV1(_Model):
    escrow_id: str
    status: EscrowStatus
    amount_usd: Amount
    commission_usd: Amount
    net_to_counterparty: Amount
    creator_id: str | None = None
    counterparty_id: str | None = None
    auto_release_at: datetime | None = None


class CompletedV1(_Model):
    escrow_id: str
    status: Literal["completed"]


class DisputedV1(_Model):
    escrow_id: str
    status: Literal["disputed"]


class SeedCreated(_Model):
    escrow_id: str


class SeedSettled(_Model):
    escrow_id: str
    status: Literal["released", "refunded"] | None = None


M = TypeVar("M", bound=_Model)


def _validation_summary(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


class PurpleFleaEscrow(ABC):
    """The escrow port on Purple Flea: the flow both dialects share (HTTP, rate limits, status and
    body checks, redaction). `PurpleFleaV1` and `PurpleFleaSeed` hold the routes; `purple_flea()`
    builds the one a dialect names.

    `payer_key` pays (create, release, refund); `worker_key` (optional) is only used by `complete`.
    `replier` answers requests instead of the network (tests)."""

    dialect: ClassVar[Dialect]
    capabilities: EscrowCapabilities

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        payer_key: str,
        worker_key: str | None = None,
        rate_limits: dict[str, int] | None = None,
        rate_limit_period_s: float = 60.0,
        timeout: Timeouts | float = DEFAULT_TIMEOUT,
        max_connections: int = 64,
        replier: Replier | None = None,
    ) -> None:
        if not isinstance(payer_key, str) or not payer_key.strip():
            raise ValueError("payer_key: must be a non-empty API key")
        if worker_key is not None and (not isinstance(worker_key, str) or not worker_key.strip()):
            raise ValueError("worker_key: must be a non-empty API key when given")
        self.base_url = base_url.rstrip("/")
        self._payer_key = SecretStr(payer_key.strip())
        self._worker_key = SecretStr(worker_key.strip()) if worker_key else None
        self._redactor = Redactor([payer_key, worker_key or ""])
        limits = {**DEFAULT_RATE_LIMITS, **(rate_limits or {})}
        self._limiters = {route: RateLimiter(n, rate_limit_period_s) for route, n in limits.items()}
        # Slots `reserve` took, per route, for the calls of these keys (idempotency keys).
        self._reserved: dict[str, set[str]] = {}
        self._short_balance: tuple[Money, float] | None = None  # a create's 402: (amount, when)
        self._client = HttpClient(
            self.base_url,
            headers={"Accept": "application/json", "User-Agent": "podsettle"},
            timeouts=timeout if isinstance(timeout, Timeouts) else Timeouts(timeout, timeout, timeout),
            max_connections=max_connections,
            replier=replier,
        )

    async def reserve(
        self, route: str, key: str, within_s: float | None = None, *, amount: Money | None = None
    ) -> bool:
        """Wait until the client-side rate limit lets one more call of `route` go, and keep that slot
        for the call of idempotency key `key` (which then goes at once). False, reserving nothing,
        when no slot comes within `within_s`. The engine waits here before it claims a create, so
        that a stop during the wait leaves no attempt behind (waiting inside the call, after the
        claim, it would). A create of `amount` that a recent 402 refuses here, without sending it,
        needs no slot: True at once, nothing reserved."""
        if route == "create" and amount is not None and self._refused_for_balance(amount):
            return True
        limiter = self._limiters.get(route)
        if limiter is not None and not await limiter.acquire(within_s):
            return False
        if limiter is not None:
            self._reserved.setdefault(route, set()).add(key)
        return True

    def unreserve(self, route: str, key: str) -> None:
        """The slot `reserve` took for `key` will not be used (the claim was lost, or the job
        ended); the limiter's slot is spent (the call of another key waits as usual)."""
        self._reserved.get(route, set()).discard(key)

    def _take_reservation(self, route: str, key: str) -> bool:
        reserved = self._reserved.get(route)
        if reserved is not None and key in reserved:
            reserved.discard(key)
            return True
        return False

    @property
    def longest_call_s(self) -> float:
        """The longest one call to the service can last (see `Timeouts.longest_s`): a claim on a
        money-moving intent must outlast it (the engine's claim lease)."""
        return self._client.timeouts.longest_s()

    def __repr__(self) -> str:
        worker = "set" if self._worker_key else "none"
        return f"PurpleFleaEscrow(base_url={self.base_url!r}, dialect={self.dialect!r}, worker_key={worker})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------ the port

    @abstractmethod
    async def create(
        self,
        *,
        key: str,
        payee: str,
        amount: Money,
        description: str,
        timeout_hours: int,
        referral: str | None = None,
        metadata: dict[str, str] | None = None,
        send_within_s: float | None = None,
    ) -> EscrowReceipt:
        """Create and fund an escrow; `key` is only logged (neither dialect takes one)."""

    @abstractmethod
    async def release(self, escrow_id: str, *, key: str, expected: FeeSplit) -> Settlement:
        """Release to the payee."""

    @abstractmethod
    async def refund(
        self,
        escrow_id: str,
        *,
        key: str,
        reason: str,
        expected: FeeSplit | None = None,
        method: str | None = None,
    ) -> Settlement:
        """Get the money back to the payer (by `method`, the job's recorded refund method)."""

    @abstractmethod
    async def get(self, escrow_id: str) -> EscrowView:
        """Read an escrow."""

    async def find_by_key(self, key: str) -> EscrowView | None:
        raise NotImplementedError("Purple Flea escrows can only be found by id, not by key")

    async def balance(self) -> Money | None:
        return None  # the published service has no balance route

    async def health(self) -> None:
        """`GET /health`: raises `Unavailable` when the service cannot be reached or is not well."""
        response = await self._call("health", "GET", "/health", money=False)
        if response.status != 200:
            raise Unavailable(f"health: {self.base_url} answered {response.status}")

    # ------------------------------------------------------------------ beyond the port

    @abstractmethod
    async def complete(self, escrow_id: str) -> EscrowStatus:
        """The worker signals delivery."""

    @abstractmethod
    async def dispute(self, escrow_id: str, *, reason: str) -> EscrowStatus:
        """Freeze an escrow for Purple Flea's manual review."""

    # ------------------------------------------------------------------ shared internals

    # v1 pays agents only; the seed dialect pays any wallet.
    payee_prefix: ClassVar[str | None] = None
    # Purple Flea matches `referral_code` against its agents' own codes only (the engine's edge checks
    # the form too, so that a job with a code the service would ignore is never recorded).

    def _refused_for_balance(self, amount: Money) -> bool:
        """Whether a create of `amount` is refused here for a 402 the service gave lately (one of as
        much or less, within `SHORT_BALANCE_HOLD_S`)."""
        short = self._short_balance
        if short is not None and time.monotonic() - short[1] > SHORT_BALANCE_HOLD_S:
            short = self._short_balance = None
        return short is not None and amount >= short[0]

    def _refuse_what_the_service_would(
        self, payee: str, amount: Money, description: str, timeout_hours: int, referral: str | None = None
    ) -> None:
        """The service's own checks, made here so that a create it would refuse is never sent."""
        refusal = None
        if self._refused_for_balance(amount):
            short = self._short_balance
            assert short is not None
            refusal = (
                "insufficient_balance",
                (
                    f"the service refused an escrow of {fmt(short[0])} for the payer's balance (402) "
                    f"{time.monotonic() - short[1]:.0f} s ago, and nothing has come back since"
                ),
            )
        elif amount < MIN_AMOUNT:
            refusal = "invalid_amount", f"amount {fmt(amount)} is below the minimum of {fmt(MIN_AMOUNT)}"
        elif len(description.strip()) < MIN_DESCRIPTION_CHARS:
            refusal = "invalid_description", f"description needs at least {MIN_DESCRIPTION_CHARS} characters"
        elif not 1 <= timeout_hours <= MAX_TIMEOUT_HOURS:
            refusal = "invalid_timeout", f"timeout_hours must be 1..{MAX_TIMEOUT_HOURS}"
        elif self.payee_prefix and not payee.startswith(self.payee_prefix):
            refusal = "invalid_counterparty", f"the counterparty must be an agent id ({self.payee_prefix}...)"
        elif referral and not is_referral_code(referral):
            refusal = (
                "invalid_referral",
                "a referral code is ref_ and 8 lowercase hex digits; the service ignores any other",
            )
        if refusal is not None:
            raise Rejected(f"create: {refusal[0]}: {refusal[1]}; nothing was sent", code=refusal[0])

    async def _call(
        self,
        route: str,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        money: bool,
        secret: SecretStr | None = None,
        send_within_s: float | None = None,
        slotted: bool = False,
    ) -> Answer:
        limiter = self._limiters.get(route)
        if slotted:
            pass  # its slot was taken by `reserve`
        elif limiter is not None and not await limiter.acquire(send_within_s):
            raise Rejected(
                f"{route}: not sent: the rate limit has no slot within {send_within_s:.1f} s",
                code="start_window",
            )
        key = (secret or self._payer_key).get_secret_value()
        headers = {"Authorization": f"Bearer {key}"}
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = _dumps(body)
        try:
            response = await self._client.request(method, path, content=content, headers=headers)
        except TransportFailure as failure:
            log.warning(
                "escrow.transport_error", route=route, error=failure.kind, sent=failure.sent.name, money=money
            )
            raise transport_error(failure, f"{route} {method} {path}", money=money) from None
        log.debug("escrow.response", route=route, status=response.status, path=path)
        if response.status == 429:
            retry_after = _retry_after(response)
            if limiter is not None:
                limiter.penalize(retry_after)
            raise status_error(
                429,
                f"{route}: rate limited by the escrow service",
                money=money,
                contract=CONTRACT_STATUSES,
                retry_after=retry_after,
            )
        return response

    def _expect_status_of_create(self, response: Answer, amount: Money, ok: tuple[int, ...]) -> None:
        # After a 402 the batch's next creates of as much or more are refused here, not each sent to
        # be refused by the service (a refund, or SHORT_BALANCE_HOLD_S, lifts that).
        if response.status == 402:
            self._short_balance = (amount, time.monotonic())
        self._expect_status(response, "create", ok, money=True)

    def _expect_status(
        self,
        response: Answer,
        route: str,
        ok: tuple[int, ...],
        *,
        money: bool,
        escrow_id: str | None = None,
    ) -> None:
        status = response.status
        if status in ok:
            return
        what = f"escrow {escrow_id}: {route}" if escrow_id else route
        if 200 <= status < 300:
            self._untrusted(f"{what}: unexpected success status {status}", money)
        code, message = self._error_text(response)
        detail = self._redact(f"{what}: HTTP {status} {code}{': ' + message if message else ''}")
        error = status_error(
            status,
            detail,
            money=money,
            contract=CONTRACT_STATUSES,
            overrides=CREATE_OVERRIDES if route == "create" else None,
            code=code,
        )
        if isinstance(error, OutcomeUnknown | BadResponse):
            log.error("escrow.bad_response", detail=detail, money=money, status=status)
        raise error

    def _error_text(self, response: Answer) -> tuple[str, str]:
        data = self._json(response, "error", money=False, required=False)
        if not isinstance(data, dict):
            return "(no JSON error body)", ""
        try:
            parsed = ErrorBody.model_validate(data)
        except ValidationError:
            return "(malformed error body)", ""
        return self._redact(parsed.error)[:80], self._redact(parsed.message or "")[:300]

    def _json(self, response: Answer, route: str, *, money: bool, required: bool = True) -> Any:
        try:
            return _json_body(response.content)
        except (ValueError, UnicodeDecodeError):
            if not required:
                return None
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            self._untrusted(
                f"{route}: HTTP {response.status} body is not JSON ({kind}, {len(response.content)} bytes)",
                money,
            )

    def _parse(self, response: Answer, model: type[M], route: str, *, money: bool) -> M:
        data = self._json(response, route, money=money)
        if not isinstance(data, dict):
            self._untrusted(f"{route}: HTTP {response.status} body is not a JSON object", money)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            self._untrusted(
                f"{route}: HTTP {response.status} body breaks the contract: {_validation_summary(e)}",
                money,
            )

    def _check_echo(self, got: str, wanted: str, route: str, *, money: bool = True) -> None:
        if got != wanted:
            self._untrusted(f"{route}: the response is about escrow {got!r}, not {wanted!r}", money)

    def _untrusted(self, detail: str, money: bool) -> NoReturn:
        detail = self._redact(detail)
        log.error("escrow.bad_response", detail=detail, money=money)
        if money:
            raise OutcomeUnknown(f"{detail}; the call may or may not have taken effect")
        raise BadResponse(detail)

    def _redact(self, text: str) -> str:
        return self._redactor.redact(text)


class PurpleFleaV1(PurpleFleaEscrow):
    """The routes the published server implements: `POST /escrow/create`, `/escrow/complete/{id}`,
    `/escrow/release/{id}`, `/escrow/dispute/{id}`, `GET /escrow/{id}`. No cancel: `refund()` asks
    for the money back by `refund_method` and reports the refund once a read shows it."""

    dialect: ClassVar[Dialect] = "v1"
    payee_prefix: ClassVar[str | None] = "ag_"

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, *, refund_method: RefundMethod = "timeout", **options: Any
    ) -> None:
        if refund_method not in ("dispute", "timeout"):
            raise ValueError(f"refund_method: must be 'dispute' or 'timeout', not {refund_method!r}")
        super().__init__(base_url, **options)
        self.refund_method: RefundMethod = refund_method
        self._payer_checks: dict[str, bool] = {}  # agent id -> whether this adapter's key is theirs
        self.capabilities = EscrowCapabilities(
            idempotent_create=False, lookup_by_key=False, cancel=False, **SERVICE_MINIMUMS
        )

    async def create(
        self,
        *,
        key: str,
        payee: str,
        amount: Money,
        description: str,
        timeout_hours: int,
        referral: str | None = None,
        metadata: dict[str, str] | None = None,
        send_within_s: float | None = None,
    ) -> EscrowReceipt:
        value = amount
        slotted = self._take_reservation("create", key)  # taken even when refused here: nothing leaks
        self._refuse_what_the_service_would(payee, value, description, timeout_hours, referral)
        expected = split(value, dialect=self.dialect)
        body: dict[str, Any] = {
            "amount_usd": value,
            "description": description,
            "counterparty_agent_id": payee,
            "timeout_hours": timeout_hours,
        }
        if referral:
            body["referral_code"] = referral
        response = await self._call(
            "create",
            "POST",
            "/escrow/create",
            body=body,
            money=True,
            send_within_s=send_within_s,
            slotted=slotted,
        )
        self._expect_status_of_create(response, value, (201, 200))
        created = self._parse(response, CreatedV1, "create", money=True)
        reported = {
            "escrow_id": created.escrow_id,
            "amount": fmt(created.amount_usd),
            "fee": fmt(created.commission_usd),
            "net": fmt(created.net_to_counterparty),
        }
        if (created.amount_usd, created.commission_usd, created.net_to_counterparty) != (
            expected.amount,
            expected.fee,
            expected.net,
        ):
            log.error("escrow.amount_mismatch", step="create", key=key, **reported)
            raise AmountMismatch(
                f"escrow {created.escrow_id} was created with amount {reported['amount']}, "
                f"fee {reported['fee']}, net {reported['net']}; "
                f"expected {fmt(expected.amount)}, {fmt(expected.fee)}, {fmt(expected.net)} "
                "(the v1 rule)",
                reported={
                    **reported,
                    "expected_fee": fmt(expected.fee),
                    "expected_net": fmt(expected.net),
                    "creator_id": created.creator_id or "",
                },
            )
        if created.status is not EscrowStatus.FUNDED:
            self._untrusted(
                f"escrow {created.escrow_id} was created with status {created.status.value!r}", True
            )
        log.info("escrow.created", key=key, escrow_id=created.escrow_id, amount=fmt(value), dialect="v1")
        # The service's own figures (checked above against the rule) and the agent it charged.
        return EscrowReceipt(
            created.escrow_id,
            Money(created.amount_usd),
            Money(created.commission_usd),
            Money(created.net_to_counterparty),
            payer=created.creator_id,
        )

    async def verify_payer(self, agent_id: str) -> bool:
        """Whether the key belongs to `agent_id`, by the one call that can tell without funding: a
        create naming `agent_id` as counterparty for more than any balance holds. The service checks
        `self_escrow` (the counterparty is the key's agent) before the counterparty, the balance and
        any money: 400 self_escrow means yes; 404 counterparty_not_found or 402 means no. It uses one
        slot of the create limit, once per agent asked about (the answer is kept). Raises
        `Unauthorized` for a key the service does not know."""
        known = self._payer_checks.get(agent_id)
        if known is not None:
            return known
        body: dict[str, Any] = {
            "amount_usd": MAX_AMOUNT,
            "description": "podsettle payer check (never funded)",
            "counterparty_agent_id": agent_id,
            "timeout_hours": 1,
        }
        response = await self._call("create", "POST", "/escrow/create", body=body, money=False)
        code = self._error_text(response)[0] if response.status >= 400 else ""
        if response.status == 400 and code == "self_escrow":
            self._payer_checks[agent_id] = True
            return True
        if response.status == 402 or (response.status == 404 and code == "counterparty_not_found"):
            self._payer_checks[agent_id] = False
            return False
        if 200 <= response.status < 300:
            # A balance above a billion: the probe was funded. Say so loudly; never silently.
            created = self._json(response, "payer check", money=True)
            escrow_id = created.get("escrow_id") if isinstance(created, dict) else None
            log.error("escrow.payer_check_funded", escrow_id=escrow_id)
            raise OutcomeUnknown(
                f"the payer check created escrow {escrow_id}: its amount is locked until its timeout"
            )
        self._expect_status(response, "payer check", (), money=False)
        raise BadResponse(f"payer check: HTTP {response.status} {code} does not tell the key's agent")

    async def release(self, escrow_id: str, *, key: str, expected: FeeSplit) -> Settlement:
        """Checks the reported net and fee against `expected`; the referral fee reported is accepted
        when it is zero or 15% of the fee."""
        _check_id(escrow_id)
        response = await self._call("release", "POST", f"/escrow/release/{escrow_id}", money=True)
        if response.status == 409:
            view = await self._read_for_conflict(escrow_id)
            if view is not None and view.status is EscrowStatus.RELEASED:
                self._check_view(view, expected.amount)
                log.info("escrow.already_released", key=key, escrow_id=escrow_id)
                return _released(escrow_id, expected)
            raise _conflict(escrow_id, "release", view)
        self._expect_status(response, "release", (200,), money=True, escrow_id=escrow_id)
        released = self._parse(response, ReleasedV1, "release", money=True)
        self._check_echo(released.escrow_id, escrow_id, "release")
        reported = {
            "escrow_id": escrow_id,
            "net": fmt(released.amount_released),
            "fee": fmt(released.commission),
            "referral_fee": fmt(released.referral_commission),
        }
        allowed_referral = {ZERO, referral_fee(Money(released.commission), self.dialect)}
        if (
            released.amount_released != expected.net
            or released.commission != expected.fee
            or released.referral_commission not in allowed_referral
        ):
            log.error("escrow.amount_mismatch", step="release", key=key, **reported)
            raise AmountMismatch(
                f"escrow {escrow_id} released net {reported['net']}, fee {reported['fee']}, referral "
                f"{reported['referral_fee']}; expected net {fmt(expected.net)}, fee {fmt(expected.fee)}",
                reported=reported,
            )
        log.info("escrow.released", key=key, escrow_id=escrow_id, net=reported["net"])
        return Settlement(
            escrow_id=escrow_id,
            status=EscrowStatus.RELEASED,
            to_payee=Money(released.amount_released),
            fee=Money(released.commission),
            referral_fee=Money(released.referral_commission),
            returned=ZERO,
        )

    async def refund(
        self,
        escrow_id: str,
        *,
        key: str,
        reason: str,
        expected: FeeSplit | None = None,
        method: str | None = None,
    ) -> Settlement:
        """Reads the escrow: `refunded` gives the Settlement (returned = amount - commission, the
        commission kept); `funded`/`completed` asks for the refund by `method` (the job's; else this
        adapter's `refund_method`): `timeout` does nothing (the sweep refunds after auto_release_at),
        `dispute` POSTs /escrow/dispute (Purple Flea's staff must then act: no route resolves it), and
        raises `EscrowPending`; `disputed` raises `EscrowPending`; `released` raises `Conflict`."""
        _check_id(escrow_id)
        view = await self.get(escrow_id)
        if view.status is EscrowStatus.REFUNDED:
            return self._refunded(view, key)
        if view.status is EscrowStatus.RELEASED:
            raise Conflict(
                f"escrow {escrow_id} cannot be refunded: it was released", status=view.status.value
            )
        if view.status is EscrowStatus.DISPUTED:
            raise EscrowPending(
                f"escrow {escrow_id} is disputed: the refund waits for Purple Flea's review",
                escrow_id=escrow_id,
                status=view.status.value,
            )
        if (method or self.refund_method) != "dispute":
            when = view.auto_release_at.isoformat() if view.auto_release_at else "its timeout"
            raise EscrowPending(
                f"escrow {escrow_id} is {view.status.value}: the timeout sweep refunds it after {when}",
                escrow_id=escrow_id,
                status=view.status.value,
            )
        status = await self.dispute(escrow_id, reason=reason)
        if status is EscrowStatus.REFUNDED:
            return self._refunded(await self.get(escrow_id), key)
        raise EscrowPending(
            f"escrow {escrow_id} is {status.value}: a refund was asked for by dispute",
            escrow_id=escrow_id,
            status=status.value,
        )

    async def get(self, escrow_id: str) -> EscrowView:
        _check_id(escrow_id)
        response = await self._call("get", "GET", f"/escrow/{escrow_id}", money=False)
        self._expect_status(response, "get", (200,), money=False, escrow_id=escrow_id)
        read = self._parse(response, EscrowV1, "get", money=False)
        self._check_echo(read.escrow_id, escrow_id, "get", money=False)
        return EscrowView(
            escrow_id=read.escrow_id,
            status=read.status,
            amount=Money(read.amount_usd),
            fee=Money(read.commission_usd),
            net=Money(read.net_to_counterparty),
            payer=read.creator_id,
            payee=read.counterparty_id,
            auto_release_at=read.auto_release_at,
        )

    async def complete(self, escrow_id: str) -> EscrowStatus:
        """`POST /escrow/complete/{id}` with the worker key."""
        if self._worker_key is None:
            raise Unauthorized("complete needs the worker's key, and none was configured")
        _check_id(escrow_id)
        response = await self._call(
            "complete", "POST", f"/escrow/complete/{escrow_id}", money=False, secret=self._worker_key
        )
        if response.status == 409:
            view = await self._read_for_conflict(escrow_id)
            if view is not None and view.status is EscrowStatus.COMPLETED:
                return view.status
            raise _conflict(escrow_id, "complete", view)
        self._expect_status(response, "complete", (200,), money=False, escrow_id=escrow_id)
        completed = self._parse(response, CompletedV1, "complete", money=False)
        self._check_echo(completed.escrow_id, escrow_id, "complete", money=False)
        return EscrowStatus.COMPLETED

    async def dispute(self, escrow_id: str, *, reason: str) -> EscrowStatus:
        """Moves no money, so a failed call is `Unavailable` and safe to repeat: a second dispute
        answers 409 and the read says `disputed`."""
        _check_id(escrow_id)
        response = await self._call(
            "dispute", "POST", f"/escrow/dispute/{escrow_id}", body={"reason": reason}, money=False
        )
        if response.status == 409:
            view = await self._read_for_conflict(escrow_id)
            if view is not None and view.status in (EscrowStatus.DISPUTED, EscrowStatus.REFUNDED):
                return view.status
            raise _conflict(escrow_id, "dispute", view)
        self._expect_status(response, "dispute", (200,), money=False, escrow_id=escrow_id)
        disputed = self._parse(response, DisputedV1, "dispute", money=False)
        self._check_echo(disputed.escrow_id, escrow_id, "dispute", money=False)
        log.info("escrow.disputed", escrow_id=escrow_id)
        return EscrowStatus.DISPUTED

    def _refunded(self, view: EscrowView, key: str) -> Settlement:
        self._check_view(view, view.amount)
        self._short_balance = None  # money came back: a create may fit the balance again
        log.info("escrow.refunded", key=key, escrow_id=view.escrow_id, returned=fmt(view.net))
        return Settlement(
            escrow_id=view.escrow_id,
            status=EscrowStatus.REFUNDED,
            to_payee=ZERO,
            fee=view.fee,
            referral_fee=ZERO,
            returned=Money(view.amount - view.fee),
        )

    def _check_view(self, view: EscrowView, amount: Money) -> None:
        expected = split(amount, dialect=self.dialect)
        if (view.amount, view.fee, view.net) != (expected.amount, expected.fee, expected.net):
            reported = {
                "escrow_id": view.escrow_id,
                "amount": fmt(view.amount),
                "fee": fmt(view.fee),
                "net": fmt(view.net),
            }
            raise AmountMismatch(
                f"escrow {view.escrow_id} reads amount {reported['amount']}, fee {reported['fee']}, net "
                f"{reported['net']}; expected {fmt(expected.amount)}, {fmt(expected.fee)}, "
                f"{fmt(expected.net)}",
                reported=reported,
            )

    async def _read_for_conflict(self, escrow_id: str) -> EscrowView | None:
        try:
            return await self.get(escrow_id)
        except GatewayError as e:
            log.warning("escrow.conflict_read_failed", escrow_id=escrow_id, error=type(e).__name__)
            return None


class PurpleFleaSeed(PurpleFleaEscrow):
    """The routes of the product page: `POST /api/escrow/create|release|cancel`. Its answers carry no
    amounts and it has no read route: the split is computed from the fee rules, `get()` raises
    NotImplementedError, and `cancel` returns the whole amount (no commission). For a refund's
    `Settlement` the adapter remembers the amount of each escrow it created; after a restart, tell
    it with `expect()` (or pass `expected` to `refund`). `payer_id` is the payer's `ag_…` id."""

    dialect: ClassVar[Dialect] = "seed"

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, payer_id: str | None, **options: Any) -> None:
        if not payer_id:
            raise ValueError("payer_id: the seed dialect needs the payer's agent id (payer_wallet)")
        super().__init__(base_url, **options)
        self.payer_id = payer_id
        self.capabilities = EscrowCapabilities(
            idempotent_create=False, lookup_by_key=False, cancel=True, **SERVICE_MINIMUMS
        )
        self._amounts: dict[str, Money] = {}

    async def create(
        self,
        *,
        key: str,
        payee: str,
        amount: Money,
        description: str,
        timeout_hours: int,
        referral: str | None = None,
        metadata: dict[str, str] | None = None,
        send_within_s: float | None = None,
    ) -> EscrowReceipt:
        value = amount
        slotted = self._take_reservation("create", key)  # taken even when refused here: nothing leaks
        self._refuse_what_the_service_would(payee, value, description, timeout_hours, referral)
        expected = split(value, dialect=self.dialect)
        body: dict[str, Any] = {
            "payer_wallet": self.payer_id,
            "payee_wallet": payee,
            "amount_usdc": value,
            "description": description,
            "referral_code": referral,
            "metadata": metadata or {},
            "auto_release": timeout_hours,
        }
        response = await self._call(
            "create",
            "POST",
            "/api/escrow/create",
            body=body,
            money=True,
            send_within_s=send_within_s,
            slotted=slotted,
        )
        self._expect_status_of_create(response, value, (200, 201))
        created = self._parse(response, SeedCreated, "create", money=True)
        self._amounts[created.escrow_id] = value
        log.info("escrow.created", key=key, escrow_id=created.escrow_id, amount=fmt(value), dialect="seed")
        return EscrowReceipt(created.escrow_id, value, expected.fee, expected.net)

    async def release(self, escrow_id: str, *, key: str, expected: FeeSplit) -> Settlement:
        """The answer reports no amounts: the settlement is `expected`'s."""
        _check_id(escrow_id)
        await self._settle("release", escrow_id, EscrowStatus.RELEASED, "released")
        log.info("escrow.released", key=key, escrow_id=escrow_id, dialect="seed")
        return _released(escrow_id, expected)

    async def refund(
        self,
        escrow_id: str,
        *,
        key: str,
        reason: str,
        expected: FeeSplit | None = None,
        method: str | None = None,
    ) -> Settlement:
        """`POST /api/escrow/cancel`: the whole amount back (whatever `method` says: seed has cancel)."""
        _check_id(escrow_id)
        if expected is not None and escrow_id not in self._amounts:
            self.expect(escrow_id, expected.amount)  # created before this adapter existed
        amount = self._amounts.get(escrow_id)
        if amount is None:
            raise GatewayError(
                f"escrow {escrow_id}: its amount is unknown to this adapter (seed responses carry none); "
                "call expect(escrow_id, amount) first. Nothing was sent."
            )
        await self._settle("cancel", escrow_id, EscrowStatus.REFUNDED, "cancelled")
        log.info("escrow.refunded", key=key, escrow_id=escrow_id, dialect="seed")
        self._short_balance = None  # money came back: a create may fit the balance again
        return _cancelled(escrow_id, amount)

    async def get(self, escrow_id: str) -> EscrowView:
        raise NotImplementedError("the seed dialect has no route to read an escrow")

    async def complete(self, escrow_id: str) -> EscrowStatus:
        raise NotImplementedError("the seed dialect has no complete route")

    async def dispute(self, escrow_id: str, *, reason: str) -> EscrowStatus:
        raise NotImplementedError("the seed dialect has no dispute route")

    def expect(self, escrow_id: str, amount: Money) -> None:
        """The amount of an escrow created before this adapter existed (for `refund`)."""
        self._amounts[escrow_id] = to_money(amount, "amount", allow_zero=False)

    async def _settle(self, route: str, escrow_id: str, wanted: EscrowStatus, verb: str) -> None:
        """`POST /api/escrow/{route}`; returns once the escrow is in `wanted` (a 409 saying it already
        is counts), else raises."""
        response = await self._call(
            route, "POST", f"/api/escrow/{route}", body={"escrow_id": escrow_id}, money=True
        )
        if response.status == 409:
            data = self._json(response, "conflict", money=False, required=False)
            found = data.get("status") if isinstance(data, dict) else None
            status = found if isinstance(found, str) else None
            if status == wanted.value:
                return
            raise Conflict(f"escrow {escrow_id} cannot be {verb}: it is {status}", status=status)
        self._expect_status(response, route, (200,), money=True, escrow_id=escrow_id)
        settled = self._parse(response, SeedSettled, route, money=True)
        self._check_echo(settled.escrow_id, escrow_id, route)


def purple_flea(
    base_url: str = DEFAULT_BASE_URL,
    *,
    dialect: Dialect = "v1",
    payer_id: str | None = None,
    refund_method: RefundMethod = "timeout",
    **options: Any,
) -> PurpleFleaEscrow:
    """The escrow adapter for `dialect` ("v1" or "seed"); `refund_method` is v1's, `payer_id` seed's.
    `options` are `PurpleFleaEscrow`'s (keys, rate limits, timeout, connections, replier)."""
    if dialect == "v1":
        return PurpleFleaV1(base_url, refund_method=refund_method, **options)
    if dialect == "seed":
        return PurpleFleaSeed(base_url, payer_id=payer_id, **options)
    raise ValueError(f"dialect: must be 'v1' or 'seed', not {dialect!r}")


# ---------------------------------------------------------------------------------------- helpers


_DECODER = json.JSONDecoder(parse_float=Decimal)  # amounts never pass through a float


def _json_body(raw: bytes) -> Any:
    """JSON (RFC 8259: UTF-8, or UTF-16/32 by its first bytes) read from the body's bytes, as
    `json.loads` does but with one decoder for every call; bytes that are not text raise."""
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def _check_id(escrow_id: str) -> None:
    if not isinstance(escrow_id, str) or not escrow_id or "/" in escrow_id or len(escrow_id) > 128:
        raise ValueError(f"escrow_id: {escrow_id!r} is not an escrow id")


def _dumps(body: dict[str, Any]) -> bytes:
    """JSON with Money written as a number from its digits (the service wants numbers)."""

    def encode(value: Any) -> str:
        if isinstance(value, Decimal):
            return f"{value.normalize():f}"
        if isinstance(value, dict):
            return "{" + ",".join(f"{json.dumps(str(k))}:{encode(v)}" for k, v in value.items()) + "}"
        return json.dumps(value)

    return encode(body).encode()


def _retry_after(response: Answer) -> float:
    header = response.headers.get("retry-after")
    if header:
        try:
            return max(float(header), 0.1)
        except ValueError:
            pass
    try:
        data = json.loads(response.text, parse_float=Decimal)
        value = data.get("retry_after") if isinstance(data, dict) else None
        if isinstance(value, int | Decimal) and not isinstance(value, bool) and value > 0:
            return float(value)
    except ValueError:
        pass
    return 1.0


def _conflict(escrow_id: str, route: str, view: EscrowView | None) -> Conflict:
    if view is None:
        return Conflict(
            f"escrow {escrow_id}: {route} refused (409); its status could not be read", status=None
        )
    return Conflict(
        f"escrow {escrow_id}: {route} refused (409): it is {view.status.value}", status=view.status.value
    )


def _released(escrow_id: str, expected: FeeSplit) -> Settlement:
    return Settlement(
        escrow_id=escrow_id,
        status=EscrowStatus.RELEASED,
        to_payee=expected.net,
        fee=expected.fee,
        referral_fee=expected.referral_fee,
        returned=ZERO,
    )


def _cancelled(escrow_id: str, amount: Money) -> Settlement:
    return Settlement(
        escrow_id=escrow_id,
        status=EscrowStatus.REFUNDED,
        to_payee=ZERO,
        fee=ZERO,
        referral_fee=ZERO,
        returned=amount,
    )
