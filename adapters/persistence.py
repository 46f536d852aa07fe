"""Choosing the event store: `PODSETTLE_STORE` to eventsourcing's persistence settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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
