"""SQLite on a really full filesystem: loud failure, no corruption, no loss, recovery.

`test_sqlite.py` simulates a full disk with `PRAGMA max_page_count`; here the filesystem itself
is full. Each test mounts a small tmpfs (root only; when mounting tmpfs is refused, a
loop-mounted ext4 image), fills most of it with a filler file, and puts the database in the
remaining HEADROOM, so commits soon fail with ENOSPC ("database or disk is full"), including
the WAL and its shared-memory index. Deleting the filler frees the space again. The mount is
always unmounted, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from store import (
    SessionStore,
    SQLiteBackend,
    StoreUnavailable,
    Turn,
    Usage,
    decode_turn,
    open_store,
)
from tests.store.helpers import assistant, make_pending, make_turn

pytestmark = pytest.mark.timeout(60)

DISK_BYTES = 2 * 1024 * 1024
HEADROOM = 512 * 1024  # left free for the database, its WAL and its -shm
CONTENT = "x" * 3000  # ~3 KB per turn: the headroom holds a hundred or two
SESSIONS = ("a", "b", "c")
MAX_TURNS = 5000  # the disk must be full long before this


@dataclass
class SmallDisk:
    path: Path  # the mount point
    kind: str  # "tmpfs" or "ext4 loop"
    filler: Path

    def fill(self) -> None:
        """Leave only HEADROOM free (call before creating the database)."""
        stat = os.statvfs(self.path)
        free = stat.f_bavail * stat.f_frsize
        assert free > HEADROOM, f"{self.kind} has only {free} bytes free"
        with open(self.filler, "wb") as handle:
            handle.write(b"\0" * (free - HEADROOM))  # real blocks, not a sparse file
            handle.flush()
            os.fsync(handle.fileno())

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def _unmount(path: Path) -> None:
    for _ in range(20):
        if _run("umount", str(path)).returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)  # a closing connection may still hold a file for a moment
    _run("umount", "-l", str(path))  # detach at least; never leave the mount behind


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    size_kib = DISK_BYTES // 1024
    tmpfs = _run(
        "mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(mount_point)
    )
    kind = "tmpfs"
    if tmpfs.returncode != 0:
        reason = f"`mount -t tmpfs` failed ({tmpfs.stderr.strip() or tmpfs.returncode})"
        if not (shutil.which("mkfs.ext4") and shutil.which("mount")):
            pytest.skip(f"{reason}, and there is no mkfs.ext4 for a loop-mounted image")
        image = tmp_path / "disk.img"
        with open(image, "wb") as handle:
            handle.truncate(4 * DISK_BYTES)  # ext4 needs some room for its own metadata
        mkfs = _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(image))
        loop = _run("mount", "-o", "loop", str(image), str(mount_point))
        if mkfs.returncode != 0 or loop.returncode != 0:
            pytest.skip(
                f"{reason}; ext4 loop mount failed too "
                f"({(mkfs.stderr or loop.stderr).strip() or loop.returncode}): needs root"
            )
        kind = "ext4 loop"
    try:
        yield SmallDisk(mount_point, kind, mount_point / "filler")
    finally:
        _unmount(mount_point)
    assert not os.path.ismount(mount_point)


def rows_on_disk(path: Path) -> tuple[list[str], list[tuple[str, int, str, bytes]]]:
    """(integrity_check, every turn row) through a separate connection, as another process
    would see the file."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        integrity = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
        rows = conn.execute(
            "SELECT session_key, seq, turn_id, record FROM turns ORDER BY session_key, seq"
        ).fetchall()
    return integrity, [(k, s, t, bytes(r)) for k, s, t, r in rows]


