"""`kill -9` of `sessiongate up` in the middle of a burst of captures, against the README's bound.

README, "Durability": a completed turn is in the SQLite commit queue within milliseconds and the
writer commits in groups every `commit_interval_ms`, so a `kill -9` can lose the turns captured
in the last commit interval and the turns whose replies were still streaming.

The test drives many sessions at once through a real `sessiongate up` (real Envoy, TLS, the
mock provider), records for every turn the moment its reply was complete at the client, sends
SIGKILL to sessiongate after some hundreds of completions, and then checks the SQLite file:

- every turn completed more than `commit_interval_ms + MARGIN_S` before the kill is stored
  (MARGIN_S absorbs scheduling on a saturated two-core machine: the client, Envoy, sessiongate
  and the mock all compete for CPU, and capture sees the reply's last bytes when the client
  does, not before);
- nothing is stored twice (turn ids unique, seqs 1..n per session without gaps), every stored
  turn is a whole turn (the user message and the reply the client got), and each session's
  stored turns are a prefix of what the client completed (plus, at most, the one reply that was
  still on its way to the client when sessiongate died);
- `PRAGMA integrity_check` is `ok`, right after the kill and after the restart;
- a restarted `up` on the same state directory continues every session: the next turn gets
  seq n + 1 and the provider receives the stored history.

The observed figures (lost turns, the age of the oldest lost turn at kill time) are printed
(`pytest -s`) and repeated in assertion messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from store import Turn, decode_turn
from tests.e2e.conftest import Gateway, Mock, start_gateway, start_mock

COMMIT_INTERVAL_MS = 20  # the README's default, passed explicitly
MARGIN_S = 0.25  # scheduling slack on top of the commit interval (see the module docstring)
SESSIONS = 40
TURNS_PER_SESSION = 25  # more than the burst gets to: sessiongate dies mid-way
KILL_AFTER = 300  # completions seen by the client before the SIGKILL
STREAMING = (True, False)  # sessions alternate between SSE and JSON replies

pytestmark = pytest.mark.timeout(120)


@dataclass
class Sent:
    """One turn as the client saw it (times from `time.monotonic()`)."""

    session: str
    index: int  # 1-based position in the client's own sequence
    text: str
    sent_at: float
    completed_at: float | None = None
    reply: str | None = None
    error: str | None = None


@dataclass
class Burst:
    turns: list[Sent] = field(default_factory=list)
    killed_at: float | None = None

    def of(self, session: str) -> list[Sent]:
        return [t for t in self.turns if t.session == session]

    @property
    def completed(self) -> list[Sent]:
        return [t for t in self.turns if t.completed_at is not None]


@dataclass
class StoredRow:
    session_key: str
    seq: int
    turn_id: str
    turn: Turn


def report(line: str) -> None:
    print(f"[durability] {line}", flush=True)


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def envoy_pids(state_dir: Path) -> list[int]:
    """Envoys started by `up` with this state directory's config."""
    needle = str(state_dir / "envoy.yaml").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in cmdline and process_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def wait_no_envoy(state_dir: Path, timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := envoy_pids(state_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Gateway | Mock]]:
    """Everything the test starts; stopped (and orphan Envoys killed) whatever happens."""
    started: list[Gateway | Mock] = []
    yield started
    for item in reversed(started):
        item.proc.stop(signal.SIGKILL if isinstance(item, Gateway) else signal.SIGTERM)
    for leftover in wait_no_envoy(tmp_path / "gw", timeout=5):
        with contextlib.suppress(ProcessLookupError):
            os.kill(leftover, signal.SIGKILL)


def read_db(path: Path) -> tuple[list[str], list[StoredRow]]:
    """(integrity_check result, every stored turn) through a connection of our own, which also
    replays the WAL the killed process left behind, as the next opener would."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        integrity = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
        rows = conn.execute(
            "SELECT session_key, seq, turn_id, record FROM turns ORDER BY session_key, seq"
        ).fetchall()
    return integrity, [StoredRow(k, s, t, decode_turn(bytes(r))) for k, s, t, r in rows]


def echo(text: str, seq: int) -> str:
    """The mock's reply to the turn at `seq` of a session whose whole history reached it."""
    return f"echo: {text} [n={2 * seq - 1}]"


