"""SQLite cold tier: one writer task with group commit, a separate read connection.

Committing per row costs ~4.5k rows/s with aiosqlite; batching with `executemany` ~115k rows/s
(DESIGN.md, measured facts). So `append` only queues the row and returns; one writer task
drains the queue and commits up to `batch_max` rows per transaction, at most
`commit_interval_ms` after the oldest queued row (sooner when a batch is full or someone
flushes). A second connection serves `load`, which WAL lets read while the writer writes.

Durability: WAL with `synchronous=NORMAL` makes a commit survive a crash of this process
(kill -9) but not necessarily a power loss or OS crash, which can lose the last transactions
since the most recent WAL sync. A kill -9 loses what was still queued: the rows appended in the
last `commit_interval_ms` plus one commit's duration, or more while commits are failing (then
`flush` raises `StoreUnavailable` and `stats["commit_errors"]` grows, so it is visible).

A failing commit (disk full, database locked beyond `busy_timeout`) never kills the writer and
never drops the batch: it is rolled back and retried with exponential backoff, and appends block
(then raise `StoreUnavailable`) once the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from store.base import StoreUnavailable
from store.codec import DEFAULT_CODEC, Codec
from store.model import Turn
from store.sqlite_schema import migrate

log = logging.getLogger(__name__)

_INSERT = (
    "INSERT OR IGNORE INTO turns (session_key, seq, turn_id, created_at, record)"
    " VALUES (?, ?, ?, ?, ?)"
)
_DELETE = "DELETE FROM turns WHERE session_key = ?"
_SELECT = "SELECT record FROM turns WHERE session_key = ? ORDER BY seq"

_Row = tuple[str, int, str, float, bytes]


@dataclass(slots=True)
class _Op:
    """One queued write: a row to insert, or (row None) a whole-session delete."""

    session_key: str
    turn_id: str
    row: _Row | None
    queued_at: float
    index: int = 0  # position in commit order, set the moment it enters the queue


class SQLiteBackend:
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
        self._codec = codec
        self._queue: asyncio.Queue[_Op] = asyncio.Queue(maxsize=queue_size)
        self._batch_max = batch_max
        self._interval_s = commit_interval_ms / 1000
        self._busy_timeout_ms = busy_timeout_ms
        self._append_timeout_s = append_timeout_s
        self._flush_timeout_s = flush_timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s

        self._conn: aiosqlite.Connection | None = None  # the writer's
        self._reader: aiosqlite.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        # Set to cut the group-commit wait short: a full batch is waiting or someone flushes.
        self._wake = asyncio.Event()
        # Queued but not committed turns, by session then turn id, so `load` sees its own
        # writes and `append` can refuse a duplicate still in the queue. Value: (index, turn).
        self._inflight: dict[str, dict[str, tuple[int, Turn]]] = {}
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._last_error = ""

        self._enqueued = 0  # ops ever queued; also the index of the newest one
        self._committed = 0  # ops committed; the queue is FIFO, so all with index <= this
        self._commits = 0
        self._rows_inserted = 0
        self._rows_ignored = 0
        self._commit_errors = 0
        self._append_timeouts = 0
        self._lost_on_close = 0

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
        self._writer = asyncio.create_task(self._run_writer(), name=f"sqlite-writer:{self.path}")

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path)
        await conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        await conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    # --- TurnBackend ---------------------------------------------------------------------

    async def append(self, session_key: str, turn: Turn) -> bool:
        """Queue the turn for the next group commit and return without waiting for disk.

        Returns True once queued ("accepted"), False only for a turn id still in the queue: a
        duplicate already committed is not looked up (that would cost a read per append) and
        is ignored at commit by `INSERT OR IGNORE`. Exact newness is the hot tier's job.
        Waits up to `append_timeout_s` for room in a full queue, then raises StoreUnavailable.
        """
        self._check_open()
        queued = self._inflight.get(session_key)
        if queued is not None and turn.turn_id in queued:
            return False
        row = (session_key, turn.seq, turn.turn_id, turn.created_at, self._codec.encode(turn))
        op = _Op(session_key, turn.turn_id, row, asyncio.get_running_loop().time())
        await self._enqueue(op)
        self._inflight.setdefault(session_key, {})[turn.turn_id] = (op.index, turn)
        return True

    async def load(self, session_key: str) -> list[Turn]:
        self._check_open()
        assert self._reader is not None
        # Snapshot the queue side first: a row committed meanwhile is then seen twice (and
        # deduplicated), never zero times.
        queued = list(self._inflight.get(session_key, {}).values())
        rows = await self._reader.execute_fetchall(_SELECT, (session_key,))
        turns = [self._codec.decode(bytes(row[0])) for row in rows]
        if queued:
            seen = {turn.turn_id for turn in turns}
            turns.extend(turn for _, turn in queued if turn.turn_id not in seen)
            turns.sort(key=lambda turn: turn.seq)
        return turns

    async def delete(self, session_key: str) -> None:
        """Delete the session, ordered after every append queued before it; waits for commit."""
        self._check_open()
        op = _Op(session_key, "", None, asyncio.get_running_loop().time())
        await self._enqueue(op)
        self._inflight.pop(session_key, None)
        await self._wait_committed(op.index, self._flush_timeout_s)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything queued so far is committed; StoreUnavailable after the timeout
        (default `flush_timeout_s`), e.g. while commits keep failing."""
        await self._wait_committed(self._enqueued, timeout_s or self._flush_timeout_s)

    async def close(self) -> None:
        """Flush, stop the writer, close both connections. If the flush fails, the rows still
        queued are lost: they are counted in `stats["lost_on_close"]` and the error is raised."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                await self.flush()
        finally:
            self._lost_on_close += self._enqueued - self._committed
            if self._writer is not None:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            await self._close_connections()

    @property
    def stats(self) -> dict[str, int]:
        return {
            "queued": self._enqueued - self._committed,
            "enqueued": self._enqueued,
            "committed": self._committed,
            "commits": self._commits,
            "rows_inserted": self._rows_inserted,
            "rows_ignored": self._rows_ignored,
            "commit_errors": self._commit_errors,
            "append_timeouts": self._append_timeouts,
            "lost_on_close": self._lost_on_close,
        }

    async def integrity_check(self) -> list[str]:
        """Run `PRAGMA integrity_check`; returns the problems found ([] when the file is ok)."""
        self._check_open()
        assert self._reader is not None
        rows = await self._reader.execute_fetchall("PRAGMA integrity_check")
        problems = [str(row[0]) for row in rows]
        return [] if problems == ["ok"] else problems

    # --- queue side ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._writer is None:
            raise StoreUnavailable(f"sqlite store {self.path} is not open")

    async def _enqueue(self, op: _Op) -> None:
        try:
            self._queue.put_nowait(op)
        except asyncio.QueueFull:
            try:
                async with asyncio.timeout(self._append_timeout_s):
                    await self._queue.put(op)
            except TimeoutError:
                self._append_timeouts += 1
                raise StoreUnavailable(
                    f"sqlite write queue full for {self._append_timeout_s}s"
                    f" (last error: {self._last_error or 'none'})"
                ) from None
        # No suspension since the put: the writer cannot have taken `op` yet, and nothing else
        # entered the queue, so this index is its position in commit order.
        self._enqueued += 1
        op.index = self._enqueued
        if self._queue.qsize() >= self._batch_max:
            self._wake.set()

    async def _wait_committed(self, index: int, timeout_s: float) -> None:
        if self._committed >= index:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((index, waiter))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            raise StoreUnavailable(
                f"sqlite commit not done after {timeout_s}s"
                f" (last error: {self._last_error or 'none'})"
            ) from None
        finally:
            self._flush_waiters = [(i, w) for i, w in self._flush_waiters if w is not waiter]

    # --- the writer task -----------------------------------------------------------------

    async def _run_writer(self) -> None:
        while True:
            first = await self._queue.get()
            await self._gather(first)
            batch = [first]
            while len(batch) < self._batch_max:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            await self._commit_until_done(batch)

    async def _gather(self, first: _Op) -> None:
        """Group commit: give more rows until `commit_interval_ms` after the oldest one to
        arrive, unless a full batch is already waiting or someone is flushing."""
        self._wake.clear()
        flushing = any(not waiter.done() for _, waiter in self._flush_waiters)
        if flushing or self._queue.qsize() + 1 >= self._batch_max:
            return
        remaining = first.queued_at + self._interval_s - asyncio.get_running_loop().time()
        if remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await self._wake.wait()

    async def _commit_until_done(self, batch: list[_Op]) -> None:
        delay = self._retry_initial_s
        while True:
            try:
                inserted = await self._commit(batch)
                break
            except Exception as exc:  # the writer must outlive any failure, so: everything
                self._commit_errors += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "sqlite commit of %d ops to %s failed (%s); retrying in %.2fs",
                    len(batch),
                    self.path,
                    self._last_error,
                    delay,
                )
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.rollback()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
        rows = sum(1 for op in batch if op.row is not None)
        self._commits += 1
        self._rows_inserted += inserted
        self._rows_ignored += rows - inserted
        self._last_error = ""
        self._committed = batch[-1].index
        self._forget_inflight(batch)
        self._wake_flushers()

    async def _commit(self, batch: list[_Op]) -> int:
        """One transaction for the whole batch, in queue order; returns rows inserted."""
        conn = self._conn
        assert conn is not None
        inserted = 0
        rows: list[_Row] = []
        for op in batch:
            if op.row is not None:
                rows.append(op.row)
                continue
            if rows:  # a delete must see the inserts queued before it
                inserted += (await conn.executemany(_INSERT, rows)).rowcount
                rows = []
            await conn.execute(_DELETE, (op.session_key,))
        if rows:
            inserted += (await conn.executemany(_INSERT, rows)).rowcount
        await conn.commit()
        return inserted

    def _forget_inflight(self, batch: list[_Op]) -> None:
        for op in batch:
            queued = self._inflight.get(op.session_key)
            if queued is None or op.row is None:
                continue
            entry = queued.get(op.turn_id)
            # Only this op's entry: a later re-append of the same id (after a delete) stays.
            if entry is not None and entry[0] == op.index:
                del queued[op.turn_id]
                if not queued:
                    del self._inflight[op.session_key]

    def _wake_flushers(self) -> None:
        for index, waiter in self._flush_waiters:
            if index <= self._committed and not waiter.done():
                waiter.set_result(None)

    async def _close_connections(self) -> None:
        for conn in (self._reader, self._conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._reader = None
        self._conn = None
