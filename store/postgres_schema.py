"""PostgreSQL schema and its versioned migrations, all inside one (configurable) schema.

Same rules as `store.sqlite_schema`: each migration is applied once, in order, and
`schema_version` records each applied version with the oldest release schema that still works
on the result (`readable_from`); a release refuses a database that needs a newer reader.

Several replicas on several hosts start at once against one database, so the whole migration
runs in one transaction under `pg_advisory_xact_lock` (keyed by the schema name): the second
replica waits, then finds the work done. Without the lock, two `CREATE TABLE IF NOT EXISTS`
race and one fails on the catalog's unique index.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import asyncpg

from store.base import StoreError

# A plain identifier, so it can be quoted safely and means the same to every tool.
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    statements: tuple[str, ...]  # `{schema}` stands for the quoted schema name
    readable_from: int


# turns: keyed (session_key, seq) so a history is one range scan of the primary key, in
# order; UNIQUE (session_key, turn_id) makes appends idempotent by turn id. docs: one row per
# named per-session document, overwritten in place.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        statements=(
            """
            CREATE TABLE {schema}.turns (
                session_key TEXT NOT NULL,
                seq BIGINT NOT NULL,
                turn_id TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                record BYTEA NOT NULL,
                PRIMARY KEY (session_key, seq),
                CONSTRAINT turns_session_turn_id UNIQUE (session_key, turn_id)
            )
            """,
            """
            CREATE TABLE {schema}.docs (
                session_key TEXT NOT NULL,
                name TEXT NOT NULL,
                data BYTEA NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (session_key, name)
            )
            """,
        ),
        readable_from=1,
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def quoted_schema(schema: str) -> str:
    """The schema name, checked and quoted for use in SQL text (it cannot be a parameter)."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema name must match {_SCHEMA_NAME.pattern}, got {schema!r}")
    return f'"{schema}"'


def _lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory lock key for migrating this schema (Python's `hash` is
    salted per process, so it would give every replica a different lock)."""
    digest = hashlib.blake2b(f"sessiongate.migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def migrate(conn: asyncpg.Connection, schema: str) -> int:
    """Bring `schema` (created if missing) to SCHEMA_VERSION; returns the version found."""
    name = quoted_schema(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema))
        # Look before creating: CREATE SCHEMA IF NOT EXISTS still needs the CREATE privilege
        # on the database, which a role confined to an existing schema does not have.
        exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema)
        if not exists:
            await conn.execute(f"CREATE SCHEMA {name}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {name}.schema_version ("
            " version INTEGER PRIMARY KEY,"
            " readable_from INTEGER NOT NULL,"
            " applied_at DOUBLE PRECISION NOT NULL)"
        )
        rows = await conn.fetch(f"SELECT version, readable_from FROM {name}.schema_version")
        found = max((int(row["version"]) for row in rows), default=0)
        needed = max((int(row["readable_from"]) for row in rows), default=0)
        if needed > SCHEMA_VERSION:
            raise StoreError(
                f"postgres schema {schema!r} is at version {found} and needs a release that "
                f"reads schema {needed}; this release knows schema {SCHEMA_VERSION}"
            )
        for migration in MIGRATIONS:
            if migration.version <= found:
                continue
            for statement in migration.statements:
                await conn.execute(statement.format(schema=name))
            await conn.execute(
                f"INSERT INTO {name}.schema_version (version, readable_from, applied_at)"
                " VALUES ($1, $2, $3)",
                migration.version,
                migration.readable_from,
                time.time(),
            )
    return found
