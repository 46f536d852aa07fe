"""Reading the log for the audit: pages of raw records, and decoding each record once.

A record is `(position, originator id, version, topic, stored state)`. On SQLite the pages come
straight from the recorder's own connection (the library's `select_notifications` builds a
dataclass per row and parses every originator id, which costs more than the audit's own work);
on other stores they come from `select_notifications`.

Decoding does the transcoder's work in one pass: `json.loads` at C speed, then the registered
transcodings (Decimal, datetime, UUID, ...) revived where a value is tagged with `_type_`, exactly as
`JSONTranscoder` does, then the library's upcasting. Nothing is decoded twice.
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    Transcoding,
    UUIDAsHex,
)
from eventsourcing.utils import resolve_topic

Record = tuple[int, str, int, str, bytes]
CHAIN_KEY = "__chain__"  # the reserved key of a sealed state (written by the chain mapper)
DEFAULT_PAGE_SIZE = 2_000


class Seals(Protocol):
    """The seal format of the store's events (the chain mapper, or its format for an export)."""

    genesis: str

    def plaintext(self, state: bytes) -> bytes: ...

    def unseal(
        self, originator_id: UUID | str, version: int, topic: str, state: bytes
    ) -> tuple[str, str, bool] | None:
        """(the previous event's seal, this event's seal, whether it matches); None if not sealed."""
        ...


def seals_of(app: Application[Any]) -> Seals | None:
    """The application's mapper when it seals events (it has `unseal`), else None."""
    mapper = app.mapper
    if hasattr(mapper, "unseal") and hasattr(mapper, "plaintext") and hasattr(mapper, "genesis"):
        return mapper
    return None


def standard_transcoder() -> JSONTranscoder:
    """The transcodings an eventsourcing Application registers by default (podsettle adds none)."""
    transcoder = JSONTranscoder()
    transcoder.register(UUIDAsHex())
    transcoder.register(DecimalAsStr())
    transcoder.register(DatetimeAsISO())
    return transcoder


def store_pages(
    app: Application[Any], *, start: int = 1, stop: int | None = None, page_size: int = DEFAULT_PAGE_SIZE
) -> Iterator[list[Record]]:
    """The notification log from `start` to `stop` (inclusive), a page of records at a time."""
    recorder = app.recorder
    datastore = getattr(recorder, "datastore", None)
    table = getattr(recorder, "events_table_name", None)
    raw = type(recorder).__module__ == "eventsourcing.sqlite" and datastore is not None and table is not None
    while stop is None or start <= stop:
        if raw:
            assert datastore is not None
            statement = (
                f"SELECT rowid, originator_id, originator_version, topic, state FROM {table} WHERE rowid >= ?"
            )
            params: list[int] = [start]
            if stop is not None:
                statement += " AND rowid <= ?"
                params.append(stop)
            statement += " ORDER BY rowid LIMIT ?"
            params.append(page_size)
            with datastore.transaction(commit=False) as cursor:
                cursor.execute(statement, params)
                page: list[Record] = [tuple(row) for row in cursor.fetchall()]
        else:
            page = [
                (n.id, _text(n.originator_id), n.originator_version, n.topic, n.state)
                for n in recorder.select_notifications(start, page_size, stop=stop)
            ]
        if not page:
            return
        yield page
        start = page[-1][0] + 1


def _text(originator_id: UUID | str) -> str:
    return originator_id.hex if isinstance(originator_id, UUID) else originator_id


def store_history(app: Application[Any]) -> Callable[[str, int], list[Record]]:
    """Reads one job's stored events up to a version (when the audit meets a job it let go of)."""

    def history(originator_id: str, through_version: int) -> list[Record]:
        stored = app.recorder.select_events(UUID(originator_id), lte=through_version)
        return [(0, originator_id, s.originator_version, s.topic, s.state) for s in stored]

    return history


class Decoder:
    """Stored event bytes to domain event objects, decoding the JSON once.

    The reserved chain key of a sealed state is dropped here, so the whole plaintext is decoded
    without slicing it first.
    """

    def __init__(self, transcoder: JSONTranscoder | None = None) -> None:
        names: dict[str, Transcoding] = (transcoder or standard_transcoder()).names
        self._names = names
        self._classes: dict[str, tuple[type, int]] = {}
        scanner = json.scanner.c_make_scanner  # type: ignore[attr-defined]
        self._scan: Callable[[str, int], tuple[Any, int]] = (
            scanner(json.JSONDecoder()) if scanner is not None else json.JSONDecoder().raw_decode
        )

    def event_class(self, topic: str) -> tuple[type, int]:
        found = self._classes.get(topic)
        if found is None:
            cls = resolve_topic(topic)
            found = self._classes[topic] = (cls, getattr(cls, "class_version", 1))
        return found

    def decode(self, topic: str, originator_id: UUID, version: int, plain: bytes) -> Any:
        cls, class_version = self._classes.get(topic) or self.event_class(topic)
        try:
            state = self._scan(plain.decode(), 0)[0]
        except StopIteration:
            raise ValueError("the stored state is not JSON") from None
        if type(state) is not dict:
            raise ValueError("the stored state is not a JSON object")
        state.pop(CHAIN_KEY, None)
        names = self._names
        for name, value in state.items():
            kind = type(value)
            if kind is dict:
                if len(value) == 2 and "_type_" in value and type(value.get("_data_")) is str:
                    try:
                        state[name] = names[value["_type_"]].decode(value["_data_"])
                    except KeyError:
                        raise ValueError(f"no transcoding is registered for {value['_type_']!r}") from None
                else:
                    state[name] = self._revive(value)
            elif kind is list:
                state[name] = self._revive(value)
        state["originator_id"] = originator_id
        state["originator_version"] = version
        from_version = state.pop("class_version", 1)
        while from_version < class_version:
            getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
            from_version += 1
        event: Any = object.__new__(cls)
        object.__setattr__(event, "__dict__", state)
        return event

    def _revive(self, value: Any) -> Any:
        kind = type(value)
        if kind is dict:
            if len(value) == 2 and "_type_" in value and "_data_" in value:
                try:
                    transcoding = self._names[value["_type_"]]
                except KeyError:
                    raise ValueError(f"no transcoding is registered for {value['_type_']!r}") from None
                return transcoding.decode(self._revive(value["_data_"]))
            for name, item in value.items():
                if type(item) is dict or type(item) is list:
                    value[name] = self._revive(item)
            return value
        if kind is list:
            return [self._revive(item) for item in value]
        return value
