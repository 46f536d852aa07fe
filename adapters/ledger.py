"""The local two-phase ledger: accounts, holds and postings in SQLite.

Money moves in two phases, like a card payment: `hold` takes an amount from the payer's balance into
a hold (an escrow); `post` then settles the hold, fully or partly (payee net, fee, the referrer's
share of the fee, the remainder back to the payer), or `void` gives it all back. A hold may carry an
expiry: `expire_holds` voids the held ones whose time has passed.

Every operation that changes money carries a key. The same key with the same parameters gives the
same answer again (the answer is stored with the key); the same key with other parameters is refused
with `IdempotencyConflict`. A hold can be found again by the key it was created with.

Money is conserved: the sum of all balances and all open holds changes only through `mint`, and
`conservation()` says whether that still holds. Amounts are stored as integer micro-units (1 USDC =
1,000,000), so SQLite never sees a float.

Concurrency: one connection per `Ledger` object, guarded by a lock (threads), and one transaction
per operation opened with `BEGIN IMMEDIATE` (processes sharing the file wait for each other through
SQLite's busy timeout). The file runs in WAL mode. `path=None` keeps the ledger in memory.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from podsettle.domain.money import ZERO, Money, fmt, to_money
from podsettle.support.logs import get_logger

log = get_logger(__name__)

MICRO = 1_000_000
FEES_ACCOUNT = "fees"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_accounts (
    account_id TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0),
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_holds (
    hold_id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    payer TEXT NOT NULL REFERENCES ledger_accounts (account_id),
    amount INTEGER NOT NULL CHECK (amount > 0),
    status TEXT NOT NULL CHECK (status IN ('held', 'posted', 'voided', 'expired')),
    expires_at TEXT,
    meta TEXT NOT NULL,
    created_at TEXT NOT NULL,
    settled_at TEXT,
    settled_by TEXT
);
CREATE INDEX IF NOT EXISTS ledger_holds_open ON ledger_holds (status, expires_at);
CREATE TABLE IF NOT EXISTS ledger_operations (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_entries (
    entry_id INTEGER PRIMARY KEY AUTOINCREMENT,
    op_key TEXT NOT NULL,
    account_id TEXT NOT NULL,
    delta INTEGER NOT NULL,
    memo TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO ledger_meta (name, value) VALUES ('minted', 0);
"""

# ---------------------------------------------------------------------------------------- errors


class LedgerError(Exception):
    """Base of the ledger's errors; nothing was changed when one is raised."""


class UnknownAccount(LedgerError):
    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        super().__init__(f"account {account_id!r} does not exist")


class UnknownHold(LedgerError):
    def __init__(self, hold_id: str) -> None:
        self.hold_id = hold_id
        super().__init__(f"hold {hold_id!r} does not exist")


class InsufficientFunds(LedgerError):
    def __init__(self, account_id: str, balance: Money, amount: Money) -> None:
        self.account_id = account_id
        self.balance = balance
        self.amount = amount
        super().__init__(
            f"account {account_id!r} holds {fmt(balance)}, less than the {fmt(amount)} asked for"
        )


class HoldNotOpen(LedgerError):
    """The hold was already posted, voided or expired."""

    def __init__(self, hold_id: str, status: str) -> None:
        self.hold_id = hold_id
        self.status = status
        super().__init__(f"hold {hold_id!r} is {status}, not held")


class HoldExpired(HoldNotOpen):
    """The hold's expiry has passed: it can only be voided (or swept by `expire_holds`)."""

    def __init__(self, hold_id: str) -> None:
        super().__init__(hold_id, "past its expiry")


class IdempotencyConflict(LedgerError):
    """The key was used before for another operation or other parameters."""

    def __init__(self, key: str, kind: str, detail: str) -> None:
        self.key = key
        self.kind = kind
        super().__init__(f"key {key!r} was already used for {kind} with other parameters: {detail}")


