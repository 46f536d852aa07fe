"""The audit's decoder reads every state as the library's JSONTranscoder and Mapper read it."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import Mapper, StoredEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from podsettle.domain import EscrowJob
from podsettle.replay import Decoder
from podsettle.replay.source import standard_transcoder

LIBRARY = Mapper[UUID](transcoder=standard_transcoder())
TOPIC = "podsettle.domain.escrow_job:EscrowJob.Funded"
JOB = uuid4()


def library(state: bytes) -> dict[str, Any]:
    event = LIBRARY.to_domain_event(StoredEvent(JOB, 3, TOPIC, state))
    return dict(vars(event))


def ours(state: bytes) -> dict[str, Any]:
    event = Decoder().decode(TOPIC, JOB, 3, state)
    assert type(event) is EscrowJob.Funded
    return dict(vars(event))


def same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (1 == 1.0 == True is not enough), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


STATES = [
    b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-11-28T02:07:08.627910+00:00"},'
    b'"escrow_id":"esc_1","amount":{"_type_":"decimal_str","_data_":"0.500000"},'
    b'"fee":{"_type_":"decimal_str","_data_":"0.005000"},"net":{"_type_":"decimal_str","_data_":"0.495000"}}',
    # whitespace, nesting, lists, tags inside tags' data and inside lists
    b' { "a" : [ 1 , {"_type_":"uuid_hex","_data_":"' + uuid4().hex.encode() + b'"} ] ,\n'
    b' "b" : {"c": {"_type_": "decimal_str", "_data_": "1e-7"},'
    b' "d": [[{"_type_":"decimal_str","_data_":"2"}]]},'
    b' "e": null, "f": true, "g": "\\u00e9\\ud83d\\ude00", "h": -0 } ',
    # numbers orjson reads differently: beyond 64 bits, floats, NaN, Infinity, an overflowing exponent
    b'{"big":18446744073709551616,"neg":-9223372036854775809,"huge":99999999999999999999999999}',
    b'{"x":1.5,"y":[2.25,{"z":-0.0}],"t":{"_type_":"decimal_str","_data_":1.1}}',
    b'{"n":NaN,"i":Infinity,"m":-Infinity,"o":1E400}',
    b'{"s":"\\ud800 lone surrogate"}',
    b'{"dup":1,"dup":2}',
    b'{"__chain__":"' + b"0" * 128 + b'","k":{"_type_":"decimal_str","_data_":"3"}}',
    # a tag with extra keys is a plain dict; a tag whose data is not a string
    b'{"k":{"_type_":"decimal_str","_data_":"3","more":1},"l":{"_type_":"decimal_str","_data_":7}}',
]


@pytest.mark.parametrize("state", STATES)
def test_the_decoder_reads_as_the_library(state: bytes) -> None:
    expected = library(state)
    expected.pop("__chain__", None)  # the chain mapper strips it before the library sees it
    assert same(ours(state), expected)


@pytest.mark.parametrize(
    "state",
    [b"", b"[1,2]", b'{"a":1} x', b'{"a":', b"\xff{}", b'{"k":{"_type_":"nope","_data_":"1"}}'],
)
def test_what_the_library_refuses_the_decoder_refuses(state: bytes) -> None:
    with pytest.raises(Exception):  # noqa: B017 (the library raises several kinds)
        library(state)
    with pytest.raises((ValueError, TypeError)):
        ours(state)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6),
    amount=st.decimals(allow_nan=False, allow_infinity=False),
    indent=st.sampled_from([None, 1]),
)
def test_random_states_read_as_the_library_reads_them(
    fields: dict[str, Any], amount: Decimal, indent: int | None
) -> None:
    fields.pop("__chain__", None)
    fields["amount"] = {"_type_": "decimal_str", "_data_": str(amount)}
    state = json.dumps(fields, indent=indent, ensure_ascii=indent is None).encode()
    assert same(ours(state), library(state))