async def drive_burst(gateway: Gateway, burst: Burst, ids: list[str]) -> None:
    """SESSIONS concurrent conversations, each one turn after the other; SIGKILL to `up` as
    soon as KILL_AFTER replies are complete at the client."""
    stop = asyncio.Event()
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url,
        api_key="sk-durability",
        max_retries=0,
        timeout=20,
        http_client=openai.DefaultAsyncHttpxClient(verify=gateway.ssl_context()),
    )

    def kill_now() -> None:
        os.kill(gateway.proc.popen.pid, signal.SIGKILL)
        burst.killed_at = time.monotonic()
        stop.set()

    async def conversation(n: int, session: str) -> None:
        headers = {"x-session-id": session}
        stream = STREAMING[n % len(STREAMING)]
        for index in range(1, TURNS_PER_SESSION + 1):
            if stop.is_set():
                return
            text = f"burst {session} turn {index} {uuid.uuid4().hex[:8]}"
            sent = Sent(session, index, text, time.monotonic())
            burst.turns.append(sent)
            messages: list[openai.types.chat.ChatCompletionMessageParam] = [
                {"role": "user", "content": text}
            ]
            try:
                if stream:
                    chunks = await client.chat.completions.create(
                        model="m", messages=messages, stream=True, extra_headers=headers
                    )
                    parts = [
                        chunk.choices[0].delta.content or ""
                        async for chunk in chunks
                        if chunk.choices
                    ]
                    reply = "".join(parts)
                else:
                    answer = await client.chat.completions.create(
                        model="m", messages=messages, extra_headers=headers
                    )
                    reply = answer.choices[0].message.content or ""
            except (openai.APIError, OSError) as exc:
                sent.error = f"{type(exc).__name__}: {exc}"
                if not stop.is_set():
                    raise
                return
            sent.completed_at = time.monotonic()
            sent.reply = reply
            if not stop.is_set() and len(burst.completed) >= KILL_AFTER:
                kill_now()

    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(conversation(n, s) for n, s in enumerate(ids)))
    finally:
        await client.close()


def check_after_kill(
    burst: Burst, ids: list[str], integrity: list[str], rows: list[StoredRow]
) -> dict[str, list[StoredRow]]:
    """Check the file the killed process left behind; return its turns by client session."""
    assert burst.killed_at is not None, "the burst ended before the kill"
    killed_at = burst.killed_at
    assert integrity == ["ok"], f"integrity_check after kill -9: {integrity}"

    by_text = {t.text: t for t in burst.turns}
    by_key: dict[str, list[StoredRow]] = defaultdict(list)
    turn_ids: set[str] = set()
    for row in rows:
        turn = row.turn
        assert row.turn_id not in turn_ids, f"turn id {row.turn_id} stored twice"
        turn_ids.add(row.turn_id)
        assert (turn.turn_id, turn.seq) == (row.turn_id, row.seq), "record disagrees with row"
        # A whole turn: exactly the user message the client sent and the reply to it.
        assert len(turn.request_messages) == 1, turn.request_messages
        (request,) = turn.request_messages
        assert request["role"] == "user" and request["content"] in by_text, request
        sent = by_text[request["content"]]
        assert turn.response_message == {
            "role": "assistant",
            "content": echo(sent.text, row.seq),
        }, f"stored reply of {sent.text!r} at seq {row.seq}: {turn.response_message}"
        assert turn.finish_reason == "stop"
        if sent.reply is not None:
            assert turn.response_message["content"] == sent.reply
        by_key[row.session_key].append(row)

    stored: dict[str, list[StoredRow]] = {}
    for session_rows in by_key.values():
        sessions = {by_text[r.turn.request_messages[0]["content"]].session for r in session_rows}
        assert len(sessions) == 1, f"one session key holds turns of {sorted(sessions)}"
        (session,) = sessions
        assert session not in stored, f"{session} is stored under two session keys"
        assert [r.seq for r in session_rows] == list(range(1, len(session_rows) + 1)), (
            f"{session}: seqs {[r.seq for r in session_rows]} are not 1..n"
        )
        stored[session] = session_rows

    lost: list[Sent] = []
    stored_in_flight = 0
    for session in ids:
        sent = burst.of(session)
        completed = [t for t in sent if t.completed_at is not None]
        texts = [r.turn.request_messages[0]["content"] for r in stored.get(session, [])]
        # Each conversation waits for one reply before the next turn, so what the client saw
        # complete is a prefix of what it sent, and what survived a prefix of that, plus at
        # most the turn that was still in flight (captured, but not yet at the client).
        assert [t.text for t in sent[: len(completed)]] == [t.text for t in completed]
        if len(texts) > len(completed):
            assert len(texts) == len(completed) + 1 and texts[-1] == sent[len(completed)].text, (
                f"{session}: stored {texts}, the client completed {[t.text for t in completed]}"
            )
            stored_in_flight += 1
        else:
            assert texts == [t.text for t in completed[: len(texts)]], (
                f"{session}: stored turns are not a prefix of the completed ones"
            )
            lost.extend(completed[len(texts) :])

    bound = COMMIT_INTERVAL_MS / 1000 + MARGIN_S
    ages = sorted(killed_at - t.completed_at for t in lost if t.completed_at is not None)
    completed_count = len(burst.completed)
    before_kill = sum(1 for t in burst.completed if t.completed_at <= killed_at)  # type: ignore[operator]
    in_flight = sum(1 for t in burst.turns if t.completed_at is None)
    figures = (
        f"{completed_count} turns complete at the client ({before_kill} before the kill, "
        f"{in_flight} in flight), {len(rows)} stored ({stored_in_flight} of them still in "
        f"flight at the client); lost {len(lost)} completed turns"
        + (
            f", ages at kill time {ages[0] * 1000:.1f}..{ages[-1] * 1000:.1f} ms "
            f"(oldest lost: {ages[-1] * 1000:.1f} ms)"
            if ages
            else ""
        )
        + f"; bound {bound * 1000:.0f} ms (commit interval {COMMIT_INTERVAL_MS} ms"
        f" + margin {MARGIN_S * 1000:.0f} ms)"
    )
    report(figures)
    too_old = [t for t in lost if killed_at - t.completed_at > bound]  # type: ignore[operator]
    assert not too_old, (
        f"{len(too_old)} turns completed more than {bound * 1000:.0f} ms before the kill were "
        f"lost: {[(t.session, t.index) for t in too_old][:10]}; {figures}"
    )
    return stored


