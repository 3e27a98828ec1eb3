"""The TurnBackend contract, run against every backend.

To cover a new backend, add one `BackendCase` line to BACKENDS. A backend whose server cannot
be reached should `pytest.skip` from its `open` (unreachable only: any other error fails); one
that keeps data outside the test's directory gives a `cleanup` that removes it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import (
    MemoryBackend,
    PostgresBackend,
    SessionStore,
    SQLiteBackend,
    StoreUnavailable,
    Turn,
    TurnBackend,
)
from tests.store.helpers import (
    PG_DSN,
    assistant,
    drop_pg_schema_for,
    make_turn,
    pg_schema_for,
    pg_unreachable_reason,
    user,
)
from tests.store.redis_servers import delete_shared_keys, open_shared_backend


@dataclass(frozen=True)
class BackendCase:
    name: str
    # Opening twice with the same directory reaches the same data (for persistent backends).
    open: Callable[[Path], Awaitable[TurnBackend]]
    persistent: bool
    # append() returns False for any duplicate, even one already flushed (not write-behind).
    exact_dedup: bool
    # Run once after the test, with the same directory: drop what `open` made outside of it.
    cleanup: Callable[[Path], Awaitable[None]] | None = None


async def _memory(_: Path) -> TurnBackend:
    return MemoryBackend(max_bytes=256 * 1024 * 1024)


async def _sqlite(directory: Path) -> TurnBackend:
    return await SQLiteBackend.open(directory / "store.db", commit_interval_ms=5)


async def _postgres(directory: Path) -> TurnBackend:
    try:
        return await PostgresBackend.open(
            PG_DSN, schema=pg_schema_for(directory), commit_interval_ms=5
        )
    except StoreUnavailable as exc:
        reason = pg_unreachable_reason(exc)
        if reason is None:
            raise
        pytest.skip(reason)


async def _tiered(directory: Path) -> TurnBackend:
    """The whole tiered store (memory hot, Redis warm, SQLite cold) as one backend."""
    warm = await open_shared_backend(directory)
    cold = await SQLiteBackend.open(directory / "tiered.db", commit_interval_ms=5)
    store = SessionStore(MemoryBackend(), cold, warm=warm)
    await store.start()
    return store


BACKENDS = [
    BackendCase("memory", _memory, persistent=False, exact_dedup=True),
    BackendCase("sqlite", _sqlite, persistent=True, exact_dedup=False),
    BackendCase(
        "postgres", _postgres, persistent=True, exact_dedup=False, cleanup=drop_pg_schema_for
    ),
    BackendCase(
        "redis", open_shared_backend, persistent=True, exact_dedup=True, cleanup=delete_shared_keys
    ),
    BackendCase("tiered", _tiered, persistent=True, exact_dedup=True, cleanup=delete_shared_keys),
]

Opener = Callable[[], Awaitable[TurnBackend]]


@pytest.fixture(params=BACKENDS, ids=lambda case: case.name)
def case(request: pytest.FixtureRequest) -> BackendCase:
    param: BackendCase = request.param
    return param


@pytest.fixture
async def reopen(case: BackendCase, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens the case's backend on the test's data; every call reaches the same data."""

    async def opener() -> TurnBackend:
        return await case.open(tmp_path)

    yield opener
    if case.cleanup is not None:
        await case.cleanup(tmp_path)


@pytest.fixture
async def backend(reopen: Opener) -> AsyncIterator[TurnBackend]:
    opened = await reopen()
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
    case: BackendCase, backend: TurnBackend, reopen: Opener
) -> None:
    text = "Grüße, 世界! مرحبا 🧑‍💻 \u200b\u2028 é\u0301 \x00 end"
    turn = make_turn("tür-1", 1, content=text, reply=text[::-1])
    await backend.append("sessión-ключ", turn)
    await backend.flush()
    assert await backend.load("sessión-ключ") == [turn]
    if case.persistent:
        await backend.close()
        reopened = await reopen()
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


async def test_flush_and_reopen_persists(case: BackendCase, reopen: Opener) -> None:
    if not case.persistent:
        pytest.skip("not a persistent backend")
    first = await reopen()
    for seq in range(1, 51):
        await first.append(f"s{seq % 3}", make_turn(f"t{seq}", seq))
    await first.delete("s0")
    await first.flush()
    await first.close()
    second = await reopen()
    try:
        assert await second.load("s0") == []
        loaded = await second.load("s1")
        assert [t.seq for t in loaded] == list(range(1, 51, 3))
        assert loaded[0] == make_turn("t1", 1)
    finally:
        await second.close()


# --- truncate_after (rewind) ---------------------------------------------------------------


