"""RedisBackend: the warm tier's own semantics, faults, TLS, Cluster and Sentinel.

Real servers only. Semantics run on the shared Redis (127.0.0.1:6379, or
SESSIONGATE_TEST_REDIS_URL) under a unique key prefix that is deleted afterwards; anything that
kills, pauses or reconfigures a server starts its own (tests/store/redis_servers.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from store.base import StoreError, StoreUnavailable
from store.breaker import BreakerState, CircuitBreaker
from store.model import Turn
from store.redis import Duplicate, NeedsFloor, RedisBackend, Stored, hash_tag
from tests.store.helpers import FakeClock, make_turn
from tests.store.redis_servers import (
    SHARED_URL,
    RedisClusterServers,
    RedisServer,
    TlsUnsupported,
    make_tls_files,
    start_cluster,
    start_sentinel,
    start_server,
    start_tls_server,
)

SESSION = "0123456789abcdef" * 4  # the shape of a real session key: an HMAC hex digest


def session(n: int) -> str:
    """A distinct session key of the real shape (the hash tag is its first 32 hex chars)."""
    return hashlib.sha256(b"session %d" % n).hexdigest()


async def append_with_floor(backend: RedisBackend, key: str, turn: Turn, floor: int = 0) -> Stored:
    """What the tiered store does: try, and on NeedsFloor retry with the cold tier's last seq."""
    result = await backend.append_next(key, turn)
    if isinstance(result, NeedsFloor):
        result = await backend.append_next(key, turn, floor)
    assert isinstance(result, Stored), result
    return result


async def delete_prefix(client: Redis | RedisCluster, prefix: str) -> None:
    if isinstance(client, RedisCluster):
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        for key in keys:
            await client.delete(key)
        return
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def shared_admin() -> AsyncIterator[Redis]:
    admin = Redis.from_url(SHARED_URL, socket_timeout=2)
    try:
        await admin.ping()
    except Exception as exc:
        pytest.skip(f"shared Redis at {SHARED_URL} unreachable: {exc}")
    yield admin
    await admin.aclose()


OpenBackend = Callable[..., RedisBackend]


@pytest.fixture
async def open_backend(shared_admin: Redis) -> AsyncIterator[OpenBackend]:
    """Backends on the shared Redis, each under its own prefix (or a given one, to play a
    second replica), closed and their keys deleted afterwards."""
    opened: list[tuple[RedisBackend, str]] = []

    def open_(prefix: str | None = None, **options: Any) -> RedisBackend:
        prefix = prefix or f"sgtest:{uuid.uuid4().hex[:12]}"
        backend = RedisBackend.from_url(SHARED_URL, prefix=prefix, **options)
        opened.append((backend, prefix))
        return backend

    yield open_
    for backend, prefix in opened:
        await delete_prefix(shared_admin, prefix)
        await backend.close()


@pytest.fixture
async def backend(open_backend: OpenBackend) -> RedisBackend:
    return open_backend()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_server(tmp_path / "redis")
    yield server
    server.kill()


async def wait_for(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- circuit breaker (injected clock) ---------------------------------------------------


def fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(StoreUnavailable), breaker.attempt("op"):
        raise StoreUnavailable("down")


def succeed(breaker: CircuitBreaker) -> None:
    with breaker.attempt("op"):
        pass


def test_breaker_opens_after_consecutive_failures_and_fails_fast() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 2.0, clock=clock)
    fail(breaker)
    fail(breaker)
    succeed(breaker)  # a success resets the count: failures must be consecutive
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    ran = False
    with pytest.raises(StoreUnavailable, match="circuit open"), breaker.attempt("load"):
        ran = True
    assert not ran
    assert breaker.stats == {
        "breaker_state": 1,
        "breaker_open": 1,
        "breaker_opens": 1,
        "failures": 5,
        "fast_failures": 1,
    }


def test_breaker_half_open_allows_one_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 2.0, clock=clock)
    fail(breaker)
    clock.advance(1.9)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    # While the trial is in flight, everyone else fails fast.
    with breaker.attempt("trial"), pytest.raises(StoreUnavailable), breaker.attempt("other"):
        pass
    assert breaker.state is BreakerState.CLOSED


