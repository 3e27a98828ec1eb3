"""Prompt-cache figures in stored usage: optional fields that leave older records readable and
records without them byte-for-byte as before, summed into the session's meta document."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.base import StoreError
from store.codec import decode_turn, encode_turn
from store.model import Usage
from store.session import SessionMeta, decode_doc, encode_doc, next_meta
from tests.store.helpers import make_turn

counts = st.integers(min_value=0, max_value=2**40)


@settings(max_examples=50, deadline=None)
@given(prompt=counts, completion=counts, cached=counts, created=counts, estimated=st.booleans())
def test_usage_round_trips_with_cache_figures(
    prompt: int, completion: int, cached: int, created: int, estimated: bool
) -> None:
    usage = Usage(prompt, completion, estimated, cached, created)
    turn = dataclasses.replace(make_turn("t", 1), usage=usage)
    assert decode_turn(encode_turn(turn)).usage == usage


def test_a_record_without_cache_figures_keeps_the_old_layout() -> None:
    turn = dataclasses.replace(make_turn("t", 1), usage=Usage(10, 5))
    usage = orjson.loads(encode_turn(turn))["usage"]
    assert usage == {"prompt_tokens": 10, "completion_tokens": 5, "estimated": False}


def test_an_old_record_reads_as_no_cache_hits() -> None:
    record = orjson.loads(encode_turn(make_turn("t", 1)))
    record["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "estimated": False}
    usage = decode_turn(orjson.dumps(record)).usage
    assert (usage.cached_tokens, usage.cache_creation_tokens) == (0, 0)


def test_the_previous_release_reads_a_record_with_cache_figures() -> None:
    """What release N-1 checks (the `v` and the types of the fields it knows) still holds;
    the two new usage keys are of the kind it ignores."""
    turn = dataclasses.replace(make_turn("t", 1), usage=Usage(10, 5, False, 8, 2))
    record = orjson.loads(encode_turn(turn))
    assert record["v"] == 1
    assert set(record["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "estimated",
        "cached_tokens",
        "cache_creation_tokens",
    }


@pytest.mark.parametrize("bad", ["8", 1.5, True, None])
def test_a_cache_figure_of_the_wrong_type_is_corrupt(bad: object) -> None:
    record = orjson.loads(encode_turn(make_turn("t", 1)))
    record["usage"]["cached_tokens"] = bad
    with pytest.raises(StoreError, match="corrupt turn record"):
        decode_turn(orjson.dumps(record))


def test_meta_sums_cached_tokens_and_old_meta_documents_read_as_zero() -> None:
    meta = SessionMeta()
    for cached in (0, 100, 250):
        turn = dataclasses.replace(make_turn("t", 1), usage=Usage(1000, 10, False, cached))
        meta = next_meta(meta, turn, None)
    assert (meta.prompt_tokens, meta.cached_tokens) == (3000, 350)
    assert decode_doc(encode_doc(meta), SessionMeta) == meta
    old = orjson.dumps({"v": 1, "turns": 3, "prompt_tokens": 3000})
    assert decode_doc(old, SessionMeta).cached_tokens == 0
