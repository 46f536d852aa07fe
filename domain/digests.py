"""Canonical digests of job inputs and outputs: the log records what was asked and delivered, not the data.

A job input is turned into its canonical JSON bytes once, at the edge; the digest is taken over those
bytes and the compute adapter sends them as they are. A value JSON cannot carry exactly (NaN, an
infinity, a set, a Decimal, a lone surrogate) is refused, naming where it sits, rather than digested
under some stand-in text that is not what the worker would receive.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from podsettle.domain.errors import InvalidInput


def canonical_json(value: Any, field: str = "value") -> bytes:
    """JSON with sorted keys and no spaces, UTF-8: equal values always give equal bytes.
    Raises `InvalidInput` naming the first part of `value` (under `field`) that is not JSON."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode()
    except (TypeError, ValueError) as error:  # UnicodeEncodeError is a ValueError
        where, why = _first_problem(value, field)
        raise InvalidInput(where, why or f"is not JSON ({error})") from None


def digest_bytes(data: bytes) -> str:
    """sha256 hex of bytes already in canonical form."""
    return hashlib.sha256(data).hexdigest()


def digest(value: Any, field: str = "value") -> str:
    """sha256 hex of the canonical JSON of `value` (an error naming the field when it is not JSON)."""
    return digest_bytes(canonical_json(value, field))


def _first_problem(value: Any, path: str) -> tuple[str, str | None]:
    """Where in `value` JSON fails, and why; only walked once encoding has failed."""
    if value is None or isinstance(value, bool | int):
        return path, None
    if isinstance(value, float):
        return (path, None) if math.isfinite(value) else (path, f"{value!r} is not a JSON number")
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path, "holds a lone surrogate, which UTF-8 cannot carry"
        return path, None
    if isinstance(value, dict):
        keys = list(value)
        if not all(isinstance(key, str) for key in keys) and not all(
            isinstance(key, str | int | float | bool) or key is None for key in keys
        ):
            return path, "has keys that are not strings"
        if len({type(key) for key in keys}) > 1:
            return path, "mixes string keys with keys of other types"
        for key in keys:
            where, why = _first_problem(key, f"{path}.{key}") if isinstance(key, str) else (path, None)
            if why is None:
                where, why = _first_problem(value[key], f"{path}.{key}")
            if why is not None:
                return where, why
        return path, None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            where, why = _first_problem(item, f"{path}[{index}]")
            if why is not None:
                return where, why
        return path, None
    return path, f"a {type(value).__name__} is not a JSON value"
