"""A turn rewritten on one replica and captured on another: the PendingTurn travels through
Redis, exactly one replica records the turn, and the replica that began it does not make the
session's next request wait for a capture it will never see.

Real servers only: our own redis-server (killed in some tests), the shared PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from store import (
    MemoryBackend,
    PendingTurn,
    PostgresBackend,
    RedisBackend,
    SessionStore,
    StoreError,
    Usage,
)
from store.pending import decode_pending, encode_pending
from tests.store.helpers import PG_DSN, assistant, user
from tests.store.redis_servers import RedisServer, start_server

OpenReplica = Callable[..., Awaitable[SessionStore]]
KEY = "ab" * 32  # the shape of a real session key (an HMAC-SHA256 hex digest)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_server(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[OpenReplica]:
    """`await open_replica(**store_options)`: one more SessionStore sharing the Redis and the
    PostgreSQL schema, as the gateway's replicas do."""
    schema = "t_" + uuid.uuid4().hex[:12]
    opened: list[SessionStore] = []

    async def open_replica(**options: Any) -> SessionStore:
        cold = await PostgresBackend.open(PG_DSN, schema=schema, commit_interval_ms=5)
        warm = RedisBackend.from_url(redis_server.url, breaker_reset_s=0.2)
        store = SessionStore(MemoryBackend(), cold, warm=warm, **options)
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


def pending(text: str, turn_id: str | None = None) -> PendingTurn:
    return PendingTurn(
        turn_id=turn_id or uuid.uuid4().hex,
        session_key=KEY,
        request_messages=(user(text),),
        system_messages=({"role": "system", "content": "be brief"},),
        model="gpt-test",
        prompt_tokens_estimate=12,
        tenant="acme",
        principal="hmac-of-the-principal",
        scopes=("chat",),
        user_agent="sdk/1.0",
    )


async def begin_shared(store: SessionStore, turn: PendingTurn) -> None:
    """begin_turn, then wait until its background write reached Redis."""
    store.begin_turn(turn)
    assert store.warm is not None
    for _ in range(200):
        if await store.warm.get_pending_payload(turn.turn_id) is not None:
            await asyncio.sleep(0.01)  # and the store's task saw the write succeed
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the pending turn never reached redis")


async def capture(store: SessionStore, turn_id: str, reply: str) -> bool:
    """What the capture filter does with a complete reply: find the turn, complete it."""
    if await store.find_pending(turn_id) is None:
        return False
    store.mark_responding(turn_id)
    return store.complete_turn(turn_id, assistant(reply), "stop", Usage(7, 2))


async def texts(store: SessionStore) -> list[str]:
    return [t.request_messages[0]["content"] for t in await store.history(KEY)]


async def settle(*stores: SessionStore) -> None:
    for store in stores:
        await store.flush()


def waits(store: SessionStore) -> tuple[int, int]:
    return store.stats["wait_timeouts"], store.stats["shared_wait_timeouts"]


