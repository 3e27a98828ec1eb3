"""SessionStore: what the gateway uses. A hot tier (memory), an optional cold tier (SQLite now,
PostgreSQL later), pending-turn markers, and one writer task.

Flow of a turn: rewrite calls `wait_for_pending` + `history` (or `history_after_pending`, both
in one), then `begin_turn`; capture calls `find_pending`, then `complete_turn` (sync, never
blocks: it only queues) or `abandon_turn`. The writer task, which is its own task and so never
cancelled with a client stream, assigns `seq` under a per-session lock, appends to hot then to
cold (queued group commit), and only then resolves the marker: a reader woken by
`wait_for_pending` finds the turn in `history`.

The writer is the only place that assigns seq, so seq is gap-free and unique per session within
one process. Memory-only mode (`cold=None`) is for tests and development: an evicted session
is gone.

Replicas (Redis configured). A turn's capture may reach another replica than its rewrite (no
ext_proc affinity, or the rewriting replica left the load balancer in between). `begin_turn`
therefore stores the PendingTurn in Redis beside its shared marker; the capturing replica's
`find_pending` fetches it and adopts the turn, and its writer claims it in Redis before
writing (`claim_pending_payload`: one claimer wins, so two adopters never both write; against
the rewriting replica's own completion, Redis's append is idempotent by turn id). The
rewriting replica still holds the turn in its registry, where nothing will resolve it: it
settles it once Redis shows it stored or its marker gone, checked on the session's
invalidation and, while a reader waits for it, every poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Literal

from store.base import StoreError, StoreUnavailable, TurnBackend
from store.memory import MemoryBackend
from store.model import Message, PendingTurn, Turn, Usage
from store.pending import (
    Claim,
    LocalPendingRegistry,
    PendingRegistry,
    decode_pending,
    encode_pending,
)
from store.redis import Duplicate, NeedsFloor, Stored
from store.session import (
    DERIVED,
    META,
    SECURITY,
    STATE,
    USER,
    DerivedContext,
    SecurityContext,
    SessionInfo,
    SessionMeta,
    SessionState,
    UserContext,
    decode_doc,
    derive_state,
    encode_doc,
    next_derived,
    next_meta,
)
from store.sharded import InvalidationSubscription, WarmBackend

log = logging.getLogger(__name__)

_COLD_RETRY_INITIAL_S = 0.05
_COLD_RETRY_MAX_S = 2.0
# Sessions written while Redis was down, remembered so their stale Redis copy is dropped once
# it is back. Past this many, the warm TTL bounds the staleness instead.
_MAX_STALE_TRACKED = 100_000
# The documents a commit reads and updates (`_update_docs`).
_COMMIT_DOCS = (META, SECURITY, DERIVED, STATE)
# How often a rewrite re-checks other replicas' pending markers while it waits.
_SHARED_MARKER_POLL_S = 0.005
# Writer tasks draining the completed-turn queue (see `start`).
_WRITERS = 8
# A capture may reach another replica before the rewriting replica's background write of the
# pending turn has landed in Redis (its event loop was busy): look again after these pauses
# before counting the turn unknown. Capture is off the request path; this delays nothing.
_ADOPT_RETRY_S = (0.005, 0.02, 0.05)


class _Unread(enum.Enum):
    """The session's version was not read along with the pending markers."""

    TOKEN = 0


