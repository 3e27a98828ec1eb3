"""SQLiteBackend specifics: group commit, the writer under failure, migrations, crash bound.

Real SQLite files throughout. Failures are real SQLite failures too: `PRAGMA max_page_count`
at the current size makes the next growing commit fail with SQLITE_FULL ("database or disk is
full"), exactly as a full disk does.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from store import SQLiteBackend, StoreError, StoreUnavailable, encode_turn
from store.sqlite_schema import MIGRATIONS
from tests.store.helpers import make_turn

REPO = Path(__file__).resolve().parents[2]


def writer_connection(backend: SQLiteBackend) -> aiosqlite.Connection:
    # Test-only reach into the writer's connection, to fill the "disk" or trace statements.
    conn = backend._conn
    assert conn is not None
    return conn


async def fill_disk(backend: SQLiteBackend) -> None:
    conn = writer_connection(backend)
    (row,) = await conn.execute_fetchall("PRAGMA page_count")
    await conn.execute(f"PRAGMA max_page_count={row[0]}")


async def free_disk(backend: SQLiteBackend) -> None:
    await writer_connection(backend).execute("PRAGMA max_page_count=1073741823")


@pytest.fixture
async def failing_backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    """A backend with one committed row, whose next growing commit fails (disk full)."""
    backend = await SQLiteBackend.open(
        tmp_path / "s.db",
        commit_interval_ms=1,
        retry_initial_s=0.01,
        retry_max_s=0.05,
        flush_timeout_s=0.3,
        append_timeout_s=0.05,
    )
    await backend.append("s", make_turn("t1", 1))
    await backend.flush()
    await fill_disk(backend)
    yield backend
    if backend._conn is not None:  # still open: let close() flush normally
        await free_disk(backend)
    with contextlib.suppress(StoreUnavailable):
        await backend.close()


async def test_group_commit_batches_rows(tmp_path: Path) -> None:
    backend = await SQLiteBackend.open(tmp_path / "s.db", commit_interval_ms=50, batch_max=1000)
    statements: list[str] = []
    await writer_connection(backend).set_trace_callback(statements.append)
    for i in range(2500):
        await backend.append(f"s{i % 7}", make_turn(f"t{i}", i // 7 + 1))
    await backend.flush()
    await backend.close()
    begins = [sql for sql in statements if sql.strip().upper().startswith("BEGIN")]
    assert backend.stats["rows_inserted"] == 2500
    assert 3 <= backend.stats["commits"] <= 5  # batch_max caps a transaction at 1000 rows
    assert len(begins) == backend.stats["commits"]  # SQLite saw as many transactions


async def test_committed_duplicate_is_ignored_and_counted(tmp_path: Path) -> None:
    backend = await SQLiteBackend.open(tmp_path / "s.db", commit_interval_ms=1)
    await backend.append("s", make_turn("t1", 1, content="first"))
    await backend.flush()
    assert await backend.append("s", make_turn("t1", 1, content="again"))  # cannot tell yet
    await backend.flush()
    assert (backend.stats["rows_inserted"], backend.stats["rows_ignored"]) == (1, 1)
    assert [t.request_messages[0]["content"] for t in await backend.load("s")] == ["first"]
    await backend.close()


async def test_writer_commits_on_its_own(tmp_path: Path) -> None:
    backend = await SQLiteBackend.open(tmp_path / "s.db", commit_interval_ms=10)
    await backend.append("s", make_turn("t1", 1))
    async with asyncio.timeout(5):
        while backend.stats["committed"] < 1:  # noqa: ASYNC110 - polls a counter, no event
            await asyncio.sleep(0.005)
    await backend.close()


async def test_flush_does_not_wait_for_the_commit_interval(tmp_path: Path) -> None:
    backend = await SQLiteBackend.open(tmp_path / "s.db", commit_interval_ms=600_000)
    await backend.append("s", make_turn("t1", 1))
    async with asyncio.timeout(5):  # the interval is ten minutes: flush must cut it short
        await backend.flush()
    assert backend.stats["committed"] == 1
    await backend.close()


async def test_concurrent_appends_and_loads(tmp_path: Path) -> None:
    # A small queue makes appends wait for room: the blocking path is exercised too.
    backend = await SQLiteBackend.open(tmp_path / "s.db", queue_size=64, commit_interval_ms=2)

    async def session_writer(key: str) -> None:
        for seq in range(1, 101):
            await backend.append(key, make_turn(f"t{seq}", seq))
            if seq % 25 == 0:
                assert [t.seq for t in await backend.load(key)] == list(range(1, seq + 1))

    await asyncio.gather(*(session_writer(f"s{n}") for n in range(10)))
    await backend.flush()
    for n in range(10):
        assert [t.seq for t in await backend.load(f"s{n}")] == list(range(1, 101))
    assert backend.stats["rows_inserted"] == 1000
    await backend.close()


async def test_failing_commit_is_retried_and_not_lost(
    failing_backend: SQLiteBackend, tmp_path: Path
) -> None:
    backend = failing_backend
    for seq in range(2, 12):
        await backend.append("s", make_turn(f"t{seq}", seq, content="x" * 5000))
    with pytest.raises(StoreUnavailable, match="full"):
        await backend.flush()
    assert backend.stats["commit_errors"] >= 2  # retried, and the writer is still alive
    assert [t.seq for t in await backend.load("s")] == list(range(1, 12))  # still readable
    await free_disk(backend)
    await backend.flush(timeout_s=5)
    assert backend.stats["rows_inserted"] == 11
    await backend.close()
    reopened = await SQLiteBackend.open(tmp_path / "s.db")
    assert [t.seq for t in await reopened.load("s")] == list(range(1, 12))
    assert await reopened.integrity_check() == []
    await reopened.close()


async def test_full_queue_raises_instead_of_dropping(tmp_path: Path) -> None:
    backend = await SQLiteBackend.open(
        tmp_path / "s.db",
        queue_size=3,
        append_timeout_s=0.05,
        commit_interval_ms=1,
        retry_initial_s=0.01,
    )
    await backend.append("s", make_turn("t1", 1))
    await backend.flush()
    await fill_disk(backend)
    accepted = 1
    with pytest.raises(StoreUnavailable, match="queue full"):
        for seq in range(2, 100):
            await backend.append("s", make_turn(f"t{seq}", seq, content="x" * 5000))
            accepted = seq
            await asyncio.sleep(0.01)  # let the writer take a batch and fail on it
    assert backend.stats["append_timeouts"] == 1
    await free_disk(backend)
    await backend.flush(timeout_s=5)
    assert [t.seq for t in await backend.load("s")] == list(range(1, accepted + 1))
    await backend.close()


async def test_close_reports_what_it_could_not_commit(failing_backend: SQLiteBackend) -> None:
    await failing_backend.append("s", make_turn("t2", 2, content="x" * 5000))
    with pytest.raises(StoreUnavailable):
        await failing_backend.close()
    assert failing_backend.stats["lost_on_close"] == 1


async def test_migrations_are_idempotent_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for seq in (1, 2, 3):
        backend = await SQLiteBackend.open(path)
        await backend.append("s", make_turn(f"t{seq}", seq))
        await backend.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        versions = conn.execute("SELECT version, readable_from FROM schema_version").fetchall()
        assert versions == [(1, 1), (2, 1)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT count(*) FROM turns").fetchone() == (3,)


async def test_a_schema_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    """A file written by the release before documents existed (schema 1) gains the docs
    table on open and keeps its turns."""
    path = tmp_path / "s.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
            " readable_from INTEGER NOT NULL, applied_at REAL NOT NULL)"
        )
        for statement in MIGRATIONS[0].statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 1, 0)")
        record = encode_turn(make_turn("t1", 1))
        conn.execute("INSERT INTO turns VALUES ('s', 1, 't1', 0, ?)", (record,))
    backend = await SQLiteBackend.open(path)
    assert await backend.load("s") == [make_turn("t1", 1)]
    await backend.put_doc("s", "meta", b"new")
    await backend.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (2,)
        assert conn.execute("SELECT data FROM docs").fetchall() == [(b"new",)]


async def test_doc_rewrites_in_one_batch_write_one_row(tmp_path: Path) -> None:
    backend = await SQLiteBackend.open(tmp_path / "s.db", commit_interval_ms=50)
    statements: list[str] = []
    await writer_connection(backend).set_trace_callback(statements.append)
    for version in range(20):
        await backend.put_doc("s", "meta", f"v{version}".encode())
    await backend.flush()
    assert await backend.get_doc("s", "meta") == b"v19"
    await backend.close()
    assert backend.stats["docs_written"] == 20
    assert sum("INTO docs" in sql for sql in statements) == 1  # the last write of the run


async def test_writes_commit_in_queue_order(tmp_path: Path) -> None:
    """Appends, a rewind, a doc write and a delete of another session, all in one batch: the
    rewind sees exactly the appends queued before it."""
    backend = await SQLiteBackend.open(tmp_path / "s.db", commit_interval_ms=600_000)
    statements: list[str] = []
    await writer_connection(backend).set_trace_callback(statements.append)
    await backend.append("s", make_turn("t1", 1))
    await backend.append("s", make_turn("t2", 2))
    await backend.append("x", make_turn("t1", 1))
    await backend.put_doc("x", "meta", b"x")
    rewind = asyncio.create_task(backend.truncate_after("s", 1))
    # The rewind queues itself and wakes the writer, but asyncio runs ready callbacks in FIFO
    # order: this test resumes (and queues the rest) before the writer takes its batch.
    await asyncio.sleep(0)
    await backend.append("s", make_turn("t3", 2))
    await backend.delete("x")  # waits for the commit, which also commits the rewind
    assert await rewind == 1
    assert backend.stats["commits"] == 1
    assert [t.turn_id for t in await backend.load("s")] == ["t1", "t3"]
    assert await backend.load("x") == []
    assert await backend.get_doc("x", "meta") is None
    await backend.close()
    begins = [sql for sql in statements if sql.strip().upper().startswith("BEGIN")]
    assert len(begins) == 1


@pytest.mark.parametrize(("readable_from", "opens"), [(1, True), (3, False)])
async def test_schema_from_a_newer_release(tmp_path: Path, readable_from: int, opens: bool) -> None:
    path = tmp_path / "s.db"
    await (await SQLiteBackend.open(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO schema_version VALUES (3, ?, 0)", (readable_from,))
    if opens:  # an additive migration: this older release keeps working
        backend = await SQLiteBackend.open(path)
        await backend.append("s", make_turn("t1", 1))
        await backend.close()
    else:
        with pytest.raises(StoreError, match="needs a release that reads schema 3"):
            await SQLiteBackend.open(path)


async def test_integrity_check_and_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "s.db"
    backend = await SQLiteBackend.open(path)
    await backend.append("s", make_turn("t1", 1))
    await backend.flush()
    assert await backend.integrity_check() == []
    await backend.close()
    assert path.is_file()


async def test_corrupt_record_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await (await SQLiteBackend.open(path)).close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("INSERT INTO turns VALUES ('s', 1, 't1', 0, x'00ff')")
    backend = await SQLiteBackend.open(path)
    with pytest.raises(StoreError, match="corrupt"):
        await backend.load("s")
    await backend.close()


async def test_closed_backend_refuses(tmp_path: Path) -> None:
    backend = await SQLiteBackend.open(tmp_path / "s.db")
    await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        await backend.append("s", make_turn("t1", 1))
    with pytest.raises(StoreUnavailable):
        await backend.load("s")


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from store import SQLiteBackend
    from tests.store.helpers import make_turn

    async def main():
        backend = await SQLiteBackend.open(Path(sys.argv[1]), commit_interval_ms=20)
        seq = 0
        while True:
            seq += 1
            await backend.append("s", make_turn(f"t{seq}", seq))
            print(seq, flush=True)
            await asyncio.sleep(0.002)

    asyncio.run(main())
    """
)


def test_kill_9_loses_only_the_last_commit_interval(tmp_path: Path) -> None:
    """The durability bound: a row queued more than commit_interval (+ one commit) before a
    kill -9 is on disk. The test allows 0.5 s, 25x the 20 ms interval, to stay robust on a
    loaded machine; what is lost is always a suffix (the queue is committed in order)."""
    path = tmp_path / "s.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    queued: list[tuple[int, float]] = []
    try:
        for line in child.stdout:
            queued.append((int(line), time.monotonic()))
            if queued[-1][1] - queued[0][1] > 1.2:
                break
    finally:
        child.kill()
        killed_at = time.monotonic()
        child.wait()
    assert child.returncode == -9
    with contextlib.closing(sqlite3.connect(path)) as conn:
        seqs = [row[0] for row in conn.execute("SELECT seq FROM turns ORDER BY seq")]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    must_have = max(seq for seq, at in queued if at < killed_at - 0.5)
    assert seqs == list(range(1, len(seqs) + 1))  # a prefix: nothing lost in the middle
    assert len(seqs) >= must_have