async def timed_wait(store: SessionStore, timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    assert await store.wait_for_pending(KEY, timeout_s)
    return time.monotonic() - started


# --- the payload ------------------------------------------------------------------------


def test_payload_round_trips_and_holds_no_more_than_the_pending_turn() -> None:
    turn = pending("hello")
    data = encode_pending(turn)
    assert decode_pending(data) == turn
    record = orjson.loads(data)
    assert record["v"] == 1
    assert set(record) == {
        "v",
        "turn_id",
        "session_key",
        "request_messages",
        "system_messages",
        "model",
        "prompt_tokens_estimate",
        "planned_prompt_tokens",
        "wire_format",
        "tenant",
        "principal",
        "scopes",
        "user_agent",
        "created_at",
    }


def test_payload_from_a_neighbouring_release_is_read() -> None:
    """A newer release may add fields (ignored here) and an older one lacks optional ones."""
    newer = {**orjson.loads(encode_pending(pending("hi"))), "priority": 3}
    assert decode_pending(orjson.dumps(newer)).request_messages == (user("hi"),)
    older = {"v": 1, "turn_id": "t", "session_key": KEY, "request_messages": [user("hi")]}
    decoded = decode_pending(orjson.dumps(older))
    assert (decoded.turn_id, decoded.principal, decoded.scopes) == ("t", "", ())


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        orjson.dumps({"v": 2, "turn_id": "t", "session_key": KEY}),
        orjson.dumps({"v": True, "turn_id": "t", "session_key": KEY}),
        orjson.dumps({"v": 1, "session_key": KEY}),
        orjson.dumps({"v": 1, "turn_id": "t", "session_key": KEY, "request_messages": ["x"]}),
        orjson.dumps({"v": 1, "turn_id": "t", "session_key": KEY, "prompt_tokens_estimate": True}),
    ],
)
def test_unreadable_payloads_are_refused(data: bytes) -> None:
    with pytest.raises(StoreError):
        decode_pending(data)


# --- one replica begins, the other captures ---------------------------------------------


async def test_a_turn_begun_on_one_replica_is_recorded_by_the_other(
    replicas: OpenReplica,
) -> None:
    a, b = await replicas(), await replicas()
    first = pending("one")
    await begin_shared(a, first)
    assert await capture(a, first.turn_id, "re: one")  # an ordinary local turn first
    assert await a.wait_for_pending(KEY, 5)
    second = pending("two")
    await begin_shared(a, second)

    assert b.pending(second.turn_id) is None  # b did not rewrite it...
    assert await b.find_pending(second.turn_id) == second  # ...but finds it in Redis
    assert await capture(b, second.turn_id, "re: two")
    assert await b.wait_for_pending(KEY, 5)

    before = waits(a)
    assert await timed_wait(a) < 0.5  # a's own entry for it does not hold a's next read
    assert waits(a) == before
    assert await texts(a) == ["one", "two"]
    assert [t.seq for t in await a.history(KEY)] == [1, 2]
    assert a.stats["pending"] == 0 and a.stats["remote_settled"] == 1
    assert (b.stats["remote_adopted"], b.stats["remote_completed"]) == (1, 1)
    await settle(a, b)
    assert a.cold is not None
    cold = await a.cold.load(KEY)
    assert [(t.seq, t.response_message["content"]) for t in cold] == [
        (1, "re: one"),
        (2, "re: two"),
    ]
    # b recorded the session's documents from the payload (the principal is an HMAC).
    info = await a.session_info(KEY)
    assert (info.security.tenant, info.security.principal) == ("acme", "hmac-of-the-principal")
    assert (info.meta.turns, info.meta.user_agent) == (2, "sdk/1.0")
    # Settled: nothing of the turn is left in Redis.
    assert a.warm is not None
    assert await a.warm.get_pending_payload(second.turn_id) is None
    assert await a.warm.pending_count(KEY) == 0


async def test_a_reader_waiting_on_the_beginning_replica_wakes_when_the_other_records(
    replicas: OpenReplica,
) -> None:
    a, b = await replicas(), await replicas()
    turn = pending("slow")
    await begin_shared(a, turn)
    reader = asyncio.create_task(a.wait_for_pending(KEY, 5))
    await asyncio.sleep(0.1)
    assert not reader.done()  # a waits for its turn, whose capture is elsewhere
    captured = time.monotonic()
    assert await capture(b, turn.turn_id, "done")
    assert await reader is True
    assert time.monotonic() - captured < 0.5
    assert await texts(a) == ["slow"]
    assert waits(a) == (0, 0)


