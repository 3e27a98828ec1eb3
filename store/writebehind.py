"""The write-behind core shared by the SQL cold tiers (SQLite, PostgreSQL).

Every write (append, put_doc, truncate_after, delete) becomes an `Op` in ONE bounded FIFO queue,
drained by ONE writer task that commits up to `batch_max` ops per transaction, at most
`commit_interval_ms` after the oldest queued op (sooner when a batch is full or someone
flushes). One queue for every kind of write is what orders them: a truncate or a delete sees
exactly the appends queued before it, in every backend, without locks.

Reads reflect the queue (read-your-writes without a flush): per session, the queued ops are
mirrored in a `_Queued` overlay that `load`/`get_doc` lay over what the database returns.
`append` and `put_doc` return once queued; `truncate_after` and `delete` wait for their commit,
because their callers need the result (a count) or expect the data gone.

A failing commit (disk full, lost connection, server restart) never kills the writer and never
drops the batch: the backend rolls back, the writer backs off exponentially and retries the
same batch. Replaying a batch is harmless: inserts are idempotent by turn id, doc writes are
upserts, truncates and deletes are idempotent. Meanwhile the queue fills, and then `append`
waits `append_timeout_s` and raises StoreUnavailable, so a stuck tier is loud, never silent.

A subclass supplies the database side: `_commit` (one transaction), `_recover`, the two reads
and `_close_connections`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from store.base import StoreUnavailable
from store.codec import Codec
from store.model import Turn

log = logging.getLogger(__name__)


class Kind(enum.Enum):
    APPEND = "append"
    PUT_DOC = "put_doc"
    TRUNCATE = "truncate"
    DELETE = "delete"


@dataclass(slots=True, eq=False)
class Op:
    """One queued write. Which fields matter depends on `kind`."""

    kind: Kind
    session_key: str
    queued_at: float
    turn: Turn | None = None  # APPEND
    record: bytes = b""  # APPEND: the encoded turn; PUT_DOC: the document
    name: str = ""  # PUT_DOC
    seq: int = 0  # TRUNCATE: the last seq kept
    index: int = 0  # position in commit order, set the moment it enters the queue
    dropped: int = 0  # TRUNCATE/DELETE: turns removed, set by the commit

    @property
    def appended(self) -> Turn:
        assert self.turn is not None, "only APPEND ops carry a turn"
        return self.turn


def runs(batch: list[Op]) -> Iterator[list[Op]]:
    """The batch as statements, in an order equivalent to the queue's: truncates and deletes
    come one at a time, each after exactly the writes queued before it (barriers); between two
    barriers, all appends are one run and all doc writes another. Appends and doc writes touch
    different tables inside one transaction, so they commute; coalescing them turns a batch of
    N turns (each an append plus ~3 doc writes) from 2N statements into 2 (each statement is a
    thread hop with aiosqlite, a round trip with asyncpg)."""
    appends: list[Op] = []
    docs: list[Op] = []
    for op in batch:
        if op.kind is Kind.APPEND:
            appends.append(op)
        elif op.kind is Kind.PUT_DOC:
            docs.append(op)
        else:
            if appends:
                yield appends
                appends = []
            if docs:
                yield docs
                docs = []
            yield [op]
    if appends:
        yield appends
    if docs:
        yield docs


def last_doc_writes(run: list[Op]) -> list[Op]:
    """A run of doc writes reduced to the last write of each (session, name): the earlier
    ones would be overwritten inside the same transaction anyway (the tiered store rewrites
    `meta` and `state` on every commit, so this saves most of the rows)."""
    last = {(op.session_key, op.name): op for op in run}
    return list(last.values())


@dataclass(slots=True)
class _Queued:
    """What the queued, uncommitted ops of one session change, for reads to lay over the
    database. Every entry carries its op's index: it leaves once that op has committed."""

    turns: dict[str, tuple[int, Turn]] = field(default_factory=dict)
    docs: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    # (index, seq) of every queued truncate (a delete is seq 0): committed turns above the
    # lowest seq are gone as far as readers are concerned.
    cuts: list[tuple[int, int]] = field(default_factory=list)
    docs_cleared: int = 0  # index of the newest queued delete: committed docs are gone

    def forget(self, op: Op) -> bool:
        """Drop what the committed `op` mirrored; True when nothing is left. Only that op's
        own entry goes: a later write of the same turn id or doc name is still queued."""
        if op.kind is Kind.APPEND:
            entry = self.turns.get(op.appended.turn_id)
            if entry is not None and entry[0] == op.index:
                del self.turns[op.appended.turn_id]
        elif op.kind is Kind.PUT_DOC:
            entry_doc = self.docs.get(op.name)
            if entry_doc is not None and entry_doc[0] == op.index:
                del self.docs[op.name]
        else:
            if self.cuts and self.cuts[0][0] == op.index:  # cuts commit in the order queued
                del self.cuts[0]
            if self.docs_cleared == op.index:
                self.docs_cleared = 0
        return not (self.turns or self.docs or self.cuts or self.docs_cleared)