async def test_truncate_after_drops_the_tail_committed_or_queued(backend: TurnBackend) -> None:
    for seq in (1, 2, 3):
        await backend.append("s", make_turn(f"t{seq}", seq))
    await backend.flush()
    for seq in (4, 5):  # still queued in write-behind backends: dropped and counted too
        await backend.append("s", make_turn(f"t{seq}", seq))
    await backend.append("other", make_turn("t5", 5))
    assert await backend.truncate_after("s", 2) == 3
    assert ids(await backend.load("s")) == ["t1", "t2"]
    await backend.flush()
    assert ids(await backend.load("s")) == ["t1", "t2"]
    assert ids(await backend.load("other")) == ["t5"]  # another session is untouched


async def test_truncate_after_nothing_to_drop(backend: TurnBackend) -> None:
    assert await backend.truncate_after("nobody", 0) == 0
    await backend.append("s", make_turn("t1", 1))
    assert await backend.truncate_after("s", 1) == 0
    assert await backend.truncate_after("s", 7) == 0
    assert ids(await backend.load("s")) == ["t1"]
    assert await backend.truncate_after("s", 0) == 1  # rewind to the very start
    assert await backend.load("s") == []


async def test_appends_continue_after_a_rewind(case: BackendCase, backend: TurnBackend) -> None:
    for seq in (1, 2, 3, 4):
        await backend.append("s", make_turn(f"t{seq}", seq, content="before"))
    await backend.flush()
    assert await backend.truncate_after("s", 2) == 2
    # New turns take the freed seqs; a dropped turn id is a new turn again.
    assert await backend.append("s", make_turn("t9", 3, content="after"))
    assert await backend.append("s", make_turn("t3", 4, content="t3 again"))
    # Idempotency by turn id still holds for the turns that stayed.
    again = await backend.append("s", make_turn("t2", 5, content="retry"))
    assert again is not case.exact_dedup
    expected = [
        make_turn("t1", 1, content="before"),
        make_turn("t2", 2, content="before"),
        make_turn("t9", 3, content="after"),
        make_turn("t3", 4, content="t3 again"),
    ]
    assert await backend.load("s") == expected  # before the commit (read-your-writes)
    await backend.flush()
    assert await backend.load("s") == expected


async def test_truncate_then_reappend_inside_one_batch(backend: TurnBackend) -> None:
    # No flush anywhere: append, rewind and re-append of the same id meet in one commit.
    await backend.append("s", make_turn("t1", 1))
    await backend.append("s", make_turn("t2", 2, content="first"))
    assert await backend.truncate_after("s", 1) == 1
    assert await backend.append("s", make_turn("t2", 2, content="second"))
    await backend.flush()
    assert await backend.load("s") == [make_turn("t1", 1), make_turn("t2", 2, content="second")]


# --- documents ------------------------------------------------------------------------------


async def test_docs_put_get_overwrite(backend: TurnBackend) -> None:
    assert await backend.get_doc("s", "meta") is None
    await backend.put_doc("s", "meta", b'{"v":1}')
    await backend.put_doc("s", "state", b"idle")
    assert await backend.get_doc("s", "meta") == b'{"v":1}'  # before any flush
    await backend.put_doc("s", "meta", b'{"v":2}')
    assert await backend.get_doc("s", "meta") == b'{"v":2}'
    await backend.flush()
    assert await backend.get_doc("s", "meta") == b'{"v":2}'
    await backend.put_doc("s", "meta", b'{"v":3}')  # over a committed one
    assert await backend.get_doc("s", "meta") == b'{"v":3}'
    await backend.flush()
    assert await backend.get_doc("s", "meta") == b'{"v":3}'
    assert await backend.get_doc("s", "state") == b"idle"
    assert await backend.get_doc("s", "missing") is None
    assert await backend.load("s") == []  # documents are not turns


async def test_get_docs_reads_several_documents_at_once(backend: TurnBackend) -> None:
    names = ("meta", "state", "derived", "security")
    assert await backend.get_docs("s", names) == dict.fromkeys(names)
    await backend.put_doc("s", "meta", b"m1")
    await backend.put_doc("s", "state", b"s1")
    await backend.flush()
    await backend.put_doc("s", "state", b"s2")  # queued over a committed one
    await backend.put_doc("s", "derived", b"d1")  # queued only
    assert await backend.get_docs("s", names) == {
        "meta": b"m1",
        "state": b"s2",
        "derived": b"d1",
        "security": None,
    }
    await backend.flush()
    assert await backend.get_docs("s", ("derived", "meta")) == {"derived": b"d1", "meta": b"m1"}
    await backend.delete("s")
    assert await backend.get_docs("s", names) == dict.fromkeys(names)


async def test_docs_are_isolated_between_sessions(backend: TurnBackend) -> None:
    await backend.put_doc("a", "meta", b"for a")
    await backend.put_doc("b", "meta", b"for b")
    await backend.flush()
    await backend.put_doc("b", "meta", b"for b, again")
    assert await backend.get_doc("a", "meta") == b"for a"
    assert await backend.get_doc("b", "meta") == b"for b, again"
    await backend.delete("b")
    assert await backend.get_doc("a", "meta") == b"for a"


