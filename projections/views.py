"""The read models' SQLite tables, and the projector that keeps them up to date.

Each flush writes the changed job rows, the changed tallies, the tracking position and the log
checkpoints in one SQLite transaction: after a crash the views and their position agree, and the
next catch-up resumes exactly after the last event they include.

The projector also keeps a running hash of the notification log as it reads it (the log digest),
with a checkpoint every `CHECKPOINT_EVERY` events. The audit recomputes it: an event changed,
removed, inserted or moved in the store after the read model saw it no longer gives the same digest.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from podsettle.domain import EscrowJob, fmt
from podsettle.projections.rows import AMOUNTS, COUNTS, JobRow, Totals, funded_at_after, row_of
from podsettle.support.lru import keep

CHECKPOINT_EVERY = 1_000
GENESIS_DIGEST = bytes(32)
VIEWS = ("all", "batch", "payee", "endpoint")

_ROW_COLUMNS = (
    "job_id",
    "job_key",
    "batch_id",
    "endpoint_id",
    "payer",
    "payee",
    "state",
    "escrow_id",
    "budget",
    *AMOUNTS,
    "execution_ms",
    "delay_ms",
    "worker_id",
    "intent",
    "awaiting_outcome",
    "opened_at",
    "funded_at",
    "version",
    "position",
)
_ROW_MONEY = frozenset(("budget", *AMOUNTS))
# The jobs table keeps the derived funding latency after `funded_at`, for the timings queries.
_FUNDING_US_AT = _ROW_COLUMNS.index("funded_at") + 1
# The tables' layout; a views file of another layout is dropped and rebuilt from the log (the read
# models hold nothing the log does not). 2: the amounts of JobMoney and Totals, `awaiting_outcome`.
SCHEMA_VERSION = 2

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, job_key TEXT NOT NULL, batch_id TEXT, endpoint_id TEXT NOT NULL,
    payer TEXT NOT NULL, payee TEXT NOT NULL, state TEXT NOT NULL, escrow_id TEXT,
    budget TEXT NOT NULL, {", ".join(f"{name} TEXT NOT NULL" for name in AMOUNTS)},
    execution_ms INTEGER, delay_ms INTEGER, worker_id TEXT, intent TEXT,
    awaiting_outcome INTEGER NOT NULL, opened_at TEXT NOT NULL, funded_at TEXT, funding_us INTEGER,
    version INTEGER NOT NULL, position INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (batch_id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS tallies (
    view TEXT NOT NULL, key TEXT NOT NULL,
    {", ".join(f"{name} INTEGER NOT NULL" for name in COUNTS)},
    {", ".join(f"{name} TEXT NOT NULL" for name in AMOUNTS)},
    PRIMARY KEY (view, key)
);
CREATE TABLE IF NOT EXISTS tracking (
    name TEXT PRIMARY KEY, position INTEGER NOT NULL, events INTEGER NOT NULL, log_digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS log_checkpoints (
    position INTEGER PRIMARY KEY, events INTEGER NOT NULL, log_digest TEXT NOT NULL
);
"""
TABLES = ("jobs", "tallies", "tracking", "log_checkpoints")
_STORED_COLUMNS = (*_ROW_COLUMNS[:_FUNDING_US_AT], "funding_us", *_ROW_COLUMNS[_FUNDING_US_AT:])
_SELECT_COLUMNS = ", ".join(_STORED_COLUMNS)


def log_step(
    digest: bytes, position: int, originator_id: UUID | str, version: int, topic: str, state: bytes
) -> bytes:
    """The log digest after one more notification: sha256(previous digest, position, the stored event).

    A UUID originator id counts as its 32 hex digits (as the SQLite recorder stores it)."""
    h = hashlib.sha256(digest)
    if isinstance(originator_id, UUID):  # its 32 hex digits, formatted in C (`UUID.hex` is Python code)
        h.update(f"{position}\n{originator_id.int:032x}\n{version}\n{topic}\n".encode())
    else:
        h.update(f"{position}\n{originator_id}\n{version}\n{topic}\n".encode())
    h.update(state)
    return h.digest()


@dataclass(frozen=True)
class Checkpoint:
    position: int
    events: int
    log_digest: str


@dataclass(frozen=True)
class Tracking:
    position: int
    events: int
    log_digest: str


