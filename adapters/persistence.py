"""Choosing the event store: `PODSETTLE_STORE` to eventsourcing's persistence settings."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

from eventsourcing.persistence import StoredEvent

DEFAULT_STORE = "sqlite:///podsettle.db"


class StoreConfigError(ValueError):
    """`PODSETTLE_STORE` does not name a store podsettle can use."""


class StoreUnavailable(StoreConfigError):
    """The store is named well but cannot be opened: not a database, not writable, its server down,
    its database missing, or the credentials refused. The message names the store (never its
    password) and the cause, on one line."""

    def __init__(self, store: str, cause: str) -> None:
        self.store = store
        self.cause = cause
        super().__init__(f"store {store}: {cause}")


# How long a check of a PostgreSQL store may wait for the server: a person waits on it.
CHECK_TIMEOUT_S = 5


@dataclass(frozen=True)
class Store:
    url: str
    env: dict[str, str]

    @property
    def kind(self) -> str:
        return self.env["PERSISTENCE_MODULE"].rsplit(".", 1)[-1]

    @property
    def sqlite_path(self) -> Path | None:
        name = self.env.get("SQLITE_DBNAME")
        return None if name is None or name.startswith("file::memory:") else Path(name)


def store_from_url(url: str, source: str = "PODSETTLE_STORE") -> Store:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db`, `memory`, or `postgresql://user@host:5432/db`.

    `source` names where the URL came from in errors (`--store` for a flag)."""
    text = url.strip()
    if text in ("memory", "memory://", "popo"):
        return Store(text, {"PERSISTENCE_MODULE": "eventsourcing.popo"})
    if text.startswith("sqlite:///"):
        path = text[len("sqlite:///") :]
        if not path:
            raise StoreConfigError(f"{source}: sqlite:/// needs a file path, e.g. sqlite:///podsettle.db")
        parent = Path(path).expanduser().parent
        if not parent.is_dir():
            raise StoreConfigError(f"{source}: the folder {parent} does not exist")
        return Store(
            text,
            {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(Path(path).expanduser()),
                "SQLITE_LOCK_TIMEOUT": "30",
            },
        )
    if text.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(text)
        dbname = parts.path.lstrip("/")
        if not parts.hostname or not dbname:
            raise StoreConfigError(f"{source}: a postgresql:// URL needs a host and a database name")
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            # The library's recorder with its inserts sent as arrays in binary (postgres_recorder.py).
            "APPLICATION_RECORDER_TOPIC": "podsettle.adapters.postgres_recorder:ArrayInsertRecorder",
            "POSTGRES_DBNAME": dbname,
            "POSTGRES_HOST": parts.hostname,
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
        }
        return Store(f"postgresql://{parts.hostname}:{parts.port or 5432}/{dbname}", env)
    shown = text.split("@")[-1] if "@" in text else text
    raise StoreConfigError(
        f"{source}: {shown!r} is not a store; use sqlite:///path.db, memory, or postgresql://host/db"
    )


def check_store(store: Store, timeout_s: int = CHECK_TIMEOUT_S) -> None:
    """Raise `StoreUnavailable` when `store` cannot be opened, within `timeout_s` seconds.

    The library would raise a traceback after a 30 s hang for a server that is down; this asks once,
    quickly, so a person learns which store failed and why."""
    if store.kind == "sqlite":
        path = store.sqlite_path
        if path is not None:
            _check_sqlite(store.url, path)
    elif store.kind == "postgres":
        _check_postgres(store, timeout_s)


def _check_sqlite(url: str, path: Path) -> None:
    if path.is_dir():
        raise StoreUnavailable(url, f"{path} is a folder, not a database file")
    if not path.exists():
        try:  # a real attempt: permission bits say nothing for root or a read-only mount
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
                pass
        except OSError as error:
            raise StoreUnavailable(
                url, f"cannot create {path}: {error.strerror or error} (choose a writable folder)"
            ) from None
        return
    if not os.access(path, os.R_OK):
        raise StoreUnavailable(url, f"cannot read {path}: permission denied")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        connection.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as error:
        raise StoreUnavailable(url, f"{path}: {error}") from None
    finally:
        connection.close()