async def test_docs_go_with_the_session(backend: TurnBackend) -> None:
    await backend.append("s", make_turn("t1", 1))
    await backend.put_doc("s", "meta", b"committed")
    await backend.flush()
    await backend.put_doc("s", "state", b"queued")
    await backend.delete("s")
    assert await backend.get_doc("s", "meta") is None
    assert await backend.get_doc("s", "state") is None
    await backend.flush()
    assert await backend.get_doc("s", "meta") is None
    assert await backend.get_doc("s", "state") is None
    await backend.put_doc("s", "meta", b"new life")  # the session can start again
    await backend.flush()
    assert await backend.get_doc("s", "meta") == b"new life"


async def test_truncate_keeps_the_docs(backend: TurnBackend) -> None:
    await backend.append("s", make_turn("t1", 1))
    await backend.put_doc("s", "meta", b"kept")
    assert await backend.truncate_after("s", 0) == 1
    assert await backend.get_doc("s", "meta") == b"kept"


async def test_docs_binary_non_ascii_and_large(
    case: BackendCase, backend: TurnBackend, reopen: Opener
) -> None:
    binary = bytes(range(256)) + "Grüße 世界 🧑‍💻".encode() + b"\x00"
    large = os.urandom(4 * 1024 * 1024)  # random: nothing compresses it away
    await backend.put_doc("sessión-ключ", "blob", binary)
    await backend.put_doc("sessión-ключ", "large", large)
    assert await backend.get_doc("sessión-ключ", "blob") == binary
    await backend.flush()
    assert await backend.get_doc("sessión-ключ", "blob") == binary
    assert await backend.get_doc("sessión-ключ", "large") == large
    if case.persistent:
        await backend.close()
        reopened = await reopen()
        try:
            assert await reopened.get_doc("sessión-ключ", "large") == large
        finally:
            await reopened.close()


async def test_rewind_and_docs_persist_across_reopen(case: BackendCase, reopen: Opener) -> None:
    if not case.persistent:
        pytest.skip("not a persistent backend")
    first = await reopen()
    for seq in (1, 2, 3):
        await first.append("s", make_turn(f"t{seq}", seq))
    await first.put_doc("s", "meta", b"v1")
    await first.put_doc("gone", "meta", b"deleted")
    assert await first.truncate_after("s", 1) == 2
    await first.append("s", make_turn("t7", 2))
    await first.put_doc("s", "meta", b"v2")
    await first.delete("gone")
    await first.close()  # no explicit flush: close commits what is queued
    second = await reopen()
    try:
        assert ids(await second.load("s")) == ["t1", "t7"]
        assert await second.get_doc("s", "meta") == b"v2"
        assert await second.get_doc("gone", "meta") is None
    finally:
        await second.close()


# --- properties -----------------------------------------------------------------------------

_OPS = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 1), st.integers(1, 6)),
    st.tuples(st.just("truncate"), st.integers(0, 1), st.integers(0, 6)),
    st.tuples(st.just("put"), st.integers(0, 1), st.sampled_from(["meta", "state"])),
    st.tuples(st.just("delete"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_OPS, max_size=25))
async def test_any_mix_of_writes_matches_a_model(
    backend: TurnBackend, ops: list[tuple[str, int, object]]
) -> None:
    """Appends, rewinds, doc writes, deletes and flushes in any order: every read right after
    every write sees exactly what a plain dict model says (committed or still queued)."""
    prefix = uuid.uuid4().hex  # one backend serves every example: keep them apart
    turns: dict[int, dict[int, Turn]] = {0: {}, 1: {}}  # session -> seq -> turn
    docs: dict[int, dict[str, bytes]] = {0: {}, 1: {}}
    for step, (op, session, arg) in enumerate(ops):
        key = f"{prefix}{session}"
        if op == "append":
            assert isinstance(arg, int)
            turn = make_turn(f"t{arg}", arg, content=f"step {step}")  # the id names the seq
            await backend.append(key, turn)
            turns[session].setdefault(arg, turn)  # a stored turn id wins: idempotent
        elif op == "truncate":
            assert isinstance(arg, int)
            dropped = [seq for seq in turns[session] if seq > arg]
            assert await backend.truncate_after(key, arg) == len(dropped)
            for seq in dropped:
                del turns[session][seq]
        elif op == "put":
            assert isinstance(arg, str)
            data = f"{arg} at step {step}".encode()
            await backend.put_doc(key, arg, data)
            docs[session][arg] = data
        elif op == "delete":
            await backend.delete(key)
            turns[session].clear()
            docs[session].clear()
        else:
            await backend.flush()
        assert await backend.load(key) == [turns[session][s] for s in sorted(turns[session])]
        for name in ("meta", "state"):
            assert await backend.get_doc(key, name) == docs[session].get(name)


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
