"""SessionStore: read-your-writes, seq assignment, idempotency, promotion, pending markers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from store import MemoryBackend, SessionStore, SQLiteBackend, Usage, open_store
from tests.store.helpers import FakeClock, assistant, make_pending


async def sqlite_store(path: Path, **options: Any) -> SessionStore:
    cold = await SQLiteBackend.open(path, commit_interval_ms=5)
    store = SessionStore(MemoryBackend(), cold, **options)
    await store.start()
    return store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SessionStore]:
    opened = await sqlite_store(tmp_path / "s.db")
    yield opened
    await opened.close()


def complete(store: SessionStore, turn_id: str, reply: str = "ok") -> bool:
    return store.complete_turn(turn_id, assistant(reply), "stop", Usage(3, 1))


async def run_turn(store: SessionStore, session_key: str, turn_id: str) -> None:
    store.begin_turn(make_pending(turn_id, session_key))
    assert complete(store, turn_id)


async def seqs(store: SessionStore, session_key: str) -> list[int]:
    return [turn.seq for turn in await store.history(session_key)]


async def test_read_your_writes(store: SessionStore) -> None:
    store.begin_turn(make_pending("t1", "s", content="question"))
    assert store.pending("t1") is not None

    async def next_request() -> list[str]:
        assert await store.wait_for_pending("s", timeout_s=5)
        # No await between waking and reading: the turn must already be visible.
        return [m["content"] for t in await store.history("s") for m in t.messages()]

    reader = asyncio.create_task(next_request())
    await asyncio.sleep(0.01)
    assert not reader.done()  # really waiting for the pending turn
    assert complete(store, "t1", reply="answer")
    assert await reader == ["question", "answer"]
    assert store.pending("t1") is None
    turn = (await store.history("s"))[0]
    assert (turn.seq, turn.finish_reason, turn.usage, turn.model) == (
        1,
        "stop",
        Usage(3, 1),
        "gpt-test",
    )


async def test_wait_returns_at_once_without_pending_turns(store: SessionStore) -> None:
    async with asyncio.timeout(1):
        assert await store.wait_for_pending("s", timeout_s=30)


async def test_wait_times_out(store: SessionStore) -> None:
    store.begin_turn(make_pending("t1", "s"))
    assert not await store.wait_for_pending("s", timeout_s=0.05)
    assert store.stats["wait_timeouts"] == 1
    assert store.pending("t1") is not None  # a timeout gives up waiting, not the turn


async def test_wait_ignores_turns_registered_after_it(store: SessionStore) -> None:
    store.begin_turn(make_pending("t1", "s"))
    waiter = asyncio.create_task(store.wait_for_pending("s", timeout_s=5))
    await asyncio.sleep(0)
    store.begin_turn(make_pending("t2", "s"))  # a later request: not waited for
    store.begin_turn(make_pending("x1", "other"))  # another session: not waited for
    assert complete(store, "t1")
    assert await waiter
    assert store.stats["pending"] == 2


async def test_abandon_wakes_waiters_and_records_nothing(store: SessionStore) -> None:
    store.begin_turn(make_pending("t1", "s"))
    waiter = asyncio.create_task(store.wait_for_pending("s", timeout_s=5))
    await asyncio.sleep(0)
    store.abandon_turn("t1")
    assert await waiter
    assert await store.history("s") == []
    assert not complete(store, "t1")  # too late: counted as a drop
    assert (store.stats["abandoned"], store.stats["dropped"]) == (1, 1)


async def test_a_completion_wins_over_a_later_abandon(store: SessionStore) -> None:
    store.begin_turn(make_pending("t1", "s"))
    assert complete(store, "t1")
    store.abandon_turn("t1")  # e.g. the stream errored after its terminal event
    await store.flush()
    assert await seqs(store, "s") == [1]
    assert store.stats["abandoned"] == 0


async def test_writer_survives_a_turn_it_cannot_store(store: SessionStore) -> None:
    store.begin_turn(make_pending("bad", "s"))
    store.begin_turn(make_pending("good", "s"))
    assert complete(store, "bad", reply="lone surrogate \ud800")  # cannot be encoded
    assert complete(store, "good")
    assert await store.wait_for_pending("s", timeout_s=5)  # the failed one is resolved too
    assert [t.turn_id for t in await store.history("s")] == ["good"]
    assert store.stats["write_errors"] == 1


async def test_concurrent_completes_get_gap_free_seqs(store: SessionStore) -> None:
    turn_ids = [f"t{n}" for n in range(60)]
    for turn_id in turn_ids:
        store.begin_turn(make_pending(turn_id, "s"))
    random.Random(7).shuffle(turn_ids)

    async def capture(turn_id: str) -> bool:
        await asyncio.sleep(random.random() / 100)
        return complete(store, turn_id)

    assert all(await asyncio.gather(*(capture(turn_id) for turn_id in turn_ids)))
    assert await store.wait_for_pending("s", timeout_s=5)
    assert await seqs(store, "s") == list(range(1, 61))
    await store.flush()
    assert store.cold is not None
    assert [turn.seq for turn in await store.cold.load("s")] == list(range(1, 61))


async def test_turns_commit_in_completion_order_with_several_writers(
    store: SessionStore,
) -> None:
    """The writer tasks share one queue; each session's turns still get their seqs in the
    order they completed, while other sessions' turns interleave."""
    order = {key: [f"{key}-{n}" for n in range(30)] for key in ("a", "b", "c")}
    for turn_ids in order.values():
        for turn_id in turn_ids:
            store.begin_turn(make_pending(turn_id, turn_id.split("-")[0]))
    interleaved = [turn_id for row in zip(*order.values(), strict=True) for turn_id in row]
    for turn_id in interleaved:
        assert complete(store, turn_id)
    await store.flush()
    for key, turn_ids in order.items():
        stored = await store.history(key)
        assert [t.turn_id for t in stored] == turn_ids
        assert [t.seq for t in stored] == list(range(1, 31))


