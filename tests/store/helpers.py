"""Shared builders for the store tests."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import asyncpg

from store import Message, PendingTurn, Turn, Usage


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def user(content: str) -> Message:
    return {"role": "user", "content": content}


def assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def make_turn(turn_id: str, seq: int, content: str = "hello", reply: str = "hi") -> Turn:
    return Turn(
        turn_id=turn_id,
        request_messages=(user(content),),
        response_message=assistant(reply),
        system_messages=({"role": "system", "content": "be brief"},),
        model="gpt-test",
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=1),
        created_at=1_700_000_000.0 + seq,
        seq=seq,
    )


def make_pending(turn_id: str, session_key: str, content: str = "hello") -> PendingTurn:
    return PendingTurn(
        turn_id=turn_id,
        session_key=session_key,
        request_messages=(user(content),),
        model="gpt-test",
    )


# --- PostgreSQL --------------------------------------------------------------------------
# A real server: on developer machines and CI one runs on 127.0.0.1:5432 with trust auth.
# Every test gets its own schema, dropped afterwards, so tests never see each other's rows.

PG_DSN = os.environ.get("SESSIONGATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def pg_unreachable_reason(exc: BaseException) -> str | None:
    """Why to skip: only when the server cannot be reached at all. Any other failure (bad
    credentials, a missing database, an SQL error) is a real failure and must not skip."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError | TimeoutError):  # refused, unreachable, no such host
            return f"PostgreSQL at {PG_DSN} is unreachable ({cause}); set SESSIONGATE_TEST_PG_DSN"
        cause = cause.__cause__
    return None


def pg_schema_for(directory: Path) -> str:
    """One schema per test directory, so reopening with the same directory finds the same
    data, and two tests (or two runs) never share one."""
    marker = directory / "pg_schema"
    if not marker.exists():
        marker.write_text(f"test_{uuid.uuid4().hex}")
    return marker.read_text()


async def drop_pg_schema(schema: str) -> None:
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, TimeoutError):
        return  # unreachable: the test skipped, nothing was created
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def drop_pg_schema_for(directory: Path) -> None:
    if (directory / "pg_schema").exists():
        await drop_pg_schema(pg_schema_for(directory))
