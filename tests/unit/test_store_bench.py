"""`sessiongate bench store`: a quick run against the real Redis and PostgreSQL reports every
row with positive figures and leaves nothing behind. Figures are never asserted against targets
here (DESIGN: performance is measured by the benchmark, not by timed tests)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from extproc.bench import store_bench

REDIS_URL = os.environ.get("SESSIONGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("SESSIONGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    store_bench.add_arguments(parser)
    return parser.parse_args(list(argv))


async def _leftovers(prefix: str, schema: str) -> tuple[int, bool]:
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5, protocol=2)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    finally:
        await client.aclose()
    conn = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        exists = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
        )
    finally:
        await conn.close()
    return len(keys), bool(exists)


async def _reachable() -> str | None:
    """Why to skip: only when a server cannot be reached at all."""
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=2, protocol=2)
    try:
        await client.ping()
    except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
        return f"Redis at {REDIS_URL} unreachable ({exc}); set SESSIONGATE_TEST_REDIS_URL"
    finally:
        await client.aclose()
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, TimeoutError) as exc:
        return f"PostgreSQL at {PG_DSN} unreachable ({exc}); set SESSIONGATE_TEST_PG_DSN"
    await conn.close()
    return None


def test_defaults_and_quick_counts() -> None:
    args = _parse()
    assert args.redis_url == "redis://127.0.0.1:6379/0"
    assert args.postgres_dsn == "postgresql://postgres@127.0.0.1:5432/test"
    assert args.sqlite_dir is None and args.json_path is None and not args.quick
    full = store_bench._options(args)
    assert (full.iterations, full.appends) == (2000, 20_000)
    quick = store_bench._options(_parse("--quick"))
    assert quick.iterations < full.iterations and quick.appends < full.appends
    assert store_bench._options(_parse("--quick", "--iterations", "7")).iterations == 7
    with pytest.raises(SystemExit):
        _parse("--iterations", "0")


def test_rows_judge_targets_on_the_figure_they_name() -> None:
    samples = [1000] * 98 + [60_000, 70_000]  # ns: p50 1 µs, p99 60 µs
    row = store_bench._row("x", "x", samples, p99_target_us=50)
    assert (row.p50_us, row.p99_us, row.status) == (1.0, 60.0, "MISS")
    assert store_bench._row("x", "x", samples, p99_target_us=61).status == "PASS"
    rated = store_bench._row("y", "y", samples, rate=25_000, rate_unit="msg/s", rate_target=20_000)
    assert (rated.status, rated.target) == ("PASS", ">= 20,000 msg/s")
    assert store_bench._row("z", "z", samples).status == ""


@pytest.mark.timeout(60)
def test_quick_run_reports_every_row_and_cleans_up(tmp_path: Path) -> None:
    reason = asyncio.run(_reachable())
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out" / "bench.json"
    sqlite_dir = tmp_path / "sqlite"
    args = _parse(
        "--quick",
        "--redis-url",
        REDIS_URL,
        "--postgres-dsn",
        PG_DSN,
        "--sqlite-dir",
        str(sqlite_dir),
        "--json",
        str(out),
    )
    assert store_bench.run(args) == 0
    result = json.loads(out.read_text())

    assert result["error"] is None
    assert result["quick"] is True
    machine = result["machine"]
    assert machine["nproc"] >= 1
    assert machine["python"] == platform.python_version()
    assert machine["redis"] and machine["postgres"]

    rows = result["rows"]
    assert [row["id"] for row in rows] == list(store_bench.ROW_IDS)
    for row in rows:
        assert row["samples"] > 0, row
        for name in ("p50_us", "p99_us", "mean_us", "max_us", "rate"):
            assert row[name] > 0, (name, row)
        assert row["p50_us"] <= row["p99_us"] <= row["max_us"], row
        assert row["status"] in ("PASS", "MISS", ""), row
        assert bool(row["status"]) == bool(row["target"]), row
    by_id = {row["id"]: row for row in rows}
    for row_id in ("history.hot.memory", "history.warm"):
        assert by_id[row_id]["target"].startswith("p99 <")
    assert by_id["history.hot.redis"]["target"] == ""  # a cost row: one Redis round trip
    for row_id in ("append.sqlite.group", "append.postgres.group"):
        assert by_id[row_id]["rate_unit"] == "msg/s"
        assert by_id[row_id]["target"] == ">= 20,000 msg/s"
        assert "turn=2 msgs" in by_id[row_id]["label"]

    config, cleanup = result["config"], result["cleanup"]
    assert cleanup["redis_keys_left"] == 0 and cleanup["redis_keys_deleted"] > 0
    assert cleanup["postgres_schema_dropped"] is True
    assert cleanup["sqlite_removed"] is True
    assert list(sqlite_dir.iterdir()) == []
    keys_left, schema_exists = asyncio.run(
        _leftovers(config["redis_prefix"], config["postgres_schema"])
    )
    assert keys_left == 0 and not schema_exists
