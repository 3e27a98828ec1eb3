"""The tiered session store: the package's one public surface.

`extproc` imports from here only; this package never imports `extproc`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from store.base import StoreError, StoreUnavailable, TurnBackend
from store.codec import Codec, TurnCodec, decode_turn, encode_turn
from store.memory import MemoryBackend
from store.model import RECORD_VERSION, Message, PendingTurn, Turn, Usage
from store.pending import LocalPendingRegistry, PendingRegistry
from store.sqlite import SQLiteBackend
from store.tiered import SessionStore

__all__ = [
    "RECORD_VERSION",
    "Codec",
    "LocalPendingRegistry",
    "MemoryBackend",
    "Message",
    "PendingRegistry",
    "PendingTurn",
    "SQLiteBackend",
    "SessionStore",
    "StoreError",
    "StoreUnavailable",
    "Turn",
    "TurnBackend",
    "TurnCodec",
    "Usage",
    "decode_turn",
    "encode_turn",
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
) -> SessionStore:
    """Build and start a store: memory hot tier, SQLite cold tier when `sqlite_path` is given
    (memory only otherwise, for tests and development)."""
    hot = MemoryBackend(hot_max_bytes, ttl_s=hot_ttl_s)
    cold = None
    if sqlite_path is not None:
        cold = SQLiteBackend(sqlite_path, commit_interval_ms=commit_interval_ms)
        await cold.start()
    store = SessionStore(
        hot, cold, pending_ttl_s=pending_ttl_s, max_pending=max_pending, queue_size=queue_size
    )
    try:
        await store.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await store.close()
        raise
    return store
