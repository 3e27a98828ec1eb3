"""What the gateway stores, read back from its own SQLite file."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from store import Turn, decode_turn
from tests.e2e.conftest import Gateway, marker, start_gateway, start_mock


def stored_turn(db: Path, mark: str, timeout: float = 5) -> Turn:
    """The committed turn whose user message contains `mark` (polls: commits are grouped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute(
                "SELECT record FROM turns WHERE CAST(record AS TEXT) LIKE ?", (f"%{mark}%",)
            ).fetchall()
        if rows:
            return decode_turn(rows[-1][0])
        time.sleep(0.05)
    raise AssertionError(f"no committed turn contains {mark}")


@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_usage_is_estimated_and_marked_unless_sent(
    gateway: Gateway, session_id: str, include_usage: bool
) -> None:
    mark = marker()
    options = {"include_usage": True} if include_usage else None
    kwargs = {"stream_options": options} if options else {}
    with gateway.client(session_id).chat.completions.stream(
        model="m", messages=[{"role": "user", "content": f"[[long:30]] {mark}"}], **kwargs
    ) as stream:
        final = stream.get_final_completion()
    turn = stored_turn(gateway.state_dir / "sessions.db", mark)
    assert turn.usage.estimated is (not include_usage)
    assert turn.finish_reason == "stop"
    if include_usage:
        assert final.usage is not None
        assert turn.usage.completion_tokens == final.usage.completion_tokens
        assert turn.usage.prompt_tokens == final.usage.prompt_tokens
    else:
        # An estimate, but a sensible one: at least one token per word of the reply.
        assert turn.usage.completion_tokens >= 30 and turn.usage.prompt_tokens > 0
    # Nothing secret is stored: no API key, no raw session id.
    raw = (gateway.state_dir / "sessions.db").read_bytes()
    assert b"sk-test-1" not in raw and session_id.encode() not in raw


def test_upstream_path_prefix_is_honoured(tmp_path: Path) -> None:
    mock = start_mock(tmp_path / "mock", "--prefix", "/openai")
    gateway = start_gateway(tmp_path / "gw", mock.url + "/openai/v1")
    try:
        client = gateway.client("prefix-1")
        first, second = marker(), marker()
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": first}])
        answer = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": second}]
        )
        assert answer.choices[0].message.content == f"echo: {second} [n=3]"
        assert mock.request_with(second)["path"] == "/openai/v1/chat/completions"
    finally:
        assert gateway.proc.stop() == 0
        mock.proc.stop()


def test_each_turn_is_stored_with_its_token_count(gateway: Gateway, session_id: str) -> None:
    """Counted once at capture, so a long session read after a restart is not re-tokenized."""
    from extproc.tokens import count_message, counts_key

    mark = marker()
    gateway.client(session_id).chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"count me {mark}"}]
    )
    turn = stored_turn(gateway.state_dir / "sessions.db", mark)
    expected = sum(count_message(m, 765) for m in turn.messages())
    assert turn.token_counts == {counts_key(765): expected}


def test_each_turn_is_stored_with_its_key_facts(gateway: Gateway, session_id: str) -> None:
    """Extracted once at capture, so a session read after a restart is not scanned again."""
    from extproc.context.facts import FACTS_VERSION

    mark = marker()
    said = f"My name is Ann. I prefer tea with {mark}."
    gateway.client(session_id).chat.completions.create(
        model="m", messages=[{"role": "user", "content": said}]
    )
    turn = stored_turn(gateway.state_dir / "sessions.db", mark)
    preference = f"I prefer tea with {mark}."
    assert turn.facts == {
        FACTS_VERSION: [["name", "My name is Ann."], [preference.lower(), preference]]
    }