async def test_the_beginning_replica_forgets_the_turn_without_being_read(
    replicas: OpenReplica,
) -> None:
    """The invalidation b's write sends makes a settle its registry entry by itself, so turns
    captured elsewhere do not pile up there until they expire."""
    a, b = await replicas(), await replicas()
    turn = pending("one")
    await begin_shared(a, turn)
    assert a.stats["pending"] == 1
    assert await capture(b, turn.turn_id, "re: one")
    for _ in range(200):
        if a.stats["pending"] == 0:
            break
        await asyncio.sleep(0.01)
    assert a.stats["pending"] == 0 and a.stats["remote_settled"] == 1


async def test_an_abandoned_reply_on_the_capturing_replica_releases_the_beginning_one(
    replicas: OpenReplica,
) -> None:
    a, b = await replicas(), await replicas()
    turn = pending("lost")
    await begin_shared(a, turn)
    assert await b.find_pending(turn.turn_id) == turn
    b.abandon_turn(turn.turn_id)  # e.g. the provider answered 500
    assert await timed_wait(a) < 0.5
    assert await texts(a) == [] and await texts(b) == []
    assert b.stats["abandoned"] == 1 and waits(a) == (0, 0)


async def test_concurrent_turns_alternating_between_replicas_keep_one_order(
    replicas: OpenReplica,
) -> None:
    """Every turn begun on one replica and captured on the other, the next one begun where
    the last was captured: no turn lost, seqs gap-free, no reader waits a timeout."""
    a, b = await replicas(), await replicas()
    stores = [a, b]
    for n in range(12):
        rewriter, capturer = stores[n % 2], stores[(n + 1) % 2]
        assert await rewriter.wait_for_pending(KEY, 5)
        assert len(await rewriter.history(KEY)) == n  # read-your-writes across the handoff
        turn = pending(f"m{n}")
        await begin_shared(rewriter, turn)
        assert await capture(capturer, turn.turn_id, f"re: m{n}")
    assert await a.wait_for_pending(KEY, 5) and await b.wait_for_pending(KEY, 5)
    assert await texts(a) == [f"m{n}" for n in range(12)]
    assert [t.seq for t in await b.history(KEY)] == list(range(1, 13))
    assert waits(a) == waits(b) == (0, 0)
    assert a.stats["remote_completed"] + b.stats["remote_completed"] == 12


# --- exactly one record -----------------------------------------------------------------


async def test_two_replicas_capturing_one_turn_record_it_once(replicas: OpenReplica) -> None:
    a, b, c = await replicas(), await replicas(), await replicas()
    turn = pending("twice")
    await begin_shared(a, turn)
    assert await b.find_pending(turn.turn_id) == turn
    assert await c.find_pending(turn.turn_id) == turn
    assert b.complete_turn(turn.turn_id, assistant("from b"), "stop")
    assert c.complete_turn(turn.turn_id, assistant("from c"), "stop")
    await settle(b, c)
    assert await a.wait_for_pending(KEY, 5)
    history = await a.history(KEY)
    assert [(t.seq, t.turn_id) for t in history] == [(1, turn.turn_id)]
    claims = sorted((s.stats["remote_completed"], s.stats["remote_claim_lost"]) for s in (b, c))
    assert claims == [(0, 1), (1, 0)]
    await settle(a)
    assert a.cold is not None and len(await a.cold.load(KEY)) == 1
    assert (await a.session_info(KEY)).meta.turns == 1


async def test_the_beginning_and_another_replica_both_completing_record_it_once(
    replicas: OpenReplica,
) -> None:
    """The beginning replica does not claim (no extra round trip on its own path): Redis's
    append is idempotent by turn id, which makes the later write a skipped duplicate."""
    a, b = await replicas(), await replicas()
    turn = pending("both")
    await begin_shared(a, turn)
    assert await b.find_pending(turn.turn_id) == turn
    assert a.complete_turn(turn.turn_id, assistant("from a"), "stop")
    assert b.complete_turn(turn.turn_id, assistant("from b"), "stop")
    await settle(a, b)
    assert await a.wait_for_pending(KEY, 5) and await b.wait_for_pending(KEY, 5)
    assert [t.seq for t in await b.history(KEY)] == [1]
    assert a.cold is not None and len(await a.cold.load(KEY)) == 1
    skipped = a.stats["duplicates_skipped"] + b.stats["duplicates_skipped"]
    assert skipped + b.stats["remote_claim_lost"] == 1