def _row_values(row: JobRow) -> tuple[Any, ...]:
    """A row as the jobs table stores it, in the order of `_ROW_COLUMNS` with `funding_us` after
    `funded_at`: amounts as their canonical text, times in ISO format, the flag as 0 or 1."""
    funded_at = row.funded_at
    return (
        row.job_id,
        row.job_key,
        row.batch_id,
        row.endpoint_id,
        row.payer,
        row.payee,
        row.state,
        row.escrow_id,
        fmt(row.budget),
        *map(fmt, row.money),
        row.execution_ms,
        row.delay_ms,
        row.worker_id,
        row.intent,
        int(row.awaiting_outcome),
        row.opened_at.isoformat(),
        None if funded_at is None else funded_at.isoformat(),
        row.funding_us,
        row.version,
        row.position,
    )


def row_from_record(record: sqlite3.Row | tuple[Any, ...]) -> JobRow:
    """A job row from the jobs table's columns (as `ViewStore.iter_records` gives them)."""
    return _row_from(record)


def _row_from(record: sqlite3.Row | tuple[Any, ...]) -> JobRow:
    data = dict(zip(_STORED_COLUMNS, record, strict=True))
    data.pop("funding_us")
    for name in _ROW_MONEY:
        data[name] = Decimal(data[name])
    data["awaiting_outcome"] = bool(data["awaiting_outcome"])
    data["opened_at"] = datetime.fromisoformat(data["opened_at"])
    if data["funded_at"] is not None:
        data["funded_at"] = datetime.fromisoformat(data["funded_at"])
    return JobRow(**data)


def _tally_from(record: Iterable[Any]) -> Totals:
    values = list(record)
    tally = Totals()
    for name, value in zip(COUNTS, values[: len(COUNTS)], strict=True):
        setattr(tally, name, int(value))
    for name, value in zip(AMOUNTS, values[len(COUNTS) :], strict=True):
        setattr(tally, name, Decimal(value))
    return tally


def _tally_values(tally: Totals) -> tuple[Any, ...]:
    return tuple(getattr(tally, n) for n in COUNTS) + tuple(fmt(getattr(tally, n)) for n in AMOUNTS)


class ViewsMoved(Exception):
    """Another reader wrote the views since this one read their position: its page was not written
    (a reader reloads its position and tallies from the views, and carries on from there)."""


