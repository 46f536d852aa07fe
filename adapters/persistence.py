"""Choosing the event store: `PODSETTLE_STORE` to eventsourcing's persistence settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

DEFAULT_STORE = "sqlite:///podsettle.db"


class StoreConfigError(ValueError):
    """`PODSETTLE_STORE` does not name a store podsettle can use."""


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