async def test_duplicate_complete_is_stored_once(store: SessionStore) -> None:
    store.begin_turn(make_pending("t1", "s"))
    assert complete(store, "t1", reply="first")
    assert not complete(store, "t1", reply="second")  # still queued
    await store.flush()
    assert not complete(store, "t1", reply="third")  # committed: the marker is gone
    store.begin_turn(make_pending("t1", "s"))  # a replayed request with the same turn id
    assert complete(store, "t1", reply="fourth")
    await store.flush()
    history = await store.history("s")
    assert [(t.seq, t.response_message["content"]) for t in history] == [(1, "first")]
    stats = store.stats
    assert (stats["duplicate_completes"], stats["dropped_unknown"]) == (1, 1)
    assert (stats["completed"], stats["duplicates_skipped"]) == (1, 1)


async def test_seq_continues_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = await sqlite_store(path)
    for n in (1, 2, 3):
        await run_turn(first, "s", f"a{n}")
    await first.close()
    second = await sqlite_store(path)
    for n in (1, 2):
        await run_turn(second, "s", f"b{n}")
    await second.flush()
    history = await second.history("s")
    assert [(t.seq, t.turn_id) for t in history] == [
        (1, "a1"),
        (2, "a2"),
        (3, "a3"),
        (4, "b1"),
        (5, "b2"),
    ]
    await second.close()