def test_breaker_failed_trial_reopens_for_another_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 1.0, clock=clock)
    fail(breaker)
    fail(breaker)
    clock.advance(1.0)
    fail(breaker)  # the trial
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.5)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.5)
    succeed(breaker)
    assert breaker.stats["breaker_opens"] == 2
    assert breaker.state is BreakerState.CLOSED


def test_breaker_ignores_other_errors_and_releases_a_cancelled_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    with pytest.raises(StoreError), breaker.attempt("decode"):
        raise StoreError("corrupt record")  # says nothing about the server
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    clock.advance(1.0)
    with pytest.raises(asyncio.CancelledError), breaker.attempt("trial"):
        raise asyncio.CancelledError
    succeed(breaker)  # the next call may be the trial
    assert breaker.state is BreakerState.CLOSED


# --- URLs and keys ------------------------------------------------------------------------


async def test_rediss_url_verifies_certificates_by_default(tmp_path: Path) -> None:
    backend = RedisBackend.from_url(f"rediss://:pw@localhost:6390/2?ssl_ca_certs={tmp_path}/ca.pem")
    pool: Any = backend.client.connection_pool
    kwargs = pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_check_hostname"] is True
    assert kwargs["ssl_ca_certs"] == f"{tmp_path}/ca.pem"
    assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (2, "pw", 0.25)
    await backend.close()


async def test_sentinel_and_cluster_urls() -> None:
    sentinel = RedisBackend.from_url("redis+sentinel://s%40cret@h1:26379,[::1]:26380/mymaster/2")
    pool: Any = sentinel.client.connection_pool  # a SentinelConnectionPool
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["password"] == "s@cret"
    assert pool.connection_kwargs["db"] == 2
    hosts = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in pool.sentinel_manager.sentinels
    ]
    assert hosts == [("h1", 26379), ("::1", 26380)]
    await sentinel.close()
    cluster = RedisBackend.from_url("redis+cluster://u:p@n1:7000,n2:7001")
    assert cluster.is_cluster and cluster.invalidation_channels()[0] == "sg:inv:{0}"
    await cluster.close()


