"""The tiered store with a Redis warm tier: replicas sharing Redis and a PostgreSQL cold tier,
Redis failing and coming back. Real servers only: the shared PostgreSQL, our own redis-server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from store import MemoryBackend, PostgresBackend, RedisBackend, SessionStore, Usage
from tests.store.helpers import assistant, make_pending
from tests.store.redis_servers import RedisServer, start_server

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

OpenReplica = Callable[[], Awaitable[SessionStore]]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_server(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[OpenReplica]:
    """`await open_replica()`: one more SessionStore sharing the Redis and the PG schema."""
    schema = "t_" + uuid.uuid4().hex[:12]
    opened: list[SessionStore] = []

    async def open_replica() -> SessionStore:
        cold = await PostgresBackend.open(PG_DSN, schema=schema, commit_interval_ms=5)
        warm = RedisBackend.from_url(redis_server.url, breaker_reset_s=0.2)
        store = SessionStore(MemoryBackend(), cold, warm=warm)
        await store.start()
        opened.append(store)
        return store

    yield open_replica
    for store in opened:
        await store.close()
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def turn(store: SessionStore, key: str, text: str) -> None:
    turn_id = uuid.uuid4().hex
    store.begin_turn(make_pending(turn_id, key, content=text))
    assert store.complete_turn(turn_id, assistant("re: " + text), "stop", Usage(3, 1))
    assert await store.wait_for_pending(key, 5)


async def texts(store: SessionStore, key: str) -> list[str]:
    return [t.request_messages[0]["content"] for t in await store.history(key)]


async def test_no_stale_read_after_a_write_in_the_other_replica(replicas: OpenReplica) -> None:
    a, b = await replicas(), await replicas()
    await turn(a, "s", "one")
    assert await texts(b, "s") == ["one"]  # b now holds a hot copy
    await turn(a, "s", "two")
    # b's hot copy is stale: the version check (and the invalidation) make b re-read.
    assert await texts(b, "s") == ["one", "two"]
    await turn(b, "s", "three")
    assert await texts(a, "s") == ["one", "two", "three"]
    assert [t.seq for t in await a.history("s")] == [1, 2, 3]


async def test_concurrent_writes_from_two_replicas_keep_one_order(replicas: OpenReplica) -> None:
    a, b = await replicas(), await replicas()
    await asyncio.gather(*(turn(a if i % 2 else b, "s", f"m{i}") for i in range(30)))
    await a.flush()
    await b.flush()
    seqs_a = [t.seq for t in await a.history("s")]
    seqs_b = [t.seq for t in await b.history("s")]
    assert seqs_a == seqs_b == list(range(1, 31))
    # The cold tier has the same single order.
    cold = await a.cold.load("s")  # type: ignore[union-attr]
    assert [t.seq for t in cold] == list(range(1, 31))
    assert sorted(await texts(a, "s")) == sorted(f"m{i}" for i in range(30))


async def test_deletion_is_seen_by_the_other_replica(replicas: OpenReplica) -> None:
    a, b = await replicas(), await replicas()
    await turn(a, "s", "one")
    assert await texts(b, "s") == ["one"]
    await a.clear("s")
    assert await texts(b, "s") == []
    await turn(b, "s", "again")
    assert [t.seq for t in await a.history("s")] == [1]


async def test_expired_warm_copy_is_refilled_from_cold(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    a = await replicas()
    await turn(a, "s", "one")
    await turn(a, "s", "two")
    await a.flush()
    redis_server.admin().flushall()  # as if the sliding TTL had expired
    b = await replicas()
    assert await texts(b, "s") == ["one", "two"]
    assert b.stats["warm_refills"] == 1
    await turn(b, "s", "three")  # seq continues from the cold tier's last
    assert [t.seq for t in await b.history("s")] == [1, 2, 3]


async def test_redis_down_serves_from_hot_and_cold_and_loses_nothing(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    a = await replicas()
    await turn(a, "s", "one")
    redis_server.kill()
    await turn(a, "s", "two")  # captured while Redis is down: hot + cold
    await turn(a, "s", "three")
    assert await texts(a, "s") == ["one", "two", "three"]
    assert a.stats["warm_degraded_writes"] >= 2
    redis_server.start()  # back, but it kept nothing (no persistence): refilled lazily
    await asyncio.sleep(0.3)  # past the breaker's reset
    await a.flush()
    b = await replicas()
    assert await texts(b, "s") == ["one", "two", "three"]
    await turn(b, "s", "four")
    assert [t.seq for t in await a.history("s")] == [1, 2, 3, 4]


async def test_redis_back_with_a_stale_copy_does_not_serve_it(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    """Redis paused (not restarted) while a replica writes: its old copy must not win."""
    a = await replicas()
    await turn(a, "s", "one")
    redis_server.freeze()
    try:
        await turn(a, "s", "two")  # Redis does not answer: degraded write
    finally:
        redis_server.thaw()
    await asyncio.sleep(0.3)
    await a.flush()
    assert await texts(a, "s") == ["one", "two"]
    b = await replicas()
    assert await texts(b, "s") == ["one", "two"]


async def test_a_pending_turn_in_one_replica_holds_the_next_read_in_the_other(
    replicas: OpenReplica,
) -> None:
    """Read-your-writes across replicas: the marker lives in Redis, not only in-process."""
    a, b = await replicas(), await replicas()
    await turn(a, "s", "one")
    a.begin_turn(make_pending("t2", "s", content="two"))
    await asyncio.sleep(0.05)  # the shared marker is written in the background

    async def read_in_b() -> list[str]:
        assert await b.wait_for_pending("s", 5)
        return await texts(b, "s")

    reader = asyncio.create_task(read_in_b())
    await asyncio.sleep(0.1)
    assert not reader.done()  # b really waits for a's turn
    assert a.complete_turn("t2", assistant("re: two"), "stop", Usage(3, 1))
    assert await reader == ["one", "two"]


async def test_an_abandoned_turn_releases_the_other_replica(replicas: OpenReplica) -> None:
    a, b = await replicas(), await replicas()
    a.begin_turn(make_pending("t1", "s", content="lost"))
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(b.wait_for_pending("s", 5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    a.abandon_turn("t1")
    assert await waiter is True
    assert await texts(b, "s") == []


async def test_redis_killed_and_restarted_under_load_loses_nothing(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    a = await replicas()
    sessions = [f"s{i}" for i in range(8)]

    async def talk(session: str) -> None:
        for n in range(15):
            await turn(a, session, f"{session}-{n}")
            await asyncio.sleep(0.01)

    load = asyncio.gather(*(talk(s) for s in sessions))
    await asyncio.sleep(0.15)
    redis_server.kill()
    await asyncio.sleep(0.3)
    redis_server.start()
    await load
    await a.flush()
    assert a.stats["warm_degraded_writes"] > 0  # some turns really went around Redis
    b = await replicas()
    for session in sessions:
        assert await texts(b, session) == [f"{session}-{n}" for n in range(15)]
        assert [t.seq for t in await b.history(session)] == list(range(1, 16))


async def test_client_pause_bounds_the_request_path(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    """CLIENT PAUSE: a read is served (from hot/cold) well before the pause ends."""
    a = await replicas()
    await turn(a, "s", "one")
    await a.flush()
    b = await replicas()
    redis_server.admin().execute_command("CLIENT", "PAUSE", "3000", "ALL")
    started = asyncio.get_running_loop().time()
    assert await texts(b, "s") == ["one"]
    assert asyncio.get_running_loop().time() - started < 2.0


async def test_a_marker_waited_out_once_does_not_slow_later_reads_with_redis(
    replicas: OpenReplica,
) -> None:
    """The marker of an aborted request is also in Redis: the shared poll must not wait for
    it again either."""
    a = await replicas()
    a.begin_turn(make_pending("lost", "s"))  # its reply never comes (client aborted)
    await asyncio.sleep(0.05)
    assert await a.wait_for_pending("s", 0.2) is False  # waited out once...
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await a.wait_for_pending("s", 0.2) is True  # ...then not again
    assert loop.time() - started < 0.15


# --- the rewrite's read: pending markers and history in one round trip ------------------


async def test_history_after_pending_is_one_round_trip_on_a_hot_hit(
    replicas: OpenReplica,
) -> None:
    a = await replicas()
    await turn(a, "s", "one")
    await a.history("s")  # now hot
    assert a.warm is not None
    calls = a.warm.stats["calls"]
    waited, history = await a.history_after_pending("s", 5)
    assert waited and [t.request_messages[0]["content"] for t in history] == ["one"]
    assert a.warm.stats["calls"] - calls == 1
    hot_hits = a.stats["hot_hits"]
    calls = a.warm.stats["calls"]
    assert await a.wait_for_pending("s", 5)  # the two calls rewrite makes today: two trips
    await a.history("s")
    assert a.warm.stats["calls"] - calls == 2
    assert a.stats["hot_hits"] == hot_hits + 1


async def test_history_after_pending_waits_for_another_replicas_turn_and_sees_it(
    replicas: OpenReplica,
) -> None:
    a, b = await replicas(), await replicas()
    await turn(a, "s", "one")
    assert await texts(b, "s") == ["one"]  # b holds a hot copy
    a.begin_turn(make_pending("t2", "s", content="two"))
    await asyncio.sleep(0.05)
    reader = asyncio.create_task(b.history_after_pending("s", 5))
    await asyncio.sleep(0.1)
    assert not reader.done()
    assert a.complete_turn("t2", assistant("re: two"), "stop", Usage(3, 1))
    waited, history = await reader
    # The version read with the last poll is newer than b's hot copy: b re-reads.
    assert waited and [t.request_messages[0]["content"] for t in history] == ["one", "two"]


async def test_history_after_pending_times_out_like_wait_for_pending(
    replicas: OpenReplica,
) -> None:
    a, b = await replicas(), await replicas()
    await turn(a, "s", "one")
    a.begin_turn(make_pending("stuck", "s"))
    await asyncio.sleep(0.05)
    waited, history = await b.history_after_pending("s", 0.1)
    assert not waited and len(history) == 1
    assert b.stats["shared_wait_timeouts"] == 1


async def test_history_after_pending_with_redis_down_serves_hot_and_cold(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    a = await replicas()
    await turn(a, "s", "one")
    redis_server.kill()
    waited, history = await a.history_after_pending("s", 1)
    assert waited and len(history) == 1
    assert a.stats["warm_degraded_reads"] >= 1


async def test_a_commit_reads_and_writes_its_documents_in_one_round_trip_each(
    replicas: OpenReplica, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await replicas()
    await turn(a, "s", "one")
    operations: list[str] = []
    call = RedisBackend._call

    async def spy(self: RedisBackend, operation: str, *args: Any) -> Any:
        operations.append(operation)
        return await call(self, operation, *args)

    monkeypatch.setattr(RedisBackend, "_call", spy)
    await turn(a, "s", "two")
    monkeypatch.undo()
    # Before: get meta, put meta, put security, get derived, put state (five trips).
    assert [op for op in operations if "doc" in op] == ["get_docs", "put_docs"]
    info = await a.session_info("s")
    assert info.meta.turns == 2 and info.state.phase == "chatting"


async def test_documents_redis_lost_are_written_back_on_the_next_commit(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    a = await replicas()
    await turn(a, "s", "one")
    await a.flush()
    client = redis.Redis.from_url(redis_server.url)
    try:
        for key in client.scan_iter("*"):
            if client.type(key) == b"hash" and client.hexists(key, "state"):
                client.hdel(key, "state", "security")
        await turn(a, "s", "two")
        assert a.warm is not None
        assert await a.warm.get_doc("s", "state") is not None  # refilled, though unchanged
    finally:
        client.close()
    assert (await a.session_info("s")).meta.turns == 2