async def test_promotion_from_cold_into_hot(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = await sqlite_store(path)
    await run_turn(first, "s", "t1")
    await first.close()
    second = await sqlite_store(path)
    assert not second.hot.contains("s")
    assert await seqs(second, "s") == [1]  # miss: read from cold
    assert second.hot.contains("s")
    assert await seqs(second, "s") == [1]  # now a hit
    assert await second.history("new") == []  # an unknown session is cached as empty
    assert second.hot.contains("new")
    stats = second.stats
    assert (stats["promotions"], stats["hot_hits"], stats["hot_misses"]) == (2, 1, 2)
    await second.close()


async def test_eviction_before_commit_loses_nothing(tmp_path: Path) -> None:
    """Hot evicts sessions whose turns are still in SQLite's queue: history and seq must come
    out right anyway (the cold tier's load includes its queue)."""
    cold = await SQLiteBackend.open(tmp_path / "s.db", commit_interval_ms=60_000)
    store = SessionStore(MemoryBackend(max_bytes=1500), cold)  # about one session
    await store.start()
    for round_ in range(3):
        for session in ("a", "b", "c"):
            await run_turn(store, session, f"{session}{round_}")
        await asyncio.wait_for(store.wait_for_pending("c", timeout_s=5), 5)
    assert cold.stats["committed"] == 0  # nothing reached the disk yet
    for session in ("a", "b", "c"):
        history = await store.history(session)
        assert [(t.seq, t.turn_id) for t in history] == [(n + 1, f"{session}{n}") for n in range(3)]
    assert store.stats["hot_evictions"] > 0
    await store.close()


async def test_pending_markers_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    store = await sqlite_store(tmp_path / "s.db", pending_ttl_s=60, clock=clock)
    store.begin_turn(make_pending("t1", "s"))
    clock.advance(61)
    assert store.pending("t1") is None
    assert await store.wait_for_pending("s", timeout_s=0.01)
    assert not complete(store, "t1")
    assert (store.stats["expired"], store.stats["dropped_unknown"]) == (1, 1)
    await store.close()


async def test_oldest_pending_markers_are_dropped_over_the_limit(tmp_path: Path) -> None:
    store = await sqlite_store(tmp_path / "s.db", max_pending=2)
    for n in (1, 2, 3):
        store.begin_turn(make_pending(f"t{n}", "s"))
    assert store.pending("t1") is None
    assert store.pending("t3") is not None
    assert (store.stats["pending"], store.stats["overflow_dropped"]) == (2, 1)
    await store.close()


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    store = SessionStore(MemoryBackend(), None, queue_size=1)  # writer not started yet
    store.begin_turn(make_pending("t1", "s"))
    store.begin_turn(make_pending("t2", "s"))
    assert complete(store, "t1")
    assert not complete(store, "t2")
    assert store.stats["dropped_queue_full"] == 1
    assert store.pending("t2") is None  # nobody will wait for a turn that will never come
    await store.start()
    await store.flush()
    assert await seqs(store, "s") == [1]
    await store.close()


async def test_delete_session(store: SessionStore) -> None:
    await run_turn(store, "s", "t1")
    await run_turn(store, "keep", "k1")
    await store.flush()
    await store.delete_session("s")
    assert await store.history("s") == []
    assert store.cold is not None
    assert await store.cold.load("s") == []
    assert await seqs(store, "keep") == [1]
    await run_turn(store, "s", "t2")
    await store.flush()
    assert await seqs(store, "s") == [1]


async def test_open_store_memory_only_and_sqlite(tmp_path: Path) -> None:
    memory_only = await open_store(None, 1 << 20)
    await run_turn(memory_only, "s", "t1")
    await memory_only.flush()
    assert await seqs(memory_only, "s") == [1]
    await memory_only.close()

    path = tmp_path / "nested" / "s.db"
    durable = await open_store(path, 1 << 20, commit_interval_ms=5)
    await run_turn(durable, "s", "t1")
    await durable.close()  # close flushes
    reopened = await open_store(path, 1 << 20)
    assert await seqs(reopened, "s") == [1]
    assert reopened.stats["cold_commits"] == 0
    await reopened.close()


async def test_a_marker_waited_out_once_does_not_slow_later_reads(store: SessionStore) -> None:
    """A request aborted before its reply leaves a marker only expiry removes: the first
    reader waits it out, later readers do not wait for it again."""
    store.begin_turn(make_pending("lost", "s"))
    started = asyncio.get_running_loop().time()
    assert await store.wait_for_pending("s", timeout_s=0.2) is False
    assert asyncio.get_running_loop().time() - started >= 0.2
    started = asyncio.get_running_loop().time()
    assert await store.wait_for_pending("s", timeout_s=0.2) is True
    assert asyncio.get_running_loop().time() - started < 0.1
    # Once its reply starts (capture saw headers), it is waited for again.
    store.mark_responding("lost")
    assert await store.wait_for_pending("s", timeout_s=0.05) is False
    store.abandon_turn("lost")
    # A turn begun after it is still waited for.
    store.begin_turn(make_pending("next", "s"))
    waiter = asyncio.create_task(store.wait_for_pending("s", timeout_s=5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert complete(store, "next")
    assert await waiter is True


async def test_a_commit_asks_the_cold_tier_for_a_missing_document_once(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session without a system prompt has no `derived` document: the writer used to ask
    SQLite for it on every commit (a read and a thread round trip per turn)."""
    cold = store.cold
    assert cold is not None
    asked: list[str] = []
    get_docs = cold.get_docs

    async def counting(session_key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        asked.extend(names)
        return await get_docs(session_key, names)

    monkeypatch.setattr(cold, "get_docs", counting)
    for n in range(5):
        await run_turn(store, "s", f"t{n}")
        assert await store.wait_for_pending("s", 5)
    # The first commit asks for its four documents in one query; later ones ask for none.
    assert sorted(asked) == ["derived", "meta", "security", "state"]
    info = await store.session_info("s")
    assert info.meta.turns == 5 and info.derived.pinned_system == ()


async def test_a_commit_writes_only_the_documents_that_changed(tmp_path: Path) -> None:
    store = await sqlite_store(tmp_path / "s.db")
    for n in range(4):
        store.begin_turn(replace(make_pending(f"t{n}", "s"), tenant="acme", principal="p1"))
        assert complete(store, f"t{n}")
        assert await store.wait_for_pending("s", 5)
    await store.flush()
    # Turn 1 writes meta, security and state; turns 2-4 only meta (its counters move).
    assert store.stats["cold_docs_written"] == 3 + 3
    info = await store.session_info("s")
    assert (info.meta.turns, info.security.principal, info.state.phase) == (4, "p1", "chatting")
    await store.close()
    reopened = await sqlite_store(tmp_path / "s.db")  # and they are all in the cold tier
    info = await reopened.session_info("s")
    assert (info.meta.turns, info.security.tenant, info.state.phase) == (4, "acme", "chatting")
    await reopened.close()
