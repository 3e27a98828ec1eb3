"""PostgresBackend specifics: group commit, cross-replica seq conflicts, the writer under
failure, migrations, the kill -9 bound.

A real server (helpers.PG_DSN), one fresh schema per test, dropped afterwards. Failures are
real too: `pg_terminate_backend` cuts the writer's connection exactly as a server restart or a
failover does, and a trigger that raises makes every insert fail until it is dropped.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from store import PostgresBackend, StoreError, StoreUnavailable, encode_turn
from tests.store.helpers import PG_DSN, drop_pg_schema, make_turn, pg_unreachable_reason

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    """A connection of our own, to inspect tables and to break things."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(PG_DSN, timeout=5)
    except Exception as exc:
        reason = pg_unreachable_reason(exc)
        if reason is None:
            raise
        pytest.skip(reason)
    yield conn
    await conn.close()


@pytest.fixture
async def schema(admin: asyncpg.Connection) -> AsyncIterator[str]:
    name = f"test_{uuid.uuid4().hex}"
    yield name
    await drop_pg_schema(name)


async def open_backend(schema: str, **options: object) -> PostgresBackend:
    return await PostgresBackend.open(PG_DSN, schema=schema, **options)


async def break_inserts(admin: asyncpg.Connection, schema: str) -> None:
    """Every insert into turns fails (like a full disk) until `repair_inserts`."""
    await admin.execute(
        f'CREATE FUNCTION "{schema}".fail() RETURNS trigger LANGUAGE plpgsql'
        " AS $$ BEGIN RAISE EXCEPTION 'disk full (test trigger)'; END $$"
    )
    await admin.execute(
        f'CREATE TRIGGER fail BEFORE INSERT ON "{schema}".turns'
        f' FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".fail()'
    )


async def repair_inserts(admin: asyncpg.Connection, schema: str) -> None:
    await admin.execute(f'DROP TRIGGER fail ON "{schema}".turns')


def writer_pid(backend: PostgresBackend) -> int | None:
    # Test-only reach into the writer's connection, to cut it.
    conn = backend._conn
    return None if conn is None or conn.is_closed() else conn.get_server_pid()


# --- group commit -----------------------------------------------------------------------


