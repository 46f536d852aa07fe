"""eventsourcing's PostgreSQL application recorder, with its events inserted as four arrays.

The library inserts a save's events as one array of a composite type (`stored_event_uuid`), which
psycopg dumps in text, in Python, field by field: about 2.5 ms of CPU for a save of 60 events,
most of a PostgreSQL engine's extra CPU over SQLite (bench/processes_bench.py). This recorder
sends the same rows as four arrays (ids, versions, topics, states) in binary, which psycopg dumps
in C: about 0.6 ms. Everything else is the library's: the table, the `EXCLUSIVE` table lock taken
first (so notification ids are given in commit order and followers never pass a gap that fills in
later), the NOTIFY, the pipelined transaction, `RETURNING notification_id`, and every read.

It is chosen through the library's own setting, `APPLICATION_RECORDER_TOPIC` (adapters/persistence.py
sets it for every postgresql:// store).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg.sql import SQL, Identifier

TOPIC = "podsettle.adapters.postgres_recorder:ArrayInsertRecorder"


class ArrayInsertRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        id_type = "uuid" if datastore.originator_id_type == "uuid" else "text"
        self.insert_arrays_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::{id_type}[], %b::bigint[], %b::text[], %b::bytea[]) "
            "RETURNING notification_id"
        ).format(
            schema=Identifier(datastore.schema),
            table=Identifier(self.events_table_name),
            id_type=SQL(id_type),
        )

    def _insert_stored_events(self, curs: Any, stored_events: Sequence[StoredEvent], **_: Any) -> None:
        # As the library's: lock the table (commit order = notification order), notify, insert.
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(
            self.insert_arrays_statement,
            (
                [event.originator_id for event in stored_events],
                [event.originator_version for event in stored_events],
                [event.topic for event in stored_events],
                [event.state for event in stored_events],
            ),
        )
