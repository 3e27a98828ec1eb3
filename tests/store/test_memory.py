"""MemoryBackend specifics: the byte bound (LRU), idle TTL, miss vs empty session, documents
as cache entries."""

from __future__ import annotations

import pytest

from store import MemoryBackend, StoreError
from store.memory import SESSION_OVERHEAD_BYTES, doc_size, turn_size
from tests.store.helpers import FakeClock, make_turn

# Every turn below has the same encoded size, so budgets can be written in turns.
TURN = turn_size(make_turn("t1", 1, content="x" * 1000))
SESSION = SESSION_OVERHEAD_BYTES + TURN  # a session holding one turn
TURN_SMALL = turn_size(make_turn("t1", 1))


async def test_lru_eviction_keeps_the_byte_bound() -> None:
    hot = MemoryBackend(max_bytes=3 * SESSION + 10)
    for key in ("a", "b", "c"):
        await hot.append(key, make_turn("t1", 1, content="x" * 1000))
    assert hot.stats["evictions"] == 0
    assert hot.get("a") is not None  # a becomes the most recently used
    await hot.append("d", make_turn("t1", 1, content="x" * 1000))
    assert [hot.contains(key) for key in "abcd"] == [True, False, True, True]
    assert hot.stats["evictions"] == 1
    assert hot.stats["bytes"] == 3 * SESSION <= 3 * SESSION + 10


async def test_growing_session_evicts_others_first() -> None:
    hot = MemoryBackend(max_bytes=2 * SESSION + TURN)
    await hot.append("old", make_turn("t1", 1, content="x" * 1000))
    await hot.append("grow", make_turn("t1", 1, content="x" * 1000))
    await hot.append("grow", make_turn("t2", 2, content="x" * 1000))
    await hot.append("grow", make_turn("t3", 3, content="x" * 1000))
    assert not hot.contains("old")
    assert [t.seq for t in await hot.load("grow")] == [1, 2, 3]


