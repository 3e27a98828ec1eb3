"""SQLite schema and its versioned migrations.

Every migration is applied once, in order, inside one `BEGIN IMMEDIATE` transaction, so two
processes opening the same file cannot both apply it. The `schema_version` table records each
applied version and the oldest release schema that still works on the result
(`readable_from`): additive migrations (new table, new nullable column, new index) keep it, so a
neighbouring older release keeps running during a rolling upgrade; a breaking migration raises
it, and an older release then refuses to open the file instead of misreading it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiosqlite

from store.base import StoreError


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    statements: tuple[str, ...]
    readable_from: int


# Rows are keyed (session_key, seq): a session's history is one range scan of the primary key
# index, already in order. UNIQUE(session_key, turn_id) makes INSERT OR IGNORE idempotent by
# turn id. A rowid table (not WITHOUT ROWID) because records can be many KB, which WITHOUT
# ROWID b-trees handle poorly.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        statements=(
            """
            CREATE TABLE turns (
                session_key TEXT NOT NULL,
                seq INTEGER NOT NULL,
                turn_id TEXT NOT NULL,
                created_at REAL NOT NULL,
                record BLOB NOT NULL,
                PRIMARY KEY (session_key, seq),
                UNIQUE (session_key, turn_id)
            )
            """,
        ),
        readable_from=1,
    ),
    # Named per-session documents (metadata, state, derived context, user profile): one row
    # each, overwritten in place. Additive, so schema-1 releases keep working on it (they do
    # not know the table, so a session they delete keeps its documents until this release
    # deletes it again or the same session key writes them anew).
    Migration(
        version=2,
        statements=(
            """
            CREATE TABLE docs (
                session_key TEXT NOT NULL,
                name TEXT NOT NULL,
                data BLOB NOT NULL,
                updated_at REAL NOT NULL,
                PRIMARY KEY (session_key, name)
            )
            """,
        ),
        readable_from=1,
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


async def migrate(conn: aiosqlite.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version found before migrating."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY,"
            " readable_from INTEGER NOT NULL,"
            " applied_at REAL NOT NULL)"
        )
        rows = await conn.execute_fetchall("SELECT version, readable_from FROM schema_version")
        found = max((int(row[0]) for row in rows), default=0)
        needed = max((int(row[1]) for row in rows), default=0)
        if needed > SCHEMA_VERSION:
            raise StoreError(
                f"sqlite schema {found} needs a release that reads schema {needed}; "
                f"this release knows schema {SCHEMA_VERSION}"
            )
        for migration in MIGRATIONS:
            if migration.version <= found:
                continue
            for statement in migration.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_version (version, readable_from, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.readable_from, time.time()),
            )
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return found
