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

Two strict xfail tests record bugs found on the way: a stall of sessiongate longer than Envoy's
1 s `deferred_close_timeout` loses completed turns (overload does the same at a burst of new
sessions), and `--commit-interval-ms` is not a flag although the README says every setting is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from store import Turn, decode_turn
from store.session import META, SessionMeta, decode_doc
from tests.e2e.conftest import Gateway, Mock, start_gateway, start_mock

COMMIT_INTERVAL_MS = 20  # the README's default, set explicitly (SESSIONGATE_COMMIT_INTERVAL_MS)
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


@dataclass
class Snapshot:
    integrity: list[str]
    rows: list[StoredRow]
    meta: dict[str, SessionMeta]  # session key -> its metadata document


def read_db(path: Path) -> Snapshot:
    """integrity_check, every stored turn and every session's metadata, through a connection
    of our own, which also replays the WAL the killed process left behind, as the next opener
    would."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        integrity = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
        rows = conn.execute(
            "SELECT session_key, seq, turn_id, record FROM turns ORDER BY session_key, seq"
        ).fetchall()
        docs = conn.execute("SELECT session_key, data FROM docs WHERE name = ?", (META,))
        meta = {key: decode_doc(bytes(data), SessionMeta) for key, data in docs}
    turns = [StoredRow(k, s, t, decode_turn(bytes(r))) for k, s, t, r in rows]
    return Snapshot(integrity, turns, meta)


def echo(text: str, seq: int) -> str:
    """The mock's reply to the turn at `seq` of a session whose whole history reached it."""
    return f"echo: {text} [n={2 * seq - 1}]"


async def chat(
    http: httpx.AsyncClient, session: str, text: str, *, stream: bool
) -> tuple[str, float]:
    """One turn with plain httpx (cheaper than the SDK, so the client's event loop lags less
    and the recorded completion times are tighter): (reply content, time it was complete)."""
    body: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": text}]}
    headers = {"x-session-id": session}
    if not stream:
        response = await http.post("chat/completions", json=body, headers=headers)
        response.raise_for_status()
        done = time.monotonic()
        return str(response.json()["choices"][0]["message"]["content"]), done
    parts: list[str] = []
    async with http.stream(
        "POST", "chat/completions", json={**body, "stream": True}, headers=headers
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "".join(parts), time.monotonic()
            for choice in json.loads(line[6:])["choices"]:
                parts.append(choice["delta"].get("content") or "")
    raise httpx.RemoteProtocolError("stream ended without [DONE]")


def http_client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gateway.base_url + "/",
        verify=gateway.ssl_context(),
        timeout=20,
        headers={"authorization": "Bearer sk-durability"},
        limits=httpx.Limits(max_connections=SESSIONS * 2, max_keepalive_connections=SESSIONS * 2),
    )


async def drive_burst(gateway: Gateway, burst: Burst, ids: list[str]) -> None:
    """SESSIONS concurrent conversations, each one turn after the other; SIGKILL to `up` as
    soon as KILL_AFTER replies are complete at the client."""
    stop = asyncio.Event()

    def kill_now() -> None:
        os.kill(gateway.proc.popen.pid, signal.SIGKILL)
        burst.killed_at = time.monotonic()
        stop.set()

    async def conversation(http: httpx.AsyncClient, n: int, session: str) -> None:
        stream = STREAMING[n % len(STREAMING)]
        for index in range(1, TURNS_PER_SESSION + 1):
            if stop.is_set():
                return
            text = f"burst {session} turn {index} {uuid.uuid4().hex[:8]}"
            sent = Sent(session, index, text, time.monotonic())
            burst.turns.append(sent)
            try:
                sent.reply, sent.completed_at = await chat(http, session, text, stream=stream)
            except (httpx.HTTPError, OSError) as exc:
                sent.error = f"{type(exc).__name__}: {exc}"
                if not stop.is_set():
                    raise
                return
            if not stop.is_set() and len(burst.completed) >= KILL_AFTER:
                kill_now()

    async with http_client(gateway) as http, asyncio.timeout(60):
        await asyncio.gather(*(conversation(http, n, s) for n, s in enumerate(ids)))


