"""The event store's orjson transcoder reads and writes exactly what the library's JSONTranscoder does."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    TranscodingNotRegisteredError,
    UUIDAsHex,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from podsettle.adapters.transcoder import FastJSONTranscoder
from podsettle.application import Settlements
from podsettle.domain import EscrowJob


def _registered(transcoder: JSONTranscoder) -> JSONTranscoder:
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(transcoding)
    return transcoder


LIBRARY = _registered(JSONTranscoder())
FAST = _registered(FastJSONTranscoder())

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.decimals(allow_nan=False, allow_infinity=False, places=6),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5)), None])),
    st.uuids(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=20,
)
states = st.dictionaries(st.text(max_size=10), values, max_size=8)


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and the types kept (1 is not True, a UUID is not its hex)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=400, deadline=None)
@given(states)
def test_each_transcoder_reads_what_the_other_writes(state: dict[str, Any]) -> None:
    expected = LIBRARY.decode(LIBRARY.encode(state))
    written = FAST.encode(state)
    assert same(FAST.decode(written), expected)
    assert same(LIBRARY.decode(written), expected)
    assert same(FAST.decode(LIBRARY.encode(state)), expected)


def test_tagged_values_are_written_as_the_library_writes_them() -> None:
    state = {
        "amount": Decimal("0.250000"),
        "at": datetime(2026, 11, 28, 1, 2, 3, tzinfo=UTC),
        "nested": {"when": [datetime(2026, 1, 1, tzinfo=UTC)], "text": "é"},
        "count": 3,
        "none": None,
    }
    assert FAST.encode(state) == LIBRARY.encode(state)


def test_a_uuid_reads_back_as_a_uuid_not_as_its_text() -> None:
    value = uuid.uuid4()
    decoded = FAST.decode(FAST.encode({"id": value, "ids": [value]}))
    assert decoded == {"id": value, "ids": [value]}
    assert type(decoded["id"]) is uuid.UUID


def test_values_orjson_would_change_are_left_to_the_library() -> None:
    state = {"ratio": math.inf, "big": 2**80, "keys": {1: "one"}}
    assert FAST.encode(state) == LIBRARY.encode(state)
    assert FAST.decode(FAST.encode(state)) == {"ratio": math.inf, "big": 2**80, "keys": {"1": "one"}}


class Colour(Enum):
    RED = "red"


@pytest.mark.parametrize("value", [Colour.RED, object(), {"deep": [Colour.RED]}])
def test_an_unregistered_type_is_refused_as_the_library_refuses_it(value: object) -> None:
    with pytest.raises(TranscodingNotRegisteredError):
        LIBRARY.encode({"value": value})
    with pytest.raises(TranscodingNotRegisteredError):
        FAST.encode({"value": value})


def test_an_unknown_tag_is_refused_on_reading() -> None:
    with pytest.raises(TranscodingNotRegisteredError, match="no_such_type"):
        FAST.decode(b'{"value":{"_type_":"no_such_type","_data_":"x"}}')


def test_the_application_stores_with_it_and_the_library_reads_its_log(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'events.db'}"
    app = Settlements(store)
    assert isinstance(app.mapper.transcoder, FastJSONTranscoder)
    job = EscrowJob.open(
        job_key="transcoder-1",
        endpoint_id="echo",
        input_digest="0" * 64,
        payer="ag_payer",
        payee="ag_worker",
        budget="0.25",
        deadline=datetime(2030, 1, 1, tzinfo=UTC),
        acceptance={"rule": "metric_at_least", "metric": "acc", "threshold": "0.9"},
    )
    app.save(job)
    app.close()
    # The same file read by an application on the library's own transcoder.
    library_app = Settlements(store, env={"TRANSCODER_TOPIC": "eventsourcing.persistence:JSONTranscoder"})
    assert not isinstance(library_app.mapper.transcoder, FastJSONTranscoder)
    copy: EscrowJob = library_app.repository.get(job.id)
    assert copy.budget == Decimal("0.250000")
    assert copy.deadline == datetime(2030, 1, 1, tzinfo=UTC)
    assert copy.acceptance == job.acceptance