class WriteBehindBackend(abc.ABC):
    """A TurnBackend whose writes are queued and group-committed by one writer task."""

    # Counters every subclass reports; `_commit` may return deltas for any of them.
    COUNTERS: tuple[str, ...] = (
        "commits",
        "rows_inserted",
        "rows_ignored",
        "docs_written",
        "turns_truncated",
        "commit_errors",
        "append_timeouts",
        "lost_on_close",
    )

    def __init__(
        self,
        label: str,
        *,
        codec: Codec,
        queue_size: int,
        batch_max: int,
        commit_interval_ms: float,
        append_timeout_s: float,
        flush_timeout_s: float,
        retry_initial_s: float,
        retry_max_s: float,
    ) -> None:
        self._label = label  # "sqlite store /path" in messages; never credentials
        self._codec = codec
        self._queue: asyncio.Queue[Op] = asyncio.Queue(maxsize=queue_size)
        self._batch_max = batch_max
        self._interval_s = commit_interval_ms / 1000
        self._append_timeout_s = append_timeout_s
        self._flush_timeout_s = flush_timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s

        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        # Set to cut the group-commit wait short: a full batch is waiting or someone flushes.
        self._wake = asyncio.Event()
        self._queued: dict[str, _Queued] = {}
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._last_error = ""
        self._enqueued = 0  # ops ever queued; also the index of the newest one
        self._committed = 0  # ops committed; the queue is FIFO, so all with index <= this
        self._counts = dict.fromkeys(self.COUNTERS, 0)

    # --- what a subclass provides --------------------------------------------------------

    @abc.abstractmethod
    async def _commit(self, batch: list[Op]) -> dict[str, int]:
        """Apply the batch in queue order in ONE transaction; set `op.dropped` on truncates
        and deletes; return counter deltas (at least "rows_inserted"). Raise to retry."""

    @abc.abstractmethod
    async def _recover(self) -> None:
        """After a failed commit: roll back, or drop a broken connection so the next attempt
        reconnects. Must not raise."""

    @abc.abstractmethod
    async def _read_turns(self, session_key: str) -> list[Turn]:
        """Committed turns of the session in seq order."""

    @abc.abstractmethod
    async def _read_doc(self, session_key: str, name: str) -> bytes | None: ...

    @abc.abstractmethod
    async def _read_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes]:
        """The committed documents among `names` (absent ones left out)."""

    @abc.abstractmethod
    async def _close_connections(self) -> None: ...

    def _start_writer(self) -> None:
        """Called by the subclass's `start` once its connections are open."""
        self._writer = asyncio.create_task(self._run_writer(), name=f"writer: {self._label}")

    # --- TurnBackend ---------------------------------------------------------------------

    async def append(self, session_key: str, turn: Turn) -> bool:
        """Queue the turn for the next group commit and return without waiting for disk.

        Returns True once queued ("accepted"), False only for a turn id still in the queue: a
        duplicate already committed is not looked up (that would cost a read per append) and
        is ignored at commit. Exact newness is the hot tier's job.
        Waits up to `append_timeout_s` for room in a full queue, then raises StoreUnavailable.
        """
        self._check_open()
        queued = self._queued.get(session_key)
        if queued is not None and turn.turn_id in queued.turns:
            return False
        record = self._codec.encode(turn)  # may raise StoreError: before anything is queued
        await self._enqueue(Op(Kind.APPEND, session_key, self._now(), turn=turn, record=record))
        return True

    async def load(self, session_key: str) -> list[Turn]:
        self._check_open()
        # Snapshot the queue side first: an op committed meanwhile is then seen twice (and
        # deduplicated, or cut again), never zero times.
        queued = self._queued.get(session_key)
        cut = min((seq for _, seq in queued.cuts), default=None) if queued else None
        pending = [turn for _, turn in queued.turns.values()] if queued else []
        turns = await self._read_turns(session_key)
        if cut is not None:
            turns = [turn for turn in turns if turn.seq <= cut]
        if pending:
            seen = {turn.turn_id for turn in turns}
            turns.extend(turn for turn in pending if turn.turn_id not in seen)
            turns.sort(key=lambda turn: turn.seq)
        return turns

    async def delete(self, session_key: str) -> None:
        """Delete the session's turns and documents, ordered after every write queued before
        it; waits for the commit."""
        self._check_open()
        op = Op(Kind.DELETE, session_key, self._now())
        await self._enqueue(op)
        await self._wait_committed(op.index, self._flush_timeout_s)

    async def truncate_after(self, session_key: str, seq: int) -> int:
        """Drop the turns with seq > `seq`, ordered after every write queued before it; waits
        for the commit and returns how many turns it removed. A dropped turn id may be
        appended again afterwards.

        Like `delete`, raises StoreUnavailable when the commit does not come within
        `flush_timeout_s`; the rewind then stays queued (reads already reflect it) and is
        applied when commits work again."""
        self._check_open()
        if seq < 0:
            raise ValueError("seq must be >= 0")
        op = Op(Kind.TRUNCATE, session_key, self._now(), seq=seq)
        await self._enqueue(op)
        await self._wait_committed(op.index, self._flush_timeout_s)
        return op.dropped

    async def put_doc(self, session_key: str, name: str, data: bytes) -> None:
        """Queue the document write (an upsert) and return; `get_doc` sees it at once."""
        self._check_open()
        await self._enqueue(Op(Kind.PUT_DOC, session_key, self._now(), name=name, record=data))

    async def get_doc(self, session_key: str, name: str) -> bytes | None:
        return (await self.get_docs(session_key, (name,)))[name]

    async def get_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        """Queued writes first, then one query for the rest."""
        self._check_open()
        found: dict[str, bytes | None] = dict.fromkeys(names)
        rest = list(names)
        queued = self._queued.get(session_key)
        if queued is not None:
            if queued.docs_cleared:  # a queued delete: what the database has is gone
                rest = []
            for name in names:
                entry = queued.docs.get(name)
                if entry is not None:
                    found[name] = entry[1]
            rest = [name for name in rest if found[name] is None]
        if len(rest) == 1:
            found[rest[0]] = await self._read_doc(session_key, rest[0])
        elif rest:
            found.update(await self._read_docs(session_key, rest))
        return found

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything queued so far is committed; StoreUnavailable after the timeout
        (default `flush_timeout_s`), e.g. while commits keep failing."""
        await self._wait_committed(self._enqueued, timeout_s or self._flush_timeout_s)

    async def close(self) -> None:
        """Flush, stop the writer, close the connections. If the flush fails, the ops still
        queued are lost: they are counted in `stats["lost_on_close"]` and the error is raised."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                await self.flush()
        finally:
            self._counts["lost_on_close"] += self._enqueued - self._committed
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
            **self._counts,
        }

    # --- queue side ----------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _check_open(self) -> None:
        if self._closed or self._writer is None:
            raise StoreUnavailable(f"{self._label} is not open")

    async def _enqueue(self, op: Op) -> None:
        try:
            self._queue.put_nowait(op)
        except asyncio.QueueFull:
            try:
                async with asyncio.timeout(self._append_timeout_s):
                    await self._queue.put(op)
            except TimeoutError:
                self._counts["append_timeouts"] += 1
                raise StoreUnavailable(
                    f"{self._label}: write queue full for {self._append_timeout_s}s"
                    f" (last error: {self._last_error or 'none'})"
                ) from None
        # No suspension since the put: the writer cannot have taken `op` yet, and nothing else
        # entered the queue, so this index is its position in commit order, and the overlay
        # entry exists before the commit that will remove it.
        self._enqueued += 1
        op.index = self._enqueued
        self._mirror(op)
        if self._queue.qsize() >= self._batch_max:
            self._wake.set()

    def _mirror(self, op: Op) -> None:
        queued = self._queued.setdefault(op.session_key, _Queued())
        if op.kind is Kind.APPEND:
            queued.turns[op.appended.turn_id] = (op.index, op.appended)
        elif op.kind is Kind.PUT_DOC:
            queued.docs[op.name] = (op.index, op.record)
        else:  # TRUNCATE, DELETE (seq 0): queued appends past the cut will never be seen
            queued.cuts.append((op.index, op.seq))
            queued.turns = {k: v for k, v in queued.turns.items() if v[1].seq <= op.seq}
            if op.kind is Kind.DELETE:
                queued.docs.clear()
                queued.docs_cleared = op.index

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
                f"{self._label}: commit not done after {timeout_s}s"
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

    async def _gather(self, first: Op) -> None:
        """Group commit: give more ops until `commit_interval_ms` after the oldest one to
        arrive, unless a full batch is already waiting or someone is waiting for a commit."""
        self._wake.clear()
        flushing = any(not waiter.done() for _, waiter in self._flush_waiters)
        if flushing or self._queue.qsize() + 1 >= self._batch_max:
            return
        remaining = first.queued_at + self._interval_s - self._now()
        if remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await self._wake.wait()

    async def _commit_until_done(self, batch: list[Op]) -> None:
        delay = self._retry_initial_s
        while True:
            try:
                counts = await self._commit(batch)
                break
            except Exception as exc:  # the writer must outlive any failure, so: everything
                self._counts["commit_errors"] += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "%s: commit of %d ops failed (%s); retrying in %.2fs",
                    self._label,
                    len(batch),
                    self._last_error,
                    delay,
                )
                with contextlib.suppress(Exception):
                    await self._recover()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
        appends = sum(1 for op in batch if op.kind is Kind.APPEND)
        counts["commits"] = 1
        counts["rows_ignored"] = appends - counts.get("rows_inserted", 0)
        counts["docs_written"] = sum(1 for op in batch if op.kind is Kind.PUT_DOC)
        counts["turns_truncated"] = sum(op.dropped for op in batch if op.kind is Kind.TRUNCATE)
        for name, value in counts.items():
            self._counts[name] = self._counts.get(name, 0) + value
        self._last_error = ""
        self._committed = batch[-1].index
        for op in batch:
            queued = self._queued.get(op.session_key)
            if queued is not None and queued.forget(op):
                del self._queued[op.session_key]
        self._wake_flushers()

    def _wake_flushers(self) -> None:
        for index, waiter in self._flush_waiters:
            if index <= self._committed and not waiter.done():
                waiter.set_result(None)