class InvalidPosting(LedgerError, ValueError):
    """A posting whose parts do not fit the hold; `field` names the part."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field}: {reason}")


# ---------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Hold:
    hold_id: str
    key: str
    payer: str
    amount: Money
    status: str  # held, posted, voided, expired
    expires_at: datetime | None
    meta: dict[str, str]


@dataclass(frozen=True)
class Posting:
    """How a hold was settled: to the payee, the fee (of which the referral share), the rest back."""

    hold_id: str
    key: str
    payer: str
    payee: str
    amount: Money  # the hold's amount
    net: Money
    fee: Money
    referrer: str | None
    referral_fee: Money
    returned: Money
    status: str  # posted, voided or expired


@dataclass(frozen=True)
class AccountBalance:
    account_id: str
    balance: Money
    held: Money  # in open holds paid by this account


@dataclass(frozen=True)
class Conservation:
    accounts: tuple[AccountBalance, ...]
    balances: Money
    held: Money
    minted: Money

    @property
    def total(self) -> Money:
        return Money(self.balances + self.held)

    @property
    def conserved(self) -> bool:
        return self.total == self.minted


def _micro(amount: Money) -> int:
    return int(amount * MICRO)


def _money(micro: int) -> Money:
    return to_money(Decimal(micro) / MICRO)


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("ledger times must be timezone-aware")
    return moment.astimezone(UTC).isoformat()


def _canonical(params: dict[str, Any]) -> str:
    """Compact JSON with sorted keys (an operation's params and result are plain JSON values)."""
    return orjson.dumps(params, option=orjson.OPT_SORT_KEYS).decode()


# ---------------------------------------------------------------------------------------- ledger


class LedgerTx:
    """One open transaction: the ledger's operations, plus `execute` for tables of the caller that
    must change in the same transaction (the sandbox's escrow rows)."""

    def __init__(self, conn: sqlite3.Connection, now: datetime) -> None:
        self._conn = conn
        self.now = now
        self._holds: dict[str, Hold] = {}  # read in this transaction and not changed since

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    # ------------------------------------------------------------------ idempotency

    def _recall(self, key: str, kind: str, params: dict[str, Any]) -> dict[str, Any] | None:
        if not key or not isinstance(key, str):
            raise InvalidPosting("key", "must be a non-empty string")
        row = self._conn.execute(
            "SELECT kind, params, result FROM ledger_operations WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        if row[0] != kind:
            raise IdempotencyConflict(key, row[0], f"now asked for {kind}")
        # Compared as values: rows written before the params were written with orjson spell
        # non-ASCII text as \u escapes.
        if orjson.loads(row[1]) != params:
            raise IdempotencyConflict(key, kind, f"first {row[1]}, now {_canonical(params)}")
        result: dict[str, Any] = orjson.loads(row[2])
        return result

    def _remember(self, key: str, kind: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        self._conn.execute(
            "INSERT INTO ledger_operations (key, kind, params, result, created_at) VALUES (?, ?, ?, ?, ?)",
            (key, kind, _canonical(params), _canonical(result), _iso(self.now)),
        )

    def _move(self, key: str, account_id: str, delta: int, memo: str) -> None:
        if delta == 0:
            return
        cursor = self._conn.execute(
            "UPDATE ledger_accounts SET balance = balance + ? WHERE account_id = ?", (delta, account_id)
        )
        if cursor.rowcount != 1:
            raise UnknownAccount(account_id)
        self._conn.execute(
            "INSERT INTO ledger_entries (op_key, account_id, delta, memo) VALUES (?, ?, ?, ?)",
            (key, account_id, delta, memo),
        )

    def _withdraw(self, key: str, account_id: str, value: Money, memo: str) -> None:
        """Take `value` from the account's balance, or raise (unknown account, insufficient funds)."""
        micro = _micro(value)
        cursor = self._conn.execute(
            "UPDATE ledger_accounts SET balance = balance - ? WHERE account_id = ? AND balance >= ?",
            (micro, account_id, micro),
        )
        if cursor.rowcount != 1:
            raise InsufficientFunds(account_id, self.balance(account_id), value)  # or UnknownAccount
        self._conn.execute(
            "INSERT INTO ledger_entries (op_key, account_id, delta, memo) VALUES (?, ?, ?, ?)",
            (key, account_id, -micro, memo),
        )

    # ------------------------------------------------------------------ accounts

    def open_account(self, account_id: str) -> bool:
        """Create the account with a zero balance; False when it existed already."""
        if not account_id or not isinstance(account_id, str):
            raise InvalidPosting("account_id", "must be a non-empty string")
        cursor = self._conn.execute(
            "INSERT OR IGNORE INTO ledger_accounts (account_id, balance, created_at) VALUES (?, 0, ?)",
            (account_id, _iso(self.now)),
        )
        return cursor.rowcount == 1

    def _require_accounts(self, *account_ids: str) -> None:
        """Raise `UnknownAccount` for the first of `account_ids` that does not exist (one query)."""
        wanted = dict.fromkeys(account_ids)
        marks = ", ".join("?" * len(wanted))
        found = {
            row[0]
            for row in self._conn.execute(
                f"SELECT account_id FROM ledger_accounts WHERE account_id IN ({marks})", tuple(wanted)
            )
        }
        for account_id in wanted:
            if account_id not in found:
                raise UnknownAccount(account_id)

    def has_account(self, account_id: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM ledger_accounts WHERE account_id = ?", (account_id,))
        return row.fetchone() is not None

    def balance(self, account_id: str) -> Money:
        row = self._conn.execute(
            "SELECT balance FROM ledger_accounts WHERE account_id = ?", (account_id,)
        ).fetchone()
        if row is None:
            raise UnknownAccount(account_id)
        return _money(row[0])

    def mint(self, account_id: str, amount: object, *, key: str) -> Money:
        """Create money in an account (the only way the total changes); returns the amount."""
        value = to_money(amount, "amount", allow_zero=False)
        params = {"account": account_id, "amount": fmt(value)}
        if self._recall(key, "mint", params) is not None:
            return value
        if not self.has_account(account_id):
            raise UnknownAccount(account_id)
        self._move(key, account_id, _micro(value), "mint")
        self._conn.execute("UPDATE ledger_meta SET value = value + ? WHERE name = 'minted'", (_micro(value),))
        self._remember(key, "mint", params, {"amount": fmt(value)})
        return value

    def transfer(self, source: str, target: str, amount: object, *, key: str) -> Money:
        value = to_money(amount, "amount", allow_zero=False)
        params = {"source": source, "target": target, "amount": fmt(value)}
        if self._recall(key, "transfer", params) is not None:
            return value
        available = self.balance(source)
        if available < value:
            raise InsufficientFunds(source, available, value)
        if not self.has_account(target):
            raise UnknownAccount(target)
        self._move(key, source, -_micro(value), "transfer out")
        self._move(key, target, _micro(value), "transfer in")
        self._remember(key, "transfer", params, {"amount": fmt(value)})
        return value

    # ------------------------------------------------------------------ holds

    def hold(
        self,
        *,
        key: str,
        payer: str,
        amount: object,
        expires_at: datetime | None = None,
        meta: dict[str, str] | None = None,
        hold_id: str | None = None,
    ) -> Hold:
        """Move `amount` from the payer's balance into a new hold. The answer to a repeated key is
        the hold as it was created."""
        value = to_money(amount, "amount", allow_zero=False)
        meta = dict(meta or {})
        if any(not isinstance(k, str) or not isinstance(v, str) for k, v in meta.items()):
            raise InvalidPosting("meta", "keys and values must be strings")
        params = {
            "payer": payer,
            "amount": fmt(value),
            "expires_at": _iso(expires_at) if expires_at else None,
            "meta": meta,
        }
        if hold_id is not None:
            params["hold_id"] = hold_id
        recalled = self._recall(key, "hold", params)
        if recalled is not None:
            return _hold_from(recalled)
        new_id = hold_id or f"hold_{uuid.uuid4().hex}"
        self._withdraw(key, payer, value, f"hold {new_id}")
        self._conn.execute(
            "INSERT INTO ledger_holds (hold_id, key, payer, amount, status, expires_at, meta, created_at)"
            " VALUES (?, ?, ?, ?, 'held', ?, ?, ?)",
            (new_id, key, payer, _micro(value), params["expires_at"], _canonical(meta), _iso(self.now)),
        )
        result = {"hold_id": new_id, "key": key, **params, "status": "held"}
        self._remember(key, "hold", params, result)
        return _hold_from(result)

    def get_hold(self, hold_id: str) -> Hold:
        known = self._holds.get(hold_id)
        if known is not None:
            return known
        row = self._conn.execute(
            "SELECT hold_id, key, payer, amount, status, expires_at, meta FROM ledger_holds "
            "WHERE hold_id = ?",
            (hold_id,),
        ).fetchone()
        if row is None:
            raise UnknownHold(hold_id)
        hold = self._holds[hold_id] = _hold_row(row)
        return hold

    def find_hold(self, key: str) -> Hold | None:
        row = self._conn.execute(
            "SELECT hold_id, key, payer, amount, status, expires_at, meta FROM ledger_holds WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else _hold_row(row)

    def settlement(self, hold_id: str) -> Posting | None:
        """How a settled hold was settled (None while it is held)."""
        hold = self.get_hold(hold_id)
        if hold.status == "held":
            return None
        row = self._conn.execute(
            "SELECT o.result FROM ledger_holds h JOIN ledger_operations o ON o.key = h.settled_by "
            "WHERE h.hold_id = ?",
            (hold_id,),
        ).fetchone()
        if row is None:  # pragma: no cover - every settled hold has its operation
            raise LedgerError(f"hold {hold_id!r} is {hold.status} but its settlement is missing")
        return _posting_from(json.loads(row[0]))

    def post(
        self,
        hold_id: str,
        *,
        key: str,
        payee: str,
        net: object,
        fee: object,
        fee_account: str = FEES_ACCOUNT,
        referrer: str | None = None,
        referral_fee: object = ZERO,
    ) -> Posting:
        """Settle a hold: `net` to the payee, `fee` to the fee account (less `referral_fee`, which goes
        to the referrer), and whatever of the hold is left back to the payer (a partial post)."""
        net_v = to_money(net, "net")
        fee_v = to_money(fee, "fee")
        referral_v = to_money(referral_fee, "referral_fee")
        params = {
            "hold_id": hold_id,
            "payee": payee,
            "net": fmt(net_v),
            "fee": fmt(fee_v),
            "fee_account": fee_account,
            "referrer": referrer,
            "referral_fee": fmt(referral_v),
        }
        recalled = self._recall(key, "post", params)
        if recalled is not None:
            return _posting_from(recalled)
        hold = self._open_hold(hold_id)
        if net_v + fee_v == 0:
            raise InvalidPosting("net", "a post must move something; void the hold instead")
        if net_v + fee_v > hold.amount:
            raise InvalidPosting(
                "net", f"net {fmt(net_v)} + fee {fmt(fee_v)} exceeds the hold's {fmt(hold.amount)}"
            )
        if referral_v > fee_v:
            raise InvalidPosting("referral_fee", f"{fmt(referral_v)} exceeds the fee {fmt(fee_v)}")
        if referral_v > 0 and not referrer:
            raise InvalidPosting("referrer", "a referral fee needs a referrer")
        self._require_accounts(payee, fee_account, *([referrer] if referrer and referral_v > 0 else []))
        returned = Money(hold.amount - net_v - fee_v)
        self._move(key, payee, _micro(net_v), f"post {hold_id}: net")
        self._move(key, fee_account, _micro(Money(fee_v - referral_v)), f"post {hold_id}: fee")
        if referrer and referral_v > 0:
            self._move(key, referrer, _micro(referral_v), f"post {hold_id}: referral")
        self._move(key, hold.payer, _micro(returned), f"post {hold_id}: remainder")
        self._close(hold_id, "posted", key)
        result = {
            "hold_id": hold_id,
            "key": key,
            "payer": hold.payer,
            "payee": payee,
            "amount": fmt(hold.amount),
            "net": fmt(net_v),
            "fee": fmt(fee_v),
            "referrer": referrer if referral_v > 0 else None,
            "referral_fee": fmt(referral_v),
            "returned": fmt(returned),
            "status": "posted",
        }
        self._remember(key, "post", params, result)
        return _posting_from(result)

    def void(self, hold_id: str, *, key: str) -> Posting:
        """Give the whole hold back to the payer (also after its expiry)."""
        params = {"hold_id": hold_id}
        recalled = self._recall(key, "void", params)
        if recalled is not None:
            return _posting_from(recalled)
        hold = self.get_hold(hold_id)
        if hold.status != "held":
            raise HoldNotOpen(hold_id, hold.status)
        return self._give_back(hold, key, "void", "voided", params)

    def expire_holds(self, now: datetime | None = None) -> list[Posting]:
        """Void every held hold whose expiry is at or before `now` (default: the transaction's time)."""
        moment = _iso(now or self.now)
        rows = self._conn.execute(
            "SELECT hold_id, key, payer, amount, status, expires_at, meta FROM ledger_holds "
            "WHERE status = 'held' AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at",
            (moment,),
        ).fetchall()
        done = []
        for row in rows:
            hold = _hold_row(row)
            key = f"expire:{hold.hold_id}"
            done.append(self._give_back(hold, key, "expire", "expired", {"hold_id": hold.hold_id}))
        return done

    def _give_back(self, hold: Hold, key: str, kind: str, status: str, params: dict[str, Any]) -> Posting:
        self._move(key, hold.payer, _micro(hold.amount), f"{kind} {hold.hold_id}")
        self._close(hold.hold_id, status, key)
        result = {
            "hold_id": hold.hold_id,
            "key": key,
            "payer": hold.payer,
            "payee": hold.payer,
            "amount": fmt(hold.amount),
            "net": fmt(ZERO),
            "fee": fmt(ZERO),
            "referrer": None,
            "referral_fee": fmt(ZERO),
            "returned": fmt(hold.amount),
            "status": status,
        }
        self._remember(key, kind, params, result)
        return _posting_from(result)

    def _open_hold(self, hold_id: str) -> Hold:
        hold = self.get_hold(hold_id)
        if hold.status != "held":
            raise HoldNotOpen(hold_id, hold.status)
        if hold.expires_at is not None and hold.expires_at <= self.now:
            raise HoldExpired(hold_id)
        return hold

    def _close(self, hold_id: str, status: str, key: str) -> None:
        self._holds.pop(hold_id, None)
        self._conn.execute(
            "UPDATE ledger_holds SET status = ?, settled_at = ?, settled_by = ? "
            "WHERE hold_id = ? AND status = 'held'",
            (status, _iso(self.now), key, hold_id),
        )

    # ------------------------------------------------------------------ report

    def conservation(self) -> Conservation:
        rows = self._conn.execute(
            "SELECT a.account_id, a.balance, COALESCE(SUM(h.amount), 0) FROM ledger_accounts a "
            "LEFT JOIN ledger_holds h ON h.payer = a.account_id AND h.status = 'held' "
            "GROUP BY a.account_id ORDER BY a.account_id"
        ).fetchall()
        accounts = tuple(AccountBalance(r[0], _money(r[1]), _money(r[2])) for r in rows)
        minted = self._conn.execute("SELECT value FROM ledger_meta WHERE name = 'minted'").fetchone()[0]
        return Conservation(
            accounts=accounts,
            balances=_money(sum(r[1] for r in rows)),
            held=_money(sum(r[2] for r in rows)),
            minted=_money(minted),
        )


def _hold_from(data: dict[str, Any]) -> Hold:
    expires = data.get("expires_at")
    return Hold(
        hold_id=data["hold_id"],
        key=data["key"],
        payer=data["payer"],
        amount=to_money(data["amount"]),
        status=data["status"],
        expires_at=datetime.fromisoformat(expires) if expires else None,
        meta=dict(data.get("meta") or {}),
    )


def _hold_row(row: tuple[Any, ...]) -> Hold:
    return Hold(
        hold_id=row[0],
        key=row[1],
        payer=row[2],
        amount=_money(row[3]),
        status=row[4],
        expires_at=datetime.fromisoformat(row[5]) if row[5] else None,
        meta=json.loads(row[6]),
    )


def _posting_from(data: dict[str, Any]) -> Posting:
    return Posting(
        hold_id=data["hold_id"],
        key=data["key"],
        payer=data["payer"],
        payee=data["payee"],
        amount=to_money(data["amount"]),
        net=to_money(data["net"]),
        fee=to_money(data["fee"]),
        referrer=data["referrer"],
        referral_fee=to_money(data["referral_fee"]),
        returned=to_money(data["returned"]),
        status=data["status"],
    )


class Ledger:
    """The ledger on one SQLite database. Each public method is one transaction; `transaction()`
    groups several operations (and the caller's own statements) into one."""

    def __init__(
        self,
        path: str | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = path
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            path or ":memory:", timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        if path:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        with self.transaction() as tx:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.execute(statement)
            tx.open_account(FEES_ACCOUNT)

    def now(self) -> datetime:
        return self._clock()

    @contextmanager
    def transaction(self) -> Iterator[LedgerTx]:
        """`BEGIN IMMEDIATE` ... `COMMIT`, or `ROLLBACK` when the block raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield LedgerTx(self._conn, self._clock())
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"Ledger(path={self.path!r})"

    # One transaction per call: thin wrappers over LedgerTx.

    def open_account(self, account_id: str) -> bool:
        with self.transaction() as tx:
            return tx.open_account(account_id)

    def balance(self, account_id: str) -> Money:
        with self.transaction() as tx:
            return tx.balance(account_id)

    def mint(self, account_id: str, amount: object, *, key: str) -> Money:
        with self.transaction() as tx:
            minted = tx.mint(account_id, amount, key=key)
        log.debug("ledger.mint", account=account_id, amount=fmt(minted))
        return minted

    def transfer(self, source: str, target: str, amount: object, *, key: str) -> Money:
        with self.transaction() as tx:
            return tx.transfer(source, target, amount, key=key)

    def hold(
        self,
        *,
        key: str,
        payer: str,
        amount: object,
        expires_at: datetime | None = None,
        meta: dict[str, str] | None = None,
        hold_id: str | None = None,
    ) -> Hold:
        with self.transaction() as tx:
            return tx.hold(
                key=key, payer=payer, amount=amount, expires_at=expires_at, meta=meta, hold_id=hold_id
            )

    def get_hold(self, hold_id: str) -> Hold:
        with self.transaction() as tx:
            return tx.get_hold(hold_id)

    def find_hold(self, key: str) -> Hold | None:
        with self.transaction() as tx:
            return tx.find_hold(key)

    def settlement(self, hold_id: str) -> Posting | None:
        with self.transaction() as tx:
            return tx.settlement(hold_id)

    def post(
        self,
        hold_id: str,
        *,
        key: str,
        payee: str,
        net: object,
        fee: object,
        fee_account: str = FEES_ACCOUNT,
        referrer: str | None = None,
        referral_fee: object = ZERO,
    ) -> Posting:
        with self.transaction() as tx:
            return tx.post(
                hold_id,
                key=key,
                payee=payee,
                net=net,
                fee=fee,
                fee_account=fee_account,
                referrer=referrer,
                referral_fee=referral_fee,
            )

    def void(self, hold_id: str, *, key: str) -> Posting:
        with self.transaction() as tx:
            return tx.void(hold_id, key=key)

    def expire_holds(self, now: datetime | None = None) -> list[Posting]:
        with self.transaction() as tx:
            expired = tx.expire_holds(now)
        if expired:
            log.info("ledger.expired", holds=[p.hold_id for p in expired])
        return expired

    def conservation(self) -> Conservation:
        with self.transaction() as tx:
            return tx.conservation()
