"""`sessiongate bench store`: what the tiered session store costs, per tier (issue 3).

Everything is measured on sessions of 100 messages: 50 turns of one user and one assistant
message, each turn also carrying the request's system message (as rewrite records it).

- `load` of a whole session from each backend: memory, Redis (`snapshot`), SQLite, PostgreSQL.
- Append throughput per backend: memory, Redis `append_next` (one task, then 16 concurrent tasks
  over distinct sessions), SQLite and PostgreSQL group commit (N turns across 50 sessions, then
  `flush`). Rates are messages/s with 1 turn = 2 messages; p50/p99 are per `append` call
  (for the group-commit tiers that is the enqueue; the rate includes the final flush).
- `SessionStore.history`, the read rewrite does on every request: hot hit with the memory tier
  only, and with Redis configured, where a hot hit still costs one version check (the price of
  coherence across replicas); warm hit (hot empty, Redis has the session); cold hit (hot empty,
  Redis copy evicted: cold load + Redis refill), over SQLite and over PostgreSQL.
- Baselines from the same run (Redis PING, PostgreSQL and SQLite `SELECT 1`, the codec and the
  hot tier's `put_session` alone), so the figures also read as ratios.

Targets (issue 3, on a 2-core machine): hot hit p99 < 50 µs, warm hit p99 < 1 ms, cold group
commit >= 20,000 messages/s. A missed target prints MISS; nothing is retried or discarded, the
garbage collector stays on, and every read is checked to have taken the path it is named after.

Isolation: a unique Redis key prefix (its keys are deleted afterwards, and carry a 10-minute TTL
should the run be killed), a unique PostgreSQL schema (dropped afterwards), a SQLite file of its
own (removed afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiosqlite
import asyncpg
import orjson
import redis
import uvloop
from redis.utils import HIREDIS_AVAILABLE

from extproc.bench import tables
from extproc.bench.tables import duration, percentile
from store import (
    MemoryBackend,
    NeedsFloor,
    PostgresBackend,
    RedisBackend,
    SessionStore,
    SQLiteBackend,
    Stored,
    Turn,
    Usage,
    WarmBackend,
    decode_turn,
    encode_turn,
)

__all__ = [
    "DEFAULT_POSTGRES_DSN",
    "DEFAULT_REDIS_URL",
    "ROW_IDS",
    "Row",
    "add_arguments",
    "run",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
FULL_ITERATIONS = 2000
FULL_APPENDS = 20_000
QUICK_ITERATIONS = 100
QUICK_APPENDS = 1_000

HISTORY_TURNS = 50  # = 100 messages
READ_SESSIONS = 16  # the read rows rotate over this many sessions of the same shape
APPEND_SESSIONS = 50
CONCURRENCY = 16
MESSAGES_PER_TURN = 2  # user + assistant (the system message is not counted)
KEY_TTL_S = 600  # Redis keys outlive a killed run by at most this long
HOT_MAX_BYTES = 1 << 30  # no eviction during the benchmark

HOT_TARGET_US = 50.0
WARM_TARGET_US = 1000.0
COLD_COMMIT_TARGET = 20_000.0  # messages/s

# Every row the benchmark reports, in the order it reports them.
ROW_IDS = (
    "baseline.redis_ping",
    "baseline.postgres_select1",
    "baseline.sqlite_select1",
    "load.memory",
    "load.redis",
    "load.sqlite",
    "load.postgres",
    "append.memory",
    "append.redis.seq",
    "append.redis.c16",
    "append.sqlite.group",
    "append.postgres.group",
    "history.hot.memory",
    "history.hot.redis",
    "history.warm",
    "history.cold.sqlite",
    "history.cold.postgres",
    "cpu.decode50",
    "cpu.encode50",
    "cpu.put_session50",
)

_RATE_FOOTNOTE = "msg/s: 1 turn = 2 messages (user + assistant)"
_SYSTEM = {
    "role": "system",
    "content": (
        "You are a concise, friendly assistant for an online bookshop. Answer questions about "
        "orders, deliveries and returns; never invent order numbers; ask before cancelling."
    ),
}
_FILLER = (
    "The order left the warehouse on Tuesday and the carrier expects to deliver it within "
    "three working days; a café in Zürich once waited nine. Returns are free for thirty days, "
    "and refunds reach the original payment method about five days after we receive the item. "
)


class BenchError(Exception):
    """A measurement could not run, or did not take the path it is named after."""


# --- results ----------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    """One measurement. Latencies in microseconds over `samples` timed calls; `rate` is per
    second in `rate_unit` (for latency rows: 1e6 / mean, one task calling back to back)."""

    id: str
    label: str
    samples: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float
    rate: float
    rate_unit: str
    target: str = ""
    status: str = ""  # PASS, MISS, or "" when there is no target
    baseline: str = ""  # the row this one is compared with
    vs_baseline: float | None = None  # p50 / the baseline's p50
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def _row(
    row_id: str,
    label: str,
    samples_ns: Sequence[int],
    *,
    rate: float | None = None,
    rate_unit: str = "ops/s",
    p99_target_us: float | None = None,
    rate_target: float | None = None,
    note: str = "",
    extra: dict[str, float] | None = None,
) -> Row:
    if not samples_ns:
        raise BenchError(f"{row_id}: no samples")
    ordered = sorted(samples_ns)
    mean_ns = sum(ordered) / len(ordered)
    row = Row(
        id=row_id,
        label=label,
        samples=len(ordered),
        p50_us=percentile(ordered, 0.50) / 1000,
        p99_us=percentile(ordered, 0.99) / 1000,
        mean_us=mean_ns / 1000,
        max_us=ordered[-1] / 1000,
        rate=rate if rate is not None else 1e9 / max(mean_ns, 1.0),
        rate_unit=rate_unit,
        note=note,
        extra=dict(extra or {}),
    )
    if p99_target_us is not None:
        row.target = f"p99 < {duration(p99_target_us)}"
        row.status = "PASS" if row.p99_us < p99_target_us else "MISS"
    elif rate_target is not None:
        row.target = f">= {rate_target:,.0f} {rate_unit}"
        row.status = "PASS" if row.rate >= rate_target else "MISS"
    return row


_COLUMNS = (
    ("name", 51, "<"),
    ("n", 6, ">"),
    ("p50", 10, ">"),
    ("p99", 10, ">"),
    ("mean", 10, ">"),
    ("rate", 20, ">"),
    ("vs base", 14, ">"),
    ("target", 17, ">"),
    ("result", 6, ">"),
)


def _format_line(cells: Sequence[str]) -> str:
    return tables.line(cells, _COLUMNS)


def _format_row(row: Row, baseline_labels: dict[str, str]) -> str:
    vs = ""
    if row.vs_baseline is not None:
        vs = f"x{row.vs_baseline:.1f} {baseline_labels.get(row.baseline, row.baseline)}"
    return _format_line(
        (
            row.label,
            str(row.samples),
            duration(row.p50_us),
            duration(row.p99_us),
            duration(row.mean_us),
            f"{row.rate:,.0f} {row.rate_unit}",
            vs,
            row.target or "-",
            row.status or "-",
        )
    )


# --- options ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    redis_url: str
    postgres_dsn: str
    sqlite_dir: Path | None
    iterations: int
    warmup: int
    appends: int
    quick: bool
    json_path: Path | None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the store benchmark's options to a (sub)parser."""
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help=f"Redis (default {DEFAULT_REDIS_URL})"
    )
    parser.add_argument(
        "--postgres-dsn",
        default=DEFAULT_POSTGRES_DSN,
        help=f"PostgreSQL (default {DEFAULT_POSTGRES_DSN})",
    )
    parser.add_argument(
        "--sqlite-dir",
        type=Path,
        default=None,
        help="directory for the SQLite file (default: a temporary directory)",
    )
    parser.add_argument(
        "--iterations",
        type=_positive,
        default=None,
        help=f"timed calls per latency row (default {FULL_ITERATIONS}, {QUICK_ITERATIONS} "
        "with --quick); plus a tenth as untimed warm-up",
    )
    parser.add_argument(
        "--appends",
        type=_positive,
        default=None,
        help=f"turns per append-throughput row (default {FULL_APPENDS:,}, {QUICK_APPENDS:,} "
        "with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts (a smoke test, not a measurement)"
    )
    parser.add_argument(
        "--json", dest="json_path", type=Path, default=None, help="also write the results here"
    )


