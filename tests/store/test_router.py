"""StoreRouter: tenants pinned to their own store, turn ids that route back to it, and the
options checks that keep tenants from sharing storage. Isolation runs on real servers: the shared
PostgreSQL (one schema per store, dropped afterwards), the shared Redis under unique prefixes, and
a redis-server of our own for one tenant.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import pytest
import redis
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.capture import CaptureStream
from extproc.metrics import Metrics
from extproc.mutations import METADATA_NAMESPACE
from store import MemoryBackend, SessionStore, open_store
from store.model import PendingTurn
from store.router import StoreRouter, TurnSink, open_router, tenant_tag
from store.session import UserContext
from tests.store.helpers import PG_DSN, assistant, drop_pg_schema, make_pending
from tests.store.redis_servers import SHARED_URL, RedisServer, start_server

KEY = "ab" * 32  # one session key (an HMAC's shape) used under every tenant


def pending_for(router: StoreRouter, tenant: str, key: str = KEY, text: str = "hi") -> PendingTurn:
    turn_id = router.new_turn_id(tenant)
    return PendingTurn(
        turn_id=turn_id,
        session_key=key,
        request_messages=({"role": "user", "content": text},),
        tenant=tenant,
        principal="p",
    )


async def memory_router(*tenants: str) -> StoreRouter:
    router = StoreRouter(
        SessionStore(MemoryBackend(), None),
        {tenant: SessionStore(MemoryBackend(), None) for tenant in tenants},
    )
    await router.start()
    return router


async def texts(store: SessionStore, key: str = KEY) -> list[str]:
    return [t.request_messages[0]["content"] for t in await store.history(key)]


# --- turn-id routing (memory stores) ----------------------------------------------------


async def test_turn_ids_name_their_tenants_store() -> None:
    router = await memory_router("acme", "globex")
    try:
        assert re.fullmatch(r"[0-9a-f]{32}", router.new_turn_id("someone-else"))
        assert re.fullmatch(r"[0-9a-f]{32}", router.new_turn_id(""))
        acme_id = router.new_turn_id("acme")
        assert re.fullmatch(r"[0-9a-f]{32}\.[0-9a-f]{8}", acme_id)
        assert acme_id.endswith("." + tenant_tag("acme"))
        assert "acme" not in acme_id
        assert router.store_for_turn(acme_id) is router.for_tenant("acme")
        assert router.store_for_turn(router.new_turn_id("globex")) is router.for_tenant("globex")
        assert router.store_for_turn(uuid.uuid4().hex) is router.default
        assert router.for_tenant("unknown") is router.default
        assert router.for_tenant("") is router.default
        assert router.tenants == ("acme", "globex")
    finally:
        await router.close()


async def test_begin_pending_complete_and_abandon_go_to_the_tenants_store() -> None:
    router = await memory_router("acme")
    acme, default = router.for_tenant("acme"), router.default
    try:
        done = pending_for(router, "acme", text="kept")
        router.begin_turn(done)
        assert router.pending(done.turn_id) == done
        assert default.pending(done.turn_id) is None
        assert router.complete_turn(done.turn_id, assistant("yes"), "stop")
        assert not router.complete_turn(done.turn_id, assistant("again"), "stop")
        gone = pending_for(router, "acme", text="dropped")
        router.begin_turn(gone)
        router.abandon_turn(gone.turn_id)
        assert router.pending(gone.turn_id) is None
        assert await acme.wait_for_pending(KEY, 5)
        assert await texts(acme) == ["kept"]
        assert await texts(default) == []
        assert acme.stats["completed"] == 1 and acme.stats["abandoned"] == 1
        assert acme.stats["duplicate_completes"] == 1
        assert default.stats["begun"] == 0
        # The default store's turns keep plain turn ids.
        plain = pending_for(router, "not-pinned", text="default")
        router.begin_turn(plain)
        assert router.complete_turn(plain.turn_id, assistant("ok"), "stop")
        assert await default.wait_for_pending(KEY, 5)
        assert await texts(default) == ["default"]
    finally:
        await router.close()


async def test_a_turn_id_not_minted_for_the_tenant_is_refused() -> None:
    router = await memory_router("acme", "globex")
    try:
        for turn_id in (uuid.uuid4().hex, router.new_turn_id("globex")):
            with pytest.raises(ValueError, match="new_turn_id"):
                router.begin_turn(_with_tenant(turn_id))
        with pytest.raises(ValueError, match="new_turn_id"):  # a pinned tag for the default
            router.begin_turn(make_pending(router.new_turn_id("acme"), KEY))
        assert router.stats["begun"] == 0
    finally:
        await router.close()


def _with_tenant(turn_id: str) -> PendingTurn:
    pending = make_pending(turn_id, KEY)
    return PendingTurn(
        turn_id=pending.turn_id,
        session_key=pending.session_key,
        request_messages=pending.request_messages,
        tenant="acme",
    )


async def test_an_unknown_tag_is_an_unknown_turn_of_the_default_store() -> None:
    router = await memory_router("acme")
    try:
        stray = uuid.uuid4().hex + ".00000000"
        assert router.pending(stray) is None
        assert not router.complete_turn(stray, assistant("x"), "stop")
        router.abandon_turn(stray)
        stats = router.stats
        assert stats["dropped_unknown"] == 1
        assert stats["router_unrouted_turns"] == 3
    finally:
        await router.close()


async def test_stats_total_every_store_and_label_pinned_tenants() -> None:
    router = await memory_router("acme")
    try:
        only_default = StoreRouter(router.default)
        assert {k: v for k, v in only_default.stats.items() if not k.startswith("router_")} == (
            router.default.stats
        )
        router.begin_turn(pending_for(router, "acme"))
        router.begin_turn(pending_for(router, "x"))
        stats = router.stats
        assert stats["begun"] == 2
        assert stats["tenant.acme.begun"] == 1
        assert stats["router_tenants"] == 1
        assert not any(k.startswith("tenant.x.") for k in stats)
    finally:
        await router.close()


def test_tag_collisions_and_the_empty_tenant_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    default = SessionStore(MemoryBackend(), None)
    with pytest.raises(ValueError, match="empty tenant"):
        StoreRouter(default, {"": SessionStore(MemoryBackend(), None)})
    monkeypatch.setattr("store.router.tenant_tag", lambda tenant: "00000000")
    with pytest.raises(ValueError, match="same turn-id tag"):
        StoreRouter(
            default,
            {"a": SessionStore(MemoryBackend(), None), "b": SessionStore(MemoryBackend(), None)},
        )


def test_both_satisfy_the_capture_protocol() -> None:
    store = SessionStore(MemoryBackend(), None)
    sinks: list[TurnSink] = [store, StoreRouter(store)]  # checked by mypy
    for sink in sinks:
        assert callable(sink.pending) and callable(sink.complete_turn)
        assert callable(sink.abandon_turn)


# --- open_router: options and their checks ----------------------------------------------


PG_A = {"postgres_dsn": "postgresql://u:a@h/db"}
PG_B = {"postgres_dsn": "postgresql://u:b@h/db"}  # the same place, another password


@pytest.mark.parametrize(
    ("default", "tenant", "shared"),
    [
        ({"redis_url": "redis://h:1/0"}, {}, "redis"),
        ({"redis_url": "redis://h:1/0"}, {"redis_url": "redis://u:pw@h:1/0"}, "redis"),
        (
            {"postgres_dsn": "postgresql://u:a@h/db"},
            {"postgres_dsn": "postgresql://u:b@h/db"},
            "postgres",
        ),
        ({"postgres_dsn": "postgresql://h/db", "postgres_schema": "s"}, {}, "postgres"),
        ({"sqlite_path": Path("a.db")}, {"sqlite_path": Path("./a.db")}, "sqlite"),
        # Sharded warm tiers: every node counts, whatever the hashing puts on it.
        ({"redis_urls": ["redis://h:1/0", "redis://h:2/0"]}, {}, "redis"),
        (
            {"redis_urls": ["redis://h:1/0", "redis://h:2/0"]},
            {"redis_urls": ["redis://h:3/0", "redis://u:pw@h:2/0"]},
            "redis",
        ),
        (
            {"redis_urls": ["redis://h:1/0", "redis://h:2/0"]},
            {"redis_url": "redis://h:2/0"},
            "redis",
        ),
        (
            {"redis_url": "redis://h:1/0"},
            {"redis_urls": ["redis://h:1/0", "redis://h:9/0"]},
            "redis",
        ),
    ],
)
async def test_a_tenant_sharing_a_tier_location_is_refused(
    default: dict[str, Any], tenant: dict[str, Any], shared: str
) -> None:
    with pytest.raises(ValueError, match=f"tenant 'acme' shares {shared} storage"):
        await open_router(default, {"acme": tenant})


async def test_two_tenants_sharing_a_location_are_refused_and_typos_too() -> None:
    one = {"postgres_dsn": "postgresql://h/db", "postgres_schema": "t"}
    with pytest.raises(ValueError, match="tenant 'b' shares postgres storage with tenant 'a'"):
        await open_router({}, {"a": one, "b": one})
    with pytest.raises(ValueError, match="unknown store option"):
        await open_router({}, {"a": {"redis_ulr": "redis://h:1"}})
    with pytest.raises(ValueError, match="empty tenant"):
        await open_router({}, {"": {}})
    both = {"redis_url": "redis://h:1/0", "redis_urls": ["redis://h:2/0", "redis://h:3/0"]}
    with pytest.raises(ValueError, match="tenant 'a': redis_url and redis_urls are exclusive"):
        await open_router({}, {"a": both})


async def test_memory_only_tenants_need_no_locations() -> None:
    router = await open_router({"sqlite_path": None}, {"acme": {}, "globex": {}})
    try:
        router.begin_turn(pending_for(router, "acme", text="a"))
        assert router.for_tenant("acme") is not router.for_tenant("globex")
        assert router.for_tenant("acme").stats["begun"] == 1
    finally:
        await router.close()


# --- isolation on real servers ----------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_server(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
async def layout(own_redis: RedisServer) -> AsyncIterator[dict[str, Any]]:
    """Three stores: default and globex on the shared Redis under two prefixes, acme on its
    own redis-server; each on its own PostgreSQL schema."""
    run = uuid.uuid4().hex[:10]
    schemas = {name: f"t_{run}_{name}" for name in ("default", "acme", "globex")}
    prefixes = {name: f"sgtest:router:{run}:{name}" for name in ("default", "globex")}
    yield {
        "default": {
            "postgres_dsn": PG_DSN,
            "postgres_schema": schemas["default"],
            "redis_url": SHARED_URL,
            "redis_prefix": prefixes["default"],
            "commit_interval_ms": 5,
        },
        "tenants": {
            # Only the server and the schema differ: the rest comes from the defaults.
            "acme": {"redis_url": own_redis.url, "postgres_schema": schemas["acme"]},
            "globex": {"redis_prefix": prefixes["globex"], "postgres_schema": schemas["globex"]},
        },
        "schemas": schemas,
        "prefixes": prefixes,
        "acme_redis": own_redis,
    }
    for schema in schemas.values():
        await drop_pg_schema(schema)
    shared = redis.Redis.from_url(SHARED_URL, socket_timeout=5)
    try:
        for prefix in prefixes.values():
            for key in shared.scan_iter(match=f"{prefix}:*"):
                shared.delete(key)
    finally:
        shared.close()


async def turn(router: StoreRouter, tenant: str, text: str, key: str = KEY) -> None:
    pending = pending_for(router, tenant, key, text)
    router.begin_turn(pending)
    assert router.complete_turn(pending.turn_id, assistant("re: " + text), "stop")
    assert await router.for_tenant(tenant).wait_for_pending(key, 5)


async def pg_sessions(schema: str) -> set[str]:
    conn = await asyncpg.connect(PG_DSN)
    try:
        rows = await conn.fetch(f'SELECT DISTINCT session_key FROM "{schema}".turns')
    finally:
        await conn.close()
    return {row["session_key"] for row in rows}


async def test_the_same_session_key_under_two_pinned_tenants_is_two_sessions(
    layout: dict[str, Any],
) -> None:
    router = await open_router(layout["default"], layout["tenants"])
    try:
        await turn(router, "acme", "acme secret")
        await turn(router, "globex", "globex secret")
        await turn(router, "unknown-tenant", "default one")
        await router.for_tenant("acme").put_user_context(KEY, UserContext(account={"t": "acme"}))
        await router.flush()

        assert await texts(router.for_tenant("acme")) == ["acme secret"]
        assert await texts(router.for_tenant("globex")) == ["globex secret"]
        # Unknown tenants share the default store.
        assert await texts(router.for_tenant("unknown-tenant")) == ["default one"]
        assert await texts(router.for_tenant("someone-else")) == ["default one"]
        assert await texts(router.default) == ["default one"]
        assert (await router.for_tenant("acme").get_user_context(KEY)).account == {"t": "acme"}
        for tenant in ("globex", "other"):
            assert (await router.for_tenant(tenant).get_user_context(KEY)).account == {}
            info = await router.for_tenant(tenant).session_info(KEY)
            assert info.security.tenant != "acme"
        assert router.stats["tenant.acme.completed"] == 1
        assert router.stats["completed"] == 3

        # Where the bytes are: each store's own schema, each store's own Redis keys.
        for name in ("default", "acme", "globex"):
            assert await pg_sessions(layout["schemas"][name]) == {KEY}
        # acme inherits the default prefix, on its own server.
        acme_keys = list(layout["acme_redis"].admin().scan_iter())
        assert acme_keys
        assert all(k.startswith(layout["prefixes"]["default"].encode()) for k in acme_keys)
        shared = redis.Redis.from_url(SHARED_URL, socket_timeout=5)
        try:
            for name in ("default", "globex"):
                assert list(shared.scan_iter(match=f"{layout['prefixes'][name]}:*"))
        finally:
            shared.close()

        # Clearing one tenant's session leaves the others' alone.
        await router.for_tenant("acme").clear(KEY)
        assert await texts(router.for_tenant("acme")) == []
        assert await texts(router.for_tenant("globex")) == ["globex secret"]
        assert await texts(router.default) == ["default one"]
    finally:
        await router.close()

    # A fresh process (new hot tiers, Redis emptied for acme) still finds each tenant's own.
    layout["acme_redis"].admin().flushall()
    router = await open_router(layout["default"], layout["tenants"])
    try:
        assert await texts(router.for_tenant("acme")) == []
        assert await texts(router.for_tenant("globex")) == ["globex secret"]
        await turn(router, "acme", "again")
        assert await texts(router.for_tenant("acme")) == ["again"]
        assert await texts(router.default) == ["default one"]
    finally:
        await router.close()


async def test_a_pinned_tenants_redis_down_leaves_the_others_alone(
    layout: dict[str, Any],
) -> None:
    router = await open_router(layout["default"], layout["tenants"])
    try:
        await turn(router, "acme", "one")
        layout["acme_redis"].kill()
        await turn(router, "acme", "two")  # degraded: hot + cold
        await turn(router, "globex", "g")
        await turn(router, "", "d")
        assert await texts(router.for_tenant("acme")) == ["one", "two"]
        assert router.stats["tenant.acme.warm_degraded_writes"] == 1
        assert router.stats["tenant.globex.warm_degraded_writes"] == 0
        assert router.default.stats["warm_degraded_writes"] == 0
    finally:
        await router.close()


async def test_capture_completes_a_turn_of_a_pinned_tenant(layout: dict[str, Any]) -> None:
    """The capture filter, given the router, completes a pinned tenant's turn knowing only the
    turn id from Envoy's metadata."""
    router = await open_router(layout["default"], layout["tenants"])
    try:
        pending = pending_for(router, "acme", text="captured?")
        router.begin_turn(pending)
        metrics = Metrics()
        # CaptureStream is annotated with SessionStore until it takes a TurnSink.
        stream = CaptureStream(cast(Any, router), metrics, max_json_bytes=1 << 20)
        assert stream.on_response_headers(response_headers(pending.turn_id))
        assert not stream.on_response_body(response_body(completion("captured!")))
        stream.on_stream_end()
        assert metrics.snapshot() == {
            "capture.completed": 1,
            "capture.prompt_tokens": 3,
            "capture.cached_tokens": 0,
        }
        acme = router.for_tenant("acme")
        assert await acme.wait_for_pending(KEY, 5)
        history = await acme.history(KEY)
        assert [t.response_message["content"] for t in history] == ["captured!"]
        assert history[0].turn_id == pending.turn_id
        assert await router.default.history(KEY) == []
        assert await router.for_tenant("globex").history(KEY) == []
    finally:
        await router.close()