# --- edges ------------------------------------------------------------------------------


async def test_an_expired_pending_turn_is_dropped_and_counted(replicas: OpenReplica) -> None:
    a = await replicas(pending_ttl_s=0.3)
    b = await replicas(pending_ttl_s=0.3)
    turn = pending("too late")
    await begin_shared(a, turn)
    await asyncio.sleep(0.5)  # the reply took longer than pending_ttl_s
    assert await b.find_pending(turn.turn_id) is None
    assert not b.complete_turn(turn.turn_id, assistant("late"), "stop")
    assert (b.stats["remote_unknown"], b.stats["dropped"]) == (1, 2)  # + dropped_unknown
    assert await texts(b) == []
    assert await timed_wait(a) < 0.1  # a's marker expired too


async def test_a_turn_nobody_began_is_unknown_everywhere(replicas: OpenReplica) -> None:
    a = await replicas()
    assert await a.find_pending(uuid.uuid4().hex) is None
    assert a.stats["remote_unknown"] == 1


async def test_a_payload_that_cannot_be_read_is_counted_not_raised(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    a, b = await replicas(), await replicas()
    turn = pending("one")
    await begin_shared(a, turn)
    key = next(k for k in redis_server.admin().keys("*pturn"))
    redis_server.admin().set(key, orjson.dumps({"v": 99}))  # a release this one cannot read
    assert await b.find_pending(turn.turn_id) is None
    assert b.stats["remote_unknown"] == 1


async def test_redis_down_at_begin_is_counted_and_the_same_replica_still_records(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    a, b = await replicas(), await replicas()
    redis_server.kill()
    turn = pending("offline")
    a.begin_turn(turn)
    for _ in range(200):
        if a.stats["shared_marker_errors"]:
            break
        await asyncio.sleep(0.01)
    assert a.stats["shared_marker_errors"] >= 1
    assert await b.find_pending(turn.turn_id) is None  # b cannot know it: counted
    assert b.stats["remote_unknown"] == 1
    assert await capture(a, turn.turn_id, "re: offline")  # the beginning replica can
    assert await a.wait_for_pending(KEY, 5)
    assert await texts(a) == ["offline"]
    redis_server.start()
    await asyncio.sleep(0.3)  # past the breaker's reset
    await settle(a)
    c = await replicas()
    assert await texts(c) == ["offline"]


async def test_redis_down_between_adoption_and_completion_still_records(
    replicas: OpenReplica, redis_server: RedisServer
) -> None:
    """The claim cannot be made: the adopter writes anyway (hot + cold), the turn is not lost."""
    a, b = await replicas(), await replicas()
    turn = pending("claim offline")
    await begin_shared(a, turn)
    assert await b.find_pending(turn.turn_id) == turn
    redis_server.kill()
    assert b.complete_turn(turn.turn_id, assistant("re"), "stop")
    await settle(b)
    assert await texts(b) == ["claim offline"]
    assert b.stats["shared_marker_errors"] >= 1


async def test_without_redis_nothing_is_shared(tmp_path: Path) -> None:
    store = SessionStore(MemoryBackend(), None)
    await store.start()
    try:
        turn = pending("local")
        store.begin_turn(turn)
        assert await store.find_pending(turn.turn_id) == turn
        assert await store.find_pending("unknown") is None
        assert store.stats["remote_unknown"] == 0  # nothing to ask
        assert await capture(store, turn.turn_id, "re")
        assert await store.wait_for_pending(KEY, 5)
        assert await texts(store) == ["local"]
    finally:
        await store.close()
