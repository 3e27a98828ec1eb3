"""SQLite cold tier: one writer task with group commit, a separate read connection.

Committing per row costs ~4.5k rows/s with aiosqlite; batching with `executemany` ~115k rows/s
(DESIGN.md, measured facts). So writes are queued and committed in groups by one writer task
(`store.writebehind`: queue, ordering, read-your-writes, retries). A second connection serves
reads, which WAL lets run while the writer writes.

Durability: WAL with `synchronous=NORMAL` makes a commit survive a crash of this process
(kill -9) but not necessarily a power loss or OS crash, which can lose the last transactions
since the most recent WAL sync. A kill -9 loses what was still queued: the writes of the last
`commit_interval_ms` plus one commit's duration, or more while commits are failing (then
`flush` raises `StoreUnavailable` and `stats["commit_errors"]` grows, so it is visible).

A failing commit (disk full, database locked beyond `busy_timeout`) is rolled back and retried
with exponential backoff without losing the batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from store.base import StoreUnavailable
from store.codec import DEFAULT_CODEC, Codec
from store.model import Turn
from store.sqlite_schema import migrate
from store.writebehind import Kind, Op, WriteBehindBackend, last_doc_writes, runs

_INSERT = (
    "INSERT OR IGNORE INTO turns (session_key, seq, turn_id, created_at, record)"
    " VALUES (?, ?, ?, ?, ?)"
)
_TRUNCATE = "DELETE FROM turns WHERE session_key = ? AND seq > ?"
_DELETE_TURNS = "DELETE FROM turns WHERE session_key = ?"
_DELETE_DOCS = "DELETE FROM docs WHERE session_key = ?"
_SELECT = "SELECT record FROM turns WHERE session_key = ? ORDER BY seq"
_PUT_DOC = (
    "INSERT INTO docs (session_key, name, data, updated_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (session_key, name) DO UPDATE"
    " SET data = excluded.data, updated_at = excluded.updated_at"
)
_GET_DOC = "SELECT data FROM docs WHERE session_key = ? AND name = ?"


def _turn_row(op: Op) -> tuple[str, int, str, float, bytes]:
    turn = op.appended
    return (op.session_key, turn.seq, turn.turn_id, turn.created_at, op.record)


class SQLiteBackend(WriteBehindBackend):
    """Cold tier in one SQLite file (created with its parent directory)."""

    def __init__(
        self,
        path: Path,
        *,
        codec: Codec = DEFAULT_CODEC,
        queue_size: int = 10_000,
        batch_max: int = 1_000,
        commit_interval_ms: float = 20.0,
        busy_timeout_ms: int = 5_000,
        append_timeout_s: float = 1.0,
        flush_timeout_s: float = 5.0,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        self.path = Path(path)
        super().__init__(
            f"sqlite store {self.path}",
            codec=codec,
            queue_size=queue_size,
            batch_max=batch_max,
            commit_interval_ms=commit_interval_ms,
            append_timeout_s=append_timeout_s,
            flush_timeout_s=flush_timeout_s,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None  # the writer's
        self._reader: aiosqlite.Connection | None = None

    @classmethod
    async def open(cls, path: Path, **options: Any) -> SQLiteBackend:
        """Construct and start: `await SQLiteBackend.open(path, commit_interval_ms=10)`."""
        backend = cls(path, **options)
        await backend.start()
        return backend

    async def start(self) -> None:
        """Open both connections, migrate the schema and start the writer task."""
        if self._writer is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = await self._connect()
            await self._conn.execute("PRAGMA journal_mode=WAL")
            await migrate(self._conn)
            self._reader = await self._connect()
            # The reader never writes; make a bug that tries fail loudly.
            await self._reader.execute("PRAGMA query_only=ON")
        except BaseException as exc:
            await self._close_connections()
            if isinstance(exc, aiosqlite.Error):
                raise StoreUnavailable(f"cannot open sqlite store {self.path}: {exc}") from exc
            raise
        self._start_writer()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path)
        await conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        await conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    async def integrity_check(self) -> list[str]:
        """Run `PRAGMA integrity_check`; returns the problems found ([] when the file is ok)."""
        self._check_open()
        assert self._reader is not None
        rows = await self._reader.execute_fetchall("PRAGMA integrity_check")
        problems = [str(row[0]) for row in rows]
        return [] if problems == ["ok"] else problems

    # --- WriteBehindBackend ----------------------------------------------------------------

    async def _read_turns(self, session_key: str) -> list[Turn]:
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(_SELECT, (session_key,))
        return [self._codec.decode(bytes(row[0])) for row in rows]

    async def _read_doc(self, session_key: str, name: str) -> bytes | None:
        assert self._reader is not None
        rows = list(await self._reader.execute_fetchall(_GET_DOC, (session_key, name)))
        return bytes(rows[0][0]) if rows else None

    async def _read_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes]:
        assert self._reader is not None
        marks = ",".join("?" * len(names))
        query = f"SELECT name, data FROM docs WHERE session_key = ? AND name IN ({marks})"
        rows = await self._reader.execute_fetchall(query, (session_key, *names))
        return {str(row[0]): bytes(row[1]) for row in rows}

    async def _commit(self, batch: list[Op]) -> dict[str, int]:
        """One transaction for the whole batch, in queue order."""
        conn = self._conn
        assert conn is not None
        inserted = 0
        now = time.time()
        for run in runs(batch):
            kind, key = run[0].kind, run[0].session_key
            if kind is Kind.APPEND:
                rows = [_turn_row(op) for op in run]
                inserted += (await conn.executemany(_INSERT, rows)).rowcount
            elif kind is Kind.PUT_DOC:
                docs = [(op.session_key, op.name, op.record, now) for op in last_doc_writes(run)]
                await conn.executemany(_PUT_DOC, docs)
            elif kind is Kind.TRUNCATE:
                run[0].dropped = (await conn.execute(_TRUNCATE, (key, run[0].seq))).rowcount
            else:
                run[0].dropped = (await conn.execute(_DELETE_TURNS, (key,))).rowcount
                await conn.execute(_DELETE_DOCS, (key,))
        await conn.commit()
        return {"rows_inserted": inserted}

    async def _recover(self) -> None:
        if self._conn is not None:
            await self._conn.rollback()

    async def _close_connections(self) -> None:
        for conn in (self._reader, self._conn):
            if conn is not None:
                with contextlib.suppress(Exception):  # best effort: errors were reported before
                    await conn.close()
        self._reader = None
        self._conn = None