_UNREAD = _Unread.TOKEN
# What the pending-marker poll read of the session's version, for `history` to reuse.
_Version = int | None | Literal[_Unread.TOKEN]


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
        warm: WarmBackend | None = None,
    ) -> None:
        self.hot = hot
        self.cold = cold
        self.warm = warm
        # The warm version each hot entry was read or written at: a hot entry is served only
        # while Redis still reports that version (other replicas may have written since).
        self._hot_versions: dict[str, int] = {}
        # Our own recent writes, so our own invalidation messages do not evict them.
        self._own_writes: dict[str, float] = {}
        self._subscription: InvalidationSubscription | None = None
        self._pending_ttl_s = pending_ttl_s
        self._markers: dict[str, asyncio.Task[None]] = {}
        # Turns begun on another replica whose capture came here (see `find_pending`).
        self._adopted: set[str] = set()
        # Sessions whose settled-elsewhere check runs now (see `_invalidated`).
        self._settling: dict[str, asyncio.Task[None]] = {}
        self._max_markers = max_pending
        self._background: set[asyncio.Task[None]] = set()
        self._registry: PendingRegistry = registry or LocalPendingRegistry(
            pending_ttl_s, max_pending, clock=clock
        )
        self._queue: asyncio.Queue[tuple[str, Turn, PendingTurn]] = asyncio.Queue(
            maxsize=queue_size
        )
        self._flush_timeout_s = flush_timeout_s
        self._writers: list[asyncio.Task[None]] = []
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
                "invalidations",
                "hot_flushes",
                "warm_hits",
                "warm_refills",
                "warm_degraded_reads",
                "warm_degraded_writes",
                "warm_stale_evicted",
                "shared_marker_errors",
                "shared_wait_timeouts",
                # Turns whose capture and rewrite ran on different replicas: adopted here,
                # completed here, lost to another claimer, unknown in Redis too (dropped),
                # and our own resolved because another replica settled them.
                "remote_adopted",
                "remote_completed",
                "remote_claim_lost",
                "remote_unknown",
                "remote_settled",
            ),
            0,
        )
        # Sessions written while Redis was down -> the last seq written then (see
        # _drop_stale_warm). Bounded: past the limit the warm TTL bounds the staleness.
        self._warm_stale: dict[str, int] = {}

    async def start(self) -> None:
        if not self._writers:
            # Several writer tasks on one FIFO queue: a turn's cold-tier reads (its session's
            # last seq, documents) are thread hops or round trips, and overlapping them raised
            # new-session throughput from 4.0k to 7.1k turns/s with 8 (SQLite, measured). A
            # session's turns still commit in queue order: a writer takes the session's lock
            # before its first suspension, and asyncio locks are FIFO.
            self._writers = [
                asyncio.create_task(self._run_writer(), name=f"session-store-writer-{i}")
                for i in range(_WRITERS)
            ]
        if self.warm is not None and self._subscription is None:
            self._subscription = await self.warm.subscribe_invalidations(
                self._invalidated, self._forget_hot_versions
            )

    def _invalidated(self, session_key: str) -> None:
        """Another replica changed the session: stop trusting our hot copy (pub/sub can lose
        messages, so `history` checks the version as well), and see whether it settled a turn
        we began (its capture went there)."""
        self._check_settled_soon(session_key)
        if time.monotonic() - self._own_writes.get(session_key, -1e9) < 1.0:
            return
        self._hot_versions.pop(session_key, None)
        self._counts["invalidations"] += 1

    def _remember_version(self, session_key: str, version: int) -> None:
        """Bounded: entries of sessions the hot tier evicted are dropped once it grows."""
        self._hot_versions[session_key] = version
        if len(self._hot_versions) > _MAX_STALE_TRACKED:
            self._hot_versions = {
                k: v for k, v in self._hot_versions.items() if self.hot.contains(k)
            }

    def _note_own_write(self, session_key: str) -> None:
        """Bounded: only writes of the last second matter (see `_invalidated`)."""
        now = time.monotonic()
        self._own_writes[session_key] = now
        if len(self._own_writes) > _MAX_STALE_TRACKED:
            self._own_writes = {k: t for k, t in self._own_writes.items() if now - t < 1.0}

    def _forget_hot_versions(self) -> None:
        """(Re)connected to Redis: whatever happened meanwhile is unknown, trust nothing."""
        self._hot_versions.clear()
        self._own_writes.clear()
        self._counts["hot_flushes"] += 1

    # --- read side -----------------------------------------------------------------------

    async def history(self, session_key: str) -> list[Turn]:
        """The session's turns in seq order: hot (if current) → warm → cold, promoting on the
        way back. Treat the result as read-only; it shares message dicts with the hot tier.
        With Redis down, hot and cold serve (this replica's hot copy may then be stale)."""
        return await self._history(session_key, _UNREAD)

    async def history_after_pending(
        self, session_key: str, timeout_s: float
    ) -> tuple[bool, list[Turn]]:
        """`wait_for_pending` then `history` (its result first): what rewrite does before it
        builds the body. With Redis, the last marker poll also reads the session's version,
        so a hot hit with no pending turn costs one Redis round trip in all, not two."""
        waited, version = await self._wait(session_key, timeout_s)
        return waited, await self._history(session_key, version)

    async def _history(self, session_key: str, version: _Version) -> list[Turn]:
        """`history`, given the version Redis reported a moment ago (or `_UNREAD`)."""
        if self.warm is not None:
            try:
                return await self._history_via_warm(session_key, version)
            except StoreUnavailable as exc:
                self._counts["warm_degraded_reads"] += 1
                log.debug("warm tier unavailable for a read: %s", exc)
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

    async def _drop_stale_warm(self, session_key: str) -> None:
        """Redis missed this session's writes while it was down. If its copy ends before our
        last degraded write, drop it (no tombstone) so the next read refills from the cold
        tier; a copy that already goes further was rebuilt since (by us or another replica)."""
        assert self.warm is not None
        missed_seq = self._warm_stale.get(session_key)
        if missed_seq is None:
            return
        snapshot = await self.warm.snapshot(session_key)
        if snapshot is not None and not snapshot.deleted and snapshot.last_seq < missed_seq:
            await self.warm.evict(session_key)
            self._counts["warm_stale_evicted"] += 1
        del self._warm_stale[session_key]

    async def _history_via_warm(self, session_key: str, current: _Version) -> list[Turn]:
        """`current`: the version Redis reported a moment ago, or `_UNREAD`."""
        assert self.warm is not None
        if self._warm_stale:
            if session_key in self._warm_stale:
                current = _UNREAD  # the copy it was read from may be dropped right here
            await self._drop_stale_warm(session_key)
        cached = self.hot.get(session_key)
        known = self._hot_versions.get(session_key)
        # Hot hit, if Redis still has the version we cached (one HGET, unless the marker poll
        # just read it); on a miss the snapshot carries its own version, so no HGET is spent.
        if cached is not None and known is not None:
            if current is _UNREAD:
                current = await self.warm.version(session_key)
            if current == known:
                return cached
        snapshot = await self.warm.snapshot(session_key)  # carries its own version
        async with self._lock(session_key):
            sizes: list[int] | None = None
            version: int | None
            if snapshot is not None and (snapshot.deleted or snapshot.first_seq <= 1):
                turns, version = snapshot.turns, snapshot.version
                sizes = snapshot.record_sizes or None
                self._counts["warm_hits"] += 1
            else:
                cold = await self.cold.load(session_key) if self.cold is not None else []
                if snapshot is None:  # expired or never in Redis: refill it
                    turns = cold
                    version = await self.warm.fill(session_key, turns)
                    self._counts["warm_refills"] += 1
                else:  # trimmed in Redis: older turns from cold, the rest from Redis
                    older = [t for t in cold if t.seq < snapshot.first_seq]
                    turns, version = older + snapshot.turns, snapshot.version
                self._counts["promotions"] += 1
            self.hot.put_session(session_key, turns, sizes)
            if version is None:
                self._hot_versions.pop(session_key, None)
            else:
                self._remember_version(session_key, version)
            return turns

    # --- pending turns (sync: called from the gRPC handlers) -----------------------------

    def begin_turn(self, pending: PendingTurn) -> None:
        self._registry.add(pending)
        self._counts["begun"] += 1
        if self.warm is not None:  # the shared marker and payload, for the other replicas
            self._markers[pending.turn_id] = asyncio.get_running_loop().create_task(
                self._add_shared_marker(pending)
            )
            if len(self._markers) > self._max_markers:
                self._markers = {t: m for t, m in self._markers.items() if not m.done()}

    async def _add_shared_marker(self, pending: PendingTurn) -> None:
        """Off the request path (a task): the marker, and the PendingTurn for a replica that
        gets the capture, in one round trip."""
        assert self.warm is not None
        payload: bytes | None
        try:
            payload = encode_pending(pending)
        except StoreError as exc:  # only this replica can complete it; readers still wait
            payload = None
            log.warning("pending turn not shared: %s", exc)
        try:
            await self.warm.add_pending(
                pending.session_key, pending.turn_id, self._pending_ttl_s, payload
            )
        except StoreUnavailable:
            self._counts["shared_marker_errors"] += 1
            return
        self._registry.mark_shared(pending.turn_id)

    def _resolve(self, session_key: str, turn_id: str) -> None:
        """The turn is settled here: wake local waiters, then drop the shared marker (after
        it was added: the two calls must not overtake each other)."""
        self._registry.resolve(turn_id)
        self._drop_shared_marker(session_key, turn_id)

    def _drop_shared_marker(self, session_key: str, turn_id: str) -> None:
        added = self._markers.pop(turn_id, None)
        self._adopted.discard(turn_id)
        if self.warm is None:
            return

        async def drop(warm: WarmBackend) -> None:
            if added is not None:
                await asyncio.wait({added})
            try:
                await warm.remove_pending(session_key, turn_id)
            except StoreUnavailable:
                self._counts["shared_marker_errors"] += 1

        task = asyncio.get_running_loop().create_task(drop(self.warm))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def pending(self, turn_id: str) -> PendingTurn | None:
        return self._registry.get(turn_id)

    async def find_pending(self, turn_id: str) -> PendingTurn | None:
        """The pending turn a capture is about: this process's, or, with Redis, one another
        replica began (Envoy sent the reply's capture here), fetched from Redis and adopted
        so that `complete_turn` and `abandon_turn` work as for our own. None (counted in
        stats["remote_unknown"] when Redis was asked) when no replica has it any more."""
        pending = self._registry.get(turn_id)
        if pending is not None or self.warm is None:
            return pending
        data = await self._fetch_payload(turn_id)
        pending = self._registry.get(turn_id)  # adopted by a concurrent call meanwhile?
        if pending is not None:
            return pending
        if data is None:
            self._counts["remote_unknown"] += 1
            return None
        try:
            pending = decode_pending(data)
            if pending.turn_id != turn_id:
                raise StoreError("pending turn stored under another turn id")
        except StoreError as exc:
            self._counts["remote_unknown"] += 1
            log.warning("pending turn from redis unreadable: %s", exc)
            return None
        self._registry.add(pending)
        self._registry.mark_shared(turn_id)  # the beginning replica's marker is in Redis
        self._adopted.add(turn_id)
        if len(self._adopted) > self._max_markers:  # adopted turns the registry expired
            self._adopted = {t for t in self._adopted if self._registry.get(t) is not None}
        self._counts["remote_adopted"] += 1
        return pending

    async def _fetch_payload(self, turn_id: str) -> bytes | None:
        assert self.warm is not None
        for pause in (*_ADOPT_RETRY_S, None):
            try:
                data = await self.warm.get_pending_payload(turn_id)
            except StoreUnavailable:
                self._counts["shared_marker_errors"] += 1
                return None
            if data is not None or pause is None:
                return data
            await asyncio.sleep(pause)
        return None

    async def wait_for_pending(self, session_key: str, timeout_s: float) -> bool:
        """Wait until the session's turns pending before this call are committed or abandoned.
        False on timeout (counted in stats["wait_timeouts"]), True at once when none.

        With Redis, markers left by other replicas count too: polled until gone, within the
        same timeout (a replica that dies mid-turn leaves a marker that expires by itself).
        A marker one reader has waited out in full is not waited for again: a request aborted
        before its reply leaves a marker nothing resolves until it expires, and it must not
        slow every later request of the session."""
        waited, _ = await self._wait(session_key, timeout_s, with_version=False)
        return waited

    async def _wait(
        self, session_key: str, timeout_s: float, *, with_version: bool = True
    ) -> tuple[bool, _Version]:
        """`wait_for_pending`, and the session's version when the last poll read it."""
        deadline = time.monotonic() + timeout_s
        if not await self._wait_local(session_key, timeout_s):
            return False, _UNREAD
        if self.warm is None:
            return True, _UNREAD
        while True:
            # Our own waited-out markers are in Redis too; they are not waited for again.
            given_up = self._registry.given_up(session_key)
            version: _Version = _UNREAD
            try:
                if with_version or given_up:
                    count, version = await self.warm.pending_and_version(session_key, given_up)
                else:  # one plain command costs less than the script (measured: 10-50 µs)
                    count = await self.warm.pending_count(session_key)
            except StoreUnavailable:
                return True, _UNREAD  # degraded: only this replica's markers can be honoured
            if count <= 0:
                return True, version
            if time.monotonic() >= deadline:
                self._counts["shared_wait_timeouts"] += 1
                return False, version
            await asyncio.sleep(_SHARED_MARKER_POLL_S)

    async def _wait_local(self, session_key: str, timeout_s: float) -> bool:
        """Wait for this process's markers of the session. With Redis, a turn we began may
        have had its reply captured (and settled) by another replica, which resolves nothing
        here: while waiting, poll Redis for those and resolve them (see `_settle_remote`)."""
        if self.warm is None or not self._registry.awaited(session_key):
            return await self._registry.wait(session_key, timeout_s)
        waiting = asyncio.ensure_future(self._registry.wait(session_key, timeout_s))
        try:
            while True:
                unobserved = self._registry.unobserved(session_key)
                if unobserved:
                    await self._settle_remote(session_key, unobserved)  # wakes `waiting`
                done, _ = await asyncio.wait({waiting}, timeout=_SHARED_MARKER_POLL_S)
                if done:
                    return waiting.result()
        finally:
            waiting.cancel()  # a no-op once done; else our caller was cancelled

    async def _settle_remote(self, session_key: str, turn_ids: Sequence[str]) -> None:
        """Resolve our markers among `turn_ids` that Redis shows settled by another replica
        (stored, or marker removed): their waiters go on at once, not at the timeout."""
        assert self.warm is not None
        try:
            settled = await self.warm.pending_settled(session_key, turn_ids)
        except StoreUnavailable:
            self._counts["shared_marker_errors"] += 1
            return
        still_unobserved = set(self._registry.unobserved(session_key))
        for turn_id, done in zip(turn_ids, settled, strict=True):
            # Not one whose capture reached us meanwhile: that completion is ours to settle.
            if done and turn_id in still_unobserved and self._registry.resolve(turn_id):
                self._markers.pop(turn_id, None)
                self._counts["remote_settled"] += 1

    def _check_settled_soon(self, session_key: str) -> None:
        """After another replica wrote the session: settle our turns it may have completed
        (one check per session at a time), so they do not sit in the registry until expiry."""
        unobserved = self._registry.unobserved(session_key)
        if not unobserved or session_key in self._settling:
            return
        task = asyncio.get_running_loop().create_task(self._settle_remote(session_key, unobserved))
        self._settling[session_key] = task
        task.add_done_callback(lambda _: self._settling.pop(session_key, None))

    def mark_responding(self, turn_id: str) -> None:
        """Capture saw the reply's headers: the turn is alive, readers wait for it again."""
        self._registry.mark_responding(turn_id)

    def complete_turn(
        self,
        turn_id: str,
        response_message: Message,
        finish_reason: str | None,
        usage: Usage | None = None,
        token_counts: dict[str, int] | None = None,
        facts: dict[str, list[list[str]]] | None = None,
    ) -> bool:
        """Queue the completed turn for the writer; never blocks. False (counted) when the turn
        id is unknown or expired, already completed, the queue is full or the store closed.
        Must be called on the store's event loop thread. `token_counts`, `facts`: see Turn."""
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
            self._resolve(claimed.session_key, turn_id)
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
            token_counts=token_counts or {},
            facts=facts or {},
        )
        self._queue.put_nowait((claimed.session_key, turn, claimed))
        return True

    def abandon_turn(self, turn_id: str) -> None:
        """Forget the marker (the reply failed); nothing is recorded, waiters wake."""
        pending = self._registry.get(turn_id)
        if self._registry.abandon(turn_id):
            self._counts["abandoned"] += 1
            if pending is not None:
                self._drop_shared_marker(pending.session_key, turn_id)

    # --- admin ---------------------------------------------------------------------------

    async def delete_session(self, session_key: str) -> None:
        """Delete from every tier. A completion still queued for the session recreates it
        (tombstones come with the shared hot tier)."""
        async with self._lock(session_key):
            if self.warm is not None:  # a tombstone: other replicas' copies become stale
                await self.warm.delete(session_key)
            self._hot_versions.pop(session_key, None)
            await self.hot.delete(session_key)
            if self.cold is not None:
                await self.cold.delete(session_key)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until the writer queue is drained and the cold tier has committed it."""
        timeout = timeout_s or self._flush_timeout_s
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            raise StoreUnavailable(
                f"session store writer queue not drained after {timeout}s"
            ) from None
        if self.cold is not None:
            # The rest of the same bound; the cold tier raises with its own cause (disk full).
            await self.cold.flush(max(0.001, deadline - time.monotonic()))

    async def close(self) -> None:
        """Flush, stop the writer, close the tiers. Turns still queued if the flush fails are
        lost, counted in stats["lost_on_close"], and the error is raised."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writers:
                await self.flush()
        finally:
            self._counts["lost_on_close"] = self._queue.qsize()
            for writer in self._writers:
                writer.cancel()
            for writer in self._writers:
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            for check in list(self._settling.values()):  # optional work, only a cleanup
                check.cancel()
            try:
                if self._subscription is not None:
                    await self._subscription.close()
                if self.warm is not None:
                    await self.warm.close()
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
            + counts["dropped_closed"]
            + counts["remote_unknown"],
            "queue_depth": self._queue.qsize(),
        }
        stats.update({f"hot_{name}": value for name, value in self.hot.stats.items()})
        if self.cold is not None:
            stats.update({f"cold_{name}": value for name, value in self.cold.stats.items()})
        return stats

    # --- session documents and operations ------------------------------------------------

    async def session_info(self, session_key: str) -> SessionInfo:
        """Metadata, security context, state and derived context of a session."""
        return SessionInfo(
            meta=decode_doc(await self._get_doc(session_key, META), SessionMeta),
            security=decode_doc(await self._get_doc(session_key, SECURITY), SecurityContext),
            state=decode_doc(await self._get_doc(session_key, STATE), SessionState),
            derived=decode_doc(await self._get_doc(session_key, DERIVED), DerivedContext),
        )

    async def put_derived(self, session_key: str, derived: DerivedContext) -> None:
        """Summary and key facts from the context manager (pinned system stays as given)."""
        async with self._lock(session_key):
            await self._put_doc(session_key, DERIVED, encode_doc(derived))

    async def get_user_context(self, principal_key: str) -> UserContext:
        """From the shared tiers, never this process's hot copy: a principal's requests reach
        any worker or replica (no session affinity), so another one's write would leave a hot
        copy stale for good. Callers cache it briefly themselves (extproc.user_context)."""
        if self.warm is None and self.cold is not None:
            return decode_doc(await self.cold.get_doc(principal_key, USER), UserContext)
        return decode_doc(await self._get_doc(principal_key, USER), UserContext)

    async def put_user_context(self, principal_key: str, context: UserContext) -> None:
        """Per principal, not per session: `principal_key` is an HMAC of (tenant, principal)."""
        await self._put_doc(principal_key, USER, encode_doc(context))

    async def clear(self, session_key: str) -> None:
        """Forget the session: turns and documents, in every tier."""
        await self.delete_session(session_key)

    async def rewind(self, session_key: str, keep_turns: int) -> int:
        """Keep turns 1..keep_turns, drop the rest (the session op: its state is re-derived);
        returns how many were dropped."""
        dropped = await self.truncate_after(session_key, keep_turns)
        if dropped:
            kept = await self.history(session_key)
            async with self._lock(session_key):
                await self._refresh_state(session_key, kept)
        return dropped

    async def fork(self, source_key: str, target_key: str) -> int:
        """Copy a session's turns and derived context into an empty session; returns the
        number of turns copied (0 when the target already has history: never overwritten)."""
        turns = await self.history(source_key)
        if await self.history(target_key):
            return 0
        # The target is empty: no duplicate check per turn (`append` reads the history for
        # it, which made forking a 5,000-turn session take ~1.5 s).
        for turn in turns:
            await self._append_to_tiers(target_key, turn)
        async with self._lock(target_key):
            derived = await self._get_doc(source_key, DERIVED)
            if derived is not None:
                await self._put_doc(target_key, DERIVED, derived)
            meta = SessionMeta(
                created_at=time.time(),
                last_activity=time.time(),
                turns=len(turns),
                forked_from_seq=turns[-1].seq if turns else 0,
            )
            await self._put_doc(target_key, META, encode_doc(meta))
            await self._refresh_state(target_key, turns)
            return len(turns)

    # --- TurnBackend: the tiered store is a backend itself (fork, imports, conformance) ---

    async def append(self, session_key: str, turn: Turn) -> bool:
        """Store `turn` at the seq it carries, in every tier; False if the session already
        has its turn id. The gateway's own turns go through `complete_turn` instead, which
        assigns the seq."""
        if any(t.turn_id == turn.turn_id for t in await self.history(session_key)):
            return False
        await self._append_to_tiers(session_key, turn)
        return True

    async def _append_to_tiers(self, session_key: str, turn: Turn) -> None:
        async with self._lock(session_key):
            if self.warm is not None:
                try:
                    await self.warm.append(session_key, turn)
                except StoreUnavailable:
                    self._counts["warm_degraded_writes"] += 1
                    self._warm_stale[session_key] = max(
                        turn.seq, self._warm_stale.get(session_key, 0)
                    )
                self._hot_versions.pop(session_key, None)
            if self.hot.contains(session_key):
                await self.hot.append(session_key, turn)
            if self.cold is not None:
                await self._append_cold(session_key, turn)

    async def load(self, session_key: str) -> list[Turn]:
        return list(await self.history(session_key))

    async def delete(self, session_key: str) -> None:
        await self.delete_session(session_key)

    async def truncate_after(self, session_key: str, seq: int) -> int:
        turns = await self.history(session_key)
        async with self._lock(session_key):
            dropped = sum(1 for t in turns if t.seq > seq)
            if dropped:
                if self.warm is not None:
                    await self.warm.truncate_after(session_key, seq)
                    self._hot_versions.pop(session_key, None)
                await self.hot.truncate_after(session_key, seq)
                if self.cold is not None:
                    await self.cold.truncate_after(session_key, seq)
            return dropped

    async def put_doc(self, session_key: str, name: str, data: bytes) -> None:
        async with self._lock(session_key):
            await self._put_doc(session_key, name, data)

    async def get_doc(self, session_key: str, name: str) -> bytes | None:
        return await self._get_doc(session_key, name)

    async def get_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        return (await self._get_docs(session_key, names))[0]

    async def _get_doc(self, key: str, name: str) -> bytes | None:
        if self.warm is not None:  # shared by replicas: not cached in hot
            with contextlib.suppress(StoreUnavailable):
                data = await self.warm.get_doc(key, name)
                if data is not None:
                    return data
            return await self.cold.get_doc(key, name) if self.cold is not None else None
        data = await self.hot.get_doc(key, name)
        if data is None and self.cold is not None and not self.hot.known_absent(key, name):
            data = await self.cold.get_doc(key, name)
            if data is not None:
                await self.hot.put_doc(key, name, data)
            else:
                self.hot.note_absent(key, name)
        return data

    async def _put_doc(self, key: str, name: str, data: bytes) -> None:
        if self.warm is not None:
            with contextlib.suppress(StoreUnavailable):  # cold has it; warm refills
                await self.warm.put_doc(key, name, data)
        else:
            await self.hot.put_doc(key, name, data)
        if self.cold is not None:
            await self.cold.put_doc(key, name, data)

    async def _refresh_state(self, session_key: str, turns: list[Turn]) -> None:
        await self._put_doc(session_key, STATE, encode_doc(derive_state(turns)))

    async def _update_docs(self, session_key: str, turn: Turn, pending: PendingTurn) -> None:
        """Metadata, security context, state and pinned system prompt after a commit: one
        read and one write of the documents (one Redis round trip each with a warm tier), and
        only those that changed are written (the security context and the state seldom do)."""
        current, warm_missing = await self._get_docs(session_key, _COMMIT_DOCS)
        meta = decode_doc(current[META], SessionMeta)
        writes = {META: encode_doc(next_meta(meta, turn, pending))}
        if pending.principal:
            security = SecurityContext(pending.tenant, pending.principal, pending.scopes)
            writes[SECURITY] = encode_doc(security)
        derived = decode_doc(current[DERIVED], DerivedContext)
        updated = next_derived(derived, turn)
        if updated is not derived:
            writes[DERIVED] = encode_doc(updated)
        # The state is read off the newest turn, so this turn is enough.
        writes[STATE] = encode_doc(derive_state([turn]))
        changed = {name: data for name, data in writes.items() if data != current[name]}
        # What Redis lacks (expired, or written while it was down) is written back to it.
        refill = {name: data for name, data in writes.items() if name in warm_missing}
        await self._put_docs(session_key, changed, {**changed, **refill})

    async def _get_docs(
        self, key: str, names: Sequence[str]
    ) -> tuple[dict[str, bytes | None], frozenset[str]]:
        """The documents, and which of them the warm tier did not have."""
        if self.warm is None:
            return await self._get_docs_hot_cold(key, names), frozenset()
        with contextlib.suppress(StoreUnavailable):
            found = await self.warm.get_docs(key, names)
            missing = frozenset(name for name, data in found.items() if data is None)
            if self.cold is not None and missing:
                found.update(await self.cold.get_docs(key, sorted(missing)))
            return found, missing
        return {name: await self._get_doc(key, name) for name in names}, frozenset()

    async def _get_docs_hot_cold(self, key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        found: dict[str, bytes | None] = {}
        ask: list[str] = []
        for name in names:
            found[name] = data = await self.hot.get_doc(key, name)
            if data is None and not self.hot.known_absent(key, name):
                ask.append(name)
        if ask and self.cold is not None:
            # One query for all of them (a new session's first commit asks for four).
            for name, data in (await self.cold.get_docs(key, ask)).items():
                found[name] = data
                if data is not None:
                    await self.hot.put_doc(key, name, data)
                else:
                    self.hot.note_absent(key, name)
        return found

    async def _put_docs(
        self, key: str, changed: Mapping[str, bytes], warm_writes: Mapping[str, bytes]
    ) -> None:
        """`changed` to the hot (or warm) and cold tiers; with a warm tier, `warm_writes`
        (the changed ones plus refills) to it instead."""
        if self.warm is not None:
            if warm_writes:
                with contextlib.suppress(StoreUnavailable):  # cold has them; warm refills
                    await self.warm.put_docs(key, warm_writes)
        else:
            for name, data in changed.items():
                await self.hot.put_doc(key, name, data)
        if self.cold is not None:
            for name, data in changed.items():
                await self.cold.put_doc(key, name, data)

    # --- the writer task -----------------------------------------------------------------

    def _lock(self, session_key: str) -> asyncio.Lock:
        lock = self._locks.get(session_key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[session_key] = lock
        return lock

    async def _run_writer(self) -> None:
        while True:
            session_key, turn, pending = await self._queue.get()
            ours = True  # whether this replica settles the turn (and drops its shared marker)
            try:
                adopted = turn.turn_id in self._adopted
                if adopted:
                    ours = await self._claim_adopted(turn.turn_id)
                if ours:
                    await self._write(session_key, turn, pending)
                    if adopted:
                        self._counts["remote_completed"] += 1
            except Exception:  # one bad turn must not stop the writer
                self._counts["write_errors"] += 1
                log.exception("session store: writing a turn failed")
            finally:
                # Stored, duplicate or failed: either way nobody should wait for it any longer.
                if ours:
                    self._resolve(session_key, turn.turn_id)
                else:  # the claimer drops the shared marker once it has written the turn
                    self._registry.resolve(turn.turn_id)
                    self._adopted.discard(turn.turn_id)
                self._queue.task_done()

    async def _claim_adopted(self, turn_id: str) -> bool:
        """Claim a turn another replica began: False when another replica claimed it first."""
        assert self.warm is not None
        try:
            if await self.warm.claim_pending_payload(turn_id):
                return True
        except StoreUnavailable:
            # Unknown whether another replica has it. Write: the turn is not lost, and the
            # appends are idempotent by turn id (Redis's ids hash, the cold tiers' keys).
            self._counts["shared_marker_errors"] += 1
            return True
        self._counts["remote_claim_lost"] += 1
        return False

    async def _write(self, session_key: str, turn: Turn, pending: PendingTurn) -> None:
        degraded = False
        if self.warm is not None:
            try:
                if await self._write_via_warm(session_key, turn, pending):
                    return
            except StoreUnavailable as exc:
                # Degraded: local seq, hot + cold only. Redis catches up lazily: the stale
                # copy there is dropped when the session is next read after Redis returns.
                self._counts["warm_degraded_writes"] += 1
                degraded = True
                log.debug("warm tier unavailable for a write: %s", exc)
        async with self._lock(session_key):
            last_seq, known = await self._head(session_key, turn.turn_id)
            if known:
                self._counts["duplicates_skipped"] += 1
                return
            stored = replace(turn, seq=last_seq + 1)
            if degraded and len(self._warm_stale) < _MAX_STALE_TRACKED:
                self._warm_stale[session_key] = stored.seq
            # Only a cached session gets the turn: appending to an evicted one would create a
            # partial session that `history` would then take for the whole of it.
            if self.hot.contains(session_key):
                await self.hot.append(session_key, stored)
            if self.cold is not None:
                await self._append_cold(session_key, stored)
            self._counts["completed"] += 1
            await self._update_docs(session_key, stored, pending)

    async def _write_via_warm(self, session_key: str, turn: Turn, pending: PendingTurn) -> bool:
        """Redis assigns the seq (one order across replicas). False: not stored here."""
        assert self.warm is not None
        async with self._lock(session_key):
            await self._drop_stale_warm(session_key)
            result = await self.warm.append_next(session_key, turn)
            if isinstance(result, NeedsFloor):
                result = await self.warm.append_next(
                    session_key, turn, await self._cold_last_seq(session_key)
                )
            if isinstance(result, Duplicate):
                self._counts["duplicates_skipped"] += 1
                return True
            if not isinstance(result, Stored):
                return False
            stored = replace(turn, seq=result.seq)
            self._note_own_write(session_key)
            if (
                self.hot.contains(session_key)
                and self._hot_versions.get(session_key) == result.version - 1
            ):
                await self.hot.append(session_key, stored)
                self._remember_version(session_key, result.version)
            else:  # our copy was behind: drop it, the next read reloads
                await self.hot.delete(session_key)
                self._hot_versions.pop(session_key, None)
            if self.cold is not None:
                await self._append_cold(session_key, stored)
            self._counts["completed"] += 1
            await self._update_docs(session_key, stored, pending)
            return True

    async def _cold_last_seq(self, session_key: str) -> int:
        if self.cold is None:
            return 0
        turns = await self.cold.load(session_key)
        return turns[-1].seq if turns else 0

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