async def test_open_store_options_pass_through(tmp_path: Path) -> None:
    """A tenant's options are open_store's own keyword arguments."""
    router = await open_router(
        {"sqlite_path": tmp_path / "default.db", "hot_max_bytes": 1 << 20},
        {"acme": {"sqlite_path": tmp_path / "acme.db"}},
    )
    try:
        await turn(router, "acme", "on disk")
        await router.flush()
    finally:
        await router.close()
    acme = await open_store(tmp_path / "acme.db")
    default = await open_store(tmp_path / "default.db")
    try:
        assert await texts(acme) == ["on disk"]
        assert await texts(default) == []
    finally:
        await acme.close()
        await default.close()


# --- Envoy messages for the capture test ------------------------------------------------


def response_headers(turn_id: str) -> Any:
    request = ep.ProcessingRequest()
    for key, value in ((":status", "200"), ("content-type", "application/json")):
        request.response_headers.headers.headers.append(
            base_pb2.HeaderValue(key=key, raw_value=value.encode())
        )
    request.metadata_context.filter_metadata[METADATA_NAMESPACE]["turn_id"] = turn_id
    return request


def response_body(body: bytes) -> Any:
    request = ep.ProcessingRequest()
    request.response_body.body = body
    request.response_body.end_of_stream = True
    return request


def completion(content: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