def _check_postgres(store: Store, timeout_s: int) -> None:
    import psycopg

    env = store.env
    try:
        connection = psycopg.connect(
            host=env["POSTGRES_HOST"],
            port=int(env["POSTGRES_PORT"]),
            dbname=env["POSTGRES_DBNAME"],
            user=env["POSTGRES_USER"],
            password=env["POSTGRES_PASSWORD"] or None,
            connect_timeout=timeout_s,
        )
    except psycopg.Error as error:
        raise StoreUnavailable(store.url, postgres_cause(error, env.get("POSTGRES_PASSWORD", ""))) from None
    connection.close()


def postgres_cause(error: BaseException, password: str = "") -> str:
    """The cause of a PostgreSQL failure as one line a person can act on (the password never shown)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if password:
        text = text.replace(password, "***")
    lowered = text.lower()
    if "does not exist" in lowered and "database" in lowered:
        return f"{_server_said(text)} (create it, or fix the database name in the URL)"
    if "password authentication failed" in lowered or ("role" in lowered and "does not exist" in lowered):
        return f"credentials refused: {_server_said(text)}"
    if "connection refused" in lowered or "timeout" in lowered or "could not" in lowered:
        return f"the server does not answer ({_server_said(text)})"
    return _server_said(text)


def _server_said(text: str) -> str:
    """The server's own reason, without psycopg's `connection failed: connection to server at ...`
    preamble (the store is already named)."""
    reason = text.rsplit("failed: ", 1)[-1] if "failed: " in text else text
    return reason.removeprefix("FATAL: ").strip()


@contextmanager
def creating_tables(factory: Any) -> Iterator[None]:
    """Hold the store's table-creation lock while the library creates its tables (PostgreSQL; a
    no-op for the other stores). Processes starting together on a new database otherwise race in
    `CREATE TABLE IF NOT EXISTS`, and the loser fails with a duplicate type or "tuple concurrently
    updated". The lock is a session advisory lock on a connection of its own, released with it."""
    datastore = getattr(factory, "datastore", None)
    if type(factory).__module__ != "eventsourcing.postgres" or datastore is None:
        yield
        return
    import psycopg

    kwargs = {k: v for k, v in datastore.pool.kwargs.items() if k != "row_factory"}
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_advisory_lock(hashtext(%s))", (f"podsettle-create-tables:{datastore.schema}",)
        )
        yield


def select_events_of(
    recorder: Any,
    originator_ids: Sequence[UUID],
    *,
    first_only: bool = False,
    after: Mapping[UUID, int] | None = None,
) -> dict[UUID, list[StoredEvent]] | None:
    """Every stored event of several aggregates in one query, each aggregate's in version order,
    from eventsourcing's PostgreSQL recorder (its table, as its own `select_events` reads it); None
    for another store, whose aggregates are read one by one (SQLite reads are local and cheap).
    One round trip instead of one per job: what a process reading other processes' jobs needs.
    `first_only`: each aggregate's first event only (how it was created). `after`: of the
    aggregates it names, only the events after that version (those a copy at that version lacks)."""
    if not hasattr(recorder, "datastore") or not hasattr(recorder, "channel_name"):
        return None
    from psycopg.sql import SQL, Identifier

    ids = list(dict.fromkeys(originator_ids))  # (a duplicate would join its rows twice)
    after = after or {}
    statement = SQL(
        "SELECT e.originator_id, e.originator_version, e.topic, e.state FROM {schema}.{table} e "
        "JOIN unnest(%s::uuid[], %s::bigint[]) AS w(id, after) ON e.originator_id = w.id "
        # (ANY, on the key's first column, is what makes the server read the index)
        "WHERE e.originator_id = ANY(%s) AND e.originator_version > w.after{first} "
        "ORDER BY e.originator_id, e.originator_version"
    ).format(
        first=SQL(" AND e.originator_version = 1" if first_only else ""),
        schema=Identifier(recorder.datastore.schema),
        table=Identifier(recorder.events_table_name),
    )
    params = [ids, [after.get(originator_id, 0) for originator_id in ids], ids]
    found: dict[UUID, list[StoredEvent]] = {}
    with recorder.datastore.get_connection() as conn, conn.cursor() as curs:
        curs.execute(statement, params)
        for row in curs.fetchall():
            originator = row["originator_id"]
            found.setdefault(originator, []).append(
                StoredEvent(
                    originator_id=originator,
                    originator_version=row["originator_version"],
                    topic=row["topic"],
                    state=bytes(row["state"]),
                )
            )
    return found