@pytest.mark.parametrize(
    "url",
    [
        "rediss://localhost/0?ssl_ca_cert=/x.pem",  # misspelt: must not silently drop the CA
        "redis://localhost/zero",
        "ftp://localhost",
        "redis+sentinel://localhost:26379",
        "redis+cluster://",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        RedisBackend.from_url(url)


def test_session_keys_share_one_hash_tag() -> None:
    backend = RedisBackend.from_url(SHARED_URL, prefix="p")
    keys = backend.keys(SESSION)
    assert keys == [f"p:{{{SESSION[:32]}}}:{name}" for name in ("meta", "turns", "ids", "docs")]
    assert len({key_slot(key.encode()) for key in keys}) == 1
    # A key of any other shape is hashed whole, braces and all: keys sharing a long prefix
    # (or one hex key extending another) must never share a session.
    assert hash_tag("a{b}c") != hash_tag("a{b}d") and len(hash_tag("a{b}c")) == 32
    assert hash_tag(SESSION + "0") != hash_tag(SESSION) != hash_tag(SESSION[:40])


# --- warm-tier semantics (shared Redis) -----------------------------------------------------


async def test_append_next_needs_floor_then_continues_after_it(backend: RedisBackend) -> None:
    assert await backend.append_next(SESSION, make_turn("t1", 0)) == NeedsFloor()
    assert await backend.version(SESSION) is None  # nothing was written
    first = await backend.append_next(SESSION, make_turn("t1", 0), floor_seq=7)
    assert isinstance(first, Stored) and first.seq == 8
    second = await backend.append_next(SESSION, make_turn("t2", 0))  # no floor needed now
    assert isinstance(second, Stored) and second.seq == 9
    snapshot = await backend.snapshot(SESSION)
    assert snapshot is not None
    assert [(t.turn_id, t.seq) for t in snapshot.turns] == [("t1", 8), ("t2", 9)]
    # Turns 1..7 live in the cold tier only: the snapshot says so.
    assert (snapshot.first_seq, snapshot.last_seq, snapshot.deleted) == (8, 9, False)
    # Every field round-trips; the seq comes from Redis, not from the record.
    assert snapshot.turns[0] == replace(make_turn("t1", 0), seq=8)


async def test_duplicate_turn_id_returns_its_seq_and_changes_nothing(
    backend: RedisBackend,
) -> None:
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    stored = await backend.append_next(SESSION, make_turn("t2", 0))
    assert isinstance(stored, Stored)
    again = await backend.append_next(SESSION, make_turn("t1", 0, content="retried"), 100)
    assert again == Duplicate(1)
    assert await backend.version(SESSION) == stored.version
    assert [t.turn_id for t in await backend.load(SESSION)] == ["t1", "t2"]


async def test_trim_keeps_newest_and_moves_first_seq(
    open_backend: OpenBackend, shared_admin: Redis
) -> None:
    backend = open_backend(max_turns=3)
    for n in range(1, 6):
        await append_with_floor(backend, SESSION, make_turn(f"t{n}", 0))
    snapshot = await backend.snapshot(SESSION)
    assert snapshot is not None
    assert [t.seq for t in snapshot.turns] == [3, 4, 5]
    assert (snapshot.first_seq, snapshot.last_seq) == (3, 5)
    ids = backend.keys(SESSION)[2]
    assert sorted(await shared_admin.hkeys(ids)) == [b"t3", b"t4", b"t5"]  # trimmed ids go too


async def test_sliding_ttl_is_extended_by_every_write(
    open_backend: OpenBackend, shared_admin: Redis
) -> None:
    backend = open_backend(ttl_s=100)
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    await backend.put_doc(SESSION, "state", b"{}")
    keys = backend.keys(SESSION)
    assert all(95 <= ttl <= 100 for ttl in [await shared_admin.ttl(key) for key in keys])
    for key in keys:  # as if most of the TTL had passed
        await shared_admin.pexpire(key, 3000)
    await backend.append_next(SESSION, make_turn("t2", 0))
    assert all(95 <= ttl <= 100 for ttl in [await shared_admin.ttl(key) for key in keys])


async def test_version_increments_on_every_change(backend: RedisBackend) -> None:
    assert await backend.version(SESSION) is None
    one = await append_with_floor(backend, SESSION, make_turn("t1", 0))
    two = await backend.append_next(SESSION, make_turn("t2", 0))
    assert isinstance(two, Stored) and two.version == one.version + 1
    assert await backend.version(SESSION) == two.version
    assert await backend.truncate_after(SESSION, 1) == 1
    assert await backend.version(SESSION) == two.version + 1
    assert await backend.truncate_after(SESSION, 1) == 0  # no change, no new version
    await backend.put_doc(SESSION, "state", b"x")  # documents do not version the turns
    assert await backend.version(SESSION) == two.version + 1


async def test_recreated_session_never_repeats_an_old_version(
    backend: RedisBackend, shared_admin: Redis
) -> None:
    old = await append_with_floor(backend, SESSION, make_turn("t1", 0))
    await shared_admin.delete(*backend.keys(SESSION))  # expired
    new = await append_with_floor(backend, SESSION, make_turn("t1", 0))
    assert new.version > old.version


async def test_truncate_after_rewinds(backend: RedisBackend) -> None:
    for n in range(1, 6):
        await append_with_floor(backend, SESSION, make_turn(f"t{n}", 0))
    assert await backend.truncate_after(SESSION, 2) == 3
    assert [t.seq for t in await backend.load(SESSION)] == [1, 2]
    # The next turn follows the kept ones; a dropped turn id is no longer a duplicate.
    version = await backend.version(SESSION)
    assert version is not None
    assert await backend.append_next(SESSION, make_turn("t4", 0)) == Stored(3, version + 1)
    assert await backend.truncate_after(session(404), 0) == 0  # missing: nothing, no error


async def test_delete_leaves_a_tombstone_that_blocks_a_stale_fill(
    backend: RedisBackend, shared_admin: Redis
) -> None:
    for n in (1, 2):
        await append_with_floor(backend, SESSION, make_turn(f"t{n}", 0))
    await backend.put_doc(SESSION, "state", b"s")
    stale = await backend.load(SESSION)  # what a slow reader loaded before the delete
    before = await backend.version(SESSION)
    await backend.delete(SESSION)
    snapshot = await backend.snapshot(SESSION)
    assert snapshot is not None and snapshot.deleted and snapshot.turns == []
    assert before is not None and snapshot.version > before
    meta = backend.keys(SESSION)[0]
    assert 0 < await shared_admin.ttl(meta) <= 86400  # the tombstone expires too
    assert await backend.fill(SESSION, stale) is None  # no resurrection
    assert await backend.load(SESSION) == []
    assert await backend.get_doc(SESSION, "state") is None
    # Chosen behaviour: a deleted session starts again at seq 1, without asking for a floor.
    restarted = await backend.append_next(SESSION, make_turn("t9", 0))
    assert isinstance(restarted, Stored) and restarted.seq == 1
    after = await backend.snapshot(SESSION)
    assert after is not None and not after.deleted and after.first_seq == 1


async def test_delete_of_an_unknown_session_still_leaves_a_tombstone(
    backend: RedisBackend,
) -> None:
    await backend.delete(SESSION)
    assert await backend.fill(SESSION, [make_turn("t1", 1)]) is None
    assert await backend.version(SESSION) is not None


async def test_evict_drops_the_copy_without_a_tombstone(open_backend: OpenBackend) -> None:
    backend = open_backend()
    reader = open_backend(prefix=backend.prefix)
    received: list[str] = []
    subscription = await reader.subscribe_invalidations(received.append)
    await asyncio.wait_for(subscription.connected.wait(), 5)
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    await backend.put_doc(SESSION, "state", b"stale")
    await backend.evict(SESSION)
    assert await backend.snapshot(SESSION) is None  # missing, not deleted: refill from cold
    assert await backend.get_doc(SESSION, "state") is None
    cold = [make_turn("t1", 1), make_turn("t2", 2)]
    assert await backend.fill(SESSION, cold) is not None
    assert await backend.load(SESSION) == cold
    await wait_for(lambda: received == [SESSION, SESSION])  # the append, then the eviction


async def test_fill_only_when_missing(open_backend: OpenBackend) -> None:
    backend = open_backend(max_turns=3)
    cold = [make_turn(f"t{n}", n) for n in (5, 1, 2, 3, 4)]
    version = await backend.fill(SESSION, cold)
    assert version is not None and await backend.version(SESSION) == version
    snapshot = await backend.snapshot(SESSION)
    assert snapshot is not None
    assert snapshot.turns == [make_turn(f"t{n}", n) for n in (3, 4, 5)]  # newest max_turns
    assert (snapshot.first_seq, snapshot.last_seq) == (3, 5)
    assert await backend.append_next(SESSION, make_turn("t5", 0)) == Duplicate(5)
    assert await backend.fill(SESSION, [make_turn("x", 1)]) is None  # exists: untouched
    assert await backend.load(SESSION) == snapshot.turns


async def test_fill_never_overwrites_a_concurrent_append(backend: RedisBackend) -> None:
    await append_with_floor(backend, SESSION, make_turn("live", 0), floor=2)
    assert await backend.fill(SESSION, [make_turn("t1", 1), make_turn("t2", 2)]) is None
    assert [t.turn_id for t in await backend.load(SESSION)] == ["live"]


async def test_fill_of_an_empty_cold_session_caches_the_emptiness(backend: RedisBackend) -> None:
    assert await backend.fill(SESSION, []) is not None
    snapshot = await backend.snapshot(SESSION)
    assert snapshot is not None and (snapshot.turns, snapshot.first_seq, snapshot.last_seq) == (
        [],
        1,
        0,
    )
    assert await backend.append_next(SESSION, make_turn("t1", 0)) == Stored(1, snapshot.version + 1)


# --- pending turns (markers, payloads) --------------------------------------------------


async def test_pending_and_version_come_back_in_one_call(backend: RedisBackend) -> None:
    assert await backend.pending_and_version(SESSION) == (0, None)
    stored = await append_with_floor(backend, SESSION, make_turn("t1", 0))
    await backend.add_pending(SESSION, "p1", 60)
    await backend.add_pending(SESSION, "p2", 60)
    await backend.add_pending(SESSION, "gone", 0.001)  # expires at once
    await asyncio.sleep(0.01)
    calls = backend.stats["calls"]
    assert await backend.pending_and_version(SESSION) == (2, stored.version)
    assert backend.stats["calls"] == calls + 1  # one round trip
    # Markers the caller stopped waiting for are not counted (nor unknown or expired ones).
    assert await backend.pending_and_version(SESSION, ["p1", "gone", "never"]) == (
        1,
        stored.version,
    )
    assert await backend.pending_count(SESSION) == 2


async def test_pending_payload_is_claimed_exactly_once(backend: RedisBackend) -> None:
    await backend.add_pending(SESSION, "t1", 60, b"payload")
    assert await backend.pending_count(SESSION) == 1
    assert await backend.get_pending_payload("t1") == b"payload"
    claims = await asyncio.gather(*(backend.claim_pending_payload("t1") for _ in range(8)))
    assert sorted(claims) == [False] * 7 + [True]
    assert await backend.get_pending_payload("t1") is None
    assert await backend.pending_count(SESSION) == 1  # the claimer drops it once written
    await backend.remove_pending(SESSION, "t1")
    assert await backend.pending_count(SESSION) == 0


async def test_pending_payload_expires_with_its_marker(backend: RedisBackend) -> None:
    await backend.add_pending(SESSION, "t1", 0.2, b"payload")
    await asyncio.sleep(0.3)
    assert await backend.pending_count(SESSION) == 0
    assert await backend.get_pending_payload("t1") is None
    assert not await backend.claim_pending_payload("t1")


async def test_remove_pending_drops_marker_and_payload(backend: RedisBackend) -> None:
    await backend.add_pending(SESSION, "t1", 60, b"payload")
    await backend.remove_pending(SESSION, "t1")
    assert await backend.pending_count(SESSION) == 0
    assert await backend.get_pending_payload("t1") is None


async def test_pending_settled_when_stored_or_marker_gone(backend: RedisBackend) -> None:
    for turn_id in ("waiting", "stored", "removed", "expired"):
        await backend.add_pending(SESSION, turn_id, 0.05 if turn_id == "expired" else 60)
    await append_with_floor(backend, SESSION, make_turn("stored", 0))
    await backend.remove_pending(SESSION, "removed")
    await asyncio.sleep(0.1)
    ids = ["waiting", "stored", "removed", "expired"]
    assert await backend.pending_settled(SESSION, ids) == [False, True, True, True]
    assert await backend.pending_settled(SESSION, []) == []


async def test_snapshot_counts_hits_and_misses(backend: RedisBackend) -> None:
    assert await backend.snapshot(SESSION) is None
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    assert await backend.snapshot(SESSION) is not None
    assert (backend.stats["snapshot_hits"], backend.stats["snapshot_misses"]) == (1, 1)


async def test_documents(backend: RedisBackend) -> None:
    assert await backend.get_doc(SESSION, "state") is None
    await backend.put_doc(SESSION, "state", b"\x00\xff binary")
    await backend.put_doc(SESSION, "state", b"v2")
    await backend.put_doc(SESSION, "summary", b"s")
    assert await backend.get_doc(SESSION, "state") == b"v2"
    assert await backend.get_doc(session(2), "state") is None


async def test_corrupt_record_is_a_store_error_not_an_outage(
    backend: RedisBackend, shared_admin: Redis
) -> None:
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    await shared_admin.zadd(backend.keys(SESSION)[1], {b"2:t2not json": 2})
    with pytest.raises(StoreError) as raised:
        await backend.load(SESSION)
    assert not isinstance(raised.value, StoreUnavailable)
    assert backend.stats["corrupt_records"] == 1 and backend.stats["failures"] == 0


async def test_snapshot_error_inside_exec_leaves_the_connection_usable(
    backend: RedisBackend, shared_admin: Redis
) -> None:
    await append_with_floor(backend, session(1), make_turn("t1", 0))
    await shared_admin.set(backend.keys(SESSION)[0], b"not a hash")  # HMGET: WRONGTYPE
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await backend.snapshot(SESSION)
    for _ in range(3):  # the same pooled connection answers the next reads correctly
        snapshot = await backend.snapshot(session(1))
        assert snapshot is not None and [t.turn_id for t in snapshot.turns] == ["t1"]


async def test_cancelled_snapshot_leaves_no_reply_behind(own_server: RedisServer) -> None:
    backend = RedisBackend.from_url(own_server.url, socket_timeout_s=2.0)
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    await append_with_floor(backend, session(2), make_turn("u1", 0))
    sleeper = await asyncio.create_subprocess_exec(
        *("redis-cli", "-p", str(own_server.port), "DEBUG", "SLEEP", "0.5"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.1)  # the server is now blocked: the read is queued behind it
        read = asyncio.create_task(backend.snapshot(SESSION))
        await asyncio.sleep(0.1)
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
    finally:
        await sleeper.wait()
    # Had the cancelled read's reply stayed on a pooled connection, this would get it.
    for _ in range(3):
        snapshot = await backend.snapshot(session(2))
        assert snapshot is not None and [t.turn_id for t in snapshot.turns] == ["u1"]
    await backend.close()


async def test_invalidations_reach_a_subscriber(open_backend: OpenBackend) -> None:
    writer = open_backend(prefix="sgtest:inv-" + uuid.uuid4().hex[:8])
    # A second replica: same prefix, its own connections and subscription.
    reader = open_backend(prefix=writer.prefix)
    received: list[str] = []
    connects: list[int] = []
    subscription = await reader.subscribe_invalidations(received.append, lambda: connects.append(1))
    await asyncio.wait_for(subscription.connected.wait(), 5)
    assert connects == [1]  # on_reconnect runs on the first connect too
    await append_with_floor(writer, SESSION, make_turn("t1", 0))
    await writer.truncate_after(SESSION, 0)
    await writer.delete(SESSION)
    await wait_for(lambda: len(received) == 3)
    assert received == [SESSION] * 3
    assert reader.stats["invalidations_received"] == 3


async def test_concurrent_append_next_assigns_gap_free_unique_seqs(
    backend: RedisBackend,
) -> None:
    results = await asyncio.gather(
        *(append_with_floor(backend, SESSION, make_turn(f"t{n}", 0)) for n in range(20))
    )
    assert sorted(result.seq for result in results) == list(range(1, 21))
    assert len({result.version for result in results}) == 20
    turns = await backend.load(SESSION)
    assert [t.seq for t in turns] == list(range(1, 21))
    assert sorted(t.turn_id for t in turns) == sorted(f"t{n}" for n in range(20))


# --- faults on our own server -----------------------------------------------------------


async def test_killed_server_fails_fast_opens_the_breaker_and_recovers(
    own_server: RedisServer,
) -> None:
    backend = RedisBackend.from_url(own_server.url, breaker_failures=3, breaker_reset_s=0.5)
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    own_server.kill()
    for _ in range(3):
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="redis snapshot failed"):
            await backend.snapshot(SESSION)
        assert time.perf_counter() - started < 2 * 0.25 + 0.1
    assert backend.stats["breaker_open"] == 1
    fast: list[float] = []
    for _ in range(20):
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="circuit open"):
            await backend.append_next(SESSION, make_turn("t2", 0))
        fast.append(time.perf_counter() - started)
    assert statistics.median(fast) < 0.005
    assert backend.stats["fast_failures"] == 20
    own_server.start()  # same port, empty (no persistence)
    await asyncio.sleep(0.5)  # reset_s: the next call is the half-open trial
    assert await backend.append_next(SESSION, make_turn("t2", 0)) == NeedsFloor()
    assert backend.stats["breaker_state"] == BreakerState.CLOSED
    await backend.close()


async def test_subscription_reconnects_and_reports_it(own_server: RedisServer) -> None:
    backend = RedisBackend.from_url(own_server.url)
    received: list[str] = []
    reconnects: list[float] = []
    subscription = await backend.subscribe_invalidations(
        received.append, lambda: reconnects.append(time.monotonic()), backoff_max_s=0.2
    )
    await wait_for(lambda: len(reconnects) == 1)
    own_server.kill()
    await wait_for(lambda: not subscription.connected.is_set())
    own_server.start()
    await wait_for(lambda: len(reconnects) == 2)  # the caller flushes its hot tier here
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    await wait_for(lambda: received == [SESSION])
    assert subscription.errors >= 1
    await backend.close()


async def test_subscription_notices_a_silent_server_by_keepalive(own_server: RedisServer) -> None:
    backend = RedisBackend.from_url(own_server.url)
    reconnects: list[float] = []
    subscription = await backend.subscribe_invalidations(
        lambda _: None, lambda: reconnects.append(1), backoff_max_s=0.2, keepalive_s=0.2
    )
    await wait_for(lambda: len(reconnects) == 1)
    own_server.freeze()  # no FIN, no RST: only the unanswered keepalive tells
    try:
        await wait_for(lambda: not subscription.connected.is_set(), within_s=3)
    finally:
        own_server.thaw()
    await wait_for(lambda: len(reconnects) == 2)
    await backend.close()


async def test_client_pause_fails_within_the_socket_timeout_bound(
    own_server: RedisServer,
) -> None:
    backend = RedisBackend.from_url(own_server.url)
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    own_server.admin().execute_command("CLIENT", "PAUSE", "2000", "ALL")
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="redis version failed: TimeoutError"):
        await backend.version(SESSION)
    elapsed = time.perf_counter() - started
    # Two attempts of one socket timeout each, plus a capped backoff: far below the pause.
    assert 0.25 <= elapsed <= backend.call_bound_s < 2.0
    await backend.close()


