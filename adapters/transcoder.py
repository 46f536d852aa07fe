"""The event store's JSON: the library's format, written and read with orjson.

`FastJSONTranscoder` is a drop-in `JSONTranscoder`: the same transcodings (registered the same
way), the same stored form (compact JSON, UTF-8, values of registered types written as
`{"_type_": name, "_data_": ...}`), so a log written by either one reads with the other, and the
audit, the export and eventsourcing's own mapper read it as they read the library's.

orjson knows some types natively that the library writes through a transcoding, and writes a few
values differently. Each difference either cannot occur or falls back to the library's encoder:

- `datetime` and `Decimal` reach the transcodings (`OPT_PASSTHROUGH_DATETIME`; orjson has no
  native `Decimal`), so they are tagged exactly as the library tags them.
- a `UUID` (orjson would write a bare string, which would read back as `str`), a float that is
  not finite (orjson would write `null`), a dict key that is not a string, an integer beyond
  64 bits, and any other type: the state is written by the library's encoder instead.
- finite floats may be spelled differently (`1e-05` / `0.00001`); they read back equal.

Reading parses with orjson and revives the tagged values in one walk, as the library's
`object_hook` does. orjson reads an integer beyond 64 bits as a float, silently, and refuses `NaN`,
`Infinity` and lone surrogates: a state in which orjson read a float (events hold none: amounts are
Decimals), or one orjson refuses, is read by the library's decoder instead.
"""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from eventsourcing.persistence import JSONTranscoder, TranscodingNotRegisteredError

_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME


_PLAIN = frozenset({str, int, bool, Decimal, datetime})


def _library_only(value: Any) -> bool:
    """Whether `value` holds anything but what orjson writes exactly as the library does.

    Accepted: strings and integers (their subclasses too: a `StrEnum` is written as its value by
    both), None, finite floats, `Decimal` and `datetime` (both reach the transcodings), and dicts
    with string keys, lists and tuples of those. Anything else (a `UUID`, a dataclass, an `Enum`
    that is neither) is left to the library's encoder, which applies its transcodings or refuses.
    """
    kind = type(value)
    if kind in _PLAIN or value is None:
        return False
    if kind is dict:
        return any(type(key) is not str or _library_only(item) for key, item in value.items())
    if kind is list or kind is tuple:
        return any(_library_only(item) for item in value)
    if kind is float:
        return not math.isfinite(value)
    return not isinstance(value, str | int)


class FastJSONTranscoder(JSONTranscoder):
    """`JSONTranscoder`'s format, encoded and decoded with orjson (see the module's docstring)."""

    def encode(self, obj: Any) -> bytes:
        if type(obj) is dict:  # an event's state: its flat fields are checked here, without a call each
            for key, value in obj.items():
                if type(key) is not str:
                    return super().encode(obj)
                if (type(value) not in _PLAIN and value is not None) and _library_only(value):
                    return super().encode(obj)
        elif _library_only(obj):
            return super().encode(obj)
        try:
            return orjson.dumps(obj, default=self._encode_obj, option=_OPTIONS)
        except orjson.JSONEncodeError as error:
            if isinstance(error.__cause__, TranscodingNotRegisteredError):
                raise error.__cause__ from None
            return super().encode(obj)  # an integer beyond 64 bits, say: the library writes it

    def decode(self, data: bytes) -> Any:
        try:
            return self._revive(orjson.loads(data))
        except orjson.JSONDecodeError:
            pass  # NaN or Infinity (the library writes them), a lone surrogate, or not JSON
        except _ReadAFloat:
            pass  # a float, or an integer beyond 64 bits that orjson read as one
        return super().decode(data)  # the library decides

    def _revive(self, value: Any) -> Any:
        kind = type(value)
        if kind is dict:
            if len(value) == 2 and "_type_" in value and "_data_" in value:
                name = value["_type_"]
                try:
                    transcoding = self.names[name]
                except (KeyError, TypeError):
                    raise TranscodingNotRegisteredError(
                        f"Data serialized with name {name!r} is not deserializable: "
                        "no transcoding is registered for it"
                    ) from None
                return transcoding.decode(self._revive(value["_data_"]))
            for key, item in value.items():
                kind = type(item)
                if kind is dict or kind is list:
                    value[key] = self._revive(item)
                elif kind is float:
                    raise _ReadAFloat
            return value
        if kind is list:
            return [self._revive(item) for item in value]
        if kind is float:
            raise _ReadAFloat
        return value


class _ReadAFloat(Exception):
    """orjson read a float: it may have been an integer beyond 64 bits, so the library reads it."""