class ViewStore:
    """The SQLite file (or in-memory database) that holds one set of read-model tables."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or ":memory:"
        self.lock = threading.RLock()
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if self.path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
        self.create()

    def create(self) -> None:
        with self.lock:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                # Written by an older layout (or new): start again, the next catch-up rebuilds it.
                self.conn.execute("BEGIN IMMEDIATE")
                for table in TABLES:
                    self.conn.execute(f"DROP TABLE IF EXISTS {table}")
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self.conn.execute("COMMIT")
            self.conn.executescript(SCHEMA)

    def drop(self) -> None:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            for table in TABLES:
                self.conn.execute(f"DROP TABLE IF EXISTS {table}")
            self.conn.execute("COMMIT")
            self.create()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # ------------------------------------------------------------------ reading

    def tracking(self, name: str) -> Tracking:
        with self.lock:
            found = self.conn.execute(
                "SELECT position, events, log_digest FROM tracking WHERE name = ?", (name,)
            ).fetchone()
        if found is None:
            return Tracking(0, 0, GENESIS_DIGEST.hex())
        return Tracking(*found)

    def row(self, job_id: str) -> JobRow | None:
        with self.lock:
            found = self.conn.execute(
                f"SELECT {_SELECT_COLUMNS} FROM jobs WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        return None if found is None else _row_from(found)

    def rows(self, *, state: str | None = None, batch_id: str | None = None) -> list[JobRow]:
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if batch_id is not None:
            where.append("batch_id = ?")
            params.append(batch_id)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        columns = _SELECT_COLUMNS
        with self.lock:
            found = self.conn.execute(
                f"SELECT {columns} FROM jobs {clause}ORDER BY position, job_id", params
            ).fetchall()
        return [_row_from(record) for record in found]

    def rows_by_id(self, job_ids: Iterable[str]) -> dict[str, JobRow]:
        """The stored rows of these jobs (those that have one), a few queries for any number."""
        wanted = list(job_ids)
        found: dict[str, JobRow] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            with self.lock:
                records = self.conn.execute(
                    f"SELECT {_SELECT_COLUMNS} FROM jobs WHERE job_id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
            for record in records:
                found[record[0]] = _row_from(record)
        return found

    def iter_rows(self) -> Iterator[JobRow]:
        """Every row in job id order, a page at a time (constant memory)."""
        for record in self.iter_records():
            yield _row_from(record)

    def iter_records(self) -> Iterator[tuple[Any, ...]]:
        """Every row in job id order as the table holds it (`row_from_record` reads one)."""
        after = ""
        while True:
            with self.lock:
                page = self.conn.execute(
                    f"SELECT {_SELECT_COLUMNS} FROM jobs WHERE job_id > ? ORDER BY job_id LIMIT 1000",
                    (after,),
                ).fetchall()
            if not page:
                return
            yield from page
            after = page[-1][0]

    def tally(self, view: str, key: str) -> Totals | None:
        with self.lock:
            found = self.conn.execute(
                f"SELECT {', '.join((*COUNTS, *AMOUNTS))} FROM tallies WHERE view = ? AND key = ?",
                (view, key),
            ).fetchone()
        return None if found is None else _tally_from(found)

    def tallies(self, view: str) -> dict[str, Totals]:
        with self.lock:
            found = self.conn.execute(
                f"SELECT key, {', '.join((*COUNTS, *AMOUNTS))} FROM tallies WHERE view = ? ORDER BY key",
                (view,),
            ).fetchall()
        return {record[0]: _tally_from(record[1:]) for record in found}

    def column(self, name: str, *, batch_id: str | None = None) -> list[int]:
        """The non-null values of an integer column, sorted (for percentiles)."""
        assert name in ("execution_ms", "delay_ms", "funding_us")
        clause = " AND batch_id = ?" if batch_id is not None else ""
        params = (batch_id,) if batch_id is not None else ()
        with self.lock:
            found = self.conn.execute(
                f"SELECT {name} FROM jobs WHERE {name} IS NOT NULL{clause} ORDER BY {name}", params
            ).fetchall()
        return [record[0] for record in found]

    def checkpoints(self) -> dict[int, Checkpoint]:
        with self.lock:
            found = self.conn.execute(
                "SELECT position, events, log_digest FROM log_checkpoints ORDER BY position"
            ).fetchall()
        return {record[0]: Checkpoint(*record) for record in found}

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's content in a stable order: for comparing two sets of views."""
        with self.lock:
            return {
                table: sorted(self.conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in TABLES
            }

    # ------------------------------------------------------------------ writing

    def write(
        self,
        name: str,
        rows: Iterable[JobRow],
        tallies: Iterable[tuple[str, str, Totals]],
        tracking: Tracking,
        checkpoints: Iterable[Checkpoint],
        expected: int | None = None,
    ) -> None:
        """One transaction: the changed rows and tallies with the position they reflect.

        With `expected`, the stored position must still be that one (the position the writer's
        tallies were read at), else nothing is written and `ViewsMoved` is raised: two processes
        catching up on the same views would otherwise both add the same events."""
        placeholders = ", ".join("?" * (len(_ROW_COLUMNS) + 1))
        tally_columns = ", ".join(("view", "key", *COUNTS, *AMOUNTS))
        tally_marks = ", ".join("?" * (2 + len(COUNTS) + len(AMOUNTS)))
        with self.lock:
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                if expected is not None:
                    found = conn.execute("SELECT position FROM tracking WHERE name = ?", (name,)).fetchone()
                    if (0 if found is None else found[0]) != expected:
                        raise ViewsMoved(f"views at {found and found[0]}, expected {expected}")
                conn.executemany(
                    f"INSERT OR REPLACE INTO jobs ({', '.join(_ROW_COLUMNS[:_FUNDING_US_AT])}, funding_us, "
                    f"{', '.join(_ROW_COLUMNS[_FUNDING_US_AT:])}) VALUES ({placeholders})",
                    [_row_values(row) for row in rows],
                )
                conn.executemany(
                    f"INSERT OR REPLACE INTO tallies ({tally_columns}) VALUES ({tally_marks})",
                    [(view, key, *_tally_values(tally)) for view, key, tally in tallies],
                )
                conn.executemany(
                    "INSERT OR REPLACE INTO log_checkpoints (position, events, log_digest) VALUES (?, ?, ?)",
                    [(c.position, c.events, c.log_digest) for c in checkpoints],
                )
                conn.execute(
                    "INSERT OR REPLACE INTO tracking (name, position, events, log_digest) "
                    "VALUES (?, ?, ?, ?)",
                    (name, tracking.position, tracking.events, tracking.log_digest),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


def _keys(row: JobRow) -> tuple[tuple[str, str], ...]:
    return (("all", ""), ("batch", row.batch_id or ""), ("payee", row.payee), ("endpoint", row.endpoint_id))


class Projector:
    """Turns (job after its event, event, position) into rows and tallies, and flushes them.

    Memory is bounded: a cache of recent rows (a miss reads the row back from the store) and the
    tallies (one per batch, payee and endpoint, not per job).
    """

    def __init__(
        self,
        store: ViewStore,
        name: str = "podsettle",
        *,
        cache_size: int = 4096,
        checkpoint_every: int = CHECKPOINT_EVERY,
    ) -> None:
        self.store = store
        self.checkpoint_every = checkpoint_every
        self.name = name
        self.cache_size = cache_size
        self._rows: OrderedDict[str, JobRow] = OrderedDict()
        self._pending: dict[str, JobRow] = {}
        self._deferred: dict[str, JobRow] = {}  # put, their previous row not read yet (see `put`)
        self._touched: dict[int | str, tuple[EscrowJob, int, datetime | None]] = {}
        self._tallies: dict[tuple[str, str], Totals] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._checkpoints: list[Checkpoint] = []
        tracking = store.tracking(name)
        self.position = tracking.position
        self.stored_position = tracking.position  # where the views were when read or last written
        self.events = tracking.events
        self.digest = bytes.fromhex(tracking.log_digest)

    def observe(
        self, position: int, originator_id: UUID | str, version: int, topic: str, state: bytes
    ) -> None:
        """Every notification, whatever its aggregate, moves the position and the log digest."""
        self.digest = log_step(self.digest, position, originator_id, version, topic, state)
        self.position = position
        self.events += 1
        if self.events % self.checkpoint_every == 0:
            self._checkpoints.append(Checkpoint(position, self.events, self.digest.hex()))

    def apply(self, job: EscrowJob, event: object, position: int) -> None:
        """The job right after `event` (already applied to it), at log `position`.

        Rows are computed at the flush, once per job and page however many of its events the page
        holds: the job object is the live aggregate, so it is then as it is after the page.
        """
        job_id = job.id
        key = job_id.int if isinstance(job_id, UUID) else job_id  # hashed in C, unlike a UUID
        touched = self._touched.get(key)
        if touched is None:
            self._touched[key] = (job, position, funded_at_after(event, None))
        else:
            self._touched[key] = (job, position, touched[2] or funded_at_after(event, None))

    def put(self, job: EscrowJob, position: int, funded_at: datetime | None) -> JobRow:
        """The job as it is after its event at `position` (for a replay that projects each job once).

        When the job's previous row is neither pending nor cached, the new row waits for the next
        flush, which reads all such previous rows from the store in a few queries."""
        new = row_of(job, position, funded_at)
        job_id = new.job_id
        if job_id in self._deferred:
            self._deferred[job_id] = new  # its previous row is still the stored one
            return new
        old = self._pending.get(job_id) or self._rows.get(job_id)
        if old is None:
            self._deferred[job_id] = new
            return new
        return self._put(old, new)

    def _put(self, old: JobRow | None, new: JobRow) -> JobRow:
        job_id = new.job_id
        if old is not None:
            for key in _keys(old):
                self._tally(key).add(old, -1)
        for key in _keys(new):
            self._tally(key).add(new, 1)
        keep(self._rows, job_id, new, self.cache_size)
        self._pending[job_id] = new
        return new

    def _tally(self, key: tuple[str, str]) -> Totals:
        tally = self._tallies.get(key)
        if tally is None:
            tally = self.store.tally(*key) or Totals()
            self._tallies[key] = tally
        self._dirty.add(key)
        return tally

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._touched) + len(self._deferred)

    def flush(self) -> None:
        deferred = self._deferred
        if deferred:
            stored = self.store.rows_by_id(deferred)
            for job_id, new in deferred.items():
                self._put(stored.get(job_id), new)
            deferred.clear()
        if self._touched:
            # Each touched job's previous row: pending, cached, or read from the store (all at once).
            olds: dict[str, JobRow | None] = {}
            for job, _, _ in self._touched.values():
                job_id = str(job.id)
                olds[job_id] = self._pending.get(job_id) or self._rows.get(job_id)
            stored = self.store.rows_by_id(job_id for job_id, old in olds.items() if old is None)
            for (job, position, funded_at), (job_id, old) in zip(
                self._touched.values(), olds.items(), strict=True
            ):
                if old is None:
                    old = stored.get(job_id)
                if old is not None and old.funded_at is not None:
                    funded_at = old.funded_at
                self._put(old, row_of(job, position, funded_at))
            self._touched.clear()
        self.store.write(
            self.name,
            self._pending.values(),
            [(view, key, self._tallies[(view, key)]) for view, key in sorted(self._dirty)],
            Tracking(self.position, self.events, self.digest.hex()),
            self._checkpoints,
            expected=self.stored_position,
        )
        self.stored_position = self.position
        self._pending.clear()
        self._dirty.clear()
        self._checkpoints.clear()
