"""PostgreSQL cold tier: the one that replicas on several hosts share.

Same semantics as `SQLiteBackend` (both are `store.writebehind` backends): writes are queued and
group-committed by ONE writer task on its own connection, up to `batch_max` ops or
`commit_interval_ms` per transaction; reads go through a separate pool; `load`/`get_doc`
reflect the local queue; a failing commit (connection lost, server restarted, failover) is
retried with backoff on a fresh connection without losing the batch, and a full queue makes
`append` raise StoreUnavailable after `append_timeout_s`.

A run of appends is ONE statement (`INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING
RETURNING ...`), not `executemany`: only the returned rows tell which turns went in, and a
unique violation would abort the whole transaction (PostgreSQL has no per-row error without a
savepoint per row).

Cross-replica seq conflicts: seq order across replicas is normally assigned by the Redis warm
tier (`RedisBackend.append_next` hands out each session's next seq atomically). This backend
is the safety net for when Redis is down and two replicas both think seq 7 is next in a
session: the second insert at (session_key, 7) hits the primary key, and a plain `ON CONFLICT
DO NOTHING` would drop that turn silently. Instead, a turn whose turn id is not stored yet but
whose seq is taken is a *seq conflict*: inside the same transaction it is re-placed at
`max(seq) + 1` of its session (its record re-encoded with that seq), and the later turns of
its session in the same batch are moved after it (`seq_displaced`), so each replica's own
order is kept. Counted in `stats["seq_conflicts"]`. The result is one total order per session,
without duplicates, and without gaps as long as each replica numbers a session's turns on from
what it last read (as the tiered store does). The replica that lost keeps its own seq for the
turn in its hot tier until the session is reloaded: the warm tier is what prevents that.

Durability: a commit is durable per the server's settings (`synchronous_commit`). A kill -9 of
this process loses what was still queued: the last `commit_interval_ms` plus one commit, or
more while commits are failing (visible in `stats["commit_errors"]`; `flush` raises).
A batch whose COMMIT reached the server but whose reply was lost is replayed: harmless, since
appends are idempotent by turn id (`rows_ignored`), doc writes are upserts, truncates and
deletes idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from store.base import StoreError, StoreUnavailable
from store.codec import DEFAULT_CODEC, Codec
from store.model import Turn
from store.postgres_schema import migrate, quoted_schema
from store.writebehind import Kind, Op, WriteBehindBackend, last_doc_writes, runs

# How often one turn may find its freshly computed max(seq) + 1 taken by a concurrent replica
# before the batch is failed (and retried as a whole, with backoff).
_PLACE_ATTEMPTS = 50

# Errors that mean "the database is not reachable or not answering", as opposed to a bug.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# The connection itself is gone (terminated by an admin, server shut down, network cut).
_CONNECTION_LOST = (
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # e.g. admin_shutdown, crash_shutdown
    OSError,
)


class _Sql:
    """Every statement, with the schema name filled in once."""

    def __init__(self, schema: str) -> None:
        s = quoted_schema(schema)
        self.insert_many = (
            f"INSERT INTO {s}.turns (session_key, seq, turn_id, created_at, record)"
            " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::float8[],"
            " $5::bytea[]) ON CONFLICT DO NOTHING RETURNING session_key, turn_id"
        )
        self.stored_ids = (
            "SELECT m.session_key, m.turn_id"
            " FROM unnest($1::text[], $2::text[]) AS m(session_key, turn_id)"
            f" JOIN {s}.turns t ON t.session_key = m.session_key AND t.turn_id = m.turn_id"
        )
        self.unplace = (
            f"DELETE FROM {s}.turns t USING unnest($1::text[], $2::text[])"
            " AS m(session_key, turn_id)"
            " WHERE t.session_key = m.session_key AND t.turn_id = m.turn_id"
        )
        self.next_seq = f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {s}.turns WHERE session_key = $1"
        self.insert_one = (
            f"INSERT INTO {s}.turns (session_key, seq, turn_id, created_at, record)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING seq"
        )
        self.has_turn = f"SELECT 1 FROM {s}.turns WHERE session_key = $1 AND turn_id = $2"
        self.truncate = f"DELETE FROM {s}.turns WHERE session_key = $1 AND seq > $2"
        self.delete_turns = f"DELETE FROM {s}.turns WHERE session_key = $1"
        self.delete_docs = f"DELETE FROM {s}.docs WHERE session_key = $1"
        self.select = f"SELECT record FROM {s}.turns WHERE session_key = $1 ORDER BY seq"
        self.put_doc = (
            f"INSERT INTO {s}.docs (session_key, name, data, updated_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (session_key, name) DO UPDATE"
            " SET data = excluded.data, updated_at = excluded.updated_at"
        )
        self.get_doc = f"SELECT data FROM {s}.docs WHERE session_key = $1 AND name = $2"
        self.get_docs = (
            f"SELECT name, data FROM {s}.docs WHERE session_key = $1 AND name = ANY($2::text[])"
        )


def _status_count(status: str) -> int:
    """Rows affected, from a command status such as "DELETE 3"."""
    return int(status.rsplit(" ", 1)[-1])


def _where(dsn: str) -> str:
    """host:port/db for messages: never the user or the password."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"


