"""Anthropic Messages through Envoy with the real `anthropic` SDK: memory, tool use, prompt-cache
breakpoints on the injected prefix, cached tokens stored, the window kept, and one session
used from both SDKs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from tests.e2e.conftest import Gateway, Mock, configured_gateway
from tests.e2e.test_usage_calibration import poll, stored

MODEL = "claude-haiku-4-5"  # in the windows table, and not deprecated by the SDK


def client(gateway: Gateway, session: str, api_key: str = "sk-ant-test", **headers: str) -> Any:
    return anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"),  # the SDK adds /v1/messages itself
        api_key=api_key,
        max_retries=0,
        timeout=20,
        default_headers={"x-session-id": session, **headers},
        http_client=anthropic.DefaultHttpxClient(verify=gateway.ssl_context()),
    )


def sent_with(mock: Mock, marker: str) -> dict[str, Any]:
    """The last Messages request the provider received whose newest message holds `marker`."""
    for request in reversed(mock.requests()):
        body = request.get("body")
        is_messages = request["path"].endswith("/v1/messages") and isinstance(body, dict)
        if is_messages and marker in str(body.get("messages", [])[-1:]):
            return body
    raise AssertionError(f"the provider never received {marker!r}")


def breakpoints(body: dict[str, Any]) -> list[str]:
    out = ["system" for b in body.get("system", []) if "cache_control" in b]
    for i, message in enumerate(body["messages"]):
        if isinstance(message["content"], list):
            out += [str(i) for b in message["content"] if "cache_control" in b]
    return out


def ask(sdk: Any, text: str, stream: bool, **kw: Any) -> Any:
    request = {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": text}]}
    request.update(kw)
    if stream:
        with sdk.messages.stream(**request) as s:
            return s.get_final_message()
    return sdk.messages.create(**request)


@pytest.mark.parametrize("stream", [False, True])
def test_a_conversation_remembers_with_breakpoints_on_the_injected_prefix(
    gateway: Gateway, mock: Mock, stream: bool
) -> None:
    tag = uuid.uuid4().hex[:8]
    sdk = client(gateway, f"ant-{tag}")
    first = ask(sdk, f"my name is Ada {tag}", stream, system="be brief")
    assert first.content[0].text == f"echo: my name is Ada {tag} [n=1]"
    second = ask(sdk, f"what is my name? {tag}", stream)  # no system: the pinned one comes back
    assert second.content[0].text.endswith("[n=3]")
    third = ask(sdk, f"third {tag}", stream)
    assert third.content[0].text.endswith("[n=5]")
    body = sent_with(mock, f"third {tag}")
    assert body["system"][0]["text"] == "be brief"
    assert f"my name is Ada {tag}" in str(body["messages"][0])
    assert body["messages"][3]["content"][0]["text"].startswith("echo: what is my name?")
    assert breakpoints(body) == ["system", "3"]  # the system prompt and the last history message
    assert body["messages"][-1] == {"role": "user", "content": f"third {tag}"}
    assert third.usage.cache_read_input_tokens > 0


def test_a_tool_use_exchange_round_trips(gateway: Gateway, mock: Mock) -> None:
    tag = uuid.uuid4().hex[:8]
    sdk = client(gateway, f"tool-{tag}")
    tools = [{"name": "lookup", "description": "look up", "input_schema": {"type": "object"}}]
    with sdk.messages.stream(
        model=MODEL,
        max_tokens=256,
        tools=tools,
        messages=[{"role": "user", "content": f"[[tool:lookup]] {tag}"}],
    ) as s:
        call = s.get_final_message()
    assert call.stop_reason == "tool_use"
    use = call.content[0]
    assert use.type == "tool_use" and use.input == {"q": f"[[tool:lookup]] {tag}"}
    # Only the result is sent: the mock rejects a tool_result whose tool_use it did not see.
    result = {"type": "tool_result", "tool_use_id": use.id, "content": f"found {tag}"}
    answer = sdk.messages.create(
        model=MODEL, max_tokens=256, tools=tools, messages=[{"role": "user", "content": [result]}]
    )
    assert answer.stop_reason == "end_turn"
    after = ask(sdk, f"thanks {tag}", False, tools=tools)
    body = sent_with(mock, f"thanks {tag}")
    assert [m["role"] for m in body["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert body["messages"][1]["content"][0]["input"] == {"q": f"[[tool:lookup]] {tag}"}
    assert body["messages"][2]["content"][0]["tool_use_id"] == use.id
    assert after.content[0].text.endswith("[n=5]")


def test_cache_reads_from_turn_three_and_stored_turns_carry_them(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex[:8]
    sdk = client(gateway, f"cache-{tag}", api_key=f"sk-ant-{tag}")  # its own provider cache
    reads = []
    for i in range(6):
        reply = ask(sdk, f"turn {i} {tag} " + "lorem ipsum dolor " * 20, i % 2 == 1)
        usage = reply.usage
        reads.append(usage.cache_read_input_tokens)
        assert usage.input_tokens >= 0
    assert reads[:2] == [0, 0]  # no system prompt: nothing to read before two turns are stored
    assert all(r > 0 for r in reads[2:]) and reads[2:] == sorted(reads[2:])
    db = gateway.state_dir / "sessions.db"

    def committed() -> Any:
        turns, _ = stored(db, tag)
        return turns if len(turns) == 6 else None

    turns = poll("stored turns", committed)
    assert [t.usage.cached_tokens for t in turns] == reads
    assert all(t.usage.prompt_tokens > t.usage.cached_tokens for t in turns)
    assert turns[0].request_messages[0]["content"].startswith("turn 0")


def test_the_margin_is_reported_on_the_messages_route(gateway: Gateway) -> None:
    tag = uuid.uuid4().hex[:8]
    raw = client(gateway, f"hdr-{tag}").messages.with_raw_response.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": f"hi {tag}"}]
    )
    assert raw.headers["x-sessiongate-margin"] == "250"  # the Claude family's 25%
    assert raw.headers["x-sessiongate-context"] == "fit"


def test_a_session_started_with_openai_continues_with_anthropic(
    gateway: Gateway, mock: Mock
) -> None:
    tag = uuid.uuid4().hex[:8]
    session = f"both-{tag}"
    gateway.client(session).chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "system", "content": "answer briefly"},
            {"role": "user", "content": f"remember {tag}"},
        ],
    )
    reply = ask(client(gateway, session, api_key="sk-test-1"), f"recall {tag}", False)
    assert reply.content[0].text.endswith("[n=3]")
    body = sent_with(mock, f"recall {tag}")
    assert body["system"][0]["text"] == "answer briefly"
    assert body["messages"][0]["content"] == [{"type": "text", "text": f"remember {tag}"}]


def test_bad_session_ids_get_anthropic_errors(gateway: Gateway) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        ask(client(gateway, "bad id!"), "x", False)
    assert "invalid x-session-id" in info.value.message


# --- a small window ---------------------------------------------------------------------------

WINDOW = 2048


@pytest.fixture(scope="module")
def small_gateway(mock: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("anthropic-small")
    yield from configured_gateway(
        directory,
        mock.url,
        f'[context.models."claude-small"]\nwindow = {WINDOW}\nfamily = "claude"\n',
    )


def test_a_long_conversation_never_exceeds_a_small_window(small_gateway: Gateway) -> None:
    tag = uuid.uuid4().hex[:8]
    sdk = client(small_gateway, f"long-{tag}", **{"x-mock-context-window": str(WINDOW)})
    before = small_gateway.counters()
    for i in range(40):
        reply = sdk.messages.create(
            model="claude-small",
            max_tokens=256,
            system="you are a patient assistant",
            messages=[{"role": "user", "content": f"turn {i} {tag} " + "the quick brown fox " * 8}],
        )  # the mock answers 400 above the window, which the SDK raises
        assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens > 0
    counters = small_gateway.counters()
    assert counters["context.outcome.trimmed"] > before["context.outcome.trimmed"]


@pytest.fixture(scope="module")
def body_source_gateway(mock: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("anthropic-user-id")
    yield from configured_gateway(
        directory,
        mock.url,
        'session_sources = ["header", "body"]\nsession_body_fields = ["metadata.user_id"]\n',
    )


def test_metadata_user_id_is_a_session_without_a_header(
    body_source_gateway: Gateway, mock: Mock
) -> None:
    """An unchanged Anthropic app that sends `metadata.user_id` gets memory, bound to its own
    credential: the same user id under another API key is another session."""
    tag = uuid.uuid4().hex[:8]
    gateway = body_source_gateway

    def sdk(api_key: str) -> Any:
        return anthropic.Anthropic(
            base_url=gateway.base_url.removesuffix("/v1"),
            api_key=api_key,
            max_retries=0,
            timeout=20,
            http_client=anthropic.DefaultHttpxClient(verify=gateway.ssl_context()),
        )

    metadata = {"user_id": f"u-{tag}"}
    first, second, third = (f"{word}-{tag}" for word in ("first", "second", "third"))
    ask(sdk("sk-ant-a"), first, False, metadata=metadata)
    ask(sdk("sk-ant-a"), second, False, metadata=metadata)
    assert first in str(sent_with(mock, second)["messages"])
    ask(sdk("sk-ant-b"), third, False, metadata=metadata)
    assert first not in str(sent_with(mock, third)["messages"])
    assert gateway.counters()["rewrite.session_source.body"] >= 3
