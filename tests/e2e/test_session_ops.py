"""Session operations by request header, and the session components the store keeps."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.identity import IdentityResolver
from tests.e2e.conftest import Gateway, Mock, marker


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def ask(
    gateway: Gateway, session: str, text: str, op: str | None = None, api_key: str = "sk-test-1"
) -> str:
    headers = {"x-session-op": op} if op else {}
    reply = gateway.client(session, api_key=api_key).chat.completions.create(
        model="m", messages=[user(text)], extra_headers=headers
    )
    return reply.choices[0].message.content or ""


def users_seen(mock: Mock, mark: str) -> list[str]:
    messages = mock.request_with(mark)["body"]["messages"]
    return [m["content"] for m in messages if m["role"] == "user"]


def test_clear_starts_over(gateway: Gateway, mock: Mock, session_id: str) -> None:
    first, second, third = marker(), marker(), marker()
    ask(gateway, session_id, first)
    ask(gateway, session_id, second)
    ask(gateway, session_id, third, op="clear")
    assert users_seen(mock, third) == [third]
    fourth = marker()
    ask(gateway, session_id, fourth)
    assert users_seen(mock, fourth) == [third, fourth]


def test_rewind_keeps_the_first_turns(gateway: Gateway, mock: Mock, session_id: str) -> None:
    texts = [marker() for _ in range(3)]
    for text in texts:
        ask(gateway, session_id, text)
    again = marker()
    ask(gateway, session_id, again, op="rewind:1")
    assert users_seen(mock, again) == [texts[0], again]
    after = marker()
    ask(gateway, session_id, after)
    assert users_seen(mock, after) == [texts[0], again, after]


def test_fork_copies_into_a_new_session_and_leaves_the_source(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    base = [marker(), marker()]
    for text in base:
        ask(gateway, session_id, text)
    branch = session_id + "-b"
    in_branch = marker()
    ask(gateway, branch, in_branch, op=f"fork:{session_id}")
    assert users_seen(mock, in_branch) == [*base, in_branch]
    in_source = marker()
    ask(gateway, session_id, in_source)
    assert users_seen(mock, in_source) == [*base, in_source]


def test_fork_never_reads_another_principals_session(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    secret = marker()
    ask(gateway, session_id, secret, api_key="sk-alice")
    probe = marker()
    ask(gateway, session_id + "-m", probe, op=f"fork:{session_id}", api_key="sk-mallory")
    assert users_seen(mock, probe) == [probe]


@pytest.mark.parametrize(
    "op", ["delete", "rewind:-1", "rewind:x", "fork:", "fork:bad id", "clear:1"]
)
def test_invalid_op_gets_400(gateway: Gateway, session_id: str, op: str) -> None:
    reply = gateway.http().post(
        "/chat/completions",
        json={"model": "m", "messages": [user("x")]},
        headers={
            "authorization": "Bearer sk-test-1",
            "x-session-id": session_id,
            "x-session-op": op,
        },
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_session_op"


def _docs(gateway: Gateway, session_id: str, api_key: str) -> dict[str, dict[str, Any]]:
    key = (gateway.state_dir / "hmac.key").read_bytes().strip()
    resolver = IdentityResolver(key)
    identity = resolver.resolve({"authorization": f"Bearer {api_key}"}, {}, {})
    assert identity is not None
    session_key = resolver.session_key(identity, session_id)
    db = gateway.state_dir / "sessions.db"
    deadline = time.monotonic() + 5
    while True:
        docs = _read_docs(db, session_key)
        if {"meta", "security", "state", "derived"} <= docs.keys() or time.monotonic() > deadline:
            return docs
        time.sleep(0.05)


def _read_docs(db: Path, session_key: str) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT name, data FROM docs WHERE session_key = ?", (session_key,)
        ).fetchall()
    return {name: orjson.loads(data) for name, data in rows}


def test_session_components_are_stored(gateway: Gateway, session_id: str) -> None:
    client = gateway.client(session_id)
    system = {"role": "system", "content": "You are terse."}
    client.chat.completions.create(model="m", messages=[system, user("hello")])
    client.chat.completions.create(model="m", messages=[user(f"[[tool:lookup]] {marker()}")])
    deadline = time.monotonic() + 5
    docs = _docs(gateway, session_id, "sk-test-1")
    while docs.get("meta", {}).get("turns") != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        docs = _docs(gateway, session_id, "sk-test-1")
    meta, security, state, derived = (docs[n] for n in ("meta", "security", "state", "derived"))
    assert meta["turns"] == 2 and meta["created_at"] <= meta["last_activity"]
    assert meta["user_agent"].startswith("OpenAI/Python")
    assert meta["prompt_tokens"] > 0 and meta["completion_tokens"] > 0
    assert security["tenant"] == "default" and security["principal"].startswith("key:")
    assert state["phase"] == "awaiting_tool_results"
    assert [call["name"] for call in state["pending_tool_calls"]] == ["lookup"]
    assert derived["pinned_system"] == [system]
    raw = (gateway.state_dir / "sessions.db").read_bytes()
    assert b"sk-test-1" not in raw