async def test_debug_sleep_fails_within_the_socket_timeout_bound(
    own_server: RedisServer,
) -> None:
    backend = RedisBackend.from_url(own_server.url, retries=0)
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    sleeper = await asyncio.create_subprocess_exec(
        *("redis-cli", "-p", str(own_server.port), "DEBUG", "SLEEP", "2.0"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:
        # Long enough for redis-cli to start even on a loaded machine: the server is then
        # blocked for well over a call's bound.
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="TimeoutError"):
            await backend.snapshot(SESSION)
        assert time.perf_counter() - started <= backend.call_bound_s < 1.0
    finally:
        await sleeper.wait()
    assert await backend.version(SESSION) is not None  # and it recovers by itself
    await backend.close()


async def test_unix_socket_url(own_server: RedisServer) -> None:
    backend = RedisBackend.from_url(f"unix://{own_server.unix_socket}?db=3")
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    assert await backend.version(SESSION) is not None
    db3 = redis.Redis(port=own_server.port, db=3)
    assert db3.exists(backend.keys(SESSION)[0]) == 1
    await backend.close()


# --- TLS --------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[RedisServer, Path, Path]]:
    files = make_tls_files(tmp_path / "tls")
    try:
        server = start_tls_server(tmp_path / "redis", files)
    except TlsUnsupported as exc:
        pytest.skip(f"this redis-server build has no TLS support: {exc}")
    yield server, files.ca_cert, files.other_ca_cert
    server.kill()


async def test_rediss_with_the_right_ca(tls_server: tuple[RedisServer, Path, Path]) -> None:
    server, ca, _ = tls_server
    backend = RedisBackend.from_url(
        f"rediss://127.0.0.1:{server.tls_port}/0?ssl_ca_certs={ca}",
        socket_timeout_s=1,
        connect_timeout_s=1,
    )
    await append_with_floor(backend, SESSION, make_turn("t1", 0))
    assert [t.turn_id for t in await backend.load(SESSION)] == ["t1"]
    await backend.close()


async def test_rediss_with_a_wrong_ca_fails_verification(
    tls_server: tuple[RedisServer, Path, Path],
) -> None:
    server, _, other_ca = tls_server
    backend = RedisBackend.from_url(
        f"rediss://127.0.0.1:{server.tls_port}/0?ssl_ca_certs={other_ca}",
        socket_timeout_s=1,
        connect_timeout_s=1,
    )
    with pytest.raises(StoreUnavailable, match=r"(?i)certificate verify failed"):
        await backend.version(SESSION)
    await backend.close()


# --- Redis Cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    servers = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield servers
    servers.kill()


async def test_cluster_sessions_on_different_slots(cluster: RedisClusterServers) -> None:
    prefix = f"sgtest:{uuid.uuid4().hex[:12]}"
    backend = RedisBackend.from_url(cluster.url, prefix=prefix)
    reader = RedisBackend.from_url(cluster.url, prefix=prefix)
    assert backend.is_cluster
    received: list[str] = []
    subscription = await reader.subscribe_invalidations(received.append)
    await asyncio.wait_for(subscription.connected.wait(), 10)
    client = backend.client
    assert isinstance(client, RedisCluster)
    await client.initialize()
    # Three sessions on each master, so every script and shard channel crosses nodes.
    by_node: dict[str, list[str]] = {}
    for n in range(1000):
        key = session(n)
        node = client.get_node_from_key(backend.keys(key)[0]).name
        if len(by_node.setdefault(node, [])) < 3:
            by_node[node].append(key)
    assert len(by_node) == 3
    sessions = [key for keys in by_node.values() for key in keys]
    for key in sessions:
        for n in (1, 2):
            await append_with_floor(backend, key, make_turn(f"t{n}", 0))
    for key in sessions:
        assert [t.seq for t in await backend.load(key)] == [1, 2]
    await backend.delete(sessions[0])
    snapshot = await backend.snapshot(sessions[0])
    assert snapshot is not None and snapshot.deleted
    assert await backend.fill(sessions[0], [make_turn("t1", 1)]) is None
    await wait_for(lambda: len(received) == 2 * len(sessions) + 1, within_s=10)
    assert sorted(set(received)) == sorted(sessions)
    assert backend.stats["publish_errors"] == 0
    await delete_prefix(client, prefix)
    await reader.close()
    await backend.close()


async def test_cluster_pending_turns_when_marker_and_payload_live_on_two_nodes(
    cluster: RedisClusterServers,
) -> None:
    """The payload is keyed by the turn id (a capture knows nothing else), the marker by the
    session: on a cluster they may sit on two nodes, and every call still works."""
    prefix = f"sgtest:{uuid.uuid4().hex[:12]}"
    backend = RedisBackend.from_url(cluster.url, prefix=prefix)
    client = backend.client
    assert isinstance(client, RedisCluster)
    await client.initialize()
    key = session(1)
    node = client.get_node_from_key(backend.keys(key)[0]).name
    turn_id = next(
        t
        for t in (uuid.uuid4().hex for _ in range(1000))
        if client.get_node_from_key(backend._payload_key(t)).name != node
    )
    try:
        await backend.add_pending(key, turn_id, 60, b"payload")
        assert await backend.pending_and_version(key) == (1, None)
        assert await backend.get_pending_payload(turn_id) == b"payload"
        assert await backend.pending_settled(key, [turn_id]) == [False]
        assert await backend.claim_pending_payload(turn_id)
        assert not await backend.claim_pending_payload(turn_id)
        await backend.remove_pending(key, turn_id)
        assert await backend.pending_settled(key, [turn_id]) == [True]
        assert await backend.pending_and_version(key) == (0, None)
    finally:
        await delete_prefix(client, prefix)
        await backend.close()


# --- Sentinel ---------------------------------------------------------------------------


async def test_sentinel_url_finds_the_master(tmp_path: Path) -> None:
    master = start_server(tmp_path / "master")
    sentinel = start_sentinel(tmp_path / "sentinel", master, "sgmaster")
    try:
        backend = RedisBackend.from_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/sgmaster/1")
        await append_with_floor(backend, SESSION, make_turn("t1", 0))
        db1 = redis.Redis(port=master.port, db=1)
        assert db1.exists(backend.keys(SESSION)[0]) == 1
        snapshot = await backend.snapshot(SESSION)  # the read's own connection handling
        assert snapshot is not None and [t.turn_id for t in snapshot.turns] == ["t1"]
        await backend.close()
    finally:
        sentinel.kill()
        master.kill()