class PostgresBackend(WriteBehindBackend):
    """Cold tier in a PostgreSQL database, all tables in `schema` (created if missing), so
    tests isolate themselves and a tenant can be pinned to its own schema or database."""

    COUNTERS = (*WriteBehindBackend.COUNTERS, "seq_conflicts", "seq_displaced", "reconnects")

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "sessiongate",
        codec: Codec = DEFAULT_CODEC,
        queue_size: int = 10_000,
        batch_max: int = 1_000,
        commit_interval_ms: float = 20.0,
        append_timeout_s: float = 1.0,
        flush_timeout_s: float = 5.0,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        read_pool_size: int = 4,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 30.0,
    ) -> None:
        self._sql = _Sql(schema)  # validates the schema name first
        super().__init__(
            f"postgres store {schema!r} at {_where(dsn)}",
            codec=codec,
            queue_size=queue_size,
            batch_max=batch_max,
            commit_interval_ms=commit_interval_ms,
            append_timeout_s=append_timeout_s,
            flush_timeout_s=flush_timeout_s,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
        )
        self.schema = schema
        self._dsn = dsn
        self._read_pool_size = read_pool_size
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._conn: asyncpg.Connection | None = None  # the writer's
        self._pool: asyncpg.Pool | None = None  # the readers'

    @classmethod
    async def open(cls, dsn: str, **options: Any) -> PostgresBackend:
        """Construct and start: `await PostgresBackend.open(dsn, schema="tenant_a")`."""
        backend = cls(dsn, **options)
        await backend.start()
        return backend

    async def start(self) -> None:
        """Connect the writer, migrate the schema, open the read pool, start the writer task."""
        if self._writer is not None:
            return
        try:
            self._conn = await self._connect()
            await migrate(self._conn, self.schema)
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._read_pool_size,
                timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                server_settings={"application_name": self._application_name("reader")},
            )
        except BaseException as exc:
            await self._close_connections()
            if isinstance(exc, _DB_ERRORS):
                raise StoreUnavailable(f"cannot open {self._label}: {exc}") from exc
            raise
        self._start_writer()

    async def _connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout_s,
            command_timeout=self._command_timeout_s,
            server_settings={"application_name": self._application_name("writer")},
        )
        return conn

    def _application_name(self, role: str) -> str:
        """Shown in pg_stat_activity: which replica role and which schema (tenant) a
        connection serves. PostgreSQL keeps 63 bytes of it."""
        return f"sessiongate-{role} {self.schema}"[:63]

    # --- reads ---------------------------------------------------------------------------

    async def _read_turns(self, session_key: str) -> list[Turn]:
        rows = await self._read("load", self._sql.select, session_key)
        return [self._codec.decode(row["record"]) for row in rows]

    async def _read_doc(self, session_key: str, name: str) -> bytes | None:
        rows = await self._read("get_doc", self._sql.get_doc, session_key, name)
        return bytes(rows[0]["data"]) if rows else None

    async def _read_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes]:
        rows = await self._read("get_docs", self._sql.get_docs, session_key, list(names))
        return {str(row["name"]): bytes(row["data"]) for row in rows}

    async def _read(self, what: str, query: str, *args: object) -> list[asyncpg.Record]:
        """A query on a pooled connection, tried twice when the first attempt finds its
        connection dead (server restart, failover, idle connection killed): the pool then
        replaces it, and one failed read per pooled connection would otherwise reach callers."""
        assert self._pool is not None
        for attempt in (1, 2):
            try:
                return await self._pool.fetch(query, *args)
            except _DB_ERRORS as exc:
                if attempt == 1 and isinstance(exc, _CONNECTION_LOST):
                    continue
                raise StoreUnavailable(f"{self._label}: {what} failed: {exc}") from exc
        raise AssertionError("unreachable")

    # --- the writer's transaction --------------------------------------------------------

    async def _commit(self, batch: list[Op]) -> dict[str, int]:
        conn = self._conn
        if conn is None or conn.is_closed():
            conn = self._conn = await self._connect()
            self._counts["reconnects"] += 1
        counts = {"rows_inserted": 0, "seq_conflicts": 0, "seq_displaced": 0}
        now = time.time()
        async with conn.transaction():
            for run in runs(batch):
                for name, value in (await self._apply(conn, run, now)).items():
                    counts[name] += value
        return counts

    async def _apply(self, conn: asyncpg.Connection, run: list[Op], now: float) -> dict[str, int]:
        """One run of the batch (see `runs`), inside the batch's transaction."""
        op = run[0]
        if op.kind is Kind.APPEND:
            return await self._insert_turns(conn, run)
        if op.kind is Kind.PUT_DOC:
            docs = [(w.session_key, w.name, w.record, now) for w in last_doc_writes(run)]
            await conn.executemany(self._sql.put_doc, docs)
        elif op.kind is Kind.TRUNCATE:
            op.dropped = _status_count(
                await conn.execute(self._sql.truncate, op.session_key, op.seq)
            )
        else:
            op.dropped = _status_count(await conn.execute(self._sql.delete_turns, op.session_key))
            await conn.execute(self._sql.delete_docs, op.session_key)
        return {}

    async def _insert_turns(self, conn: asyncpg.Connection, run: list[Op]) -> dict[str, int]:
        """Insert a run of appends; re-place the turns whose seq another turn holds."""
        # Sorted, so that two replicas' transactions take row locks in the same order and do
        # not deadlock each other (a deadlock would still only cost a retry).
        ordered = sorted(run, key=lambda op: (op.session_key, op.appended.seq))
        rows = await conn.fetch(
            self._sql.insert_many,
            [op.session_key for op in ordered],
            [op.appended.seq for op in ordered],
            [op.appended.turn_id for op in ordered],
            [op.appended.created_at for op in ordered],
            [op.record for op in ordered],
        )
        inserted = {(row["session_key"], row["turn_id"]) for row in rows}
        missing = [op for op in ordered if _ident(op) not in inserted]
        counts = {"rows_inserted": len(inserted), "seq_conflicts": 0, "seq_displaced": 0}
        if not missing:
            return counts
        stored = await conn.fetch(
            self._sql.stored_ids,
            [op.session_key for op in missing],
            [op.appended.turn_id for op in missing],
        )
        duplicates = {(row["session_key"], row["turn_id"]) for row in stored}
        # Per session, the lowest seq that conflicted: it and every later turn of the session
        # in this run (inserted or not) go to the end, in order.
        first_conflict: dict[str, int] = {}
        for op in missing:
            if _ident(op) not in duplicates:
                first_conflict.setdefault(op.session_key, op.appended.seq)
        if not first_conflict:
            return counts  # only duplicates: idempotent appends, nothing else to do
        moving = [
            op
            for op in ordered
            if op.appended.seq >= first_conflict.get(op.session_key, op.appended.seq + 1)
            and _ident(op) not in duplicates
        ]
        displaced = [op for op in moving if _ident(op) in inserted]
        if displaced:
            await conn.execute(
                self._sql.unplace,
                [op.session_key for op in displaced],
                [op.appended.turn_id for op in displaced],
            )
        placed = 0
        for op in moving:
            placed += await self._place_at_end(conn, op)
        counts["rows_inserted"] += placed - len(displaced)
        counts["seq_conflicts"] = len(moving) - len(displaced)
        counts["seq_displaced"] = len(displaced)
        return counts

    async def _place_at_end(self, conn: asyncpg.Connection, op: Op) -> bool:
        """Insert the turn at its session's max(seq) + 1, re-encoded with that seq (the record
        carries it). False if the turn id turned out to be stored already."""
        turn = op.appended
        for _ in range(_PLACE_ATTEMPTS):
            seq: int = await conn.fetchval(self._sql.next_seq, op.session_key)
            moved = replace(turn, seq=seq)
            placed = await conn.fetchval(
                self._sql.insert_one,
                op.session_key,
                seq,
                turn.turn_id,
                turn.created_at,
                self._codec.encode(moved),
            )
            if placed is not None:
                return True
            # Taken again: by a concurrent replica's turn, or by this very turn (stored by a
            # replica that replayed it). Under READ COMMITTED the next max() sees the winner.
            if await conn.fetchval(self._sql.has_turn, op.session_key, turn.turn_id):
                return False
        raise StoreError(
            f"could not place a turn after {_PLACE_ATTEMPTS} seq conflicts in one session"
        )

    async def _recover(self) -> None:
        # The failed transaction was rolled back by its context manager if the connection
        # still worked. Whatever state it is in, a fresh connection is the one safe bet, and
        # failures are rare enough (and backed off) for the reconnect not to matter.
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _close_connections(self) -> None:
        conn, self._conn = self._conn, None
        pool, self._pool = self._pool, None
        if conn is not None:
            with contextlib.suppress(Exception):  # best effort: errors were reported before
                await conn.close(timeout=self._connect_timeout_s)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._connect_timeout_s)
            except Exception:  # a hung server: do not hang close() with it
                pool.terminate()


def _ident(op: Op) -> tuple[str, str]:
    return (op.session_key, op.appended.turn_id)