async def test_session_larger_than_the_bound_is_evicted_too() -> None:
    hot = MemoryBackend(max_bytes=SESSION + TURN // 2)
    await hot.append("s", make_turn("t1", 1, content="x" * 1000))
    await hot.append("s", make_turn("t2", 2, content="x" * 1000))
    assert not hot.contains("s")
    assert hot.stats["bytes"] == 0


async def test_idle_sessions_expire_with_the_injected_clock() -> None:
    clock = FakeClock()
    hot = MemoryBackend(ttl_s=10, clock=clock)
    await hot.append("a", make_turn("t1", 1))
    await hot.append("b", make_turn("t1", 1))
    clock.advance(6)
    assert hot.get("a") is not None  # an access resets a's idle time
    clock.advance(5)  # b idle 11 s, a idle 5 s
    assert not hot.contains("b")
    assert hot.contains("a")
    clock.advance(10)
    assert await hot.load("a") == []
    assert hot.stats["expirations"] == 2
    assert hot.stats["bytes"] == 0


async def test_miss_differs_from_an_empty_cached_session() -> None:
    hot = MemoryBackend()
    assert hot.get("s") is None
    assert not hot.contains("s")
    hot.put_session("s", [])
    assert hot.contains("s")
    assert hot.get("s") == []
    assert (hot.stats["misses"], hot.stats["hits"]) == (1, 1)


async def test_byte_accounting_follows_every_change() -> None:
    hot = MemoryBackend()
    turns = [make_turn(f"t{seq}", seq, content="x" * 1000) for seq in (1, 2, 3)]
    hot.put_session("s", turns[:2])
    assert hot.stats["bytes"] == SESSION_OVERHEAD_BYTES + 2 * TURN
    assert not await hot.append("s", turns[0])  # duplicate: no change
    await hot.append("s", turns[2])
    assert hot.stats["bytes"] == SESSION_OVERHEAD_BYTES + 3 * TURN
    hot.put_session("s", turns[:1])  # replaces, does not add
    assert hot.stats["bytes"] == SESSION
    await hot.delete("s")
    assert hot.stats["bytes"] == 0


async def test_head_helpers() -> None:
    hot = MemoryBackend()
    assert hot.last_seq("s") == 0
    await hot.append("s", make_turn("t1", 1))
    await hot.append("s", make_turn("t5", 5))
    assert hot.last_seq("s") == 5
    assert hot.has_turn("s", "t5")
    assert not hot.has_turn("s", "t2")
    assert not hot.has_turn("other", "t5")


async def test_a_seq_taken_by_another_turn_is_refused() -> None:
    hot = MemoryBackend()
    await hot.append("s", make_turn("t1", 1))
    await hot.append("s", make_turn("t2", 2))
    with pytest.raises(StoreError, match="seq 1"):
        await hot.append("s", make_turn("other", 1))
    assert [t.turn_id for t in await hot.load("s")] == ["t1", "t2"]


async def test_docs_count_toward_the_bound_and_leave_with_the_session() -> None:
    hot = MemoryBackend(max_bytes=2 * SESSION + doc_size("meta", b"x" * 500))
    await hot.append("a", make_turn("t1", 1, content="x" * 1000))
    await hot.put_doc("a", "meta", b"x" * 500)
    assert hot.stats["bytes"] == SESSION + doc_size("meta", b"x" * 500)
    await hot.put_doc("a", "meta", b"y" * 100)  # an overwrite replaces, does not add
    assert hot.stats["bytes"] == SESSION + doc_size("meta", b"y" * 100)
    await hot.append("b", make_turn("t1", 1, content="x" * 1000))
    await hot.put_doc("b", "meta", b"x" * 600)  # over the bound: a (and its doc) goes
    assert not hot.contains("a")
    assert await hot.get_doc("a", "meta") is None
    assert await hot.get_doc("b", "meta") == b"x" * 600
    assert hot.stats["evictions"] == 1
    await hot.delete("b")
    assert hot.stats["bytes"] == 0


async def test_a_doc_alone_does_not_make_a_cached_history() -> None:
    """The tiered store caches documents of sessions whose turns it never loaded: such an
    entry must still be a miss for `contains`/`get`, or history would read as empty."""
    hot = MemoryBackend()
    await hot.put_doc("s", "meta", b"m")
    assert not hot.contains("s")
    assert hot.get("s") is None
    assert await hot.get_doc("s", "meta") == b"m"
    hot.put_session("s", [make_turn("t1", 1)])  # promotion keeps the cached documents
    assert hot.contains("s")
    assert await hot.get_doc("s", "meta") == b"m"
    assert hot.stats["bytes"] == SESSION_OVERHEAD_BYTES + TURN_SMALL + doc_size("meta", b"m")
    await hot.put_doc("fresh", "meta", b"m")
    await hot.append("fresh", make_turn("t1", 1))  # an append makes it a session, as always
    assert hot.contains("fresh")


async def test_docs_expire_with_the_idle_session() -> None:
    clock = FakeClock()
    hot = MemoryBackend(ttl_s=10, clock=clock)
    await hot.put_doc("s", "meta", b"m")
    clock.advance(6)
    assert await hot.get_doc("s", "meta") == b"m"  # a read refreshes it
    clock.advance(6)
    assert await hot.get_doc("s", "meta") == b"m"
    clock.advance(11)
    assert await hot.get_doc("s", "meta") is None
    assert hot.stats["bytes"] == 0


async def test_truncate_after_frees_the_dropped_turns_bytes() -> None:
    hot = MemoryBackend()
    turns = [make_turn(f"t{seq}", seq, content="x" * 1000) for seq in (1, 2, 3)]
    hot.put_session("s", turns)
    assert await hot.truncate_after("s", 1) == 2
    assert hot.stats["bytes"] == SESSION
    assert not hot.has_turn("s", "t2")
    assert hot.last_seq("s") == 1
    assert await hot.append("s", turns[1])  # a dropped id is new again
    assert await hot.truncate_after("not cached", 0) == 0
