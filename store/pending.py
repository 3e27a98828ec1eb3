"""Pending-turn markers: which turns of a session are still waiting for their reply.

Rewrite registers a marker when it forwards a request; the store's writer resolves it once the
completed turn is in the hot tier and queued for the cold one; capture errors abandon it. The
next rewrite of the session waits (bounded) for the markers registered before it, which is
what makes history read-your-writes.

This module holds the in-process registry; `SessionStore` mirrors its markers in Redis (when
configured) so they hold across replicas. It also holds the payload format of a pending turn
handed to another replica: with Redis, the rewriting replica stores the `PendingTurn` next to
its shared marker, and a replica that receives the reply's capture without having rewritten
the request (no ext_proc affinity, or the rewriting replica left the load balancer) fetches
it from there and completes the turn.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from store.base import StoreError
from store.codec import load_record
from store.model import PendingTurn

# The pending-turn payload's format version, bumped under the same rule as turn records (see
# store.codec): a field added with a default does not bump it, a change an older reader would
# misread does, and is refused by readers that do not know it.
PENDING_VERSION = 1
SUPPORTED_PENDING_VERSIONS = frozenset({PENDING_VERSION})


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

    def awaited(self, session_key: str) -> bool:
        """Whether `wait` would wait for some marker of the session (none: it returns at once)."""
        ...

    def mark_shared(self, turn_id: str) -> None:
        """The turn's marker (and payload) is in Redis: another replica may settle it."""
        ...

    def unobserved(self, session_key: str) -> list[str]:
        """The session's shared markers that a reader would wait for and whose reply this
        process has not seen (no response headers, no completion): their capture may have
        gone to another replica, which then settles them in Redis, not here."""
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
    # Its marker and payload are in Redis (see `PendingRegistry.mark_shared`).
    shared: bool = False
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

    def _awaited_entries(self, session_key: str) -> list[_Entry]:
        return [
            e
            for e in self._by_session.get(session_key, {}).values()
            if e.responding or not e.given_up
        ]

    def awaited(self, session_key: str) -> bool:
        self._expire()
        return bool(self._awaited_entries(session_key))

    async def wait(self, session_key: str, timeout_s: float) -> bool:
        self._expire()
        entries = self._awaited_entries(session_key)
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

    def mark_shared(self, turn_id: str) -> None:
        entry = self._entries.get(turn_id)
        if entry is not None:
            entry.shared = True

    def unobserved(self, session_key: str) -> list[str]:
        return [
            turn_id
            for turn_id, e in self._by_session.get(session_key, {}).items()
            if e.shared and not (e.claimed or e.responding or e.given_up)
        ]

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


# --- the payload a replica hands to another ---------------------------------------------


def encode_pending(pending: PendingTurn) -> bytes:
    """The pending turn as a versioned orjson record. It holds what rewrite recorded: the new
    messages, the HMAC'd principal and its scopes, never a credential. `StoreError` when it
    cannot be encoded (the marker is then shared without it)."""
    record = {
        "v": PENDING_VERSION,
        "turn_id": pending.turn_id,
        "session_key": pending.session_key,
        "request_messages": pending.request_messages,
        "system_messages": pending.system_messages,
        "model": pending.model,
        "prompt_tokens_estimate": pending.prompt_tokens_estimate,
        "planned_prompt_tokens": pending.planned_prompt_tokens,
        "wire_format": pending.wire_format,
        "tenant": pending.tenant,
        "principal": pending.principal,
        "scopes": pending.scopes,
        "user_agent": pending.user_agent,
        "created_at": pending.created_at,
    }
    try:
        return orjson.dumps(record)
    except TypeError as exc:  # orjson names the kind of problem, never the content
        raise StoreError(f"pending turn {pending.turn_id!r} cannot be encoded: {exc}") from None


def decode_pending(data: bytes) -> PendingTurn:
    """The record `encode_pending` wrote (or a neighbouring release's: unknown fields are
    ignored, absent optional ones take their defaults). `StoreError` when it is unreadable."""
    record = load_record(data, "pending turn", SUPPORTED_PENDING_VERSIONS)
    try:
        return _pending_from_record(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"corrupt pending turn: {type(exc).__name__} {exc}") from None


def _typed(record: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = record.get(name, default)
    # type() not isinstance(): a bool is not a token count.
    if type(value) is not kind:
        raise TypeError(f"{name} must be {kind.__name__}")
    return value


def _messages(record: dict[str, Any], name: str) -> tuple[dict[str, Any], ...]:
    messages = _typed(record, name, list, [])
    if any(type(message) is not dict for message in messages):
        raise TypeError(f"{name} must hold objects")
    return tuple(messages)


def _pending_from_record(record: dict[str, Any]) -> PendingTurn:
    scopes = _typed(record, "scopes", list, [])
    if any(type(scope) is not str for scope in scopes):
        raise TypeError("scopes must hold strings")
    created_at = record.get("created_at", 0.0)
    if type(created_at) not in (int, float):
        raise TypeError("created_at must be a number")
    return PendingTurn(
        turn_id=_typed(record, "turn_id", str, None),
        session_key=_typed(record, "session_key", str, None),
        request_messages=_messages(record, "request_messages"),
        system_messages=_messages(record, "system_messages"),
        model=_typed(record, "model", str, ""),
        prompt_tokens_estimate=_typed(record, "prompt_tokens_estimate", int, 0),
        planned_prompt_tokens=_typed(record, "planned_prompt_tokens", int, 0),
        wire_format=_typed(record, "wire_format", str, ""),
        tenant=_typed(record, "tenant", str, ""),
        principal=_typed(record, "principal", str, ""),
        scopes=tuple(scopes),
        user_agent=_typed(record, "user_agent", str, ""),
        created_at=float(created_at),
    )
