"""Dynamic selection and rolling summaries through Envoy.

A long conversation in a 4,096-token window with a fact planted early among distractors: a
recall question gets the planted turn back via relevance (what the mock provider received says
so), the same question under `x-sessiongate-strategy: window` does not, and once turns are
dropped a summary made by the configured summarizer (the mock provider itself, called directly
by sessiongate, not through Envoy) leads the history.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from extproc.context.summary import HEADER as SUMMARY_HEADER
from tests.e2e.conftest import Gateway, Mock, configured_gateway
from tests.e2e.test_context import FILLER, MODEL, WINDOW, client_for, received_with, user

SUMMARIZER_KEY = "sk-summarizer-test"
SUMMARIZER_MODEL = "mock-summarizer"
TOPICS = ["apples", "trains", "violins", "glaciers", "tulips", "compilers", "volcanoes", "chess"]
PLANTED = "The vault code is PELICAN-42, keep it safe."


@pytest.fixture(scope="module")
def strategies_gateway(mock: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("strategies-gateway")
    key = directory / "summarizer.key"
    key.write_text(SUMMARIZER_KEY + "\n")
    yield from configured_gateway(
        directory,
        mock.url,
        "context_summary_share = 0.1\n"
        f'context_summarizer_url = "{mock.url}/v1"\n'
        f'context_summarizer_model = "{SUMMARIZER_MODEL}"\n'
        f'context_summarizer_api_key_file = "{key}"\n'
        f'\n[context.models."{MODEL}"]\nwindow = {WINDOW}\n',
    )


def history_messages(sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in sent if m["role"] != "system"]


def summarizer_calls(mock: Mock) -> list[dict[str, Any]]:
    return [
        r
        for r in mock.requests()
        if isinstance(r.get("body"), dict) and r["body"].get("model") == SUMMARIZER_MODEL
    ]


def test_recall_relevance_and_summary(strategies_gateway: Gateway, mock: Mock) -> None:
    tag = "r" + uuid.uuid4().hex[:8]
    client = client_for(strategies_gateway, "strat-" + tag)
    system = {"role": "system", "content": "You answer briefly. " + tag}
    summarized: list[dict[str, Any]] | None = None
    for i in range(80):
        if i == 1:
            text = f"turn {i} {tag}. {PLANTED}"
        else:
            text = f"turn {i} {tag}. A note about {TOPICS[i % len(TOPICS)]}: {FILLER}"
        messages: list[Any] = [system, user(text)] if i == 0 else [user(text)]
        reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
        assert reply.headers["x-sessiongate-strategy"] == "window"
        sent = received_with(mock, f"turn {i} {tag}.")[-1]
        if len(sent) > 1 and sent[1]["content"].startswith(SUMMARY_HEADER):
            summarized = sent
            assert int(reply.headers["x-sessiongate-summary-tokens"]) > 0
            if i > 45:
                break
        if i > 40 and summarized is None:
            time.sleep(0.05)  # the summary is made in the background; no request waits for it
    assert summarized is not None, "no summary reached the provider"
    # Injection order: the pinned system prompt, the summary, then the history.
    assert summarized[0] == system
    # The summarizer's answer (the mock echoes its two-message input: its newest lines, the
    # dropped turns, are what fits the summary's share) stands for the dropped turns.
    content = summarized[1]["content"]
    assert content.endswith("[n=2]") and "- user: turn " in content
    assert PLANTED not in json.dumps(history_messages(summarized))
    # The summarizer was called directly: its key, no session header, nothing Envoy adds.
    calls = summarizer_calls(mock)
    assert calls
    for call in calls:
        headers = call["headers"]
        assert headers["authorization"] == f"Bearer {SUMMARIZER_KEY}"
        assert "x-session-id" not in headers and "x-request-id" not in headers
        assert "x-envoy-expected-rq-timeout-ms" not in headers
    # ...and never recorded into the session: no history message carries its prompt.
    assert "running summary" not in json.dumps(history_messages(summarized))

    ask = f"What did I tell you about the vault code? {tag}"
    reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=[user(ask)])
    assert reply.headers["x-sessiongate-strategy"] == "relevance"
    assert reply.headers["x-sessiongate-query"] == "recall"
    assert int(reply.headers["x-sessiongate-relevant-turns"]) > 0
    assert "relevance" in reply.headers["x-sessiongate-dropped-by"]
    request = mock.request_with(ask)
    assert "x-sessiongate-strategy" not in request["headers"]
    sent = request["body"]["messages"]
    history = history_messages(sent)
    planted = [k for k, m in enumerate(history) if PLANTED in str(m["content"])]
    assert planted and history[planted[0]]["role"] == "user"
    # Chronological: the turn numbers the client sent only grow.
    numbers = [
        int(m["content"].split()[1])
        for m in history
        if m["role"] == "user" and m["content"].startswith("turn ")
    ]
    assert numbers == sorted(numbers) and numbers[0] == 1 and numbers[-1] > 40
    assert history[-1] == user(ask)

    # The same question with the window strategy asked for: the planted turn stays out.
    again = client.copy(default_headers={"x-sessiongate-strategy": "window"})
    ask2 = f"What did I tell you about the vault code, again? {tag}"
    reply = again.chat.completions.with_raw_response.create(model=MODEL, messages=[user(ask2)])
    assert reply.headers["x-sessiongate-strategy"] == "window"
    sent = mock.request_with(ask2)["body"]["messages"]
    assert PLANTED not in json.dumps(history_messages(sent))
    counters = strategies_gateway.counters()
    assert counters["context.strategy.relevance"] >= 1
    assert counters["context.query.recall"] >= 2
    assert counters["context.summary_injected"] >= 1
    assert counters["context.summary.produced.llm"] >= 1


def test_an_unknown_strategy_is_a_400(strategies_gateway: Gateway) -> None:
    client = client_for(strategies_gateway, "strat-bad").copy(
        default_headers={"x-sessiongate-strategy": "psychic"}
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[user("hello")])
    assert err.value.code == "invalid_strategy"
