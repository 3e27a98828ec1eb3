"""The TurnBackend contract, run against every backend.

To cover a new backend (Redis, PostgreSQL), add a `BackendCase` to BACKENDS; a backend whose
server is not configured should `pytest.skip` from its `open`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import MemoryBackend, SQLiteBackend, Turn, TurnBackend
from tests.store.helpers import assistant, make_turn, user


@dataclass(frozen=True)
class BackendCase:
    name: str
    # Opening twice with the same directory reaches the same data (for persistent backends).
    open: Callable[[Path], Awaitable[TurnBackend]]
    persistent: bool
    # append() returns False for any duplicate, even one already flushed (not write-behind).
    exact_dedup: bool


async def _memory(_: Path) -> TurnBackend:
    return MemoryBackend(max_bytes=256 * 1024 * 1024)


async def _sqlite(directory: Path) -> TurnBackend:
    return await SQLiteBackend.open(directory / "store.db", commit_interval_ms=5)


BACKENDS = [
    BackendCase("memory", _memory, persistent=False, exact_dedup=True),
    BackendCase("sqlite", _sqlite, persistent=True, exact_dedup=False),
]


@pytest.fixture(params=BACKENDS, ids=lambda case: case.name)
def case(request: pytest.FixtureRequest) -> BackendCase:
    param: BackendCase = request.param
    return param


@pytest.fixture
async def backend(case: BackendCase, tmp_path: Path) -> AsyncIterator[TurnBackend]:
    opened = await case.open(tmp_path)
    yield opened
    await opened.close()


def ids(turns: list[Turn]) -> list[str]:
    return [turn.turn_id for turn in turns]


async def test_unknown_session_loads_empty(backend: TurnBackend) -> None:
    assert await backend.load("nobody") == []


async def test_load_is_ordered_by_seq_before_and_after_flush(backend: TurnBackend) -> None:
    for seq in (3, 1, 2):
        assert await backend.append("s", make_turn(f"t{seq}", seq))
    assert ids(await backend.load("s")) == ["t1", "t2", "t3"]  # read-your-writes, no flush
    await backend.flush()
    assert ids(await backend.load("s")) == ["t1", "t2", "t3"]


async def test_append_is_idempotent_by_turn_id(case: BackendCase, backend: TurnBackend) -> None:
    original = make_turn("t1", 1, content="first")
    assert await backend.append("s", original)
    assert not await backend.append("s", make_turn("t1", 1, content="retry"))  # still queued
    await backend.flush()
    again = await backend.append("s", make_turn("t1", 1, content="after flush"))
    assert again is not case.exact_dedup  # write-behind backends accept, then ignore it
    await backend.flush()
    assert await backend.load("s") == [original]


async def test_sessions_are_isolated(backend: TurnBackend) -> None:
    await backend.append("a", make_turn("t1", 1, content="for a"))
    await backend.append("b", make_turn("t1", 1, content="for b"))  # same id, other session
    await backend.append("b", make_turn("t2", 2))
    await backend.flush()
    assert [t.request_messages[0]["content"] for t in await backend.load("a")] == ["for a"]
    assert ids(await backend.load("b")) == ["t1", "t2"]


async def test_delete(backend: TurnBackend) -> None:
    await backend.append("a", make_turn("t1", 1))
    await backend.flush()
    await backend.append("a", make_turn("t2", 2))  # queued, not yet committed
    await backend.append("b", make_turn("t1", 1))
    await backend.delete("a")
    assert await backend.load("a") == []
    assert ids(await backend.load("b")) == ["t1"]
    await backend.flush()
    assert await backend.load("a") == []
    assert await backend.append("a", make_turn("t1", 1))  # the session can start again
    await backend.flush()
    assert ids(await backend.load("a")) == ["t1"]


async def test_all_fields_round_trip(backend: TurnBackend) -> None:
    turn = Turn(
        turn_id="t1",
        request_messages=(
            user("weather?"),
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21.5}'},
        ),
        response_message={
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}],
        },
        system_messages=({"role": "system", "content": "s"},),
        model="claude-x",
        finish_reason="tool_calls",
        created_at=1_700_000_123.25,
        seq=1,
    )
    await backend.append("s", turn)
    await backend.flush()
    assert await backend.load("s") == [turn]


async def test_non_ascii_round_trip(
    case: BackendCase, backend: TurnBackend, tmp_path: Path
) -> None:
    text = "Grüße, 世界! مرحبا 🧑‍💻 \u200b\u2028 é\u0301 \x00 end"
    turn = make_turn("tür-1", 1, content=text, reply=text[::-1])
    await backend.append("sessión-ключ", turn)
    await backend.flush()
    assert await backend.load("sessión-ключ") == [turn]
    if case.persistent:
        await backend.close()
        reopened = await case.open(tmp_path)
        try:
            assert await reopened.load("sessión-ключ") == [turn]
        finally:
            await reopened.close()


async def test_large_messages(backend: TurnBackend) -> None:
    big = "x" * (3 * 1024 * 1024)
    turns = [make_turn(f"t{seq}", seq, content=big, reply=big[:1000]) for seq in (1, 2)]
    for turn in turns:
        await backend.append("s", turn)
    await backend.flush()
    assert await backend.load("s") == turns


async def test_flush_and_reopen_persists(case: BackendCase, tmp_path: Path) -> None:
    if not case.persistent:
        pytest.skip("not a persistent backend")
    first = await case.open(tmp_path)
    for seq in range(1, 51):
        await first.append(f"s{seq % 3}", make_turn(f"t{seq}", seq))
    await first.delete("s0")
    await first.flush()
    await first.close()
    second = await case.open(tmp_path)
    try:
        assert await second.load("s0") == []
        loaded = await second.load("s1")
        assert [t.seq for t in loaded] == list(range(1, 51, 3))
        assert loaded[0] == make_turn("t1", 1)
    finally:
        await second.close()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    appends=st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 8)),  # (session, seq); seq names the turn
        max_size=25,
    ),
    flush_at=st.integers(0, 25),
)
async def test_any_append_order_loads_sorted_and_unique(
    backend: TurnBackend, appends: list[tuple[int, int]], flush_at: int
) -> None:
    prefix = uuid.uuid4().hex  # one backend serves every example: keep them apart
    expected: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    for position, (session, seq) in enumerate(appends):
        if position == flush_at:
            await backend.flush()
        await backend.append(f"{prefix}{session}", make_turn(f"t{seq}", seq))
        expected[session].add(seq)
    for session, seqs in expected.items():
        loaded = await backend.load(f"{prefix}{session}")
        assert [turn.seq for turn in loaded] == sorted(seqs)
        assert all(turn == make_turn(f"t{turn.seq}", turn.seq) for turn in loaded)


def test_helpers_build_distinct_messages() -> None:
    # Guards the helpers the suite relies on: a reply differs from its request.
    assert make_turn("t", 1).messages() == [user("hello"), assistant("hi")]
