"""The tiered session store: the package's one public surface.

`extproc` imports from here only; this package never imports `extproc`.
"""

from __future__ import annotations

import contextlib
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
    redis_prefix: str = "sg",
    redis_ttl_s: int = 86400,
    redis_max_turns: int = 2000,
) -> SessionStore:
    """Build and start a store: memory hot tier; Redis warm tier when `redis_url` is given;
    PostgreSQL cold tier when `postgres_dsn` is given, else SQLite when `sqlite_path` is
    (memory only without either, for tests and development)."""
    hot = MemoryBackend(hot_max_bytes, ttl_s=hot_ttl_s)
    cold: TurnBackend | None = None
    warm: RedisBackend | None = None
    store: SessionStore | None = None
    try:
        if postgres_dsn:
            cold = await PostgresBackend.open(
                postgres_dsn, schema=postgres_schema, commit_interval_ms=commit_interval_ms
            )
        elif sqlite_path is not None:
            cold = await SQLiteBackend.open(sqlite_path, commit_interval_ms=commit_interval_ms)
        if redis_url:
            warm = RedisBackend.from_url(
                redis_url, prefix=redis_prefix, ttl_s=redis_ttl_s, max_turns=redis_max_turns
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
