"""The cache of serialized history turns that rewrite splices into request bodies."""

from __future__ import annotations

import dataclasses

import orjson

from extproc.protocols.wire import TurnWireCache, joined
from store.codec import DEFAULT_CODEC
from store.model import Turn


def turn(turn_id: str, answer: str) -> Turn:
    return Turn(
        turn_id=turn_id,
        request_messages=({"role": "user", "content": "q"},),
        response_message={"role": "assistant", "content": answer},
    )


def encode(t: Turn) -> bytes:
    return joined(t.messages())


def test_same_turn_object_is_encoded_once() -> None:
    cache = TurnWireCache(encode)
    t = turn("t1", "answer")
    first = cache.get(t)
    assert cache.get(t) is first
    assert (cache.hits, cache.misses) == (1, 1)
    assert orjson.loads(b"[" + first + b"]") == t.messages()


def test_another_object_under_the_same_id_is_encoded_again() -> None:
    """A turn reloaded from another tier, or a different turn reusing an id, never gets a
    stale encoding."""
    cache = TurnWireCache(encode)
    cache.get(turn("t1", "old"))
    fresh = turn("t1", "new")
    assert b'"new"' in cache.get(fresh)
    assert cache.get(fresh) is cache.get(fresh)
    assert len(cache) == 1


def test_an_equal_copy_reloaded_from_another_tier_is_a_hit() -> None:
    """Redis and the cold tier hand out new objects for the same stored turn: no re-encoding
    (nor re-tokenizing, nor re-scanning for facts) per request."""
    cache = TurnWireCache(encode)
    stored = turn("t1", "answer")
    first = cache.get(stored)
    reloaded = DEFAULT_CODEC.decode(DEFAULT_CODEC.encode(stored))
    assert reloaded is not stored and reloaded == stored
    assert cache.get(reloaded) is first
    assert cache.get(reloaded) is first  # and then found by identity
    assert (cache.hits, cache.misses) == (2, 1)
    fork_copy = dataclasses.replace(stored, seq=stored.seq + 7)  # same id, another position
    cache.get(fork_copy)
    assert cache.misses == 2


def test_bounded_by_bytes_least_recently_used_first() -> None:
    one = len(encode(turn("t0", "x" * 100)))
    cache = TurnWireCache(encode, max_bytes=3 * one)
    turns = [turn(f"t{i}", "x" * 100) for i in range(4)]
    for t in turns[:3]:
        cache.get(t)
    cache.get(turns[0])  # most recently used now
    cache.get(turns[3])  # evicts t1, the least recently used
    assert len(cache) == 3
    misses = cache.misses
    cache.get(turns[0])
    cache.get(turns[2])
    assert cache.misses == misses
    cache.get(turns[1])
    assert cache.misses == misses + 1


def test_a_turn_larger_than_the_bound_is_encoded_but_not_kept() -> None:
    cache = TurnWireCache(encode, max_bytes=10)
    big = turn("big", "y" * 1000)
    assert orjson.loads(b"[" + cache.get(big) + b"]") == big.messages()
    assert len(cache) == 0


def test_integers_beyond_64_bits_keep_their_value() -> None:
    t = Turn("t", ({"role": "user", "content": "n", "seed": 2**70},), {"role": "assistant"})
    assert str(2**70).encode() in TurnWireCache(encode).get(t)
