"""Pending-turn markers: which turns of a session are still waiting for their reply.

Rewrite registers a marker when it forwards a request; the store's writer resolves it once the
completed turn is in the hot tier and queued for the cold one; capture errors abandon it. The
next rewrite of the session waits (bounded) for the markers registered before it, which is
what makes history read-your-writes.

This module holds the in-process registry. The Redis-backed one (next issue) implements the
same `PendingRegistry` protocol so markers hold across processes and replicas.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from store.model import PendingTurn


class Claim(enum.Enum):
    """Why `claim` returned no PendingTurn."""

    UNKNOWN = "unknown"  # never registered, expired, dropped, or already resolved
    ALREADY_CLAIMED = "already_claimed"  # its completion is already queued


class PendingRegistry(Protocol):
    def add(self, pending: PendingTurn) -> None:
        """Register a marker (a turn id already registered is left as it is)."""
        ...

    def get(self, turn_id: str) -> PendingTurn | None: ...

    def claim(self, turn_id: str) -> PendingTurn | Claim:
        """Mark the turn as being completed; the marker stays until `resolve`. Only the first
        claim gets the PendingTurn, so a duplicate completion is refused here."""
        ...

    def resolve(self, turn_id: str) -> bool:
        """Remove the marker (committed or given up) and wake its waiters."""
        ...

    def abandon(self, turn_id: str) -> bool:
        """Remove the marker unless its completion is already queued (a completion wins)."""
        ...

    def mark_responding(self, turn_id: str) -> None:
        """The turn's reply has started (its capture saw response headers)."""
        ...

    def given_up(self, session_key: str) -> list[str]:
        """Turn ids of the session's markers no reader waits for any more."""
        ...

    async def wait(self, session_key: str, timeout_s: float) -> bool:
        """Wait until every marker of the session registered before this call is resolved;
        False on timeout, True at once when there is none."""
        ...

    def __len__(self) -> int: ...

    @property
    def stats(self) -> dict[str, int]: ...


@dataclass(slots=True, eq=False)
class _Waiter:
    remaining: int
    future: asyncio.Future[None]


@dataclass(slots=True, eq=False)
class _Entry:
    pending: PendingTurn
    expires_at: float
    claimed: bool = False
    # A reader already waited its full timeout for this marker: later readers do not wait for
    # it again (a request aborted before its reply leaves a marker that only expiry removes)...
    given_up: bool = False
    # ...unless its reply has started (capture saw the response headers): then it is waited for.
    responding: bool = False
    waiters: list[_Waiter] = field(default_factory=list)


class LocalPendingRegistry:
    """In-process registry, bounded by `max_pending` (oldest dropped first, counted) and by
    `ttl_s` (a reply that never arrives must not pin its marker, nor make readers wait)."""

    def __init__(
        self,
        ttl_s: float = 900.0,
        max_pending: int = 100_000,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_pending = max_pending
        self._clock = clock
        # Insertion order is expiry order (one TTL, monotonic clock): expiry and overflow
        # only ever look at the front.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_session: dict[str, dict[str, _Entry]] = {}
        self._expired = 0
        self._overflow_dropped = 0
        self._waits = 0
        self._wait_timeouts = 0

    def add(self, pending: PendingTurn) -> None:
        self._expire()
        if pending.turn_id in self._entries:
            return
        entry = _Entry(pending, self._clock() + self._ttl_s)
        self._entries[pending.turn_id] = entry
        self._by_session.setdefault(pending.session_key, {})[pending.turn_id] = entry
        while len(self._entries) > self._max_pending:
            self._remove(next(iter(self._entries)))
            self._overflow_dropped += 1

    def get(self, turn_id: str) -> PendingTurn | None:
        self._expire()
        entry = self._entries.get(turn_id)
        return entry.pending if entry else None

    def claim(self, turn_id: str) -> PendingTurn | Claim:
        self._expire()
        entry = self._entries.get(turn_id)
        if entry is None:
            return Claim.UNKNOWN
        if entry.claimed:
            return Claim.ALREADY_CLAIMED
        entry.claimed = True
        return entry.pending

    def resolve(self, turn_id: str) -> bool:
        return self._remove(turn_id)

    def abandon(self, turn_id: str) -> bool:
        entry = self._entries.get(turn_id)
        if entry is None or entry.claimed:
            return False
        return self._remove(turn_id)

    async def wait(self, session_key: str, timeout_s: float) -> bool:
        self._expire()
        entries = [
            e
            for e in self._by_session.get(session_key, {}).values()
            if e.responding or not e.given_up
        ]
        if not entries:
            return True
        self._waits += 1
        waiter = _Waiter(len(entries), asyncio.get_running_loop().create_future())
        for entry in entries:
            entry.waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter.future
            return True
        except TimeoutError:
            self._wait_timeouts += 1
            for entry in entries:
                entry.given_up = True
            return False
        finally:
            for entry in entries:  # no-op for entries already resolved
                if waiter in entry.waiters:
                    entry.waiters.remove(waiter)

    def mark_responding(self, turn_id: str) -> None:
        entry = self._entries.get(turn_id)
        if entry is not None:
            entry.responding = True

    def given_up(self, session_key: str) -> list[str]:
        """Markers of the session no reader waits for any more (see `_Entry.given_up`)."""
        return [
            turn_id
            for turn_id, e in self._by_session.get(session_key, {}).items()
            if e.given_up and not e.responding
        ]

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    @property
    def stats(self) -> dict[str, int]:
        return {
            "pending": len(self),
            "expired": self._expired,
            "overflow_dropped": self._overflow_dropped,
            "waits": self._waits,
            "wait_timeouts": self._wait_timeouts,
        }

    def _remove(self, turn_id: str) -> bool:
        entry = self._entries.pop(turn_id, None)
        if entry is None:
            return False
        session_key = entry.pending.session_key
        same_session = self._by_session.get(session_key)
        if same_session is not None:
            same_session.pop(turn_id, None)
            if not same_session:
                del self._by_session[session_key]
        for waiter in entry.waiters:
            waiter.remaining -= 1
            if waiter.remaining == 0 and not waiter.future.done():
                waiter.future.set_result(None)
        entry.waiters.clear()
        return True

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            turn_id, entry = next(iter(self._entries.items()))
            if entry.expires_at > now:
                break
            self._remove(turn_id)
            self._expired += 1
