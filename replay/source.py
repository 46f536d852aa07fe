"""Reading the log for the audit: pages of raw records, and decoding each record once.

A record is `(position, originator id, version, topic, stored state)`. On SQLite the pages come
straight from the recorder's own connection (the library's `select_notifications` builds a
dataclass per row and parses every originator id, which costs more than the audit's own work);
on other stores they come from `select_notifications`.

Decoding does the transcoder's work in one pass: orjson parses the stored bytes (the stdlib where
orjson would read them differently, see `Decoder`), then the registered transcodings (Decimal,
datetime, UUID, ...) are revived where a value is tagged with `_type_`, exactly as `JSONTranscoder`
does, then the library's upcasting. Nothing is decoded twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

import orjson
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
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


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
                rows = getattr(cursor, "sqlite_cursor", cursor)  # the sqlite3 cursor under the wrapper
                rows.row_factory = None  # plain tuples (not sqlite3.Row): the records as they are
                rows.execute(statement, params)
                page: list[Record] = rows.fetchall()
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


class _Inexact(Exception):
    """orjson read a number that may not be what the stdlib reads (see `Decoder.fields`)."""


class Decoder:
    """Stored event bytes to domain event objects, decoding the JSON once.

    The JSON is parsed by orjson (from the bytes, no text copy), then the registered transcodings
    are applied where a value is tagged `{"_type_": name, "_data_": data}`, innermost first, exactly
    as `JSONTranscoder`'s object hook does. Two things orjson reads differently from the stdlib, and
    both send the state to the stdlib decoder instead, so that any valid JSON reads as the library
    reads it: a number orjson returns as a float (an integer beyond 64 bits comes back as a float;
    event states hold none, money is Decimal), and JSON orjson refuses (NaN, Infinity, a lone
    surrogate escape). The reserved chain key of a sealed state is dropped here, so the whole
    plaintext is decoded without slicing it first.
    """

    def __init__(self, transcoder: JSONTranscoder | None = None) -> None:
        names: dict[str, Transcoding] = (transcoder or standard_transcoder()).names
        self._names = names
        # The library's own transcodings, called without their method (same results).
        self._revivers: dict[str, Callable[[Any], Any]] = {
            name: _direct(transcoding) for name, transcoding in names.items()
        }
        self._classes: dict[str, tuple[type, int]] = {}
        self._exact_decode = json.JSONDecoder().decode

    def event_class(self, topic: str) -> tuple[type, int]:
        found = self._classes.get(topic)
        if found is None:
            cls = resolve_topic(topic)
            found = self._classes[topic] = (cls, getattr(cls, "class_version", 1))
        return found

    def decode(self, topic: str, originator_id: UUID, version: int, plain: bytes) -> Any:
        cls, class_version = self._classes.get(topic) or self.event_class(topic)
        state = self.fields(plain)
        state["originator_id"] = originator_id
        state["originator_version"] = version
        if class_version > 1 or "class_version" in state:
            from_version = state.pop("class_version", 1)
            while from_version < class_version:
                getattr(cls, f"upcast_v{from_version}_v{from_version + 1}")(state)
                from_version += 1
        event: Any = object.__new__(cls)
        object.__setattr__(event, "__dict__", state)
        return event

    def fields(self, plain: bytes) -> dict[str, Any]:
        """The event's stored fields with their values revived (the chain key left out)."""
        try:
            state = _loads(plain)
        except _JSONDecodeError:
            return self._fields_exact(plain)
        if type(state) is not dict:
            raise ValueError("the stored state is not a JSON object")
        try:
            self._revive_fields(state, False)
        except _Inexact:
            return self._fields_exact(plain)
        return state

    def _fields_exact(self, plain: bytes) -> dict[str, Any]:
        """The stdlib's reading of a state (as `JSONTranscoder.decode` reads it)."""
        try:
            state = self._exact_decode(plain.decode("utf8"))
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"the stored state is not JSON: {error}") from None
        if type(state) is not dict:
            raise ValueError("the stored state is not a JSON object")
        self._revive_fields(state, True)
        return state

    def _revive_fields(self, state: dict[str, Any], exact: bool) -> None:
        state.pop(CHAIN_KEY, None)
        revivers = self._revivers
        for name, value in state.items():
            kind = type(value)
            if kind is dict:
                if len(value) == 2 and "_type_" in value and "_data_" in value:
                    data = value["_data_"]
                    if type(data) is not str:
                        data = self._revive(data, exact)
                    revive = revivers.get(value["_type_"])
                    if revive is None:
                        raise ValueError(f"no transcoding is registered for {value['_type_']!r}")
                    state[name] = revive(data)
                else:
                    state[name] = self._revive(value, exact)
            elif kind is list:
                state[name] = self._revive(value, exact)
            elif kind is float and not exact:
                raise _Inexact

    @staticmethod
    def _transcode(revivers: dict[str, Callable[[Any], Any]], name: Any, data: Any) -> Any:
        try:
            revive = revivers[name]
        except KeyError:
            raise ValueError(f"no transcoding is registered for {name!r}") from None
        return revive(data)

    def _revive(self, value: Any, exact: bool) -> Any:
        kind = type(value)
        if kind is dict:
            if len(value) == 2 and "_type_" in value and "_data_" in value:
                return self._transcode(self._revivers, value["_type_"], self._revive(value["_data_"], exact))
            for name, item in value.items():
                if type(item) is dict or type(item) is list or type(item) is float:
                    value[name] = self._revive(item, exact)
            return value
        if kind is list:
            return [self._revive(item, exact) for item in value]
        if kind is float and not exact:
            raise _Inexact
        return value


def _direct(transcoding: Transcoding) -> Callable[[Any], Any]:
    """The library's own transcodings as the callables their `decode` comes down to (the same
    values; data of a wrong type fails either way); any other transcoding as it is."""
    kind = type(transcoding)
    if kind is DecimalAsStr:
        return Decimal
    if kind is UUIDAsHex:
        return UUID
    if kind is DatetimeAsISO:
        return datetime.fromisoformat
    return transcoding.decode
