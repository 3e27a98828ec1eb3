"""SessionStore: what the gateway uses. A hot tier (memory), an optional cold tier (SQLite now,
PostgreSQL later), pending-turn markers, and one writer task.

Flow of a turn: rewrite calls `wait_for_pending` + `history`, then `begin_turn`; capture calls
`complete_turn` (sync, never blocks: it only queues) or `abandon_turn`. The writer task, which
is its own task and so never cancelled with a client stream, assigns `seq` under a per-session
lock, appends to hot then to cold (queued group commit), and only then resolves the marker: a
reader woken by `wait_for_pending` finds the turn in `history`.

The writer is the only place that assigns seq, so seq is gap-free and unique per session within
one process. Memory-only mode (`cold=None`) is for tests and development: an evicted session
is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import replace

from store.base import StoreUnavailable, TurnBackend
from store.memory import MemoryBackend
from store.model import Message, PendingTurn, Turn, Usage
from store.pending import Claim, LocalPendingRegistry, PendingRegistry

log = logging.getLogger(__name__)

_COLD_RETRY_INITIAL_S = 0.05
_COLD_RETRY_MAX_S = 2.0


class SessionStore:
    def __init__(
        self,
        hot: MemoryBackend,
        cold: TurnBackend | None,
        pending_ttl_s: float = 900,
        max_pending: int = 100_000,
        queue_size: int = 10_000,
        *,
        registry: PendingRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        flush_timeout_s: float = 10.0,
    ) -> None:
        self.hot = hot
        self.cold = cold
        self._registry: PendingRegistry = registry or LocalPendingRegistry(
            pending_ttl_s, max_pending, clock=clock
        )
        self._queue: asyncio.Queue[tuple[str, Turn]] = asyncio.Queue(maxsize=queue_size)
        self._flush_timeout_s = flush_timeout_s
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        # One lock per session that someone is using right now; unused locks vanish on their own.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._counts = dict.fromkeys(
            (
                "begun",
                "completed",
                "abandoned",
                "dropped_unknown",
                "dropped_queue_full",
                "dropped_closed",
                "duplicate_completes",
                "duplicates_skipped",
                "promotions",
                "write_errors",
                "cold_retries",
                "lost_on_close",
            ),
            0,
        )

    async def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._run_writer(), name="session-store-writer")

    # --- read side -----------------------------------------------------------------------

    async def history(self, session_key: str) -> list[Turn]:
        """The session's turns in seq order: from hot, or from cold on a miss (then cached).
        Treat the result as read-only; it shares message dicts with the hot tier."""
        turns = self.hot.get(session_key)
        if turns is not None:
            return turns
        if self.cold is None:
            return []
        async with self._lock(session_key):
            if self.hot.contains(session_key):  # promoted while we waited for the lock
                return await self.hot.load(session_key)
            turns = await self.cold.load(session_key)
            self.hot.put_session(session_key, turns)
            self._counts["promotions"] += 1
            return turns

    # --- pending turns (sync: called from the gRPC handlers) -----------------------------

    def begin_turn(self, pending: PendingTurn) -> None:
        self._registry.add(pending)
        self._counts["begun"] += 1

    def pending(self, turn_id: str) -> PendingTurn | None:
        return self._registry.get(turn_id)

    async def wait_for_pending(self, session_key: str, timeout_s: float) -> bool:
        """Wait until the session's turns pending before this call are committed or abandoned.
        False on timeout (counted in stats["wait_timeouts"]), True at once when none."""
        return await self._registry.wait(session_key, timeout_s)

    def complete_turn(
        self,
        turn_id: str,
        response_message: Message,
        finish_reason: str | None,
        usage: Usage | None = None,
    ) -> bool:
        """Queue the completed turn for the writer; never blocks. False (counted) when the turn
        id is unknown or expired, already completed, the queue is full or the store closed.
        Must be called on the store's event loop thread."""
        claimed = self._registry.claim(turn_id)
        if claimed is Claim.UNKNOWN:
            self._counts["dropped_unknown"] += 1
            return False
        if claimed is Claim.ALREADY_CLAIMED:
            self._counts["duplicate_completes"] += 1
            return False
        if self._closed or self._queue.full():
            self._counts["dropped_closed" if self._closed else "dropped_queue_full"] += 1
            # Nothing will be written: readers waiting on this marker must not wait for it.
            self._registry.resolve(turn_id)
            log.warning("turn dropped: store %s", "closed" if self._closed else "queue full")
            return False
        turn = Turn(
            turn_id=turn_id,
            request_messages=claimed.request_messages,
            response_message=response_message,
            system_messages=claimed.system_messages,
            model=claimed.model,
            finish_reason=finish_reason,
            usage=usage or Usage(),
            created_at=claimed.created_at,
        )
        self._queue.put_nowait((claimed.session_key, turn))
        return True

    def abandon_turn(self, turn_id: str) -> None:
        """Forget the marker (the reply failed); nothing is recorded, waiters wake."""
        if self._registry.abandon(turn_id):
            self._counts["abandoned"] += 1

    # --- admin ---------------------------------------------------------------------------

    async def delete_session(self, session_key: str) -> None:
        """Delete from every tier. A completion still queued for the session recreates it
        (tombstones come with the shared hot tier)."""
        async with self._lock(session_key):
            await self.hot.delete(session_key)
            if self.cold is not None:
                await self.cold.delete(session_key)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until the writer queue is drained and the cold tier has committed it."""
        timeout = timeout_s or self._flush_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            raise StoreUnavailable(
                f"session store writer queue not drained after {timeout}s"
            ) from None
        if self.cold is not None:
            await self.cold.flush()

    async def close(self) -> None:
        """Flush, stop the writer, close the tiers. Turns still queued if the flush fails are
        lost, counted in stats["lost_on_close"], and the error is raised."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                await self.flush()
        finally:
            self._counts["lost_on_close"] = self._queue.qsize()
            if self._writer is not None:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            try:
                if self.cold is not None:
                    await self.cold.close()
            finally:
                await self.hot.close()

    @property
    def stats(self) -> dict[str, int]:
        counts = self._counts
        stats = {
            **counts,
            **self._registry.stats,
            "dropped": counts["dropped_unknown"]
            + counts["dropped_queue_full"]
            + counts["dropped_closed"],
            "queue_depth": self._queue.qsize(),
        }
        stats.update({f"hot_{name}": value for name, value in self.hot.stats.items()})
        if self.cold is not None:
            stats.update({f"cold_{name}": value for name, value in self.cold.stats.items()})
        return stats

    # --- the writer task -----------------------------------------------------------------

    def _lock(self, session_key: str) -> asyncio.Lock:
        lock = self._locks.get(session_key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[session_key] = lock
        return lock

    async def _run_writer(self) -> None:
        while True:
            session_key, turn = await self._queue.get()
            try:
                await self._write(session_key, turn)
            except Exception:  # one bad turn must not stop the writer
                self._counts["write_errors"] += 1
                log.exception("session store: writing a turn failed")
            finally:
                # Stored, duplicate or failed: either way nobody should wait for it any longer.
                self._registry.resolve(turn.turn_id)
                self._queue.task_done()

    async def _write(self, session_key: str, turn: Turn) -> None:
        async with self._lock(session_key):
            last_seq, known = await self._head(session_key, turn.turn_id)
            if known:
                self._counts["duplicates_skipped"] += 1
                return
            stored = replace(turn, seq=last_seq + 1)
            # Only a cached session gets the turn: appending to an evicted one would create a
            # partial session that `history` would then take for the whole of it.
            if self.hot.contains(session_key):
                await self.hot.append(session_key, stored)
            if self.cold is not None:
                await self._append_cold(session_key, stored)
            self._counts["completed"] += 1

    async def _head(self, session_key: str, turn_id: str) -> tuple[int, bool]:
        """(last seq, whether turn_id is already stored), loading the session into hot from
        cold when it is not cached, so seq continues after a restart or an eviction."""
        if self.hot.contains(session_key):
            return self.hot.last_seq(session_key), self.hot.has_turn(session_key, turn_id)
        turns: list[Turn] = []
        if self.cold is not None:
            turns = await self.cold.load(session_key)
            self._counts["promotions"] += 1
        self.hot.put_session(session_key, turns)
        last_seq = turns[-1].seq if turns else 0
        return last_seq, any(t.turn_id == turn_id for t in turns)

    async def _append_cold(self, session_key: str, turn: Turn) -> None:
        """The cold append only blocks when its queue is full (commits failing); keep trying,
        so the turn is never silently lost: the backlog shows in stats and, once our queue is
        full too, as counted drops in complete_turn."""
        assert self.cold is not None
        delay = _COLD_RETRY_INITIAL_S
        while True:
            try:
                await self.cold.append(session_key, turn)
                return
            except StoreUnavailable as exc:
                self._counts["cold_retries"] += 1
                log.warning("cold tier append failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _COLD_RETRY_MAX_S)
