"""open_store / open_router built from options, as the gateway builds them from its settings:
sessions sharded over several Redis nodes (`redis_urls`, on redis-server processes of our own)
and the hot tier's idle TTL (`hot_ttl_s`).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from store import RedisBackend, SessionStore, ShardedRedis, open_router, open_store
from store.redis import hash_tag
from store.sharded import Rendezvous, shard_name
from tests.store.helpers import assistant, make_pending
from tests.store.redis_servers import RedisServer, start_server

PREFIX = "sgtest:open"


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[list[RedisServer]]:
    nodes: list[RedisServer] = []
    try:
        for i in range(2):
            nodes.append(start_server(tmp_path / f"node{i}"))
        yield nodes
    finally:
        for node in nodes:
            node.kill()


def keys_on_every_node(nodes: list[RedisServer], per_node: int = 4) -> list[str]:
    """Session keys (of the real HMAC shape) covering every node `per_node` times. Chosen by
    the placement itself, so coverage does not depend on which ports the servers got."""
    ring = Rendezvous([shard_name(node.url) for node in nodes])
    chosen: dict[int, list[str]] = {i: [] for i in range(len(nodes))}
    n = 0
    while min(len(keys) for keys in chosen.values()) < per_node:
        key = hashlib.sha256(b"open_store session %d" % n).hexdigest()
        index = ring.index_of(key)
        if len(chosen[index]) < per_node:
            chosen[index].append(key)
        n += 1
    return [key for keys in chosen.values() for key in keys]


def tags_on(node: RedisServer, prefix: str) -> set[str]:
    """The session hash tags that have keys on `node` under `prefix`."""
    tags = set()
    for key in node.admin().scan_iter(match=f"{prefix}:*"):
        text = key.decode()
        tags.add(text[text.index("{") + 1 : text.index("}")])
    return tags


async def commit(store: SessionStore, keys: list[str], text: str = "hello") -> None:
    for key in keys:
        pending = make_pending(uuid.uuid4().hex, key, text)
        store.begin_turn(pending)
        assert store.complete_turn(pending.turn_id, assistant("re: " + text), "stop")
    for key in keys:
        assert await store.wait_for_pending(key, 5)


async def texts(store: SessionStore, key: str) -> list[str]:
    return [t.request_messages[0]["content"] for t in await store.history(key)]


# --- redis_urls --------------------------------------------------------------------------


async def test_open_store_shards_sessions_over_redis_urls(
    two_nodes: list[RedisServer], tmp_path: Path
) -> None:
    urls = [node.url for node in two_nodes]
    keys = keys_on_every_node(two_nodes)
    store = await open_store(tmp_path / "cold.db", redis_urls=urls, redis_prefix=PREFIX)
    try:
        assert isinstance(store.warm, ShardedRedis)
        await commit(store, keys)
    finally:
        await store.close()
    ring = Rendezvous([shard_name(url) for url in urls])
    for index, node in enumerate(two_nodes):
        expected = {hash_tag(key) for key in keys if ring.index_of(key) == index}
        assert expected and tags_on(node, PREFIX) == expected

    # A new process (empty hot tier) reads each session from its own node.
    store = await open_store(None, redis_urls=urls, redis_prefix=PREFIX)
    try:
        for key in keys:
            assert await texts(store, key) == ["hello"]
        assert store.stats["warm_hits"] == len(keys)
    finally:
        await store.close()


async def test_a_single_url_in_redis_urls_is_a_plain_redis_backend(tmp_path: Path) -> None:
    store = await open_store(None, redis_urls=["redis://127.0.0.1:1/0"])
    try:
        assert isinstance(store.warm, RedisBackend)  # same keys as redis_url, one hop less
    finally:
        await store.close()
    with pytest.raises(ValueError, match="exclusive"):
        await open_store(None, redis_url="redis://h:1/0", redis_urls=["redis://h:2/0"])


async def test_a_router_keeps_a_pinned_tenant_off_the_sharded_nodes(
    two_nodes: list[RedisServer], tmp_path: Path
) -> None:
    """The default store sharded over both nodes; acme on the first node alone, under its own
    prefix: its keys are there and only there, the default store's spread over both."""
    urls = [node.url for node in two_nodes]
    keys = keys_on_every_node(two_nodes)
    router = await open_router(
        {"sqlite_path": tmp_path / "default.db", "redis_urls": urls, "redis_prefix": PREFIX},
        {"acme": {"sqlite_path": tmp_path / "acme.db", "redis_url": urls[0], "redis_prefix": "a"}},
    )
    try:
        await commit(router.default, keys, "default")
        await commit(router.for_tenant("acme"), keys, "acme")
        assert isinstance(router.for_tenant("acme").warm, RedisBackend)
        for key in keys:
            assert await texts(router.default, key) == ["default"]
            assert await texts(router.for_tenant("acme"), key) == ["acme"]
    finally:
        await router.close()
    assert all(tags_on(node, PREFIX) for node in two_nodes)
    assert tags_on(two_nodes[0], "a") == {hash_tag(key) for key in keys}
    assert tags_on(two_nodes[1], "a") == set()


# --- hot_ttl_s ---------------------------------------------------------------------------


async def test_a_session_idle_past_the_hot_ttl_is_promoted_again(tmp_path: Path) -> None:
    """Through open_router, as the gateway builds it: the pinned tenant inherits the TTL."""
    key = hashlib.sha256(b"idle session").hexdigest()
    router = await open_router(
        {"sqlite_path": tmp_path / "default.db", "hot_ttl_s": 0.3},
        {"acme": {"sqlite_path": tmp_path / "acme.db"}},
    )
    try:
        for store in (router.default, router.for_tenant("acme")):
            await commit(store, [key])
            await store.flush()
            assert await texts(store, key) == ["hello"]  # now hot, however it got there
            before = store.stats
            assert await texts(store, key) == ["hello"]
            assert store.stats["promotions"] == before["promotions"]  # a hot hit
            await asyncio.sleep(0.4)
            assert await texts(store, key) == ["hello"]
            after = store.stats
            assert after["hot_expirations"] == before["hot_expirations"] + 1
            assert after["promotions"] == before["promotions"] + 1  # read from the cold tier
    finally:
        await router.close()


async def test_without_a_hot_ttl_an_idle_session_stays_hot(tmp_path: Path) -> None:
    key = hashlib.sha256(b"idle session").hexdigest()
    store = await open_store(tmp_path / "cold.db", hot_ttl_s=None)
    try:
        await commit(store, [key])
        await store.flush()
        assert await texts(store, key) == ["hello"]
        before = store.stats
        await asyncio.sleep(0.2)
        assert await texts(store, key) == ["hello"]
        assert store.stats["promotions"] == before["promotions"]
        assert store.stats["hot_expirations"] == 0
    finally:
        await store.close()
