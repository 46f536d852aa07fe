"""A Purple Flea-compatible escrow server for tests, demos and benchmarks, backed by the local ledger.

It speaks the contract in contracts/purpleflea-escrow.md: the v1 routes (`/escrow/...`) with their
status codes, error bodies (`{error, message}` plus `_info`, as `application/json; charset=UTF-8`)
and rate limits; the seed dialect (`/api/escrow/create|release|cancel`); `/health`; and the onboarding routes
(`/api/v1/auth/register`, `/faucet/claim`). Amounts go out as JSON numbers written from `Decimal`
digits (never through a float) and are kept in the ledger as integer micro-units.

Semantics, as the published service has them (by default; the options that relax them are named):
- rate limits: a fixed window of `rate_limit_window_s` (60 s) per path and client IP, opened by its
  first call; the IP comes from X-Forwarded-For (its first entry) or X-Real-IP, else every client
  shares the bucket "unknown"; release, complete and dispute paths hold the escrow id, so each
  escrow has its own bucket; the limit is checked before the key (a 401 uses a slot); a refused call
  answers 429 "Too many requests. Limit: 20 per 60s" with no Retry-After. The window runs on the
  sandbox's clock, so advancing it (`POST /sandbox/clock`) opens new windows. `rate_limits` lifts
  the limits;
- create takes the amount from the creator's balance into a hold; the commission is 1% by the
  escrow's dialect's rule (rules.py: v1 as the service computes it in JavaScript floats, seed exact
  half up); release pays `amount - commission` to the counterparty, the referrer's share (15% of the
  commission, by the same rule) to the referrer, the rest of the commission to the `fees` account.
  The referrer, as the published code finds it: a create's `referral_code` is matched against the
  agents' own codes (`ref_` and 8 hex digits, made when the agent is created; an agent id or an
  unknown code matches nothing, and no referrer is paid); without a code, the creator's own referrer;
- the timeout sweep refunds funded and completed escrows whose `auto_release_at` has passed,
  crediting `amount - commission` to the creator and the referrer its share of the commission (the
  rest is kept). It runs at startup and then every `sweep_interval_s` (300, the service's five
  minutes) of the injectable clock, on the same timetable as the service's timer: each sweep
  refunds what was due at its tick. It is played lazily, before each request, so a clock advanced
  past a tick sees that tick's sweep; `POST /sandbox/sweep` runs it at once; pass
  `sweep_interval_s=math.inf` to sweep only on that route;
- a dispute is permanent, as on the published service (nothing resolves it, the sweep skips it).
  The sandbox's own relaxations: `POST /sandbox/disputes/{id}/resolve {"outcome": "refund"|"release"}`
  plays Purple Flea's manual review (refund: `amount - commission` back, like the sweep), and
  `dispute_review` decides every dispute at once;
- seed: `auto_release` on create is the timeout in hours; cancel gives the creator the *whole*
  amount back (no commission); responses carry no amounts; a 409 carries the escrow's `status`.

Admin routes (no auth; sandbox only): `POST /sandbox/agents`, `GET /sandbox/ledger`,
`POST /sandbox/clock`, `POST /sandbox/sweep`, `POST|GET|DELETE /sandbox/faults`,
`POST /sandbox/disputes/{id}/resolve`. Fault modes per route (`create`, `complete`, `release`,
`cancel`, `dispute`, `get`): `error_before` (500, nothing done), `drop_after` (the work is done,
then a 500, or with `"close": true` the connection is cut in the middle of the response),
`rate_limit` (429), `delay` (sleep `delay_s` seconds, then do the work and answer: a client that
timed out meanwhile still gets the effect). Each fault applies to the next `count` calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from podsettle.adapters.ledger import FEES_ACCOUNT, MICRO, Ledger, LedgerTx
from podsettle.domain.errors import InvalidAmount
from podsettle.domain.money import ZERO, Money, fmt, to_money
from podsettle.domain.rules import commission, referral_fee
from podsettle.support.logs import get_logger

log = get_logger(__name__)

INFO = {
    "service": "agent-escrow",
    "docs": "https://escrow.purpleflea.com/llms.txt",
    "referral": "GET /gossip \u2014 15% referral commission on escrow fees",
    "version": "1.0.0",
}
DEFAULT_RATE_LIMITS = {
    "create": 20,
    "complete": 30,
    "release": 30,
    "dispute": 10,
    "cancel": 30,
    "faucet": 1,  # claims per IP per 24 h
}
MIN_AMOUNT = Decimal("0.10")
FAUCET_AMOUNT = Decimal("1.00")
FAULT_ROUTES = frozenset({"create", "complete", "release", "cancel", "dispute", "get"})
FAULT_MODES = frozenset({"error_before", "drop_after", "rate_limit", "delay"})
STATE_KEY = "podsettle.escrow_sandbox"
RATE_LIMIT_WINDOW_S = 60.0
SWEEP_INTERVAL_S = 300.0
JSON_TYPE = "application/json; charset=UTF-8"
UNAUTHORIZED_MESSAGE = "Bearer {casino_api_key} required. Register at casino.purpleflea.com."

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandbox_agents (
    agent_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    referrer TEXT,
    faucet_claimed_at TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sandbox_escrows (
    escrow_id TEXT PRIMARY KEY,
    dialect TEXT NOT NULL,
    creator_id TEXT NOT NULL,
    counterparty_id TEXT NOT NULL,
    amount INTEGER NOT NULL,
    commission INTEGER NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    timeout_hours INTEGER NOT NULL,
    referrer TEXT,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL,
    auto_release_at TEXT NOT NULL,
    completed_at TEXT,
    released_at TEXT,
    disputed_at TEXT
);
CREATE INDEX IF NOT EXISTS sandbox_escrows_due ON sandbox_escrows (status, auto_release_at);
CREATE TABLE IF NOT EXISTS sandbox_events (
    id TEXT PRIMARY KEY,
    escrow_id TEXT NOT NULL,
    event TEXT NOT NULL,
    actor_id TEXT,
    note TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sandbox_referral_codes (
    code TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS sandbox_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sandbox_faucet_claims (ip TEXT NOT NULL, claimed_at TEXT NOT NULL);
"""