def check_after_kill(burst: Burst, ids: list[str], db: Snapshot) -> dict[str, list[StoredRow]]:
    """Check the file the killed process left behind; return its turns by client session."""
    assert burst.killed_at is not None, "the burst ended before the kill"
    killed_at = burst.killed_at
    assert db.integrity == ["ok"], f"integrity_check after kill -9: {db.integrity}"
    rows = db.rows

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
        # The metadata document commits with its turn: its count agrees with the turns.
        meta = db.meta.get(session_rows[0].session_key, SessionMeta())
        assert meta.turns == len(session_rows), (
            f"{session}: {len(session_rows)} turns stored, metadata says {meta.turns}"
        )
        stored[session] = session_rows

    lost: list[Sent] = []
    stored_in_flight = 0
    for session in ids:
        sent_turns = burst.of(session)
        completed = [t for t in sent_turns if t.completed_at is not None]
        texts = [r.turn.request_messages[0]["content"] for r in stored.get(session, [])]
        # Each conversation waits for one reply before the next turn, so what the client saw
        # complete is a prefix of what it sent, and what survived a prefix of that, plus at
        # most the turn that was still in flight (captured, but not yet at the client).
        assert [t.text for t in sent_turns[: len(completed)]] == [t.text for t in completed]
        if len(texts) > len(completed):
            in_flight_text = sent_turns[len(completed)].text
            assert len(texts) == len(completed) + 1 and texts[-1] == in_flight_text, (
                f"{session}: stored {texts}, the client completed {[t.text for t in completed]}"
            )
            stored_in_flight += 1
        else:
            assert texts == [t.text for t in completed[: len(texts)]], (
                f"{session}: stored turns are not a prefix of the completed ones: stored (by "
                f"client index) {[by_text[t].index for t in texts]}, completed "
                f"{[t.index for t in completed]}, sent {len(sent_turns)}. A turn missing in the "
                "middle was never captured at all: see the xfail test of a stall (Envoy's 1 s "
                "deferred_close_timeout), which overload reproduces"
            )
            lost.extend(completed[len(texts) :])

    bound = COMMIT_INTERVAL_MS / 1000 + MARGIN_S
    # Age at kill time of each lost turn: > 0 completed at the client before the SIGKILL,
    # < 0 after it (its last bytes were already on their way when sessiongate died).
    ages = sorted(killed_at - t.completed_at for t in lost if t.completed_at is not None)
    before_kill = sum(1 for t in burst.completed if (t.completed_at or 0) <= killed_at)
    in_flight = sum(1 for t in burst.turns if t.completed_at is None)
    figures = (
        f"{len(burst.completed)} turns complete at the client ({before_kill} before the kill), "
        f"{in_flight} never completed; {len(rows)} stored ({stored_in_flight} of them never "
        f"completed at the client); lost {len(lost)} completed turns, "
        f"{sum(1 for a in ages if a > 0)} of them completed before the kill"
        + (
            f"; age at kill time of the oldest lost turn {ages[-1] * 1000:+.1f} ms, of the "
            f"youngest {ages[0] * 1000:+.1f} ms"
            if ages
            else ""
        )
        + f"; bound {bound * 1000:.0f} ms (commit interval {COMMIT_INTERVAL_MS} ms"
        f" + margin {MARGIN_S * 1000:.0f} ms)"
    )
    report(figures)
    too_old = [t for t in lost if killed_at - (t.completed_at or killed_at) > bound]
    assert not too_old, (
        f"{len(too_old)} turns completed more than {bound * 1000:.0f} ms before the kill were "
        f"lost: {[(t.session, t.index) for t in too_old][:10]}; {figures}"
    )
    return stored


async def continue_sessions(gateway: Gateway, ids: list[str]) -> dict[str, tuple[str, str]]:
    """One more turn in every session through the restarted gateway: text -> reply."""

    async def one(http: httpx.AsyncClient, session: str) -> tuple[str, str]:
        text = f"after restart {session} {uuid.uuid4().hex[:8]}"
        reply, _ = await chat(http, session, text, stream=False)
        return text, reply

    async with http_client(gateway) as http, asyncio.timeout(30):
        replies = await asyncio.gather(*(one(http, s) for s in ids))
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
    stored = check_after_kill(burst, ids, read_db(db))

    # Restart on the same state directory: every session continues where the file ends.
    restarted = start_gateway(state_dir, mock.url)
    procs.append(restarted)
    replies = asyncio.run(continue_sessions(restarted, ids))
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

    after = read_db(db)
    rows_after = after.rows
    assert after.integrity == ["ok"], f"integrity_check after the restart: {after.integrity}"
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
        assert after.meta[key_of_text[text]].turns == len(history) + 1
    report(
        f"after the restart: {len(rows_after)} turns stored, every session continued at n+1, "
        "integrity ok"
    )


def test_commit_interval_is_a_flag_as_the_readme_says() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "config", "check", "--commit-interval-ms", "50"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["commit_interval_ms"] == 50


def test_a_stall_of_sessiongate_does_not_lose_a_completed_turn(
    tmp_path: Path, procs: list[Gateway | Mock]
) -> None:
    """SIGSTOP sessiongate for STALL_S while a reply streams past: Envoy delivers the whole
    reply to the client meanwhile (capture runs in observability mode), and once sessiongate
    runs again the turn must be captured and committed."""
    mock = start_mock(tmp_path / "mock")
    procs.append(mock)
    gateway = start_gateway(tmp_path / "gw", mock.url)
    procs.append(gateway)
    pid = gateway.proc.popen.pid
    text = f"stall {uuid.uuid4().hex[:8]}"
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": text}]}
    headers = {
        "authorization": "Bearer sk-durability",
        "x-session-id": "stall-1",
        "x-mock-delay-ms": "50",  # the reply streams for about half a second
    }
    stall_s = 3.0
    with httpx.Client(base_url=gateway.base_url + "/", verify=gateway.ssl_context()) as http:
        try:
            with http.stream("POST", "chat/completions", json=body, headers=headers) as reply:
                # The response headers are here: rewrite is done, the reply is on its way.
                os.kill(pid, signal.SIGSTOP)
                stopped = time.monotonic()
                received = reply.read()
            assert reply.status_code == 200 and received.rstrip().endswith(b"data: [DONE]")
            time.sleep(max(0.0, stopped + stall_s - time.monotonic()))
        finally:
            os.kill(pid, signal.SIGCONT)
    report(f"stall: reply complete at the client {time.monotonic() - stopped:.1f} s ago")
    db = gateway.state_dir / "sessions.db"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        texts = [r.turn.request_messages[0]["content"] for r in read_db(db).rows]
        if text in texts:
            break
        time.sleep(0.05)
    counters = {k: v for k, v in gateway.counters().items() if k.startswith("capture.") and v}
    assert text in texts, f"the turn was not stored after a {stall_s} s stall; {counters}"
