"""The read models' tables inside a PostgreSQL store: the same tables as projections/views.py, in the
store's own database and schema, prefixed by the application's name.

Every process that reads a PostgreSQL store (the engine's, `podsettle replay`, `totals`, the MCP
server, on any machine) keeps these tables current by pulling the notification log: there is no
file in a working directory to share or to get wrong. Each page is written with its tracking
position in one transaction, under a transaction-scoped advisory lock of the views, after checking
that no other reader moved the position since this one read it (`ViewsMoved` otherwise): two
readers catching up together never add the same event twice.

The views use a connection of their own, not the application's pool: a catch-up holds its views
transaction while it reads the log, and the library's pool is one connection by default.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import psycopg
from psycopg import sql

from podsettle.projections.rows import AMOUNTS, COUNTS, JobRow, Totals
from podsettle.projections.views import (
    _SELECT_COLUMNS,
    _STORED_COLUMNS,
    GENESIS_DIGEST,
    SCHEMA,
    SCHEMA_VERSION,
    TABLES,
    Checkpoint,
    Tracking,
    ViewsMoved,
    ViewStore,
    _row_from,
    _row_values,
    _tally_from,
    _tally_values,
)

_TALLY_COLUMNS = ", ".join((*COUNTS, *AMOUNTS))


def _postgres_schema(prefix: str) -> str:
    """The SQLite layout for PostgreSQL: integers as BIGINT (sums of milliseconds outgrow 32 bits),
    each table and index under the prefix."""
    text = SCHEMA.replace(" INTEGER", " BIGINT")
    text = re.sub(r"TABLE IF NOT EXISTS (\w+) \(", lambda m: f"TABLE IF NOT EXISTS {prefix}{m[1]} (", text)
    return re.sub(
        r"INDEX IF NOT EXISTS (\w+) ON (\w+) \(",
        lambda m: f"INDEX IF NOT EXISTS {prefix}{m[1]} ON {prefix}{m[2]} (",
        text,
    )


class PostgresViewStore(ViewStore):
    """One set of read-model tables in a PostgreSQL database (`conninfo`: psycopg's connection
    arguments), in `schema`, their names starting with `prefix`."""

    def __init__(
        self, conninfo: Mapping[str, Any], *, schema: str = "public", prefix: str = "views_"
    ) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", prefix) or not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", schema
        ):
            raise ValueError("the views' schema and prefix must be plain SQL names")
        self.path = f"{schema}.{prefix}*"
        self.schema = schema
        self.prefix = prefix
        self.lock = threading.RLock()
        kwargs = {k: v for k, v in conninfo.items() if k != "row_factory"}
        self.pg = psycopg.connect(**kwargs, autocommit=True)
        self.pg.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        # One number per schema and prefix: the views of two stores in one database do not wait
        # for each other.
        self._lock_key = sql.Literal(f"podsettle-views:{schema}.{prefix}")
        self.create()

    def _t(self, table: str) -> str:
        return f"{self.prefix}{table}"

    def _exclusive(self, cur: psycopg.Cursor[Any]) -> None:
        cur.execute(sql.SQL("SELECT pg_advisory_xact_lock(hashtext({}))").format(self._lock_key))

    def create(self) -> None:
        with self.lock, self.pg.transaction(), self.pg.cursor() as cur:
            self._exclusive(cur)
            cur.execute(f"CREATE TABLE IF NOT EXISTS {self._t('layout')} (version BIGINT NOT NULL)")
            found = cur.execute(f"SELECT version FROM {self._t('layout')}").fetchone()
            if found is None or found[0] != SCHEMA_VERSION:
                # Another layout (or none): start again, the next catch-up rebuilds it from the log.
                for table in TABLES:
                    cur.execute(f"DROP TABLE IF EXISTS {self._t(table)}")
                cur.execute(f"DELETE FROM {self._t('layout')}")
                cur.execute(f"INSERT INTO {self._t('layout')} (version) VALUES (%s)", (SCHEMA_VERSION,))
            for statement in _postgres_schema(self.prefix).split(";"):
                if statement.strip():
                    cur.execute(statement)

    def drop(self) -> None:
        with self.lock, self.pg.transaction(), self.pg.cursor() as cur:
            self._exclusive(cur)
            for table in TABLES:
                cur.execute(f"DROP TABLE IF EXISTS {self._t(table)}")
        self.create()

    def close(self) -> None:
        with self.lock:
            self.pg.close()

    def _all(self, query: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self.pg.execute(query, tuple(params)).fetchall())

    # ------------------------------------------------------------------ reading

    def tracking(self, name: str) -> Tracking:
        found = self._all(
            f"SELECT position, events, log_digest FROM {self._t('tracking')} WHERE name = %s", (name,)
        )
        if not found:
            return Tracking(0, 0, GENESIS_DIGEST.hex())
        return Tracking(*found[0])

    def row(self, job_id: str) -> JobRow | None:
        found = self._all(f"SELECT {_SELECT_COLUMNS} FROM {self._t('jobs')} WHERE job_id = %s", (job_id,))
        return _row_from(found[0]) if found else None

    def rows(self, *, state: str | None = None, batch_id: str | None = None) -> list[JobRow]:
        where, params = [], []
        if state is not None:
            where.append("state = %s")
            params.append(state)
        if batch_id is not None:
            where.append("batch_id = %s")
            params.append(batch_id)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        found = self._all(
            f'SELECT {_SELECT_COLUMNS} FROM {self._t("jobs")} {clause}ORDER BY position, job_id COLLATE "C"',
            params,
        )
        return [_row_from(record) for record in found]

    def rows_by_id(self, job_ids: Iterable[str]) -> dict[str, JobRow]:
        wanted = list(job_ids)
        if not wanted:
            return {}
        found = self._all(
            f"SELECT {_SELECT_COLUMNS} FROM {self._t('jobs')} WHERE job_id = ANY(%s)", (wanted,)
        )
        return {record[0]: _row_from(record) for record in found}

    def iter_records(self) -> Iterator[tuple[Any, ...]]:
        after = ""
        while True:
            page = self._all(
                f'SELECT {_SELECT_COLUMNS} FROM {self._t("jobs")} WHERE job_id COLLATE "C" > %s '
                'ORDER BY job_id COLLATE "C" LIMIT 1000',
                (after,),
            )
            if not page:
                return
            yield from page
            after = page[-1][0]

    def tally(self, view: str, key: str) -> Totals | None:
        found = self._all(
            f"SELECT {_TALLY_COLUMNS} FROM {self._t('tallies')} WHERE view = %s AND key = %s", (view, key)
        )
        return _tally_from(found[0]) if found else None

    def tallies(self, view: str) -> dict[str, Totals]:
        found = self._all(
            f"SELECT key, {_TALLY_COLUMNS} FROM {self._t('tallies')} WHERE view = %s "
            'ORDER BY key COLLATE "C"',
            (view,),
        )
        return {record[0]: _tally_from(record[1:]) for record in found}

    def column(self, name: str, *, batch_id: str | None = None) -> list[int]:
        assert name in ("execution_ms", "delay_ms", "funding_us")
        clause = " AND batch_id = %s" if batch_id is not None else ""
        params = (batch_id,) if batch_id is not None else ()
        found = self._all(
            f"SELECT {name} FROM {self._t('jobs')} WHERE {name} IS NOT NULL{clause} ORDER BY {name}", params
        )
        return [record[0] for record in found]

    def checkpoints(self) -> dict[int, Checkpoint]:
        found = self._all(
            f"SELECT position, events, log_digest FROM {self._t('log_checkpoints')} ORDER BY position"
        )
        return {record[0]: Checkpoint(*record) for record in found}

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        return {table: sorted(self._all(f"SELECT * FROM {self._t(table)}"), key=repr) for table in TABLES}

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
        columns = ", ".join(_STORED_COLUMNS)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _STORED_COLUMNS if c != "job_id")
        marks = ", ".join(["%s"] * len(_STORED_COLUMNS))
        tally_updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in (*COUNTS, *AMOUNTS))
        with self.lock, self.pg.transaction(), self.pg.cursor() as cur:
            self._exclusive(cur)
            if expected is not None:
                found = cur.execute(
                    f"SELECT position FROM {self._t('tracking')} WHERE name = %s", (name,)
                ).fetchone()
                if (0 if found is None else found[0]) != expected:
                    raise ViewsMoved(f"views at {found and found[0]}, expected {expected}")
            cur.executemany(
                f"INSERT INTO {self._t('jobs')} ({columns}) VALUES ({marks}) "
                f"ON CONFLICT (job_id) DO UPDATE SET {updates}",
                [_row_values(row) for row in rows],
            )
            cur.executemany(
                f"INSERT INTO {self._t('tallies')} (view, key, {_TALLY_COLUMNS}) "
                f"VALUES ({', '.join(['%s'] * (2 + len(COUNTS) + len(AMOUNTS)))}) "
                f"ON CONFLICT (view, key) DO UPDATE SET {tally_updates}",
                [(view, key, *_tally_values(tally)) for view, key, tally in tallies],
            )
            cur.executemany(
                f"INSERT INTO {self._t('log_checkpoints')} (position, events, log_digest) "
                "VALUES (%s, %s, %s) ON CONFLICT (position) DO UPDATE SET events = EXCLUDED.events, "
                "log_digest = EXCLUDED.log_digest",
                [(c.position, c.events, c.log_digest) for c in checkpoints],
            )
            cur.execute(
                f"INSERT INTO {self._t('tracking')} (name, position, events, log_digest) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, "
                "events = EXCLUDED.events, "
                "log_digest = EXCLUDED.log_digest",
                (name, tracking.position, tracking.events, tracking.log_digest),
            )


def postgres_views(app: Any) -> PostgresViewStore | None:
    """The views inside `app`'s store when it is a PostgreSQL store (None for any other store):
    the store's database and schema, the tables named after the application."""
    datastore = getattr(app.recorder, "datastore", None)
    # The library's PostgreSQL recorder, or podsettle's subclass of it (adapters/postgres_recorder.py).
    postgres = any(cls.__module__ == "eventsourcing.postgres" for cls in type(app.recorder).__mro__)
    if not postgres or datastore is None:
        return None
    prefix = re.sub(r"[^a-z0-9_]", "_", app.name.lower()) + "_views_"
    return PostgresViewStore(datastore.pool.kwargs, schema=datastore.schema, prefix=prefix)