# ---------------------------------------------------------------------------------------- JSON


def dumps(value: Any) -> bytes:
    """JSON with `Decimal` written as a number from its own digits (0.500000 -> 0.5), never a float."""
    return _encode(value).encode()


def _encode(value: Any) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"cannot write {value} as JSON")
        text = f"{value.normalize():f}"
        return "0" if text in ("-0", "0") else text
    if isinstance(value, float):
        raise TypeError("the sandbox never writes floats")
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


class JSONOut(Response):
    media_type = JSON_TYPE

    def render(self, content: Any) -> bytes:
        return dumps(content)


_INFO_TAIL = ',"_info":' + _encode(INFO) + "}"


def _body(content: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON object answer with the service's `_info` last (written once, not per response)."""
    text = _encode({k: v for k, v in content.items() if k != "_info"} if "_info" in content else content)
    body = (text[:-1] + _INFO_TAIL) if text != "{}" else "{" + _INFO_TAIL[1:]
    return Response(body.encode(), status_code=status_code, headers=headers, media_type=JSON_TYPE)


class ApiError(Exception):
    def __init__(self, http_status: int, error: str, message: str | None = None, **extra: Any) -> None:
        self.status = http_status
        self.error = error
        self.message = message
        self.extra = extra
        super().__init__(f"{http_status} {error}: {message}")

    def response(self, headers: dict[str, str] | None = None) -> Response:
        content: dict[str, Any] = {"error": self.error}
        if self.message is not None:
            content["message"] = self.message
        content.update(self.extra)
        return _body(content, self.status, headers)


# ---------------------------------------------------------------------------------------- helpers


def _js_time(moment: datetime | None) -> str | None:
    """ISO-8601 as JavaScript's toISOString writes it: milliseconds and a Z."""
    if moment is None:
        return None
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _micro(amount: Decimal) -> int:
    return int(amount * MICRO)


def _money(micro: int) -> Money:
    return to_money(Decimal(micro) / MICRO)


def _dollars(amount: Decimal) -> str:
    return f"{amount.quantize(Decimal('0.01'), rounding=ROUND_DOWN):f}"


def _hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def _request_amount(value: Any, field: str) -> Money:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ApiError(400, "invalid_amount", f"{field} must be a number")
    try:
        amount = to_money(value, field)
    except InvalidAmount as e:
        raise ApiError(400, "invalid_amount", str(e)) from None
    if amount < MIN_AMOUNT:
        raise ApiError(400, "invalid_amount", "Minimum escrow amount is $0.1")
    return amount


def _timeout_hours(value: Any) -> int:
    if value is None or isinstance(value, bool) or not isinstance(value, int | Decimal):
        return 24
    if isinstance(value, Decimal) and not value.is_finite():
        return 24
    return max(1, min(720, int(value)))


@dataclass
class Fault:
    mode: str
    count: int
    delay_s: float = 0.0
    close: bool = False


class FixedWindow:
    """The published server's limiter: per key, a window that opens with the key's first call and
    lasts `period_s`; every call counts, refused ones too, and the window only ends with time."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str, limit: int, period_s: float, now: float) -> bool:
        with self._lock:
            bucket = self._buckets.get(key)
            # The service opens a new window only once more than the period has passed.
            if bucket is None or now - bucket[0] > period_s:
                self._buckets[key] = (now, 1)
                return True
            opened, count = bucket[0], bucket[1] + 1
            self._buckets[key] = (opened, count)
            return count <= limit


# ---------------------------------------------------------------------------------------- state


class EscrowSandbox:
    """The server's state: agents, escrows and their events next to the ledger in one SQLite file."""

    def __init__(
        self,
        *,
        ledger_path: str | None = None,
        clock: Callable[[], datetime] | None = None,
        rate_limits: dict[str, int] | None = None,
        sweep_interval_s: float | None = None,
        rate_limit_window_s: float = RATE_LIMIT_WINDOW_S,
        seed: int = 0,
        dispute_review: str | None = None,
    ) -> None:
        if rate_limit_window_s <= 0:
            raise ValueError(f"rate_limit_window_s must be > 0, got {rate_limit_window_s!r}")
        if dispute_review not in (None, "refund", "release"):
            raise ValueError(f"dispute_review must be None, 'refund' or 'release', got {dispute_review!r}")
        # Stands in for Purple Flea's manual review of disputes: None leaves them locked until
        # POST /sandbox/disputes/{id}/resolve; "refund" or "release" decides each at once.
        self.dispute_review = dispute_review
        self._base_clock = clock or (lambda: datetime.now(UTC))
        self._offset = timedelta(0)
        self.seed = seed
        self.rate_limits = {**DEFAULT_RATE_LIMITS, **(rate_limits or {})}
        for route, limit in self.rate_limits.items():
            if not isinstance(limit, int) or limit < 1:
                raise ValueError(f"rate_limits[{route!r}] must be an integer >= 1, got {limit!r}")
        self.sweep_interval_s = SWEEP_INTERVAL_S if sweep_interval_s is None else sweep_interval_s
        if not self.sweep_interval_s > 0:
            raise ValueError(f"sweep_interval_s must be > 0, got {sweep_interval_s!r}")
        self.rate_limit_window_s = rate_limit_window_s
        self.ledger = Ledger(ledger_path, clock=self.now)
        self.faults: dict[str, deque[Fault]] = {}
        self._windows = FixedWindow()
        # Agents by key hash, filled on first use: an agent and its key never change once created,
        # so a request need not open a transaction only to learn who is calling.
        self._agents_by_key: dict[str, str] = {}
        with self.ledger.transaction() as tx:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.execute(statement)
            # The clock's offset survives a restart, so escrows past due stay past due.
            row = tx.execute("SELECT value FROM sandbox_counters WHERE name = 'clock_offset_us'").fetchone()
            if row is not None:
                self._offset = timedelta(microseconds=row[0])
        # The service's timer: a sweep at startup, then one every interval from then on.
        self._sweep_origin = self.now()
        self._sweep_ticks = 0
        if not math.isinf(self.sweep_interval_s):
            self.sweep()

    def __repr__(self) -> str:
        return f"EscrowSandbox(ledger={self.ledger!r})"

    # ------------------------------------------------------------------ clock, ids, limits

    def now(self) -> datetime:
        return self._base_clock() + self._offset

    def advance(self, seconds: float) -> datetime:
        """Move the sandbox's clock forward (for the timeout sweep); kept in the database."""
        self._offset += timedelta(seconds=seconds)
        offset_us = int(self._offset / timedelta(microseconds=1))
        with self.ledger.transaction() as tx:
            tx.execute(
                "INSERT INTO sandbox_counters (name, value) VALUES ('clock_offset_us', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (offset_us,),
            )
        return self.now()

    def _next_id(self, tx: LedgerTx, kind: str, prefix: str, hex_chars: int) -> str:
        n = tx.execute(
            "INSERT INTO sandbox_counters (name, value) VALUES (?, 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
            (kind,),
        ).fetchone()[0]
        return prefix + hashlib.sha256(f"{self.seed}:{kind}:{n}".encode()).hexdigest()[:hex_chars]

    def admit(self, route: str, path: str, ip: str) -> None:
        """The route's limit on the bucket of this path and client IP (as the service keys it)."""
        limit = self.rate_limits.get(route)
        if limit is None:
            return
        window = self.rate_limit_window_s
        if not self._windows.admit(f"{path}:{ip}", limit, window, self.now().timestamp()):
            raise ApiError(429, "rate_limited", f"Too many requests. Limit: {limit} per {window:g}s")

    def take_fault(self, route: str) -> Fault | None:
        queue = self.faults.get(route)
        if not queue:
            return None
        fault = queue[0]
        fault.count -= 1
        if fault.count <= 0:
            queue.popleft()
        return fault

    # ------------------------------------------------------------------ agents

    def create_agent(self, balance: object = ZERO, referrer: str | None = None) -> tuple[str, str]:
        amount = to_money(balance, "balance")
        api_key = "pf_live_" + secrets.token_hex(20)
        with self.ledger.transaction() as tx:
            if referrer is not None and not tx.has_account(referrer):
                raise ApiError(404, "not_found", f"referrer {referrer!r} does not exist")
            agent_id = self._next_id(tx, "agent", "ag_", 12)
            tx.execute(
                "INSERT INTO sandbox_agents (agent_id, key_hash, referrer, created_at) VALUES (?, ?, ?, ?)",
                (agent_id, _hash_key(api_key), referrer, tx.now.isoformat()),
            )
            tx.open_account(agent_id)
            # The casino gives every agent a code at registration: `ref_` and 4 random bytes in hex.
            tx.execute(
                "INSERT INTO sandbox_referral_codes (code, agent_id) VALUES (?, ?)",
                (f"ref_{secrets.token_hex(4)}", agent_id),
            )
            if amount > 0:
                tx.mint(agent_id, amount, key=f"sandbox:agent:{agent_id}")
        log.debug("sandbox.agent_created", agent_id=agent_id, balance=fmt(amount))
        return agent_id, api_key

    def referral_code(self, agent_id: str) -> str | None:
        """The agent's own referral code (None for an agent the sandbox made before it gave codes)."""
        with self.ledger.transaction() as tx:
            row = tx.execute(
                "SELECT code FROM sandbox_referral_codes WHERE agent_id = ?", (agent_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def agent_for_key(self, api_key: str) -> str | None:
        key_hash = _hash_key(api_key)
        known = self._agents_by_key.get(key_hash)
        if known is not None:
            return known
        with self.ledger.transaction() as tx:
            row = tx.execute("SELECT agent_id FROM sandbox_agents WHERE key_hash = ?", (key_hash,)).fetchone()
        if row is None:
            return None
        self._agents_by_key[key_hash] = agent_id = str(row[0])
        return agent_id

    def claim_faucet(self, agent_id: Any, ip: str) -> dict[str, Any]:
        if not isinstance(agent_id, str) or not agent_id.startswith("ag_"):
            raise ApiError(400, "invalid_agent", "agent_casino_id must be in ag_xxx format")
        limit = self.rate_limits["faucet"]
        with self.ledger.transaction() as tx:
            row = tx.execute(
                "SELECT faucet_claimed_at FROM sandbox_agents WHERE agent_id = ?", (agent_id,)
            ).fetchone()
            if row is None:
                raise ApiError(
                    404, "not_found", f"Agent {agent_id} not found. Register at casino.purpleflea.com."
                )
            if row[0] is not None:
                raise ApiError(
                    409, "already_claimed", "This agent has already claimed the faucet", claimed_at=row[0]
                )
            since = (tx.now - timedelta(hours=24)).isoformat()
            recent = tx.execute(
                "SELECT COUNT(*) FROM sandbox_faucet_claims WHERE ip = ? AND claimed_at > ?", (ip, since)
            ).fetchone()[0]
            if recent >= limit:
                raise ApiError(
                    429, "rate_limited", "Faucet already claimed from this IP in the last 24 hours"
                )
            tx.execute(
                "INSERT INTO sandbox_faucet_claims (ip, claimed_at) VALUES (?, ?)", (ip, tx.now.isoformat())
            )
            tx.execute(
                "UPDATE sandbox_agents SET faucet_claimed_at = ? WHERE agent_id = ?",
                (tx.now.isoformat(), agent_id),
            )
            tx.mint(agent_id, FAUCET_AMOUNT, key=f"sandbox:faucet:{agent_id}")
            balance = tx.balance(agent_id)
        return {
            "success": True,
            "agent_casino_id": agent_id,
            "amount_usd": FAUCET_AMOUNT,
            "new_balance": balance,
            "message": "$1.00 credited to your casino balance",
        }

    # ------------------------------------------------------------------ escrows

    def create_escrow(
        self,
        *,
        creator: str,
        counterparty: Any,
        amount: Money,
        description: Any,
        timeout_hours: int,
        referral_code: Any,
        dialect: str,
        metadata: Any = None,
    ) -> dict[str, Any]:
        if not isinstance(description, str) or len(description.strip()) < 3:
            raise ApiError(400, "invalid_description", "description must be at least 3 characters")
        field = "counterparty_agent_id" if dialect == "v1" else "payee_wallet"
        if not isinstance(counterparty, str) or not counterparty.startswith("ag_") or len(counterparty) < 4:
            raise ApiError(400, "invalid_counterparty", f"{field} must be in ag_xxx format")
        if counterparty == creator:
            raise ApiError(400, "self_escrow", "Cannot create escrow with yourself")
        with self.ledger.transaction() as tx:
            if not tx.has_account(creator):
                raise ApiError(404, "creator_not_found", "Creator agent not found")
            if not tx.has_account(counterparty) or counterparty == FEES_ACCOUNT:
                raise ApiError(404, "counterparty_not_found", "Counterparty agent not found")
            balance = tx.balance(creator)
            if balance < amount:
                raise ApiError(
                    402,
                    "insufficient_balance",
                    f"Balance ${_dollars(balance)} < escrow amount ${_dollars(amount)}",
                    balance=balance,
                )
            referrer = self._referrer(tx, creator, referral_code)
            escrow_id = self._next_id(tx, "escrow", "esc_", 16)
            fee = commission(amount, dialect)
            now = tx.now
            auto_release_at = now + timedelta(hours=timeout_hours)
            tx.hold(key=f"sandbox:create:{escrow_id}", payer=creator, amount=amount, hold_id=escrow_id)
            row = {
                "escrow_id": escrow_id,
                "dialect": dialect,
                "creator_id": creator,
                "counterparty_id": counterparty,
                "amount": _micro(amount),
                "commission": _micro(fee),
                "description": description,
                "status": "funded",
                "timeout_hours": timeout_hours,
                "referrer": referrer,
                "metadata": json.dumps(metadata if isinstance(metadata, dict) else {}, default=str),
                "created_at": now.isoformat(),
                "auto_release_at": auto_release_at.isoformat(),
                "completed_at": None,
                "released_at": None,
                "disputed_at": None,
            }
            tx.execute(
                f"INSERT INTO sandbox_escrows ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
            self._event(
                tx,
                escrow_id,
                "created",
                creator,
                f'Escrow created: ${amount.normalize():f} for "{description}"',
            )
        log.debug("sandbox.escrow_created", escrow_id=escrow_id, amount=fmt(amount), dialect=dialect)
        return row

    def _referrer(self, tx: LedgerTx, creator: str, referral_code: Any) -> str | None:
        if referral_code:
            # As the published code: a code given is the only way to a referrer; one that matches
            # no agent's code (an agent id, a typo) or the creator's own is ignored without a word.
            found = tx.execute(
                "SELECT agent_id FROM sandbox_referral_codes WHERE code = ?", (str(referral_code),)
            ).fetchone()
            return str(found[0]) if found is not None and found[0] != creator else None
        own = tx.execute("SELECT referrer FROM sandbox_agents WHERE agent_id = ?", (creator,)).fetchone()
        return None if own is None or own[0] is None else str(own[0])

    def _event(self, tx: LedgerTx, escrow_id: str, event: str, actor: str | None, note: str) -> None:
        stamp = tx.now
        event_id = (
            f"{escrow_id}_created"
            if event == "created"
            else f"{escrow_id}_{event}_{int(stamp.timestamp() * 1000)}"
        )
        tx.execute(
            "INSERT OR REPLACE INTO sandbox_events (id, escrow_id, event, actor_id, note, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, escrow_id, event, actor, note, int(stamp.timestamp())),
        )

    def _row(self, tx: LedgerTx, escrow_id: str) -> dict[str, Any]:
        cursor = tx.execute("SELECT * FROM sandbox_escrows WHERE escrow_id = ?", (escrow_id,))
        row = cursor.fetchone()
        if row is None:
            raise ApiError(404, "not_found", "Escrow not found")
        names = [d[0] for d in cursor.description]
        return dict(zip(names, row, strict=True))

    def _participant_row(self, tx: LedgerTx, escrow_id: Any) -> dict[str, Any]:
        if not isinstance(escrow_id, str) or not escrow_id:
            raise ApiError(400, "invalid_escrow_id", "escrow_id is required")
        return self._row(tx, escrow_id)

    def complete(self, escrow_id: str, actor: str) -> dict[str, Any]:
        with self.ledger.transaction() as tx:
            row = self._row(tx, escrow_id)
            if actor != row["counterparty_id"]:
                raise ApiError(403, "forbidden", "Only the counterparty can mark the task complete")
            if row["status"] != "funded":
                raise ApiError(409, "invalid_status", f"Cannot complete escrow in status '{row['status']}'")
            tx.execute(
                "UPDATE sandbox_escrows SET status = 'completed', completed_at = ? WHERE escrow_id = ?",
                (tx.now.isoformat(), escrow_id),
            )
            self._event(tx, escrow_id, "completed", actor, "Counterparty marked task complete")
            return self._row(tx, escrow_id)

    def release(self, escrow_id: Any, actor: str, *, seed: bool = False) -> dict[str, Any]:
        with self.ledger.transaction() as tx:
            row = self._participant_row(tx, escrow_id)
            if actor != row["creator_id"]:
                raise ApiError(403, "forbidden", "Only the escrow creator can release funds")
            if row["status"] not in ("funded", "completed"):
                raise ApiError(
                    409,
                    "invalid_status",
                    f"Cannot release escrow in status '{row['status']}'",
                    **({"status": row["status"]} if seed else {}),
                )
            return self._pay_out(tx, row, actor)

    def _pay_out(self, tx: LedgerTx, row: dict[str, Any], actor: str | None) -> dict[str, Any]:
        amount = _money(row["amount"])
        fee = _money(row["commission"])
        referrer, share = self._referral_share(row)
        tx.post(
            row["escrow_id"],
            key=f"sandbox:release:{row['escrow_id']}",
            payee=row["counterparty_id"],
            net=amount - fee,
            fee=fee,
            referrer=referrer,
            referral_fee=share,
        )
        tx.execute(
            "UPDATE sandbox_escrows SET status = 'released', released_at = ? WHERE escrow_id = ?",
            (tx.now.isoformat(), row["escrow_id"]),
        )
        self._event(
            tx, row["escrow_id"], "released", actor, f"Released ${_dollars(amount - fee)} to counterparty"
        )
        log.debug("sandbox.escrow_released", escrow_id=row["escrow_id"])
        return {
            "escrow_id": row["escrow_id"],
            "status": "released",
            "amount_released": Money(amount - fee),
            "commission": fee,
            "referral_commission": share,
            "counterparty_id": row["counterparty_id"],
            "message": f"${_dollars(amount - fee)} released to counterparty.",
        }

    def _referral_share(self, row: dict[str, Any]) -> tuple[str | None, Money]:
        """The escrow's referrer and the share of the commission it is paid (release or timeout)."""
        referrer: str | None = row["referrer"]
        return referrer, referral_fee(_money(row["commission"]), row["dialect"]) if referrer else ZERO

    def _refund_less_commission(
        self, tx: LedgerTx, row: dict[str, Any], note: str, *, pay_referrer: bool
    ) -> None:
        amount = _money(row["amount"])
        fee = _money(row["commission"])
        referrer, share = self._referral_share(row) if pay_referrer else (None, ZERO)
        tx.post(
            row["escrow_id"],
            key=f"sandbox:refund:{row['escrow_id']}",
            payee=row["creator_id"],
            net=amount - fee,
            fee=fee,
            referrer=referrer,
            referral_fee=share,
        )
        # The published service stamps released_at on a refund too (see the recorded example).
        tx.execute(
            "UPDATE sandbox_escrows SET status = 'refunded', released_at = ? WHERE escrow_id = ?",
            (tx.now.isoformat(), row["escrow_id"]),
        )
        self._event(tx, row["escrow_id"], "refunded", None, note)

    def dispute(self, escrow_id: str, actor: str, reason: Any) -> dict[str, Any]:
        text = reason if isinstance(reason, str) and reason else "No reason given"
        with self.ledger.transaction() as tx:
            row = self._row(tx, escrow_id)
            if actor not in (row["creator_id"], row["counterparty_id"]):
                raise ApiError(403, "forbidden", "Only escrow participants can raise a dispute")
            if row["status"] not in ("funded", "completed"):
                raise ApiError(409, "invalid_status", f"Cannot dispute escrow in status '{row['status']}'")
            tx.execute(
                "UPDATE sandbox_escrows SET status = 'disputed', disputed_at = ? WHERE escrow_id = ?",
                (tx.now.isoformat(), escrow_id),
            )
            self._event(tx, escrow_id, "disputed", actor, f"Dispute: {text}")
        if self.dispute_review is not None:
            self.resolve_dispute(escrow_id, self.dispute_review)
        return {
            "escrow_id": escrow_id,
            "status": "disputed",
            "reason": text,
            "message": "Escrow flagged for manual review. Purple Flea team will investigate.",
            "contact": "support@purpleflea.com",
        }

    def resolve_dispute(self, escrow_id: str, outcome: Any) -> dict[str, Any]:
        if outcome not in ("refund", "release"):
            raise ApiError(400, "invalid_outcome", "outcome must be 'refund' or 'release'")
        with self.ledger.transaction() as tx:
            row = self._row(tx, escrow_id)
            if row["status"] != "disputed":
                raise ApiError(409, "invalid_status", f"Cannot resolve escrow in status '{row['status']}'")
            if outcome == "release":
                self._pay_out(tx, row, None)
            else:
                self._refund_less_commission(tx, row, "Refunded after manual review", pay_referrer=False)
            return self._row(tx, escrow_id)

    def cancel(self, escrow_id: Any, actor: str) -> dict[str, Any]:
        with self.ledger.transaction() as tx:
            row = self._participant_row(tx, escrow_id)
            if actor != row["creator_id"]:
                raise ApiError(403, "forbidden", "Only the escrow creator can cancel")
            if row["status"] not in ("funded", "completed"):
                raise ApiError(
                    409,
                    "invalid_status",
                    f"Cannot cancel escrow in status '{row['status']}'",
                    status=row["status"],
                )
            tx.void(row["escrow_id"], key=f"sandbox:cancel:{row['escrow_id']}")
            tx.execute(
                "UPDATE sandbox_escrows SET status = 'refunded', released_at = ? WHERE escrow_id = ?",
                (tx.now.isoformat(), row["escrow_id"]),
            )
            self._event(tx, row["escrow_id"], "refunded", actor, "Cancelled by creator; refunded in full")
        return {"escrow_id": row["escrow_id"], "status": "refunded"}

    def view(self, escrow_id: str, viewer: str | None) -> dict[str, Any]:
        with self.ledger.transaction() as tx:
            row = self._row(tx, escrow_id)
            events = None
            if viewer in (row["creator_id"], row["counterparty_id"]):
                events = [
                    {
                        "id": e[0],
                        "escrow_id": e[1],
                        "event": e[2],
                        "actor_id": e[3],
                        "note": e[4],
                        "created_at": e[5],
                    }
                    for e in tx.execute(
                        "SELECT id, escrow_id, event, actor_id, note, created_at FROM sandbox_events "
                        "WHERE escrow_id = ? ORDER BY rowid",
                        (escrow_id,),
                    )
                ]
        amount = _money(row["amount"])
        fee = _money(row["commission"])
        out: dict[str, Any] = {
            "escrow_id": row["escrow_id"],
            "status": row["status"],
            "amount_usd": amount,
            "commission_usd": fee,
            "net_to_counterparty": Money(amount - fee),
            "description": row["description"],
            "creator_id": row["creator_id"],
            "counterparty_id": row["counterparty_id"],
            "timeout_hours": row["timeout_hours"],
            "created_at": _js_time(_parse_time(row["created_at"])),
            "auto_release_at": _js_time(_parse_time(row["auto_release_at"])),
            "completed_at": _js_time(_parse_time(row["completed_at"])),
            "released_at": _js_time(_parse_time(row["released_at"])),
            "disputed_at": _js_time(_parse_time(row["disputed_at"])),
        }
        if events is not None:
            out["events"] = events
        return out

    def stats(self) -> dict[str, Any]:
        with self.ledger.transaction() as tx:
            created, volume = tx.execute(
                "SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM sandbox_escrows"
            ).fetchone()
            released, fees = tx.execute(
                "SELECT COUNT(*), COALESCE(SUM(commission), 0) FROM sandbox_escrows WHERE status = 'released'"
            ).fetchone()
            disputed = tx.execute(
                "SELECT COUNT(*) FROM sandbox_escrows WHERE status = 'disputed'"
            ).fetchone()[0]
        return {
            "total_created": created,
            "total_released": released,
            "total_disputed": disputed,
            "total_volume_usd": _money(volume),
            "total_commission_usd": _money(fees),
            "commission_rate": "1%",
            "referral_commission_rate": "15% of fees",
        }

    def sweep(self, at: datetime | None = None) -> list[str]:
        """Refund every funded or completed escrow due by `at` (default now): `amount - commission`
        to the creator, the referrer's share to the referrer, the rest of the commission kept."""
        with self.ledger.transaction() as tx:
            cutoff = tx.now if at is None else at
            due = tx.execute(
                "SELECT escrow_id FROM sandbox_escrows WHERE status IN ('funded', 'completed') "
                "AND auto_release_at <= ? ORDER BY auto_release_at",
                (cutoff.isoformat(),),
            ).fetchall()
            refunded = []
            for (escrow_id,) in due:
                row = self._row(tx, escrow_id)
                self._refund_less_commission(
                    tx, row, f"Auto-refunded after {row['timeout_hours']}h timeout", pay_referrer=True
                )
                refunded.append(str(escrow_id))
        if refunded:
            log.info("sandbox.swept", refunded=refunded)
        return refunded

    def maybe_sweep(self) -> None:
        """Play the timer's ticks that passed since the last one: the latest tick's sweep refunds what
        was due at that tick (an earlier tick's would have refunded a subset of it)."""
        if math.isinf(self.sweep_interval_s):
            return
        elapsed = (self.now() - self._sweep_origin).total_seconds()
        ticks = math.floor(elapsed / self.sweep_interval_s)
        if ticks > self._sweep_ticks:
            self._sweep_ticks = ticks
            self.sweep(self._sweep_origin + timedelta(seconds=ticks * self.sweep_interval_s))

    def ledger_report(self) -> dict[str, Any]:
        report = self.ledger.conservation()
        return {
            "accounts": [
                {"account": a.account_id, "balance": fmt(a.balance), "held": fmt(a.held)}
                for a in report.accounts
            ],
            "balances": fmt(report.balances),
            "held": fmt(report.held),
            "total": fmt(report.total),
            "minted": fmt(report.minted),
            "conserved": report.conserved,
        }


# ---------------------------------------------------------------------------------------- HTTP


_DECODER = json.JSONDecoder(parse_float=Decimal)  # json.loads(raw, parse_float=...) makes one per call


async def _json(request: Request, *, optional: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    try:
        data = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    return data


def _state(request: Request) -> EscrowSandbox:
    # Set by SandboxMiddleware, so the routes work even when an outer app routes to this one.
    state: EscrowSandbox = request.scope[STATE_KEY]
    return state


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _agent(request: Request) -> str:
    token = _bearer(request)
    agent = _state(request).agent_for_key(token) if token else None
    if agent is None:
        raise ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE)
    return agent


def _ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _limit_ip(request: Request) -> str:
    """The client IP as the escrow service's limiter reads it: the proxy headers only, so callers
    without them (every local client) share one bucket, "unknown"."""
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
    return forwarded or request.headers.get("x-real-ip") or "unknown"


Handler = Callable[[Request], Any]


def _api(route: str | None = None) -> Callable[[Handler], Handler]:
    """Rate limit (before anything else, the key included) and turn ApiError into its JSON answer."""

    def wrap(handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                if route is not None:
                    _state(request).admit(route, request.url.path, _limit_ip(request))
                result: Response = await handler(request)
                return result
            except ApiError as e:
                return e.response()

        return endpoint

    return wrap


@_api("create")
async def create_v1(request: Request) -> Response:
    state = _state(request)
    creator = _agent(request)
    body = await _json(request)
    amount = _request_amount(body.get("amount_usd"), "amount_usd")
    timeout_hours = _timeout_hours(body.get("timeout_hours"))
    row = state.create_escrow(
        creator=creator,
        counterparty=body.get("counterparty_agent_id"),
        amount=amount,
        description=body.get("description"),
        timeout_hours=timeout_hours,
        referral_code=body.get("referral_code"),
        dialect="v1",
    )
    escrow_id = row["escrow_id"]
    fee = _money(row["commission"])
    return _body(
        {
            "escrow_id": escrow_id,
            "amount_usd": amount,
            "commission_usd": fee,
            "net_to_counterparty": Money(amount - fee),
            "description": row["description"],
            "creator_id": creator,
            "counterparty_id": row["counterparty_id"],
            "status": "funded",
            "timeout_hours": row["timeout_hours"],
            "auto_release_at": _js_time(_parse_time(row["auto_release_at"])),
            "next_steps": {
                "counterparty": f"POST /escrow/complete/{escrow_id} when task is done",
                "creator": f"POST /escrow/release/{escrow_id} to release funds",
                "dispute": f"POST /escrow/dispute/{escrow_id} if something goes wrong",
            },
        },
        201,
    )


@_api("complete")
async def complete_v1(request: Request) -> Response:
    actor = _agent(request)
    escrow_id = request.path_params["escrow_id"]
    row = _state(request).complete(escrow_id, actor)
    return _body(
        {
            "escrow_id": escrow_id,
            "status": "completed",
            "message": "Task marked complete. Waiting for creator to release funds.",
            "next_step": f"Creator should call POST /escrow/release/{escrow_id}",
            "auto_release_at": _js_time(_parse_time(row["auto_release_at"])),
        }
    )


@_api("release")
async def release_v1(request: Request) -> Response:
    actor = _agent(request)
    return _body(_state(request).release(request.path_params["escrow_id"], actor))


@_api("dispute")
async def dispute_v1(request: Request) -> Response:
    actor = _agent(request)
    body = await _json(request, optional=True)
    return _body(_state(request).dispute(request.path_params["escrow_id"], actor, body.get("reason")))


@_api()
async def get_v1(request: Request) -> Response:
    token = _bearer(request)
    state = _state(request)
    viewer = state.agent_for_key(token) if token else None
    return _body(state.view(request.path_params["escrow_id"], viewer))


@_api()
async def stats(request: Request) -> Response:
    return _body(_state(request).stats())


@_api()
async def health(request: Request) -> Response:
    return _body({"status": "ok", "service": "agent-escrow", "version": "1.0.0"})


@_api("create")
async def create_seed(request: Request) -> Response:
    state = _state(request)
    creator = _agent(request)
    body = await _json(request)
    payer = body.get("payer_wallet")
    if payer != creator:
        raise ApiError(403, "forbidden", "payer_wallet must be the agent of the api key")
    amount = _request_amount(body.get("amount_usdc"), "amount_usdc")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError(400, "invalid_metadata", "metadata must be a JSON object")
    row = state.create_escrow(
        creator=creator,
        counterparty=body.get("payee_wallet"),
        amount=amount,
        description=body.get("description"),
        timeout_hours=_timeout_hours(body.get("auto_release")),
        referral_code=body.get("referral_code"),
        dialect="seed",
        metadata=metadata,
    )
    return _body({"escrow_id": row["escrow_id"], "status": "funded"}, 201)


@_api("release")
async def release_seed(request: Request) -> Response:
    actor = _agent(request)
    body = await _json(request)
    result = _state(request).release(body.get("escrow_id"), actor, seed=True)
    return _body({"escrow_id": result["escrow_id"], "status": "released"})


@_api("cancel")
async def cancel_seed(request: Request) -> Response:
    actor = _agent(request)
    body = await _json(request)
    return _body(_state(request).cancel(body.get("escrow_id"), actor))


@_api()
async def register(request: Request) -> Response:
    await _json(request, optional=True)
    state = _state(request)
    agent_id, api_key = state.create_agent()
    return _body(
        {
            "agent_id": agent_id,
            "api_key": api_key,
            "referral_code": state.referral_code(agent_id),
            "balance_usd": ZERO,
        },
        201,
    )


@_api()
async def faucet_claim(request: Request) -> Response:
    body = await _json(request)
    return _body(_state(request).claim_faucet(body.get("agent_casino_id"), _ip(request)))


# ---------------------------------------------------------------------------------------- admin


@_api()
async def admin_agents(request: Request) -> Response:
    body = await _json(request, optional=True)
    balance = body.get("balance", "0")
    if isinstance(balance, bool) or not isinstance(balance, str | int | Decimal):
        raise ApiError(400, "invalid_balance", 'balance must be an amount such as "100.00"')
    try:
        amount = to_money(balance, "balance")
    except InvalidAmount as e:
        raise ApiError(400, "invalid_balance", str(e)) from None
    referrer = body.get("referrer")
    if referrer is not None and not isinstance(referrer, str):
        raise ApiError(400, "invalid_referrer", "referrer must be an agent id")
    state = _state(request)
    agent_id, api_key = state.create_agent(amount, referrer)
    return JSONOut(
        {"agent_id": agent_id, "api_key": api_key, "referral_code": state.referral_code(agent_id)},
        status_code=201,
    )


@_api()
async def admin_ledger(request: Request) -> Response:
    return JSONOut(_state(request).ledger_report())


@_api()
async def admin_clock(request: Request) -> Response:
    body = await _json(request)
    seconds = body.get("advance_s")
    if isinstance(seconds, bool) or not isinstance(seconds, int | Decimal) or seconds < 0:
        raise ApiError(400, "invalid_advance", "advance_s must be a number of seconds >= 0")
    now = _state(request).advance(float(seconds))
    return JSONOut({"now": _js_time(now)})


@_api()
async def admin_sweep(request: Request) -> Response:
    return JSONOut({"refunded": _state(request).sweep()})


@_api()
async def admin_faults(request: Request) -> Response:
    state = _state(request)
    if request.method == "DELETE":
        state.faults.clear()
        return JSONOut({"faults": {}})
    if request.method == "POST":
        body = await _json(request)
        route, mode, count = body.get("route"), body.get("mode"), body.get("count", 1)
        if route not in FAULT_ROUTES:
            raise ApiError(400, "invalid_route", f"route must be one of {sorted(FAULT_ROUTES)}")
        if mode not in FAULT_MODES:
            raise ApiError(400, "invalid_mode", f"mode must be one of {sorted(FAULT_MODES)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ApiError(400, "invalid_count", "count must be an integer >= 1")
        delay = body.get("delay_s", body.get("seconds", 0))
        if isinstance(delay, bool) or not isinstance(delay, int | Decimal) or delay < 0:
            raise ApiError(400, "invalid_delay", "delay_s must be a number of seconds >= 0")
        state.faults.setdefault(route, deque()).append(
            Fault(mode=mode, count=count, delay_s=float(delay), close=body.get("close") is True)
        )
    return JSONOut(
        {
            "faults": {
                route: [
                    {"mode": f.mode, "count": f.count, "delay_s": str(f.delay_s), "close": f.close}
                    for f in queue
                ]
                for route, queue in state.faults.items()
                if queue
            }
        }
    )


@_api()
async def admin_resolve(request: Request) -> Response:
    body = await _json(request)
    row = _state(request).resolve_dispute(request.path_params["escrow_id"], body.get("outcome"))
    return JSONOut({"escrow_id": row["escrow_id"], "status": row["status"]})


# ---------------------------------------------------------------------------------------- faults


def _fault_route(method: str, path: str) -> str | None:
    if method == "POST":
        if path in ("/escrow/create", "/api/escrow/create"):
            return "create"
        if path.startswith("/escrow/release/") or path == "/api/escrow/release":
            return "release"
        if path.startswith("/escrow/complete/"):
            return "complete"
        if path.startswith("/escrow/dispute/"):
            return "dispute"
        if path == "/api/escrow/cancel":
            return "cancel"
    if method == "GET" and path.startswith("/escrow/") and path != "/escrow/stats":
        return "get"
    return None


class SandboxMiddleware:
    """Runs the lazy timeout sweep before each request and plays the injected faults."""

    def __init__(self, app: ASGIApp, state: EscrowSandbox) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[STATE_KEY] = self.state
        self.state.maybe_sweep()
        route = _fault_route(scope["method"], scope["path"])
        fault = self.state.take_fault(route) if route else None
        if fault is None:
            await self.app(scope, receive, send)
            return
        log.info("sandbox.fault", route=route, mode=fault.mode)
        if fault.mode == "error_before":
            await _send(send, ApiError(500, "internal_error", "Injected fault: nothing was done").response())
        elif fault.mode == "rate_limit":
            # Shaped as the service's own 429: no Retry-After, no retry_after in the body.
            await _send(send, ApiError(429, "rate_limited", "Too many requests (injected).").response())
        elif fault.mode == "delay":
            # Read the request first: the work must still happen when the client gives up meanwhile.
            replay = await _buffered(receive)
            await asyncio.sleep(fault.delay_s)
            await self.app(scope, replay, send)
        else:  # drop_after: do the work, lose the answer

            async def swallow(message: Message) -> None:
                return None

            await self.app(scope, receive, swallow)
            if fault.close:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4096")]}
                )
                await send({"type": "http.response.body", "body": b'{"escrow_id": "esc_', "more_body": True})
                # Returning with the body unfinished makes uvicorn close the connection.
                return
            await _send(
                send, ApiError(500, "internal_error", "Injected fault after the work was done").response()
            )


async def _buffered(receive: Receive) -> Receive:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


async def _send(send: Send, response: Response) -> None:
    await send(
        {"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers}
    )
    await send({"type": "http.response.body", "body": response.body})


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    if status == 405:
        status = 404
    return _body({"error": "not_found"}, status)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("sandbox.internal_error", error=type(exc).__name__)
    return _body({"error": "internal_error", "message": "Internal server error"}, 500)


def create_escrow_app(
    *,
    ledger_path: str | None = None,
    clock: Callable[[], datetime] | None = None,
    rate_limits: dict[str, int] | None = None,
    sweep_interval_s: float | None = None,
    rate_limit_window_s: float = RATE_LIMIT_WINDOW_S,
    seed: int = 0,
    dispute_review: str | None = None,
) -> Starlette:
    """The sandbox escrow server; its state is `app.state.escrow` (an `EscrowSandbox`).

    By default it behaves as the published server (module docstring). `ledger_path` None keeps
    everything in memory; a file path survives a restart. `rate_limits` overrides the limits per
    window of `rate_limit_window_s` per route (`create`, `complete`, `release`, `dispute`, `cancel`)
    and the faucet's claims per IP per 24 h (`faucet`). `sweep_interval_s` sets the sweep's timer
    (math.inf: only `POST /sandbox/sweep`). `seed` makes agent and escrow ids reproducible.
    `dispute_review` ("refund" or "release") decides every dispute at once, as Purple Flea's review
    would; None (the published behaviour) leaves disputes locked (the admin route can resolve one).
    """
    state = EscrowSandbox(
        ledger_path=ledger_path,
        clock=clock,
        rate_limits=rate_limits,
        sweep_interval_s=sweep_interval_s,
        rate_limit_window_s=rate_limit_window_s,
        seed=seed,
        dispute_review=dispute_review,
    )
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/escrow/create", create_v1, methods=["POST"]),
        Route("/escrow/stats", stats, methods=["GET"]),
        Route("/escrow/complete/{escrow_id}", complete_v1, methods=["POST"]),
        Route("/escrow/release/{escrow_id}", release_v1, methods=["POST"]),
        Route("/escrow/dispute/{escrow_id}", dispute_v1, methods=["POST"]),
        Route("/escrow/{escrow_id}", get_v1, methods=["GET"]),
        Route("/api/escrow/create", create_seed, methods=["POST"]),
        Route("/api/escrow/release", release_seed, methods=["POST"]),
        Route("/api/escrow/cancel", cancel_seed, methods=["POST"]),
        Route("/api/v1/auth/register", register, methods=["POST"]),
        Route("/faucet/claim", faucet_claim, methods=["POST"]),
        Route("/sandbox/agents", admin_agents, methods=["POST"]),
        Route("/sandbox/ledger", admin_ledger, methods=["GET"]),
        Route("/sandbox/clock", admin_clock, methods=["POST"]),
        Route("/sandbox/sweep", admin_sweep, methods=["POST"]),
        Route("/sandbox/faults", admin_faults, methods=["GET", "POST", "DELETE"]),
        Route("/sandbox/disputes/{escrow_id}/resolve", admin_resolve, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SandboxMiddleware, state=state)],
        exception_handlers={404: _not_found, 405: _not_found, 500: _internal_error},
    )
    app.state.escrow = state
    return app
