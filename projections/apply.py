"""Applying an event of an `@event` method to its aggregate, as the library's `mutate` does, for the
replays (the read model's catch-up and the audit) where the library's own checks are already made.

For such an event the library's `mutate` checks that the event belongs to the aggregate and follows
its version, calls the decorated method with the event's fields that the method names, then sets
the aggregate's version and modified time. The replays know the first two already (they placed the
event); `applier` does the rest with the method and its parameter names looked up once per class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from eventsourcing.domain import CanInitAggregate, CanMutateAggregate, DecoratedFuncCaller, decorated_funcs
from eventsourcing.utils import resolve_topic

Applier = Callable[[Any, Any], None]


def event_method(cls: type) -> tuple[Callable[..., None], frozenset[str]] | None:
    """The `@event` method that events of `cls` apply, and its parameter names; None for a class
    whose `mutate` or `apply` is not the library's (a created event, or one with its own code)."""
    if not isinstance(cls, type) or not issubclass(cls, DecoratedFuncCaller) or cls not in decorated_funcs:
        return None
    mutates = [k for k in cls.__mro__ if "mutate" in vars(k)]
    applies = [k for k in cls.__mro__ if "apply" in vars(k)]
    if mutates[:1] != [CanMutateAggregate] or applies != [DecoratedFuncCaller, CanMutateAggregate]:
        return None
    func = decorated_funcs[cls]
    return func, frozenset(inspect.signature(func).parameters)


def applier(cls: type) -> Applier | None:
    """`event.mutate(aggregate)` for events of `cls` without the id and version checks (the caller
    makes them), or None when `cls` must go through its own `mutate`."""
    found = event_method(cls)
    if found is None:
        return None
    func, names = found

    def apply(aggregate: Any, event: Any) -> None:
        fields = event.__dict__
        func(aggregate, **{name: value for name, value in fields.items() if name in names})
        aggregate.version = fields["originator_version"]
        aggregate.modified_on = event.timestamp

    return apply


Creator = Callable[[Any], Any]
_creators: dict[type, tuple[frozenset[str], frozenset[str]] | None] = {}


def creator(cls: type) -> Creator | None:
    """`event.mutate(None)` for created events of `cls` (they construct the aggregate), with the
    parameter names of the aggregate's `__base_init__` and `__init__` looked up once per aggregate
    class; None when `cls` must go through its own `mutate`. Like the library: the aggregate class
    is the event's `originator_topic`, both initialisers get the event's fields that they name, and
    the event's (empty) `apply` is skipped."""
    if not isinstance(cls, type) or not issubclass(cls, CanInitAggregate):
        return None
    mutates = [k for k in cls.__mro__ if "mutate" in vars(k)]
    applies = [k for k in cls.__mro__ if "apply" in vars(k)]
    if mutates[:1] != [CanInitAggregate] or applies != [CanMutateAggregate]:
        return None

    def create(event: Any) -> Any:
        fields = event.__dict__
        aggregate_class = resolve_topic(event.originator_topic)
        names = _creators.get(aggregate_class, _UNKNOWN)
        if names is _UNKNOWN:
            names = _creators[aggregate_class] = _initialiser_names(aggregate_class)
        if names is None:
            return event.mutate(None)
        base_names, init_names = names
        aggregate = aggregate_class.__new__(aggregate_class)
        aggregate.__base_init__(**{name: value for name, value in fields.items() if name in base_names})
        aggregate.__init__(**{name: value for name, value in fields.items() if name in init_names})
        return aggregate

    return create


_UNKNOWN: Any = object()


def _initialiser_names(aggregate_class: Any) -> tuple[frozenset[str], frozenset[str]] | None:
    init_names = frozenset(inspect.signature(aggregate_class.__init__).parameters)
    if "id" in init_names:  # the library passes the id to such an __init__: left to its mutate
        return None
    return frozenset(inspect.signature(aggregate_class.__base_init__).parameters), init_names