async def test_group_commit_batches_rows(schema: str, admin: asyncpg.Connection) -> None:
    backend = await open_backend(schema, commit_interval_ms=50, batch_max=1000)
    for i in range(2500):
        await backend.append(f"s{i % 7}", make_turn(f"t{i}", i // 7 + 1))
    await backend.flush()
    await backend.close()
    # xmin is the id of the transaction that inserted the row: the server's own count.
    transactions = await admin.fetchval(f'SELECT count(DISTINCT xmin::text) FROM "{schema}".turns')
    assert backend.stats["rows_inserted"] == 2500
    assert 3 <= backend.stats["commits"] <= 5  # batch_max caps a transaction at 1000 rows
    assert transactions == backend.stats["commits"]


async def test_committed_duplicate_is_ignored_and_counted(schema: str) -> None:
    backend = await open_backend(schema, commit_interval_ms=1)
    await backend.append("s", make_turn("t1", 1, content="first"))
    await backend.flush()
    assert await backend.append("s", make_turn("t1", 1, content="again"))  # cannot tell yet
    await backend.flush()
    assert await backend.append("s", make_turn("t1", 2, content="other seq"))  # same id
    await backend.flush()
    assert (backend.stats["rows_inserted"], backend.stats["rows_ignored"]) == (1, 2)
    assert backend.stats["seq_conflicts"] == 0  # a known turn id is a duplicate, not a conflict
    assert [t.request_messages[0]["content"] for t in await backend.load("s")] == ["first"]
    await backend.close()


# --- replicas ---------------------------------------------------------------------------


async def test_replicas_share_one_database(schema: str) -> None:
    a = await open_backend(schema, commit_interval_ms=1)
    b = await open_backend(schema, commit_interval_ms=1)
    for seq in (1, 2, 3):
        await a.append("s", make_turn(f"t{seq}", seq))
    await a.put_doc("s", "meta", b"from a")
    await a.flush()
    assert [t.turn_id for t in await b.load("s")] == ["t1", "t2", "t3"]
    assert await b.get_doc("s", "meta") == b"from a"
    assert await b.truncate_after("s", 1) == 2
    assert [t.turn_id for t in await a.load("s")] == ["t1"]
    await b.delete("s")
    assert await a.get_doc("s", "meta") is None
    await a.close()
    await b.close()


async def test_seq_conflict_is_placed_after_the_winner(schema: str) -> None:
    """Replica b thinks seqs 2..4 are free (Redis down); replica a already has 1..3."""
    a = await open_backend(schema, commit_interval_ms=1)
    b = await open_backend(schema, commit_interval_ms=600_000)  # one batch, on flush
    for seq in (1, 2, 3):
        await a.append("s", make_turn(f"t{seq}", seq))
    await a.flush()
    await b.append("s", make_turn("u1", 2))  # taken by t2: conflict
    await b.append("s", make_turn("u2", 3))  # taken by t3: conflict
    await b.append("s", make_turn("u3", 4))  # free, but must stay after u1 and u2: displaced
    await b.append("s", make_turn("t2", 5))  # a's turn id: a duplicate, ignored
    await b.flush()
    turns = await a.load("s")
    assert [(t.turn_id, t.seq) for t in turns] == [
        ("t1", 1),
        ("t2", 2),
        ("t3", 3),
        ("u1", 4),
        ("u2", 5),
        ("u3", 6),
    ]  # the record's own seq was rewritten too: `load` decodes it from the record
    assert turns[3] == replace(make_turn("u1", 2), seq=4)  # otherwise the very same turn
    stats = b.stats
    assert (stats["seq_conflicts"], stats["seq_displaced"]) == (2, 1)
    assert (stats["rows_inserted"], stats["rows_ignored"], stats["commits"]) == (3, 1, 1)
    await a.close()
    await b.close()


_REPLICA = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from store import PostgresBackend
    from tests.store.helpers import make_turn

    async def main():
        dsn, schema, tag, start_at, count = sys.argv[1:6]
        backend = await PostgresBackend.open(
            dsn, schema=schema, commit_interval_ms=2, batch_max=16
        )
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        for i in range(1, int(count) + 1):
            for session in ("s0", "s1", "s2"):
                # Each replica numbers its turns 1, 2, 3...: every seq collides.
                await backend.append(session, make_turn(f"{tag}-{i}", i))
            if i % (3 if tag == "a" else 4) == 0:
                # Spread over many transactions, at paces that differ so the replicas
                # overtake each other and conflict in both directions.
                await asyncio.sleep(0.002)
        await backend.close()
        print(json.dumps(backend.stats))

    asyncio.run(main())
    """
)


async def test_two_processes_with_colliding_seqs_end_in_one_total_order(
    schema: str,
) -> None:
    count = 120
    setup = await open_backend(schema)  # migrate first: the race under test is the seqs
    await setup.close()
    start_at = str(time.time() + 1.0)  # both past their imports, then off together
    replicas = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", _REPLICA, PG_DSN, schema, tag, start_at, str(count)),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        for tag in ("a", "b")
    ]
    stats = []
    for replica in replicas:
        async with asyncio.timeout(60):
            out, _ = await replica.communicate()
        assert replica.returncode == 0
        stats.append(json.loads(out))
    reader = await open_backend(schema)
    try:
        for session in ("s0", "s1", "s2"):
            turns = await reader.load(session)
            # One total order: seqs 1..2N, no gap, no duplicate, every turn exactly once.
            assert [t.seq for t in turns] == list(range(1, 2 * count + 1)), stats
            assert sorted(t.turn_id for t in turns) == sorted(
                f"{tag}-{i}" for tag in ("a", "b") for i in range(1, count + 1)
            )
            # And each replica's own turns stay in the order it appended them.
            for tag in ("a", "b"):
                mine = [int(t.turn_id[2:]) for t in turns if t.turn_id.startswith(tag)]
                assert mine == sorted(mine), (tag, session)
    finally:
        await reader.close()
    moved = sum(s["seq_conflicts"] + s["seq_displaced"] for s in stats)
    assert moved >= 3 * count  # seqs N+1..2N can only have been reached by re-placing
    assert sum(s["seq_conflicts"] for s in stats) >= 1
    assert sum(s["rows_inserted"] for s in stats) == 6 * count
    assert all(s["lost_on_close"] == 0 for s in stats)


# --- failures ---------------------------------------------------------------------------


async def test_writer_connection_killed_mid_run_loses_nothing(
    schema: str, admin: asyncpg.Connection
) -> None:
    backend = await open_backend(
        schema, commit_interval_ms=2, retry_initial_s=0.01, flush_timeout_s=10
    )
    kills = 0
    seq = 0
    for _ in range(5):
        for _ in range(60):
            seq += 1
            await backend.append("s", make_turn(f"t{seq}", seq))
            if seq % 10 == 0:
                await asyncio.sleep(0.001)  # let commits happen between the kills
        pid = writer_pid(backend)
        if pid is not None:
            kills += await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    await backend.flush()
    assert kills >= 1
    assert backend.stats["commit_errors"] >= 1
    assert backend.stats["reconnects"] >= 1
    assert [t.seq for t in await backend.load("s")] == list(range(1, seq + 1))
    await backend.close()
    count = await admin.fetchval(f'SELECT count(*) FROM "{schema}".turns')
    assert count == seq


async def test_reads_survive_killed_pool_connections(
    schema: str, admin: asyncpg.Connection
) -> None:
    backend = await open_backend(schema, commit_interval_ms=1)
    await backend.append("s", make_turn("t1", 1))
    await backend.put_doc("s", "meta", b"m")
    await backend.flush()
    assert len(await backend.load("s")) == 1
    killed = await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        f"sessiongate-reader {schema}",
    )
    assert killed >= 1
    await asyncio.sleep(0.05)  # let the terminations land
    assert len(await backend.load("s")) == 1
    assert await backend.get_doc("s", "meta") == b"m"
    await backend.close()


async def test_failing_commit_is_retried_and_not_lost(
    schema: str, admin: asyncpg.Connection
) -> None:
    backend = await open_backend(
        schema,
        commit_interval_ms=1,
        retry_initial_s=0.01,
        retry_max_s=0.05,
        flush_timeout_s=0.3,
    )
    await backend.append("s", make_turn("t1", 1))
    await backend.flush()
    await break_inserts(admin, schema)
    for seq in range(2, 12):
        await backend.append("s", make_turn(f"t{seq}", seq))
    await backend.put_doc("s", "meta", b"in the failing batch")
    with pytest.raises(StoreUnavailable, match="disk full"):
        await backend.flush()
    assert backend.stats["commit_errors"] >= 2  # retried, and the writer is still alive
    assert [t.seq for t in await backend.load("s")] == list(range(1, 12))  # still readable
    assert await backend.get_doc("s", "meta") == b"in the failing batch"
    await repair_inserts(admin, schema)
    await backend.flush(timeout_s=5)
    assert backend.stats["rows_inserted"] == 11
    await backend.close()
    reopened = await open_backend(schema)
    assert [t.seq for t in await reopened.load("s")] == list(range(1, 12))
    assert await reopened.get_doc("s", "meta") == b"in the failing batch"
    await reopened.close()


async def test_full_queue_raises_instead_of_dropping(
    schema: str, admin: asyncpg.Connection
) -> None:
    backend = await open_backend(
        schema, queue_size=3, append_timeout_s=0.05, commit_interval_ms=1, retry_initial_s=0.01
    )
    await break_inserts(admin, schema)
    accepted = 0
    with pytest.raises(StoreUnavailable, match="queue full"):
        for seq in range(1, 100):
            await backend.append("s", make_turn(f"t{seq}", seq))
            accepted = seq
            await asyncio.sleep(0.01)  # let the writer take a batch and fail on it
    assert backend.stats["append_timeouts"] == 1
    await repair_inserts(admin, schema)
    await backend.flush(timeout_s=5)
    assert [t.seq for t in await backend.load("s")] == list(range(1, accepted + 1))
    await backend.close()


async def test_close_reports_what_it_could_not_commit(
    schema: str, admin: asyncpg.Connection
) -> None:
    backend = await open_backend(
        schema, commit_interval_ms=1, retry_initial_s=0.01, flush_timeout_s=0.2
    )
    await break_inserts(admin, schema)
    await backend.append("s", make_turn("t1", 1))
    await backend.append("s", make_turn("t2", 2))
    with pytest.raises(StoreUnavailable):
        await backend.close()
    assert backend.stats["lost_on_close"] == 2
    with pytest.raises(StoreUnavailable, match="not open"):
        await backend.load("s")


async def test_unreachable_server_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1/test") as raised:
        await PostgresBackend.open("postgresql://postgres@127.0.0.1:1/test", connect_timeout_s=2)
    assert "postgres@" not in str(raised.value)  # never the user (or a password)


def test_schema_name_is_checked() -> None:
    with pytest.raises(ValueError, match="schema name"):
        PostgresBackend(PG_DSN, schema='x"; DROP TABLE turns; --')


# --- migrations -------------------------------------------------------------------------


async def test_concurrent_first_opens_migrate_once(schema: str, admin: asyncpg.Connection) -> None:
    """Four replicas start at once on an empty database: the advisory lock serialises the
    migration, so none fails on a half-created table and each version is applied once."""
    backends = await asyncio.gather(*(open_backend(schema) for _ in range(4)))
    await backends[0].append("s", make_turn("t1", 1))
    for backend in backends:
        await backend.close()
    reopened = await open_backend(schema)  # and once more: nothing left to do
    assert [t.turn_id for t in await reopened.load("s")] == ["t1"]
    await reopened.close()
    rows = await admin.fetch(f'SELECT version, readable_from FROM "{schema}".schema_version')
    assert [tuple(row) for row in rows] == [(1, 1)]


@pytest.mark.parametrize(("readable_from", "opens"), [(1, True), (3, False)])
async def test_schema_from_a_newer_release(
    schema: str, admin: asyncpg.Connection, readable_from: int, opens: bool
) -> None:
    await (await open_backend(schema)).close()
    await admin.execute(f'INSERT INTO "{schema}".schema_version VALUES (3, $1, 0)', readable_from)
    if opens:  # an additive migration: this older release keeps working
        backend = await open_backend(schema)
        await backend.append("s", make_turn("t1", 1))
        await backend.close()
    else:
        with pytest.raises(StoreError, match="needs a release that reads schema 3"):
            await open_backend(schema)


async def test_corrupt_record_is_a_store_error(schema: str, admin: asyncpg.Connection) -> None:
    backend = await open_backend(schema)
    await admin.execute(
        f"INSERT INTO \"{schema}\".turns VALUES ('s', 1, 't1', 0, '\\x00ff'::bytea)"
    )
    await admin.execute(
        f"INSERT INTO \"{schema}\".turns VALUES ('ok', 1, 't1', 0, $1)",
        encode_turn(make_turn("t1", 1)),
    )
    with pytest.raises(StoreError, match="corrupt"):
        await backend.load("s")
    assert await backend.load("ok") == [make_turn("t1", 1)]
    await backend.close()


# --- crash bound ------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from store import PostgresBackend
    from tests.store.helpers import make_turn

    async def main():
        backend = await PostgresBackend.open(sys.argv[1], schema=sys.argv[2],
                                             commit_interval_ms=20)
        seq = 0
        while True:
            seq += 1
            await backend.append("s", make_turn(f"t{seq}", seq))
            print(seq, flush=True)
            await asyncio.sleep(0.002)

    asyncio.run(main())
    """
)


async def test_kill_9_loses_only_the_last_commit_interval(
    schema: str, admin: asyncpg.Connection
) -> None:
    """Same bound as SQLite: a turn queued more than commit_interval (+ one commit) before a
    kill -9 is committed (0.5 s allowed for a loaded machine); what is lost is a suffix."""
    child = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", _CHILD, PG_DSN, schema), cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    queued: list[tuple[int, float]] = []
    try:
        async with asyncio.timeout(30):
            while not queued or queued[-1][1] - queued[0][1] <= 1.2:
                line = await child.stdout.readline()
                assert line, "the child died"
                queued.append((int(line), time.monotonic()))
    finally:
        child.kill()
        killed_at = time.monotonic()
        await child.wait()
    assert child.returncode == -9
    seqs = [row[0] for row in await admin.fetch(f'SELECT seq FROM "{schema}".turns ORDER BY seq')]
    must_have = max(seq for seq, at in queued if at < killed_at - 0.5)
    assert seqs == list(range(1, len(seqs) + 1))  # a prefix: nothing lost in the middle
    assert len(seqs) >= must_have
