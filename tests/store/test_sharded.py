"""ShardedRedis: rendezvous placement, failure isolation between nodes, the tiered store on top
of it, and rebalancing. Placement tests need no server (clients connect lazily); everything else
runs on our own redis-server processes (tests/store/redis_servers.py) and the shared PostgreSQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

from store import MemoryBackend, PostgresBackend, RedisBackend, SessionStore, StoreUnavailable
from store.model import Turn
from store.redis import NeedsFloor, Stored
from store.sharded import Rendezvous, ShardedRedis, WarmBackend, shard_name
from tests.store.helpers import PG_DSN, assistant, make_pending, make_turn
from tests.store.redis_servers import RedisServer, start_server


def session(n: int) -> str:
    """A session key of the real shape (an HMAC-SHA256 hex digest)."""
    return hashlib.sha256(b"sharded session %d" % n).hexdigest()


def urls(count: int, start: int = 0) -> list[str]:
    return [f"redis://10.0.0.{i}:6379/0" for i in range(start, start + count)]


def placement(sharded: ShardedRedis, keys: list[str]) -> list[str]:
    return [sharded.shard_name(key) for key in keys]


KEYS = [session(n) for n in range(20_000)]


# --- placement (no server) --------------------------------------------------------------


def test_adding_a_fifth_node_moves_about_a_fifth_all_onto_it() -> None:
    before = placement(ShardedRedis.from_urls(urls(4)), KEYS)
    after = placement(ShardedRedis.from_urls(urls(5)), KEYS)
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    # Expected 1/5; the standard deviation over 20k keys is 0.3 %, so +-2 % is ~7 sigma.
    assert abs(len(moved) / len(KEYS) - 0.2) < 0.02
    new_node = shard_name(urls(5)[4])
    assert {new for _, new in moved} == {new_node}


def test_removing_a_node_moves_only_its_own_sessions() -> None:
    before = placement(ShardedRedis.from_urls(urls(5)), KEYS)
    remaining = urls(5)[:2] + urls(5)[3:]
    after = placement(ShardedRedis.from_urls(remaining), KEYS)
    removed = shard_name(urls(5)[2])
    for old, new in zip(before, after, strict=True):
        assert old in (new, removed)
    # ... and they spread over all the others.
    moved_to = Counter(new for old, new in zip(before, after, strict=True) if old == removed)
    assert len(moved_to) == 4


def test_sessions_spread_evenly() -> None:
    counts = Counter(placement(ShardedRedis.from_urls(urls(4)), KEYS))
    assert len(counts) == 4
    for count in counts.values():
        assert abs(count / len(KEYS) - 0.25) < 0.02


def test_placement_ignores_order_credentials_and_tls_options() -> None:
    plain = ShardedRedis.from_urls(urls(4))
    decorated = [
        u.replace("redis://", "redis://user:secret@") + "?ssl_ca_certs=/x" for u in urls(4)
    ]
    for sharded in (
        ShardedRedis.from_urls(list(reversed(urls(4)))),
        ShardedRedis.from_urls(decorated),
    ):
        assert placement(sharded, KEYS[:2000]) == placement(plain, KEYS[:2000])


def test_named_shards_keep_their_sessions_when_a_node_changes_address() -> None:
    names = ["eu1", "eu2", "eu3"]
    before = ShardedRedis.from_urls(dict(zip(names, urls(3), strict=True)))
    after = ShardedRedis.from_urls(dict(zip(names, urls(3, start=50), strict=True)))
    assert placement(before, KEYS[:2000]) == placement(after, KEYS[:2000])


def test_placement_is_by_hash_tag_and_any_key_shape_works() -> None:
    ring = Rendezvous(["a", "b", "c"])
    key = session(7)
    # Two keys with one hash tag (first 32 hex chars) share their Redis keys: one shard too.
    assert ring.name_of(key) == ring.name_of(key[:32] + "0" * 32)
    assert ring.name_of("test-session") in {"a", "b", "c"}


def test_the_placement_cache_is_bounded_and_changes_nothing() -> None:
    cached = Rendezvous(["a", "b", "c"], cache_size=10)
    for key in KEYS[:100]:
        assert cached.index_of(key) == cached.index_of(key)
        assert cached.index_of(key) == Rendezvous(["a", "b", "c"]).index_of(key)
    assert len(cached._cache) == 10


def test_shard_names_and_bad_shard_lists() -> None:
    assert shard_name("redis://u:p@h:1/2?ssl_ca_certs=/ca.pem") == "redis://h:1/2"
    assert shard_name("unix://:p@/run/redis.sock?db=3") == "unix:///run/redis.sock?db=3"
    assert (
        shard_name("REDIS+sentinel://s1:1,s2:2/mymaster/0")
        == "redis+sentinel://s1:1,s2:2/mymaster/0"
    )
    with pytest.raises(ValueError, match="same shard"):
        ShardedRedis.from_urls(["redis://h:1/0", "redis://x:y@h:1/0"])
    with pytest.raises(ValueError, match="at least one"):
        ShardedRedis.from_urls([])
    with pytest.raises(ValueError, match="unique"):
        Rendezvous(["a", "a"])


def test_both_backends_are_warm_backends() -> None:
    """The protocol SessionStore's `warm` should be annotated with (runtime shape check; mypy
    checks the signatures in store/sharded.py)."""
    names = [n for n in dir(WarmBackend) if not n.startswith("_")]
    for cls in (RedisBackend, ShardedRedis):
        assert all(hasattr(cls, name) for name in names), cls


# --- real servers -----------------------------------------------------------------------


@pytest.fixture
def start_nodes(tmp_path: Path) -> Iterator[Callable[[int], list[RedisServer]]]:
    """`start_nodes(n)`: n redis-servers of our own, killed after the test."""
    servers: list[RedisServer] = []

    def start(count: int) -> list[RedisServer]:
        for _ in range(count):
            servers.append(start_server(tmp_path / f"redis{len(servers)}"))
        return servers[-count:]

    try:
        yield start
    finally:
        for server in servers:
            server.kill()


StartNodes = Callable[[int], list[RedisServer]]


def sharded_over(servers: list[RedisServer], **opts: Any) -> ShardedRedis:
    opts.setdefault("breaker_reset_s", 0.2)
    return ShardedRedis.from_urls([s.url for s in servers], **opts)


async def store_turn(warm: ShardedRedis, key: str, turn: Turn) -> Stored:
    result = await warm.append_next(key, turn)
    if isinstance(result, NeedsFloor):
        result = await warm.append_next(key, turn, 0)
    assert isinstance(result, Stored)
    return result


async def test_each_session_lives_on_its_shard_only(start_nodes: StartNodes) -> None:
    servers = start_nodes(3)
    warm = sharded_over(servers)
    try:
        keys = [session(n) for n in range(60)]
        for n, key in enumerate(keys):
            await store_turn(warm, key, make_turn(f"t{n}", 0))
            await warm.put_doc(key, "meta", b"doc %d" % n)
        by_url = {shard_name(s.url): s for s in servers}
        seen = Counter[str]()
        for n, key in enumerate(keys):
            owner = warm.shard_name(key)
            seen[owner] += 1
            redis_keys = warm.shard_for(key).keys(key)
            for name, server in by_url.items():
                assert server.admin().exists(*redis_keys) == (4 if name == owner else 0)
            assert [t.turn_id for t in await warm.load(key)] == [f"t{n}"]
            assert await warm.get_doc(key, "meta") == b"doc %d" % n
        assert len(seen) == 3
        stats = warm.stats
        assert stats["shards"] == 3
        assert stats["calls"] == sum(stats[f"shard.{name}.calls"] for name in by_url)
        assert stats["calls"] >= 60 * 5
    finally:
        await warm.close()


async def test_a_dead_node_fails_only_its_own_sessions(start_nodes: StartNodes) -> None:
    servers = start_nodes(3)
    warm = sharded_over(servers)
    try:
        keys = [session(n) for n in range(30)]
        for n, key in enumerate(keys):
            await store_turn(warm, key, make_turn(f"a{n}", 0))
        dead = servers[1]
        dead_name = shard_name(dead.url)
        dead.kill()
        on_dead = [k for k in keys if warm.shard_name(k) == dead_name]
        alive = [k for k in keys if warm.shard_name(k) != dead_name]
        assert on_dead and alive
        for key in on_dead:
            with pytest.raises(StoreUnavailable):
                await warm.snapshot(key)
            with pytest.raises(StoreUnavailable):
                await warm.append_next(key, make_turn(uuid.uuid4().hex, 0), 1)
        for n, key in enumerate(alive):
            assert (await store_turn(warm, key, make_turn(f"b{n}", 0))).seq == 2
            snapshot = await warm.snapshot(key)
            assert snapshot is not None and len(snapshot.turns) == 2
        assert warm.stats[f"shard.{dead_name}.breaker_open"] == 1
        assert warm.stats["breaker_state"] > 0  # the worst shard's state
        # Back (empty, no persistence): its sessions work again once the breaker lets a trial in.
        dead.start()
        await asyncio.sleep(0.3)
        for key in on_dead:
            for _ in range(20):
                try:
                    await warm.version(key)
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.1)
            assert await warm.snapshot(key) is None
    finally:
        await warm.close()


async def test_one_subscription_object_for_every_shard(start_nodes: StartNodes) -> None:
    servers = start_nodes(3)
    publisher, subscriber = sharded_over(servers), sharded_over(servers)
    received: list[str] = []
    reconnects: list[None] = []
    subscription = await subscriber.subscribe_invalidations(
        received.append, lambda: reconnects.append(None)
    )
    try:
        for _ in range(100):
            if subscription.connected:
                break
            await asyncio.sleep(0.05)
        assert subscription.connected and len(reconnects) == 3
        # Keys that reach every shard whatever ports the servers got (12 fixed keys missed one
        # of the 3 shards in ~2% of runs).
        keys: list[str] = []
        per_shard: dict[str, int] = {}
        for n in range(1000):
            shard = publisher.shard_name(session(n))
            if per_shard.get(shard, 0) < 4:
                per_shard[shard] = per_shard.get(shard, 0) + 1
                keys.append(session(n))
            if len(keys) == 12:
                break
        assert len({publisher.shard_name(k) for k in keys}) == 3
        for n, key in enumerate(keys):
            await store_turn(publisher, key, make_turn(f"i{n}", 0))
        for _ in range(100):
            if set(keys) <= set(received):
                break
            await asyncio.sleep(0.05)
        assert set(keys) <= set(received)
        assert subscription.received >= len(keys)
    finally:
        await subscription.close()
        tasks = [s._task for s in subscription.subscriptions.values()]
        assert all(task.done() for task in tasks)
        await publisher.close()
        await subscriber.close()


# --- the tiered store over ShardedRedis -------------------------------------------------


def as_warm(sharded: ShardedRedis) -> Any:
    """SessionStore's `warm` is annotated `RedisBackend | None` until it takes `WarmBackend`;
    at runtime it needs only the protocol."""
    warm: WarmBackend = sharded
    return cast(Any, warm)


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    schema = "t_" + uuid.uuid4().hex[:12]
    yield schema
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def open_replica(servers: list[RedisServer], schema: str) -> SessionStore:
    cold = await PostgresBackend.open(PG_DSN, schema=schema, commit_interval_ms=5)
    store = SessionStore(MemoryBackend(), cold, warm=as_warm(sharded_over(servers)))
    await store.start()
    return store


async def turn(store: SessionStore, key: str, text: str) -> None:
    turn_id = uuid.uuid4().hex
    store.begin_turn(make_pending(turn_id, key, content=text))
    assert store.complete_turn(turn_id, assistant("re: " + text), "stop")
    assert await store.wait_for_pending(key, 5)


async def texts(store: SessionStore, key: str) -> list[str]:
    return [t.request_messages[0]["content"] for t in await store.history(key)]


async def test_session_store_over_shards_reads_writes_and_invalidates(
    start_nodes: StartNodes, pg_schema: str
) -> None:
    servers = start_nodes(3)
    a = await open_replica(servers, pg_schema)
    b = await open_replica(servers, pg_schema)
    try:
        for _ in range(100):  # every shard's subscription confirmed in b
            if b.stats["hot_flushes"] >= 3:
                break
            await asyncio.sleep(0.05)
        # Shard names hold the nodes' random ports, so pick sessions until every shard has one.
        sharded = cast(ShardedRedis, a.warm)
        keys: list[str] = []
        for n in range(200):
            if len({sharded.shard_name(k) for k in keys}) == 3 and len(keys) >= 9:
                break
            keys.append(session(n))
        assert len({sharded.shard_name(k) for k in keys}) == 3
        for key in keys:
            await turn(a, key, "one")
        for key in keys:
            assert await texts(b, key) == ["one"]  # b caches every session
        for key in keys:
            await turn(a, key, "two")
        for key in keys:  # b's copies are stale: versions (and invalidations) make it re-read
            assert await texts(b, key) == ["one", "two"]
            await turn(b, key, "three")
            assert [t.seq for t in await a.history(key)] == [1, 2, 3]
        for _ in range(100):
            if b.stats["invalidations"] >= len(keys):
                break
            await asyncio.sleep(0.05)
        assert b.stats["invalidations"] >= len(keys)
        assert b.stats["warm_degraded_reads"] == 0
    finally:
        await a.close()
        await b.close()


async def test_pending_markers_of_other_replicas_live_on_the_sessions_shard(
    start_nodes: StartNodes, pg_schema: str
) -> None:
    servers = start_nodes(3)
    a = await open_replica(servers, pg_schema)
    b = await open_replica(servers, pg_schema)
    try:
        sharded = cast(ShardedRedis, a.warm)
        key = session(1)
        turn_id = uuid.uuid4().hex
        a.begin_turn(make_pending(turn_id, key, content="slow"))
        for _ in range(100):
            if await sharded.shard_for(key).pending_count(key) == 1:
                break
            await asyncio.sleep(0.01)
        others = [
            backend for name, backend in sharded.shards.items() if name != sharded.shard_name(key)
        ]
        assert [await backend.pending_count(key) for backend in others] == [0, 0]
        assert not await b.wait_for_pending(key, 0.2)  # a's marker, seen through the shard
        assert a.complete_turn(turn_id, assistant("done"), "stop")
        assert await b.wait_for_pending(key, 5)
        assert await texts(b, key) == ["slow"]
    finally:
        await a.close()
        await b.close()


async def test_a_turn_captured_by_another_replica_with_its_payload_on_another_shard(
    start_nodes: StartNodes, pg_schema: str
) -> None:
    """The payload is placed by turn id (all a capture knows), the marker by session: with
    the two on different shards, the other replica still finds, claims and records it."""
    servers = start_nodes(3)
    a = await open_replica(servers, pg_schema)
    b = await open_replica(servers, pg_schema)
    try:
        sharded = cast(ShardedRedis, a.warm)
        key = session(2)
        turn_id = next(
            t
            for t in (uuid.uuid4().hex for _ in range(1000))
            if sharded.shard_for_turn(t) is not sharded.shard_for(key)
        )
        pending = make_pending(turn_id, key, content="elsewhere")
        a.begin_turn(pending)
        for _ in range(100):
            if await sharded.shard_for_turn(turn_id).get_pending_payload(turn_id) is not None:
                break
            await asyncio.sleep(0.01)
        assert await sharded.shard_for(key).get_pending_payload(turn_id) is None
        assert await sharded.shard_for(key).pending_count(key) == 1
        assert await b.find_pending(turn_id) == pending
        assert b.complete_turn(turn_id, assistant("done"), "stop")
        assert await b.wait_for_pending(key, 5)
        assert await a.wait_for_pending(key, 5)
        assert await texts(a, key) == ["elsewhere"]
        assert b.stats["remote_completed"] == 1
        assert await sharded.pending_count(key) == 0
        assert await sharded.get_pending_payload(turn_id) is None
    finally:
        await a.close()
        await b.close()


async def test_session_store_degrades_only_for_the_dead_shards_sessions(
    start_nodes: StartNodes, pg_schema: str
) -> None:
    servers = start_nodes(3)
    store = await open_replica(servers, pg_schema)
    try:
        sharded = cast(ShardedRedis, store.warm)
        keys = [session(n) for n in range(12)]
        for key in keys:
            await turn(store, key, "one")
        dead_name = shard_name(servers[0].url)
        servers[0].kill()
        for key in keys:
            await turn(store, key, "two")
            assert await texts(store, key) == ["one", "two"]
        on_dead = sum(1 for k in keys if sharded.shard_name(k) == dead_name)
        assert 0 < on_dead < len(keys)
        # Only the dead shard's sessions went hot + cold only (one write, one read each;
        # a read may also hit the open breaker while checking a stale copy).
        assert store.stats["warm_degraded_writes"] == on_dead
        assert on_dead <= store.stats["warm_degraded_reads"]
        await store.flush()
    finally:
        await store.close()


async def test_rebalancing_moves_sessions_without_losing_any(
    start_nodes: StartNodes, pg_schema: str
) -> None:
    """4 -> 5 nodes: moved sessions are warm misses refilled from the cold tier; the sweep drops
    the copies left behind, so going back to 4 nodes serves no stale copy either."""
    five = start_nodes(5)
    four = five[:4]
    keys = [session(n) for n in range(40)]
    store = await open_replica(four, pg_schema)
    try:
        for key in keys:
            await turn(store, key, "one")
        before = {k: cast(ShardedRedis, store.warm).shard_name(k) for k in keys}
    finally:
        await store.close()

    store = await open_replica(five, pg_schema)
    try:
        sharded = cast(ShardedRedis, store.warm)
        moved = [k for k in keys if sharded.shard_name(k) != before[k]]
        assert 0 < len(moved) < len(keys) // 2
        for key in keys:
            assert await texts(store, key) == ["one"]  # a moved session: refilled from cold
            await turn(store, key, "two")
            assert await texts(store, key) == ["one", "two"]
        assert store.stats["warm_refills"] == len(moved)
        swept = await sharded.sweep_misplaced()
        assert sum(swept.values()) == len(moved)
        assert swept[shard_name(five[4].url)] == 0
        assert await sharded.sweep_misplaced() == dict.fromkeys(sharded.names, 0)
    finally:
        await store.close()

    store = await open_replica(four, pg_schema)
    try:
        for key in keys:
            assert await texts(store, key) == ["one", "two"]
            await turn(store, key, "three")
            assert [t.seq for t in await store.history(key)] == [1, 2, 3]
    finally:
        await store.close()


async def test_sweep_reports_an_unreachable_shard(start_nodes: StartNodes) -> None:
    nodes = start_nodes(2)
    warm = sharded_over(nodes)
    try:
        nodes[1].kill()
        swept = await warm.sweep_misplaced()
        assert swept == {shard_name(nodes[0].url): 0, shard_name(nodes[1].url): -1}
    finally:
        await warm.close()
