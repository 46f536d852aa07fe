"""A bounded, least-recently-used mapping step shared by the caches of the write and read sides."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep(cache: OrderedDict[K, V], key: K, value: V, maxsize: int) -> None:
    """Put `value` under `key` as the most recent entry, dropping the oldest past `maxsize` (O(1) in
    an OrderedDict; a plain dict would scan the holes its deletions leave)."""
    if key in cache:
        cache[key] = value
        cache.move_to_end(key)
    else:
        cache[key] = value
        if len(cache) > maxsize:
            cache.popitem(last=False)