async def continue_sessions(
    gateway: Gateway, stored: dict[str, list[StoredRow]], ids: list[str]
) -> dict[str, tuple[str, str]]:
    """One more turn in every session through the restarted gateway: text -> reply."""
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url,
        api_key="sk-durability",
        max_retries=0,
        timeout=20,
        http_client=openai.DefaultAsyncHttpxClient(verify=gateway.ssl_context()),
    )

    async def one(session: str) -> tuple[str, str]:
        text = f"after restart {session} {uuid.uuid4().hex[:8]}"
        answer = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": text}],
            extra_headers={"x-session-id": session},
        )
        return text, answer.choices[0].message.content or ""

    try:
        replies = await asyncio.gather(*(one(s) for s in ids))
    finally:
        await client.close()
    return dict(zip(ids, replies, strict=True))


def test_kill_9_mid_burst_loses_only_the_last_commit_interval(
    tmp_path: Path, procs: list[Gateway | Mock], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The variable, not a flag: `up` has no `--commit-interval-ms` (see the xfail test below).
    monkeypatch.setenv("SESSIONGATE_COMMIT_INTERVAL_MS", str(COMMIT_INTERVAL_MS))
    mock = start_mock(tmp_path / "mock")
    procs.append(mock)
    state_dir = tmp_path / "gw"
    gateway = start_gateway(state_dir, mock.url)
    procs.append(gateway)
    ids = [f"dur-{n:02d}-{uuid.uuid4().hex[:6]}" for n in range(SESSIONS)]

    burst = Burst()
    asyncio.run(drive_burst(gateway, burst, ids))
    assert gateway.proc.popen.wait(10) == -signal.SIGKILL
    assert not wait_no_envoy(state_dir), "Envoy outlived the kill -9 of sessiongate"

    db = state_dir / "sessions.db"
    integrity, rows = read_db(db)
    stored = check_after_kill(burst, ids, integrity, rows)

    # Restart on the same state directory: every session continues where the file ends.
    restarted = start_gateway(state_dir, mock.url)
    procs.append(restarted)
    replies = asyncio.run(continue_sessions(restarted, stored, ids))
    for session, (text, reply) in replies.items():
        history = stored.get(session, [])
        assert reply == echo(text, len(history) + 1), (
            f"{session}: {len(history)} turns stored, the restarted gateway answered {reply!r}"
        )
        # The provider received exactly the stored history, then the new message.
        expected = [m for row in history for m in row.turn.messages()]
        expected.append({"role": "user", "content": text})
        assert mock.request_with(text)["body"]["messages"] == expected
    assert restarted.proc.stop() == 0, restarted.proc.log()[-3000:]

    integrity, rows_after = read_db(db)
    assert integrity == ["ok"], f"integrity_check after the restart: {integrity}"
    assert len({r.turn_id for r in rows_after}) == len(rows_after), "a turn id is stored twice"
    by_key: dict[str, list[StoredRow]] = defaultdict(list)
    key_of_text: dict[str, str] = {}
    for row in rows_after:
        by_key[row.session_key].append(row)
        key_of_text[row.turn.request_messages[0]["content"]] = row.session_key
    for session, (text, _reply) in replies.items():
        history = stored.get(session, [])
        session_rows = by_key[key_of_text[text]]
        assert [r.seq for r in session_rows] == list(range(1, len(history) + 2))
        assert [r.turn_id for r in session_rows[:-1]] == [r.turn_id for r in history]
        assert session_rows[-1].turn.request_messages[0]["content"] == text
    report(
        f"after the restart: {len(rows_after)} turns stored, every session continued at n+1, "
        "integrity ok"
    )
