"""The tiered session store: the package's one public surface.

`extproc` imports from here only; this package never imports `extproc`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from store.base import StoreError, StoreUnavailable, TurnBackend
from store.breaker import CircuitBreaker
from store.codec import Codec, TurnCodec, decode_turn, encode_turn
from store.memory import MemoryBackend
from store.model import RECORD_VERSION, Message, PendingTurn, Turn, Usage
from store.pending import LocalPendingRegistry, PendingRegistry
from store.postgres import PostgresBackend
from store.redis import (
    AppendResult,
    Duplicate,
    NeedsFloor,
    RedisBackend,
    Stored,
    Subscription,
    WarmSnapshot,
)
from store.router import StoreRouter, TurnSink, open_router
from store.sharded import InvalidationSubscription, ShardedRedis, WarmBackend
from store.sqlite import SQLiteBackend
from store.tiered import SessionStore

__all__ = [
    "RECORD_VERSION",
    "AppendResult",
    "CircuitBreaker",
    "Codec",
    "Duplicate",
    "InvalidationSubscription",
    "LocalPendingRegistry",
    "MemoryBackend",
    "Message",
    "NeedsFloor",
    "PendingRegistry",
    "PendingTurn",
    "PostgresBackend",
    "RedisBackend",
    "SQLiteBackend",
    "SessionStore",
    "ShardedRedis",
    "StoreError",
    "StoreRouter",
    "StoreUnavailable",
    "Stored",
    "Subscription",
    "Turn",
    "TurnBackend",
    "TurnCodec",
    "TurnSink",
    "Usage",
    "WarmBackend",
    "WarmSnapshot",
    "decode_turn",
    "encode_turn",
    "open_router",
    "open_store",
]


async def open_store(
    sqlite_path: Path | None,
    hot_max_bytes: int = 64 * 1024 * 1024,
    *,
    hot_ttl_s: float | None = None,
    pending_ttl_s: float = 900,
    max_pending: int = 100_000,
    queue_size: int = 10_000,
    commit_interval_ms: float = 20.0,
    postgres_dsn: str | None = None,
    postgres_schema: str = "sessiongate",
    redis_url: str | None = None,
    redis_urls: Sequence[str] = (),
    redis_prefix: str = "sg",
    redis_ttl_s: int = 86400,
    redis_max_turns: int = 2000,
) -> SessionStore:
    """Build and start a store: memory hot tier (idle sessions leave it after `hot_ttl_s`
    when given); Redis warm tier when `redis_url` is given, or sessions sharded over the nodes
    of `redis_urls` (`ShardedRedis`; exclusive with `redis_url`); PostgreSQL cold tier when
    `postgres_dsn` is given, else SQLite when `sqlite_path` is (memory only without either,
    for tests and development)."""
    if redis_url and redis_urls:
        raise ValueError("redis_url and redis_urls are exclusive: one Redis, or several")
    hot = MemoryBackend(hot_max_bytes, ttl_s=hot_ttl_s)
    cold: TurnBackend | None = None
    warm: WarmBackend | None = None
    store: SessionStore | None = None
    try:
        if postgres_dsn:
            cold = await PostgresBackend.open(
                postgres_dsn, schema=postgres_schema, commit_interval_ms=commit_interval_ms
            )
        elif sqlite_path is not None:
            cold = await SQLiteBackend.open(sqlite_path, commit_interval_ms=commit_interval_ms)
        warm = _warm_tier(
            [redis_url] if redis_url else list(redis_urls),
            prefix=redis_prefix,
            ttl_s=redis_ttl_s,
            max_turns=redis_max_turns,
        )
        store = SessionStore(
            hot,
            cold,
            pending_ttl_s=pending_ttl_s,
            max_pending=max_pending,
            queue_size=queue_size,
            warm=warm,
        )
        await store.start()
    except BaseException:
        with contextlib.suppress(Exception):
            if store is not None:
                await store.close()
            else:
                if warm is not None:
                    await warm.close()
                if cold is not None:
                    await cold.close()
        raise
    return store


def _warm_tier(urls: list[str], *, prefix: str, ttl_s: int, max_turns: int) -> WarmBackend | None:
    """No warm tier, one Redis, or sessions sharded over several (every node gets the same
    prefix, TTL and trim, so a session's keys look the same whichever node holds them)."""
    if not urls:
        return None
    if len(urls) == 1:
        # One node however it was given: a one-shard ShardedRedis would store the very same
        # keys (same prefix, same hash tags), only through an extra hop.
        return RedisBackend.from_url(urls[0], prefix=prefix, ttl_s=ttl_s, max_turns=max_turns)
    return ShardedRedis.from_urls(urls, prefix=prefix, ttl_s=ttl_s, max_turns=max_turns)