def check_rows(rows: list[tuple[str, int, str, bytes]], expected: dict[str, list[Turn]]) -> None:
    """Exactly the expected turns: each once, seqs 1..n per session, records intact."""
    turn_ids = [row[2] for row in rows]
    assert len(turn_ids) == len(set(turn_ids)), "a turn is stored twice"
    for session, turns in expected.items():
        stored = [decode_turn(r[3]) for r in rows if r[0] == session]
        assert [t.seq for t in stored] == list(range(1, len(turns) + 1)), session
        assert stored == turns, f"{session}: stored turns differ from the appended ones"
    assert {row[0] for row in rows} <= set(expected)


async def test_backend_on_a_full_disk_fails_loudly_then_commits_everything(
    small_disk: SmallDisk,
) -> None:
    small_disk.fill()
    db = small_disk.path / "sessions.db"
    backend = await SQLiteBackend.open(
        db,
        commit_interval_ms=5,
        queue_size=200,
        retry_initial_s=0.01,
        retry_max_s=0.1,
        flush_timeout_s=0.5,
        append_timeout_s=0.2,
    )
    accepted: dict[str, list[Turn]] = {s: [] for s in SESSIONS}
    order: list[tuple[str, Turn]] = []  # every accepted append, in queue order
    try:

        async def append(n: int) -> None:
            session = SESSIONS[n % len(SESSIONS)]
            turn = make_turn(f"t{n}", len(accepted[session]) + 1, content=f"{n} {CONTENT}")
            await backend.append(session, turn)
            accepted[session].append(turn)
            order.append((session, turn))

        # 1. Append and flush until a commit fails for want of space.
        failure: StoreUnavailable | None = None
        for n in range(MAX_TURNS):
            await append(n)
            if n % 10 == 9:
                try:
                    await backend.flush()
                except StoreUnavailable as exc:
                    failure = exc
                    break
        assert failure is not None, f"{small_disk.kind} never filled up"
        message = str(failure)
        assert "database or disk is full" in message and str(db) in message, message
        stats = backend.stats
        assert stats["commit_errors"] >= 1 and stats["queued"] > 0, stats

        # 2. What was committed before is on disk, whole, and the file is sound.
        integrity, committed_rows = rows_on_disk(db)
        assert integrity == ["ok"], integrity
        assert len(committed_rows) == stats["committed"] == stats["rows_inserted"]
        committed: dict[str, list[Turn]] = {s: [] for s in SESSIONS}
        for session, turn in order[: len(committed_rows)]:  # the queue is FIFO
            committed[session].append(turn)
        check_rows(committed_rows, committed)

        # 3. The writer keeps retrying, and reads still see every accepted turn.
        errors = stats["commit_errors"]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while backend.stats["commit_errors"] <= errors + 2:  # noqa: ASYNC110 - a counter
                    await asyncio.sleep(0.02)
        assert backend.stats["commit_errors"] > errors + 2, "the writer stopped retrying"
        for session in SESSIONS:
            assert await backend.load(session) == accepted[session]

        # 4. Once the queue is full too, appends fail loudly (counted), nothing is dropped.
        refused: StoreUnavailable | None = None
        for extra in range(n + 1, n + 1 + 10 * 200):
            try:
                await append(extra)
            except StoreUnavailable as exc:
                refused = exc
                break
        assert refused is not None, "appends never reported the full queue"
        assert "queue full" in str(refused) and "database or disk is full" in str(refused)
        assert backend.stats["append_timeouts"] == 1
        assert await backend.integrity_check() == []
        integrity, rows_while_full = rows_on_disk(db)
        assert integrity == ["ok"] and rows_while_full == committed_rows

        # 5. Space again: everything queued is committed, exactly once.
        small_disk.free()
        await backend.flush(timeout_s=10)
        stats = backend.stats
        total = sum(len(turns) for turns in accepted.values())
        assert stats["queued"] == 0 and stats["committed"] == stats["enqueued"] == total
        assert (stats["rows_inserted"], stats["rows_ignored"]) == (total, 0), stats
        print(
            f"\n[full disk] {small_disk.kind}: first failure after {len(committed_rows)} "
            f"committed turns, {total} accepted in all, {stats['commit_errors']} failed "
            f"commits retried, all committed once space was freed"
        )
    finally:
        small_disk.free()
        with contextlib.suppress(StoreUnavailable):
            await backend.close()

    integrity, rows = rows_on_disk(db)
    assert integrity == ["ok"], integrity
    check_rows(rows, accepted)
    reopened = await SQLiteBackend.open(db)
    try:
        for session in SESSIONS:
            assert await reopened.load(session) == accepted[session]
        assert await reopened.integrity_check() == []
    finally:
        await reopened.close()