def _options(args: argparse.Namespace) -> Options:
    quick = bool(args.quick)
    iterations = args.iterations or (QUICK_ITERATIONS if quick else FULL_ITERATIONS)
    appends = args.appends or (QUICK_APPENDS if quick else FULL_APPENDS)
    return Options(
        redis_url=args.redis_url,
        postgres_dsn=args.postgres_dsn,
        sqlite_dir=args.sqlite_dir,
        iterations=iterations,
        warmup=min(200, max(10, iterations // 10)),
        appends=max(appends, CONCURRENCY),
        quick=quick,
        json_path=args.json_path,
    )


def run(args: argparse.Namespace) -> int:
    """Run every measurement, print the table (and write `--json`). 0 when every measurement
    ran (missed targets are reported as MISS, not as a failure), 1 when one could not run."""
    options = _options(args)
    status: int = uvloop.run(_main(options))
    return status


# --- workload ---------------------------------------------------------------------------


def _text(kind: str, index: int, size: int) -> str:
    head = f"{kind} {index}: "
    body = _FILLER * (size // len(_FILLER) + 1)
    return (head + body)[:size]


def _session_key() -> str:
    """The shape extproc mints: an HMAC-SHA256 hex digest."""
    return uuid.uuid4().hex + uuid.uuid4().hex


def _turn(index: int, seq: int) -> Turn:
    return Turn(
        turn_id=uuid.uuid4().hex,
        request_messages=({"role": "user", "content": _text("question", index, 300)},),
        response_message={"role": "assistant", "content": _text("answer", index, 900)},
        system_messages=(_SYSTEM,),
        model="gpt-4o-mini",
        finish_reason="stop",
        usage=Usage(prompt_tokens=150 + 40 * index, completion_tokens=220),
        created_at=1_750_000_000.0 + index,
        seq=seq,
    )


def _history() -> list[Turn]:
    return [_turn(index, index + 1) for index in range(HISTORY_TURNS)]


class _AppendTurns:
    """Turns for an append run: fresh turn ids, messages shared (building them is not timed)."""

    def __init__(self) -> None:
        self._templates = _history()

    def make(self, count: int, sessions: int, seq_offset: int = 0) -> list[Turn]:
        """`count` turns for round-robin over `sessions` sessions: turn i goes to session
        i % sessions with seq i // sessions + 1 + seq_offset."""
        return [
            replace(
                self._templates[i % HISTORY_TURNS],
                turn_id=uuid.uuid4().hex,
                seq=i // sessions + 1 + seq_offset,
            )
            for i in range(count)
        ]


# --- timing -----------------------------------------------------------------------------

Call = Callable[[int], Awaitable[object]]


async def _time_calls(
    call: Call, iterations: int, warmup: int, before: Call | None = None
) -> list[int]:
    """Nanoseconds of each timed `await call(i)`; `before(i)` runs untimed ahead of each."""
    clock = time.perf_counter_ns
    for i in range(warmup):
        if before is not None:
            await before(i)
        await call(i)
    samples = [0] * iterations
    for i in range(iterations):
        if before is not None:
            await before(i)
        start = clock()
        await call(i)
        samples[i] = clock() - start
    return samples


async def _nothing(_: int) -> None:
    return None


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise BenchError(what)


# --- the run ----------------------------------------------------------------------------


class _Bench:
    def __init__(self, options: Options, sqlite_path: Path) -> None:
        self.options = options
        self.sqlite_path = sqlite_path
        tag = uuid.uuid4().hex[:12]
        self.redis_prefix = f"sgbench:{tag}"
        self.pg_schema = f"sgbench_{tag}"
        self.rows: list[Row] = []
        # Server versions and the timing harness's own cost, for the JSON's "machine".
        self.machine_extra: dict[str, Any] = {}
        self.read_keys = [_session_key() for _ in range(READ_SESSIONS)]
        self.read_sessions = {key: _history() for key in self.read_keys}
        self.append_turns = _AppendTurns()
        self.printed_header = False
        self.step = "starting"  # what was running, for the error message

    # --- output ---

    def add(self, row: Row, baseline: str = "") -> None:
        if baseline:
            base = next(r for r in self.rows if r.id == baseline)
            row.baseline = baseline
            row.vs_baseline = row.p50_us / base.p50_us if base.p50_us > 0 else None
        self.rows.append(row)
        if not self.printed_header:
            header = _format_line([name for name, _, _ in _COLUMNS])
            print(header)
            print("-" * len(header))
            self.printed_header = True
        print(_format_row(row, _BASELINE_NAMES), flush=True)

    def _redis(self) -> RedisBackend:
        return RedisBackend.from_url(
            self.options.redis_url, prefix=self.redis_prefix, ttl_s=KEY_TTL_S
        )

    def _key_of(self, i: int) -> str:
        return self.read_keys[i % READ_SESSIONS]

    # --- baselines ---

    async def baselines(self, warm: RedisBackend, pg_pool: asyncpg.Pool) -> None:
        n, w = self.options.iterations, self.options.warmup

        async def ping(_: int) -> object:
            return await warm.client.ping()

        self.add(_row("baseline.redis_ping", "baseline: redis PING", await _time_calls(ping, n, w)))

        async def select1(_: int) -> object:
            return await pg_pool.fetchval("SELECT 1")

        self.add(
            _row(
                "baseline.postgres_select1",
                "baseline: postgres SELECT 1 (pool)",
                await _time_calls(select1, n, w),
            )
        )
        conn = await aiosqlite.connect(self.sqlite_path)
        try:

            async def sqlite_select1(_: int) -> object:
                return await conn.execute_fetchall("SELECT 1")

            self.add(
                _row(
                    "baseline.sqlite_select1",
                    "baseline: sqlite SELECT 1 (aiosqlite)",
                    await _time_calls(sqlite_select1, n, w),
                )
            )
        finally:
            await conn.close()

    # --- load of a 100-message session, per backend ---

    async def loads(
        self, warm: RedisBackend, sqlite: SQLiteBackend, postgres: PostgresBackend
    ) -> None:
        n, w = self.options.iterations, self.options.warmup
        memory = MemoryBackend(HOT_MAX_BYTES)
        for key, turns in self.read_sessions.items():
            memory.put_session(key, turns)
            _expect(await warm.fill(key, turns) is not None, "redis already had a read session")
            for turn in turns:
                await sqlite.append(key, turn)
                await postgres.append(key, turn)
        await sqlite.flush()
        await postgres.flush()

        async def load_memory(i: int) -> object:
            return await memory.load(self._key_of(i))

        async def load_redis(i: int) -> object:
            return await warm.snapshot(self._key_of(i))

        async def load_sqlite(i: int) -> object:
            return await sqlite.load(self._key_of(i))

        async def load_postgres(i: int) -> object:
            return await postgres.load(self._key_of(i))

        for key in self.read_keys:  # every backend holds the whole session
            snapshot = await warm.snapshot(key)
            _expect(
                snapshot is not None and len(snapshot.turns) == HISTORY_TURNS,
                "redis snapshot is not the 50-turn session",
            )
            for backend in (memory, sqlite, postgres):
                got = await backend.load(key)
                _expect(len(got) == HISTORY_TURNS, f"{type(backend).__name__} load is short")

        self.add(_row("load.memory", "load 100 msgs: memory", await _time_calls(load_memory, n, w)))
        self.add(
            _row(
                "load.redis",
                "load 100 msgs: redis snapshot",
                await _time_calls(load_redis, n, w),
            ),
            "baseline.redis_ping",
        )
        self.add(
            _row("load.sqlite", "load 100 msgs: sqlite", await _time_calls(load_sqlite, n, w)),
            "baseline.sqlite_select1",
        )
        self.add(
            _row(
                "load.postgres",
                "load 100 msgs: postgres",
                await _time_calls(load_postgres, n, w),
            ),
            "baseline.postgres_select1",
        )
        await memory.close()

    # --- append throughput, per backend ---

    def _append_row(
        self,
        row_id: str,
        label: str,
        samples: list[int],
        elapsed_ns: int,
        cpu_ns: int,
        *,
        target: float | None = None,
        note: str = "",
        extra: dict[str, float] | None = None,
    ) -> Row:
        turns_per_s = len(samples) / (elapsed_ns / 1e9)
        return _row(
            row_id,
            label,
            samples,
            rate=turns_per_s * MESSAGES_PER_TURN,
            rate_unit="msg/s",
            rate_target=target,
            note=note,
            extra={
                "turns_per_s": turns_per_s,
                "elapsed_s": elapsed_ns / 1e9,
                # This process's CPU time over the wall time: near 1 (or above, with threads),
                # the client side is what limits the rate.
                "client_cpu_share": cpu_ns / max(elapsed_ns, 1),
                **(extra or {}),
            },
        )

    async def append_memory(self) -> None:
        count = self.options.appends
        memory = MemoryBackend(HOT_MAX_BYTES)
        keys = [_session_key() for _ in range(APPEND_SESSIONS)]
        for turn in self.append_turns.make(self.options.warmup, APPEND_SESSIONS):
            await memory.append(_session_key(), turn)
        turns = self.append_turns.make(count, APPEND_SESSIONS)
        clock = time.perf_counter_ns
        samples = [0] * count
        cpu_start = time.process_time_ns()
        start = clock()
        for i, turn in enumerate(turns):
            began = clock()
            _expect(await memory.append(keys[i % APPEND_SESSIONS], turn), "memory append refused")
            samples[i] = clock() - began
        elapsed = clock() - start
        cpu = time.process_time_ns() - cpu_start
        await memory.close()
        self.add(
            self._append_row(
                "append.memory",
                "append [msg/s, turn=2 msgs]: memory",
                samples,
                elapsed,
                cpu,
            )
        )

    async def _append_next(self, warm: RedisBackend, key: str, turn: Turn) -> None:
        result = await warm.append_next(key, turn)
        if isinstance(result, NeedsFloor):  # a new session: the cold tier would say 0
            result = await warm.append_next(key, turn, 0)
        _expect(isinstance(result, Stored), f"redis append_next returned {result!r}")

    async def append_redis(self, warm: RedisBackend) -> None:
        count = self.options.appends
        clock = time.perf_counter_ns
        # One task, round-robin over 50 sessions (created during the warm-up).
        keys = [_session_key() for _ in range(APPEND_SESSIONS)]
        warmup = self.append_turns.make(max(self.options.warmup, APPEND_SESSIONS), APPEND_SESSIONS)
        for i, turn in enumerate(warmup):
            await self._append_next(warm, keys[i % APPEND_SESSIONS], turn)
        turns = self.append_turns.make(count, APPEND_SESSIONS)
        samples = [0] * count
        cpu_start = time.process_time_ns()
        start = clock()
        for i, turn in enumerate(turns):
            began = clock()
            result = await warm.append_next(keys[i % APPEND_SESSIONS], turn)
            samples[i] = clock() - began
            _expect(isinstance(result, Stored), f"redis append_next returned {result!r}")
        elapsed = clock() - start
        cpu = time.process_time_ns() - cpu_start
        self.add(
            self._append_row(
                "append.redis.seq",
                "append [msg/s, turn=2 msgs]: redis, 1 task",
                samples,
                elapsed,
                cpu,
            ),
            "baseline.redis_ping",
        )

        # 16 tasks, each on its own session.
        per_task = count // CONCURRENCY
        task_keys = [_session_key() for _ in range(CONCURRENCY)]
        for key, turn in zip(
            task_keys, self.append_turns.make(CONCURRENCY, CONCURRENCY), strict=True
        ):
            await self._append_next(warm, key, turn)
        batches = [self.append_turns.make(per_task, 1, seq_offset=1) for _ in task_keys]
        all_samples: list[list[int]] = [[] for _ in task_keys]

        async def worker(index: int) -> None:
            key, mine = task_keys[index], all_samples[index]
            for turn in batches[index]:
                began = clock()
                result = await warm.append_next(key, turn)
                mine.append(clock() - began)
                _expect(isinstance(result, Stored), f"redis append_next returned {result!r}")

        cpu_start = time.process_time_ns()
        start = clock()
        await asyncio.gather(*(worker(index) for index in range(CONCURRENCY)))
        elapsed = clock() - start
        cpu = time.process_time_ns() - cpu_start
        self.add(
            self._append_row(
                "append.redis.c16",
                f"append [msg/s, turn=2 msgs]: redis, {CONCURRENCY} tasks",
                [sample for samples in all_samples for sample in samples],
                elapsed,
                cpu,
                note="p50/p99: one append_next call while 16 are in flight",
            ),
            "baseline.redis_ping",
        )

    async def group_commit(
        self, row_id: str, name: str, backend: SQLiteBackend | PostgresBackend
    ) -> None:
        count = self.options.appends
        clock = time.perf_counter_ns
        warm_keys = [_session_key() for _ in range(APPEND_SESSIONS)]
        for i, turn in enumerate(
            self.append_turns.make(max(500, self.options.warmup), APPEND_SESSIONS)
        ):
            await backend.append(warm_keys[i % APPEND_SESSIONS], turn)
        await backend.flush()
        keys = [_session_key() for _ in range(APPEND_SESSIONS)]
        turns = self.append_turns.make(count, APPEND_SESSIONS)
        before = backend.stats
        samples = [0] * count
        cpu_start = time.process_time_ns()
        start = clock()
        for i, turn in enumerate(turns):
            began = clock()
            await backend.append(keys[i % APPEND_SESSIONS], turn)
            samples[i] = clock() - began
        await backend.flush()
        elapsed = clock() - start
        cpu = time.process_time_ns() - cpu_start
        after = backend.stats
        inserted = after["rows_inserted"] - before["rows_inserted"]
        commits = after["commits"] - before["commits"]
        _expect(inserted == count, f"{name}: {inserted} of {count} turns committed")
        self.add(
            self._append_row(
                row_id,
                f"append [msg/s, turn=2 msgs]: {name} group commit",
                samples,
                elapsed,
                cpu,
                target=COLD_COMMIT_TARGET,
                note="p50/p99: one append (enqueue); rate: from the first append to flush done",
                extra={"commits": float(commits), "turns_per_commit": count / max(commits, 1)},
            )
        )

    # --- tiered reads ---

    async def history_hot_memory(self) -> None:
        n, w = self.options.iterations, self.options.warmup
        store = SessionStore(MemoryBackend(HOT_MAX_BYTES), None)
        await store.start()
        try:
            for key, turns in self.read_sessions.items():
                store.hot.put_session(key, turns)
            hits = store.hot.stats["hits"]

            async def read(i: int) -> object:
                return await store.history(self._key_of(i))

            samples = await _time_calls(read, n, w)
            _expect(store.hot.stats["hits"] - hits == n + w, "memory-only reads missed hot")
        finally:
            await store.close()
        self.add(
            _row(
                "history.hot.memory",
                "history: hot hit, memory only",
                samples,
                p99_target_us=HOT_TARGET_US,
            )
        )

    async def _tiered(self, cold: SQLiteBackend | PostgresBackend) -> SessionStore:
        warm = self._redis()
        store = SessionStore(MemoryBackend(HOT_MAX_BYTES), cold, warm=warm)
        try:
            await store.start()
            deadline = time.monotonic() + 5
            # Subscribed first: the (re)connect flushes hot versions, which would turn a timed
            # hot read into a warm one.
            while warm.stats["subscription_connects"] < 1:
                _expect(time.monotonic() < deadline, "redis invalidation subscription not up")
                await asyncio.sleep(0.01)
        except BaseException:
            await store.close()  # closes warm and cold too
            raise
        return store

    async def history_via_sqlite(self) -> None:
        n, w = self.options.iterations, self.options.warmup
        store = await self._tiered(await SQLiteBackend.open(self.sqlite_path))
        try:
            assert store.warm is not None
            warm = store.warm

            async def read(i: int) -> object:
                return await store.history(self._key_of(i))

            # Hot hit with Redis configured, read as rewrite reads it: the pending-marker check
            # and the version check in one round trip, then the hot copy.
            async def read_as_rewrite(i: int) -> object:
                waited, turns = await store.history_after_pending(self._key_of(i), 1.0)
                return turns if waited else None

            for key in self.read_keys:
                _expect(len(await store.history(key)) == HISTORY_TURNS, "tiered read is short")
            stats = store.stats
            samples = await _time_calls(read_as_rewrite, n, w)
            after = store.stats
            _expect(
                after["warm_hits"] == stats["warm_hits"]
                and after["promotions"] == stats["promotions"]
                and after["hot_hits"] - stats["hot_hits"] == n + w,
                "hot reads with redis left the hot tier",
            )
            self.add(
                _row(
                    "history.hot.redis",
                    "history: hot hit, redis configured (1 round trip)",
                    samples,
                    note="rewrite's read: pending markers + version in one Redis call (the "
                    "read-your-writes check it needs anyway), then the hot copy; no target: "
                    "the hot-hit target is the hot tier's own (row above)",
                ),
                "baseline.redis_ping",
            )

            # Warm hit: hot empty, Redis has the session.
            async def drop_hot(i: int) -> None:
                await store.hot.delete(self._key_of(i))

            stats = store.stats
            samples = await _time_calls(read, n, w, before=drop_hot)
            after = store.stats
            _expect(
                after["warm_hits"] - stats["warm_hits"] == n + w
                and after["warm_refills"] == stats["warm_refills"],
                "warm reads did not all hit redis",
            )
            self.add(
                _row(
                    "history.warm",
                    "history: warm hit (hot empty)",
                    samples,
                    p99_target_us=WARM_TARGET_US,
                    note="version HGET + snapshot + decode + hot put_session",
                ),
                "baseline.redis_ping",
            )
            await self._history_cold(store, warm, "history.cold.sqlite", "sqlite")
        finally:
            await store.close()

    async def history_via_postgres(self) -> None:
        cold = await PostgresBackend.open(self.options.postgres_dsn, schema=self.pg_schema)
        store = await self._tiered(cold)
        try:
            assert store.warm is not None
            await self._history_cold(store, store.warm, "history.cold.postgres", "postgres")
        finally:
            await store.close()

    async def _history_cold(
        self, store: SessionStore, warm: WarmBackend, row_id: str, name: str
    ) -> None:
        """Hot empty and the Redis copy evicted: cold load, Redis refill, hot fill."""
        n, w = self.options.iterations, self.options.warmup

        async def read(i: int) -> object:
            return await store.history(self._key_of(i))

        async def evict(i: int) -> None:
            key = self._key_of(i)
            await warm.evict(key)
            await store.hot.delete(key)

        stats = store.stats
        samples = await _time_calls(read, n, w, before=evict)
        after = store.stats
        _expect(
            after["warm_refills"] - stats["warm_refills"] == n + w
            and after["warm_hits"] == stats["warm_hits"],
            f"cold reads over {name} did not all refill redis",
        )
        for key in self.read_keys:
            _expect(len(await store.history(key)) == HISTORY_TURNS, f"{name} read is short")
        self.add(
            _row(
                row_id,
                f"history: cold hit, {name} (redis evicted)",
                samples,
                note="version HGET + snapshot (miss) + cold load + redis fill + hot put_session",
            ),
            "baseline.redis_ping",
        )

    # --- CPU-only parts of a read, to see where the time goes ---

    async def cpu(self) -> None:
        n, w = self.options.iterations, self.options.warmup
        turns = self.read_sessions[self.read_keys[0]]
        records = [encode_turn(turn) for turn in turns]
        memory = MemoryBackend(HOT_MAX_BYTES)

        async def decode(_: int) -> object:
            return [decode_turn(record) for record in records]

        async def encode(_: int) -> object:
            return [encode_turn(turn) for turn in turns]

        async def put_session(_: int) -> None:
            memory.put_session("k", turns)

        self.add(_row("cpu.decode50", "cpu: decode 50 records", await _time_calls(decode, n, w)))
        self.add(_row("cpu.encode50", "cpu: encode 50 turns", await _time_calls(encode, n, w)))
        self.add(
            _row(
                "cpu.put_session50",
                "cpu: hot put_session 50 turns",
                await _time_calls(put_session, n, w),
                note="sizes each turn by encoding it",
            )
        )
        await memory.close()

    # --- cleanup ---

    async def cleanup(self) -> dict[str, Any]:
        """Delete our Redis keys and drop our schema; report what is left."""
        report: dict[str, Any] = {}
        admin = self._redis()
        try:
            client = admin.client
            pattern = f"{self.redis_prefix}:*"
            keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
            for key in keys:  # one by one: keys of different sessions may be in other slots
                await client.unlink(key)
            report["redis_keys_deleted"] = len(keys)
            report["redis_keys_left"] = len(
                [key async for key in client.scan_iter(match=pattern, count=1000)]
            )
        except Exception as exc:
            report["redis_error"] = f"{type(exc).__name__}: {exc}"
        finally:
            await admin.close()
        try:
            conn = await asyncpg.connect(self.options.postgres_dsn, timeout=5)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.pg_schema}" CASCADE')
                report["postgres_schema_dropped"] = not await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                    self.pg_schema,
                )
            finally:
                await conn.close()
        except Exception as exc:
            report["postgres_error"] = f"{type(exc).__name__}: {exc}"
        return report


_BASELINE_NAMES = {
    "baseline.redis_ping": "PING",
    "baseline.postgres_select1": "SELECT 1",
    "baseline.sqlite_select1": "SELECT 1",
}


def _where(url: str) -> str:
    """host:port of a URL or DSN, never its credentials."""
    parts = urlsplit(url)
    try:
        return f"{parts.hostname or 'localhost'}:{parts.port or ''}".rstrip(":")
    except ValueError:  # several hosts (cluster, sentinel): name the scheme only
        return f"{parts.scheme}://..."


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _machine() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "uvloop": str(getattr(uvloop, "__version__", "")),
        "sqlite": sqlite3.sqlite_version,
        "redis_py": redis.__version__,
        # redis-py parses replies in C with hiredis, else in Python (a 50-turn snapshot is
        # ~100 reply elements: this shows in the Redis rows).
        "redis_parser": "hiredis" if HIREDIS_AVAILABLE else "python",
        "orjson": orjson.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


async def _server_versions(warm: RedisBackend, pg_pool: asyncpg.Pool) -> dict[str, str]:
    info = await warm.client.info("server")
    return {
        "redis": str(info.get("redis_version", "")),
        "postgres": str(await pg_pool.fetchval("SHOW server_version")),
    }


async def _harness_overhead_ns(iterations: int) -> int:
    """p50 of timing an `await` that does nothing: included in every latency figure."""
    samples = sorted(await _time_calls(_nothing, iterations, 10))
    return int(percentile(samples, 0.5))


def _print_notes(rows: Sequence[Row], machine: dict[str, Any]) -> None:
    overhead = machine.get("harness_overhead_ns")
    if overhead is not None:
        print(
            f"harness: an empty timed await costs {overhead} ns (p50), included in every "
            f"figure; redis-py parses replies with {machine['redis_parser']}; GC on"
        )
    for row in rows:
        parts = [row.note] if row.note else []
        if "client_cpu_share" in row.extra:
            parts.append(f"this process's CPU {row.extra['client_cpu_share']:.0%} of wall time")
        if "turns_per_commit" in row.extra:
            parts.append(f"{row.extra['turns_per_commit']:.0f} turns per commit")
        if parts:
            print(f"  {row.label}: {'; '.join(parts)}")


def _remove_sqlite(path: Path) -> bool:
    """Remove the database and its WAL companions; True when nothing is left."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()
    return not any(Path(f"{path}{suffix}").exists() for suffix in ("", "-wal", "-shm"))


async def _main(options: Options) -> int:
    machine = _machine()
    temporary: tempfile.TemporaryDirectory[str] | None = None
    if options.sqlite_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="sgbench-")
        directory = Path(temporary.name)
    else:
        directory = options.sqlite_dir
        directory.mkdir(parents=True, exist_ok=True)
    try:
        return await _run_bench(options, machine, directory / f"sgbench-{uuid.uuid4().hex[:12]}.db")
    finally:
        if temporary is not None:
            temporary.cleanup()


async def _run_bench(options: Options, machine: dict[str, Any], sqlite_path: Path) -> int:
    bench = _Bench(options, sqlite_path)
    sample = encode_turn(bench.read_sessions[bench.read_keys[0]][0])
    print(
        f"sessiongate bench store: {options.iterations} timed calls per latency row "
        f"(+{options.warmup} warm-up), {options.appends:,} turns per append row"
        f"{' (QUICK: a smoke test, not a measurement)' if options.quick else ''}\n"
        f"session: {HISTORY_TURNS} turns = {HISTORY_TURNS * MESSAGES_PER_TURN} messages "
        f"(+1 system message per turn), {len(sample)} B per record; "
        f"{machine['nproc']} CPUs, Python {machine['python']}, uvloop {machine['uvloop']}\n"
        f"redis prefix {bench.redis_prefix!r}, postgres schema {bench.pg_schema!r}, "
        f"sqlite {sqlite_path}",
        flush=True,
    )
    load = machine["loadavg_start"][0]
    if load > 0.5 * (machine["cpus_usable"] or 1):
        print(
            f"note: load average {load:.2f} on {machine['cpus_usable']} CPUs before the run: "
            "other work is running, and every figure below includes its interference",
            flush=True,
        )
    print(flush=True)
    error = ""
    try:
        await _measure(bench)
    except Exception as exc:
        error = f"{bench.step}: {type(exc).__name__}: {exc}"
        print(f"bench store: error: {error}", file=sys.stderr, flush=True)
    finally:
        cleanup = await bench.cleanup()
        cleanup["sqlite_removed"] = await asyncio.to_thread(_remove_sqlite, sqlite_path)
    machine["loadavg_end"] = list(os.getloadavg())
    machine.update(bench.machine_extra)
    missed = [row.label for row in bench.rows if row.status == "MISS"]
    print()
    print(_RATE_FOOTNOTE + "; p50/p99/mean are per call; vs base: p50 / the baseline's p50")
    _print_notes(bench.rows, machine)
    print(
        f"targets: {sum(row.status == 'PASS' for row in bench.rows)} PASS, {len(missed)} MISS"
        + (f" ({'; '.join(missed)})" if missed else "")
    )
    problems = [f"{name}={value}" for name, value in cleanup.items() if name.endswith("_error")]
    if cleanup.get("redis_keys_left"):
        problems.append(f"{cleanup['redis_keys_left']} redis keys left")
    if "postgres_error" not in cleanup and not cleanup.get("postgres_schema_dropped"):
        problems.append(f"postgres schema {bench.pg_schema} not dropped")
    if problems:
        print(f"cleanup: {', '.join(problems)}", file=sys.stderr)
    if options.json_path is not None:
        result = {
            "benchmark": "store",
            "quick": options.quick,
            "machine": machine,
            "config": {
                "iterations": options.iterations,
                "warmup": options.warmup,
                "appends": options.appends,
                "history_turns": HISTORY_TURNS,
                "history_messages": HISTORY_TURNS * MESSAGES_PER_TURN,
                "record_bytes": len(sample),
                "read_sessions": READ_SESSIONS,
                "append_sessions": APPEND_SESSIONS,
                "concurrency": CONCURRENCY,
                "redis_prefix": bench.redis_prefix,
                "postgres_schema": bench.pg_schema,
                "sqlite_path": str(sqlite_path),
            },
            "targets": {
                "hot_p99_us": HOT_TARGET_US,
                "warm_p99_us": WARM_TARGET_US,
                "cold_group_commit_msg_per_s": COLD_COMMIT_TARGET,
            },
            "rows": [asdict(row) for row in bench.rows],
            "cleanup": cleanup,
            "error": error or None,
        }
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 1 if error else 0


async def _measure(bench: _Bench) -> None:
    options = bench.options
    warm = bench._redis()
    pg_pool: asyncpg.Pool | None = None
    sqlite: SQLiteBackend | None = None
    postgres: PostgresBackend | None = None
    try:
        bench.step = f"connecting to PostgreSQL ({_where(options.postgres_dsn)})"
        pg_pool = await asyncpg.create_pool(options.postgres_dsn, min_size=1, max_size=1, timeout=5)
        assert pg_pool is not None
        bench.step = f"connecting to Redis ({_where(options.redis_url)})"
        bench.machine_extra.update(await _server_versions(warm, pg_pool))
        bench.machine_extra["harness_overhead_ns"] = await _harness_overhead_ns(options.iterations)
        bench.step = "opening the SQLite and PostgreSQL cold tiers"
        sqlite = await SQLiteBackend.open(bench.sqlite_path)
        postgres = await PostgresBackend.open(options.postgres_dsn, schema=bench.pg_schema)
        bench.step = "baselines"
        await bench.baselines(warm, pg_pool)
        bench.step = "backend loads"
        await bench.loads(warm, sqlite, postgres)
        bench.step = "appends"
        await bench.append_memory()
        await bench.append_redis(warm)
        await bench.group_commit("append.sqlite.group", "sqlite", sqlite)
        await bench.group_commit("append.postgres.group", "postgres", postgres)
    finally:
        for closer in (sqlite, postgres, warm, pg_pool):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.close()
    bench.step = "tiered reads"
    await bench.history_hot_memory()
    await bench.history_via_sqlite()
    await bench.history_via_postgres()
    bench.step = "cpu breakdown"
    await bench.cpu()
    _expect(
        [row.id for row in bench.rows] == list(ROW_IDS),
        "rows out of step with ROW_IDS",
    )
