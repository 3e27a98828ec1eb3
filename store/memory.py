"""The in-process hot tier: whole sessions in a dict, bounded by bytes, LRU + idle TTL.

It holds complete sessions or nothing: `contains` tells a cached (possibly empty) session from a
miss, so the tiered store only goes to the cold tier on a real miss. Everything here is
synchronous under the hood (the async methods never suspend), so each call is atomic on the
event loop and needs no lock.

Turns handed out by `get`/`load` share their message dicts with the cache: callers must treat
them as read-only (copying every history on every request would cost more than it protects).

Documents (`put_doc`) are a cache like turns: they count toward `max_bytes`, expire and are
evicted with their session, and `get_doc` returning None means "not cached" as much as "none"
(the tiered store then asks the cold tier). A document written to a session whose turns are not
cached creates a docs-only entry, which `contains` does NOT report: its (unknown) history must
never pass for a cached empty one.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from store.base import StoreError
from store.codec import DEFAULT_CODEC
from store.model import Turn

# Charged per cached session on top of its turns, so that many empty or tiny sessions still
# count against the bound (the dict entry, the lists and the id set are not free).
SESSION_OVERHEAD_BYTES = 256
# Charged per cached document on top of its name and bytes (dict slot, bytes object header).
DOC_OVERHEAD_BYTES = 64


def turn_size(turn: Turn) -> int:
    """Byte estimate of a cached turn: its encoded size (the Python objects take a few times
    more; size `max_bytes` with that in mind)."""
    return len(DEFAULT_CODEC.encode(turn))


def doc_size(name: str, data: bytes) -> int:
    """Byte estimate of a cached document."""
    return DOC_OVERHEAD_BYTES + len(name) + len(data)


@dataclass(slots=True)
class _Session:
    turns: list[Turn] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    docs: dict[str, bytes] = field(default_factory=dict)
    # Documents the cold tier was asked for and does not have: asking again on every commit
    # (the `derived` document of a session without a system prompt) cost a SQLite read and a
    # thread round trip per turn.
    absent: set[str] = field(default_factory=set)
    size: int = SESSION_OVERHEAD_BYTES
    touched: float = 0.0
    # False for an entry created by `put_doc` alone: its turns were never loaded, so it holds
    # documents but is not a cached history (see the module docstring).
    has_turns: bool = True


class MemoryBackend:
    """Hot tier. Sessions are evicted least-recently-used first once the estimated size exceeds
    `max_bytes` (a single session bigger than the bound is evicted too: the bound holds), and
    expire after `ttl_s` seconds without access. `clock` is monotonic and injectable for tests.
    """

    def __init__(
        self,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        # Ordered least- to most-recently used; since every access also refreshes `touched`,
        # this is also oldest-to-newest by idle time, so expiry only looks at the front.
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0

    # --- synchronous API for the tiered store -------------------------------------------

    def contains(self, session_key: str) -> bool:
        """Whether the session's turns are cached (even none). A peek: no LRU refresh, no
        stats. False for a docs-only entry."""
        self._expire_idle()
        session = self._sessions.get(session_key)
        return session is not None and session.has_turns

    def get(self, session_key: str) -> list[Turn] | None:
        """The cached session's turns in seq order, or None on a miss (counted)."""
        self._expire_idle()
        session = self._sessions.get(session_key)
        if session is None or not session.has_turns:
            self._misses += 1
            return None
        self._hits += 1
        self._touch(session_key, session)
        return list(session.turns)

    def last_seq(self, session_key: str) -> int:
        """Highest seq of a cached session, 0 when empty or not cached."""
        session = self._sessions.get(session_key)
        return session.turns[-1].seq if session and session.turns else 0

    def has_turn(self, session_key: str, turn_id: str) -> bool:
        session = self._sessions.get(session_key)
        return session is not None and turn_id in session.ids

    def put_session(
        self, session_key: str, turns: Iterable[Turn], sizes: Sequence[int] | None = None
    ) -> None:
        """Cache a whole session's turns (promotion from the cold tier), replacing any cached
        turns; cached documents stay. `sizes`: the turns' encoded sizes when the caller has
        them (it read the records), in the same order, so they are not encoded again."""
        session = _Session()
        previous = self._sessions.get(session_key)
        if previous is not None:
            session.docs = previous.docs
            session.absent = previous.absent
            session.size += sum(doc_size(name, data) for name, data in previous.docs.items())
        sized = list(zip(turns, sizes, strict=True)) if sizes else [(t, 0) for t in turns]
        seqs = [turn.seq for turn, _ in sized]
        if seqs != sorted(seqs):  # the tiers hand sessions over in seq order: rarely sorts
            sized.sort(key=lambda pair: pair[0].seq)
        kept, ids = session.turns, session.ids
        total = 0
        for turn, size in sized:
            turn_id = turn.turn_id
            if turn_id in ids:
                continue
            kept.append(turn)
            ids.add(turn_id)
            total += size or turn_size(turn)
        session.size += total
        self._drop(session_key)
        self._sessions[session_key] = session
        self._bytes += session.size
        self._touch(session_key, session)
        self._evict_over_budget()

    # --- TurnBackend ---------------------------------------------------------------------

    async def append(self, session_key: str, turn: Turn) -> bool:
        """Add a turn, creating the session if it is not cached (a docs-only entry becomes a
        cached session too). False for a known turn id."""
        self._expire_idle()
        session = self._sessions.get(session_key)
        if session is not None and turn.turn_id in session.ids:
            self._touch(session_key, session)
            return False
        size = turn_size(turn)  # may raise StoreError: before anything changes
        session = self._entry(session_key)
        session.has_turns = True
        turns = session.turns
        if not turns or turn.seq > turns[-1].seq:
            turns.append(turn)  # the common case: the next seq
        else:
            index = bisect.bisect_left(turns, turn.seq, key=lambda t: t.seq)
            if index < len(turns) and turns[index].seq == turn.seq:
                raise StoreError(f"seq {turn.seq} already used by another turn in this session")
            turns.insert(index, turn)
        session.ids.add(turn.turn_id)
        session.size += size
        self._bytes += size
        self._touch(session_key, session)
        self._evict_over_budget()
        return True

    async def load(self, session_key: str) -> list[Turn]:
        return self.get(session_key) or []

    async def delete(self, session_key: str) -> None:
        """Forget the session: turns and documents."""
        self._drop(session_key)

    async def truncate_after(self, session_key: str, seq: int) -> int:
        """Drop the cached turns with seq > `seq`; 0 when the session is not cached."""
        self._expire_idle()
        session = self._sessions.get(session_key)
        if session is None or not session.turns:
            return 0
        keep = bisect.bisect_right(session.turns, seq, key=lambda t: t.seq)
        dropped = session.turns[keep:]
        if not dropped:
            return 0
        del session.turns[keep:]
        size = sum(turn_size(turn) for turn in dropped)
        session.ids.difference_update(turn.turn_id for turn in dropped)
        session.size -= size
        self._bytes -= size
        self._touch(session_key, session)
        return len(dropped)

    async def put_doc(self, session_key: str, name: str, data: bytes) -> None:
        """Cache the document (see the module docstring for uncached sessions)."""
        self._expire_idle()
        session = self._sessions.get(session_key)
        if session is None:
            session = self._entry(session_key)
            session.has_turns = False
        old = session.docs.get(name)
        delta = doc_size(name, data) - (doc_size(name, old) if old is not None else 0)
        session.docs[name] = bytes(data)
        session.absent.discard(name)
        session.size += delta
        self._bytes += delta
        self._touch(session_key, session)
        self._evict_over_budget()

    async def get_doc(self, session_key: str, name: str) -> bytes | None:
        """The cached document, or None when it is not cached (or does not exist)."""
        self._expire_idle()
        session = self._sessions.get(session_key)
        if session is None:
            return None
        data = session.docs.get(name)
        if data is not None:
            self._touch(session_key, session)
        return data

    async def get_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        return {name: await self.get_doc(session_key, name) for name in names}

    def note_absent(self, session_key: str, name: str) -> None:
        """Remember that the tiers below have no such document (until `put_doc` writes one),
        for a session with an entry here; it goes with the entry."""
        session = self._sessions.get(session_key)
        if session is not None:
            session.absent.add(name)

    def known_absent(self, session_key: str, name: str) -> bool:
        session = self._sessions.get(session_key)
        return session is not None and name in session.absent

    async def flush(self, timeout_s: float | None = None) -> None:
        """Nothing to do: memory is as durable as it gets the moment `append` returns."""

    async def close(self) -> None:
        self._sessions.clear()
        self._bytes = 0

    @property
    def stats(self) -> dict[str, int]:
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "expirations": self._expirations,
            "bytes": self._bytes,
            "sessions": len(self._sessions),
        }

    # --- internals -----------------------------------------------------------------------

    def _touch(self, session_key: str, session: _Session) -> None:
        session.touched = self._clock()
        self._sessions.move_to_end(session_key)

    def _entry(self, session_key: str) -> _Session:
        """The session's entry, created (empty, counted) when there is none."""
        session = self._sessions.get(session_key)
        if session is None:
            session = _Session()
            self._sessions[session_key] = session
            self._bytes += session.size
        return session

    def _drop(self, session_key: str) -> bool:
        session = self._sessions.pop(session_key, None)
        if session is None:
            return False
        self._bytes -= session.size
        return True

    def _evict_over_budget(self) -> None:
        while self._bytes > self._max_bytes and self._sessions:
            _, session = self._sessions.popitem(last=False)
            self._bytes -= session.size
            self._evictions += 1

    def _expire_idle(self) -> None:
        if self._ttl_s is None:
            return
        deadline = self._clock() - self._ttl_s
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if session.touched > deadline:
                break
            self._drop(key)
            self._expirations += 1