async def test_session_store_on_a_full_disk_keeps_every_completed_turn(
    small_disk: SmallDisk,
) -> None:
    """The gateway's path: open_store, complete_turn (never blocks), the store's writer,
    the cold tier's group commit. A full disk must not cost a single completed turn."""
    small_disk.fill()
    db = small_disk.path / "sessions.db"
    store = await open_store(db, commit_interval_ms=5)
    completed: dict[str, list[str]] = {s: [] for s in SESSIONS}
    try:
        failure: StoreUnavailable | None = None
        for n in range(MAX_TURNS):
            session = SESSIONS[n % len(SESSIONS)]
            turn_id = f"t{n}"
            store.begin_turn(make_pending(turn_id, session, content=f"{n} {CONTENT}"))
            assert store.complete_turn(turn_id, assistant(f"reply {n}"), "stop", Usage(3, 1))
            completed[session].append(turn_id)
            if n % 10 == 9:
                try:
                    await store.flush(timeout_s=2)
                except StoreUnavailable as exc:
                    failure = exc
                    break
        assert failure is not None, f"{small_disk.kind} never filled up"
        assert "database or disk is full" in str(failure), failure
        stats = store.stats
        assert stats["cold_commit_errors"] >= 1, stats
        assert stats["dropped"] == 0 and stats["write_errors"] == 0, stats
        for session in SESSIONS:  # served from the hot tier meanwhile
            history = await store.history(session)
            assert [t.turn_id for t in history] == completed[session]

        integrity, _ = rows_on_disk(db)
        assert integrity == ["ok"], integrity

        small_disk.free()
        await store.flush(timeout_s=10)
        stats = store.stats
        assert stats["cold_queued"] == 0 and stats["completed"] == sum(map(len, completed.values()))
    finally:
        small_disk.free()
        with contextlib.suppress(StoreUnavailable):
            await store.close()

    integrity, rows = rows_on_disk(db)
    assert integrity == ["ok"], integrity
    assert len({row[2] for row in rows}) == len(rows), "a turn is stored twice"
    reopened: SessionStore = await open_store(db)
    try:
        for session in SESSIONS:
            history = await reopened.history(session)
            assert [t.turn_id for t in history] == completed[session]
            assert [t.seq for t in history] == list(range(1, len(completed[session]) + 1))
            info = await reopened.session_info(session)
            assert info.meta.turns == len(completed[session])  # the documents made it too
    finally:
        await reopened.close()


async def test_session_store_flush_timeout_bounds_the_wait_on_a_full_disk(
    small_disk: SmallDisk,
) -> None:
    """`flush(timeout_s)` bounds the whole wait, the cold tier's commit included (it used to
    wait for the cold tier's own 5 s flush timeout on top), and names the cause."""
    small_disk.fill()
    store = await open_store(small_disk.path / "sessions.db", commit_interval_ms=5)
    try:
        for n in range(2 * HEADROOM // len(CONTENT)):  # twice what the headroom holds
            store.begin_turn(make_pending(f"t{n}", "s", content=f"{n} {CONTENT}"))
            assert store.complete_turn(f"t{n}", assistant("r"), "stop")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="full"):
            await store.flush(timeout_s=0.5)
        waited = time.monotonic() - started
        assert waited < 2.0, f"flush(timeout_s=0.5) raised after {waited:.1f} s"
    finally:
        small_disk.free()
        with contextlib.suppress(StoreUnavailable):
            await store.close()
