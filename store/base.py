"""The protocol every storage backend implements, and the store's errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from store.model import Turn


class StoreError(Exception):
    """A backend failed; the message says which and why (never includes message content)."""


class StoreUnavailable(StoreError):
    """A tier cannot be reached or is failing (disk full, connection refused)."""


class TurnBackend(Protocol):
    """One tier. Keys are opaque session keys (HMACs), never raw client input.

    `append` is idempotent by `turn.turn_id`: appending a turn id the session already has
    returns False and changes nothing. The caller assigns `turn.seq` (> 0); a backend keeps
    turns ordered by it.

    A write-behind backend (SQLite's group commit) returns from `append` once the turn is
    queued, before it can see a duplicate already committed; it then returns True ("accepted")
    and ignores the duplicate at commit. Exact newness is decided by the caller (the hot tier).

    `load` reflects every `append` that has returned, committed or still queued (read-your-
    writes inside one backend), so a tier can be re-read at any time without a `flush`.
    """

    async def append(self, session_key: str, turn: Turn) -> bool: ...

    async def load(self, session_key: str) -> list[Turn]: ...

    async def delete(self, session_key: str) -> None:
        """Remove the session: its turns and its documents."""
        ...

    async def truncate_after(self, session_key: str, seq: int) -> int:
        """Drop the turns with seq > `seq` (rewind); return how many were dropped."""
        ...

    async def put_doc(self, session_key: str, name: str, data: bytes) -> None:
        """Upsert one named per-session document (session metadata, state, derived context).

        Documents are opaque bytes to a backend (the codec encodes them); `delete` removes
        them with the session. Names are short ASCII identifiers.
        """
        ...

    async def get_doc(self, session_key: str, name: str) -> bytes | None: ...

    async def get_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        """`get_doc` for each of `names` (None: no such document), in one query or round
        trip where the backend can (a commit reads four)."""
        ...

    async def flush(self, timeout_s: float | None = None) -> None:
        """Return when everything appended so far is durable in this tier."""
        ...

    async def close(self) -> None: ...

    @property
    def stats(self) -> dict[str, int]:
        """Counters for metrics (sizes, hits, errors); names are backend-specific."""
        ...
