"""Anthropic Messages: request parsing, conversion to the store's shape and back, bodies with
cache breakpoints, JSON replies and SSE accumulation (the mock provider's own event bytes)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.context import ContextManager, ContextSettings
from extproc.protocols import anthropic_cache as cache
from extproc.protocols import anthropic_convert as convert
from extproc.protocols import anthropic_messages as am
from extproc.protocols import formats
from extproc.protocols.openai_chat import RequestError
from extproc.protocols.openai_chat import build_body as openai_build_body
from extproc.protocols.openai_chat import parse_request as openai_parse
from extproc.sse import SSEDecoder
from store.model import Turn


def request(messages: list[Any], **extra: Any) -> am.MessagesRequest:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 256, "messages": messages, **extra}
    return am.parse_request(orjson.dumps(body))


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def stored_turn(turn_id: str, messages: list[Any], reply: list[Any]) -> Turn:
    parsed = request(messages)
    return Turn(turn_id, parsed.new_messages, am.reply_message(reply))


# --- parsing ----------------------------------------------------------------------------------


def test_parse_request_converts_system_and_messages_to_the_store_shape() -> None:
    parsed = request(
        [
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "42"},
                    {"type": "text", "text": "and?", "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
        system=[{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        stream=True,
    )
    assert parsed.system_messages == (
        {
            "role": "system",
            "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        },
    )
    assert parsed.new_messages == (
        {"role": "tool", "tool_call_id": "t1", "content": "42"},
        {"role": "user", "content": "and?"},
    )
    assert parsed.stream and parsed.model == "claude-sonnet-4-5"
    assert request([user("x")], system="sys").system_messages == (
        {"role": "system", "content": "sys"},
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"messages": []}',
        b'{"messages": [{"role": "system", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": 3}]}',
        b'{"messages": [{"role": "user", "content": "x"}], "system": 5}',
    ],
)
def test_bodies_that_are_not_messages_requests_pass_through(body: bytes) -> None:
    with pytest.raises(RequestError):
        am.parse_request(body)


def test_formats_are_picked_by_path_and_by_recorded_name() -> None:
    assert formats.for_path("/v1/chat/completions") is formats.OPENAI
    assert formats.for_path("/support/v1/messages") is formats.ANTHROPIC
    assert formats.for_path("/v1/models") is None
    assert formats.by_name("anthropic_messages") is formats.ANTHROPIC
    assert formats.by_name("") is formats.OPENAI


# --- conversion -------------------------------------------------------------------------------

text = st.text(min_size=1, max_size=20)
ids = st.text(alphabet="abcdef0123456789", min_size=4, max_size=8).map(lambda s: "toolu_" + s)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
text_block = st.builds(lambda t: {"type": "text", "text": t}, text)
image_block = st.builds(
    lambda d: {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": d}},
    st.text(alphabet="ABCD+/=", min_size=4, max_size=12),
)
tool_use = st.builds(
    lambda i, n, inp: {"type": "tool_use", "id": i, "name": n, "input": inp},
    ids,
    st.text(alphabet="abc_", min_size=1, max_size=8),
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
)
thinking = st.builds(lambda t, s: {"type": "thinking", "thinking": t, "signature": s}, text, text)
tool_result = st.builds(
    lambda i, c, e: {"type": "tool_result", "tool_use_id": i, "content": c, **e},
    ids,
    text | st.lists(text_block | image_block, max_size=2),
    st.sampled_from([{}, {"is_error": True}]),
)
assistant = st.builds(
    lambda blocks: {"role": "assistant", "content": blocks},
    st.lists(thinking, max_size=1).flatmap(
        lambda th: st.lists(text_block | tool_use, min_size=1, max_size=3).map(lambda r: th + r)
    ),
) | st.builds(lambda t: {"role": "assistant", "content": t}, text)
user_message = st.builds(
    lambda blocks: {"role": "user", "content": blocks},
    st.lists(tool_result, max_size=2).flatmap(
        lambda results: st.lists(text_block | image_block, max_size=2).map(lambda r: results + r)
    ),
).filter(lambda m: m["content"]) | st.builds(lambda t: {"role": "user", "content": t}, text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(user_message, assistant), min_size=1, max_size=4))
def test_anthropic_messages_survive_the_store_shape(pairs: list[tuple[Any, Any]]) -> None:
    """Anthropic -> stored -> Anthropic gives the same blocks (thinking signatures, is_error,
    tool-result images included), and the stored shape is clean for the OpenAI API."""
    messages = [m for pair in pairs for m in pair]
    stored = convert.messages_to_stored(messages)
    back = convert.stored_to_messages(stored)
    assert [convert._normal_blocks(m["content"]) for m in back] == [
        convert._normal_blocks(m["content"]) for m in messages
    ]
    assert [m["role"] for m in back] == [m["role"] for m in messages]
    for message in stored:
        clean = convert.strip_for_openai(message)
        assert convert.ANTHROPIC_CONTENT not in clean
        assert clean["role"] in ("user", "assistant", "tool")


def test_tool_use_is_stored_as_openai_tool_calls_and_continues_in_either_format() -> None:
    turn = stored_turn(
        "t1",
        [user("weather?")],
        [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
    )
    assert turn.response_message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
            }
        ],
    }
    answer = request(
        [
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
            }
        ]
    )
    assert answer.new_messages == ({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},)
    # The same session from the OpenAI SDK: plain OpenAI messages, nothing Anthropic-only.
    chat = openai_parse(orjson.dumps({"model": "gpt-4o", "messages": [user("and tomorrow?")]}))
    body, _ = openai_build_body(chat, [turn], 1 << 20)
    assert orjson.loads(body)["messages"][1] == turn.response_message


def test_thinking_blocks_keep_their_signatures_for_anthropic_only() -> None:
    reply = [
        {"type": "thinking", "thinking": "hmm", "signature": "sig=="},
        {"type": "text", "text": "4"},
    ]
    turn = stored_turn("t1", [user("2+2")], reply)
    assert turn.response_message["content"] == "4"
    body, _ = am.build_body(request([user("and 3+3?")]), [turn], 1 << 20, cache_breakpoints=False)
    assert orjson.loads(body)["messages"][1]["content"] == reply
    chat = openai_parse(orjson.dumps({"model": "gpt-4o", "messages": [user("x")]}))
    sent, _ = openai_build_body(chat, [turn], 1 << 20)
    assert b"sig==" not in sent and b"anthropic_content" not in sent


def test_openai_history_becomes_alternating_anthropic_messages() -> None:
    chat_turn = Turn(
        "t1",
        (
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": "not json"},
                }
            ],
        },
    )
    tool_turn = Turn(
        "t2",
        (
            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
            {"role": "user", "content": "so?"},
        ),
        {"role": "assistant", "content": ""},  # empty: left out, the users merge
    )
    body, _ = am.build_body(
        request([user("next")]), [chat_turn, tool_turn], 1 << 20, cache_breakpoints=False
    )
    messages = orjson.loads(body)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][1]["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": "AAAA",
    }
    assert messages[1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"arguments": "not json"}}
    ]
    assert messages[2]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "call_1",
            "content": [{"type": "text", "text": "done"}],
        },
        {"type": "text", "text": "so?"},
        {"type": "text", "text": "next"},
    ]


# --- bodies and breakpoints --------------------------------------------------------------------


def history(n: int) -> list[Turn]:
    return [
        stored_turn(f"t{i}", [user(f"question {i}")], [{"type": "text", "text": f"answer {i}"}])
        for i in range(n)
    ]


def marked(body: dict[str, Any]) -> list[str]:
    """Where the breakpoints are: "system", or "<message index>"."""
    out = ["system" for b in body.get("system", []) if "cache_control" in b]
    for i, message in enumerate(body["messages"]):
        content = message["content"]
        if isinstance(content, list):
            out += [str(i) for b in content if "cache_control" in b]
    return out


def test_breakpoints_mark_the_system_and_the_last_injected_message() -> None:
    turns = history(3)
    body = orjson.loads(am.build_body(request([user("q3")], system="sys"), turns, 1 << 20)[0])
    assert marked(body) == ["system", "5"]
    assert body["system"] == [{"type": "text", "text": "sys", "cache_control": cache.EPHEMERAL}]
    assert body["messages"][-1] == user("q3")  # the request's own, untouched


@pytest.mark.parametrize("own", [0, 1, 2, 3, 4])
def test_never_more_than_four_breakpoints_counting_the_clients(own: int) -> None:
    ephemeral = {"type": "ephemeral"}
    tools = [{"name": f"t{i}", "input_schema": {}, "cache_control": ephemeral} for i in range(own)]
    parsed = request([user("q")], system="sys", tools=tools)
    body = orjson.loads(am.build_body(parsed, history(2), 1 << 20)[0])
    assert cache.count_breakpoints(body) == min(4, own + 2)
    # The history breakpoint goes first when only one is left.
    if own == 3:
        assert marked(body) == ["3"]


def test_the_injected_prefix_is_byte_identical_from_turn_to_turn() -> None:
    turns = history(6)
    bodies = []
    for n in range(2, 6):
        raw, _ = am.build_body(request([user(f"q{n}")], system="sys"), turns[:n], 1 << 20)
        bodies.append(convert.strip_cache_control(orjson.loads(raw)))
    for previous, current in itertools.pairwise(bodies):
        injected = len(previous["messages"]) - 1
        assert current["system"] == previous["system"]
        assert current["messages"][:injected] == previous["messages"][:injected]


def test_client_breakpoints_on_its_own_system_are_kept_and_not_doubled() -> None:
    system = [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}]
    body = orjson.loads(am.build_body(request([user("q")], system=system), history(1), 1 << 20)[0])
    assert marked(body) == ["system", "1"]


def test_breakpoints_can_be_turned_off() -> None:
    body = orjson.loads(
        am.build_body(request([user("q")], system="s"), history(2), 1 << 20, None, False)[0]
    )
    assert marked(body) == []


def test_oldest_turns_are_left_out_to_fit_the_body_limit() -> None:
    turns = history(20)
    full, skipped = am.build_body(request([user("q")]), turns, 1 << 20)
    assert skipped == 0
    body, skipped = am.build_body(request([user("q")]), turns, len(full) // 2)
    assert 0 < skipped < 20 and len(body) <= len(full) // 2


# --- budget -------------------------------------------------------------------------------


def test_budget_counts_system_tools_and_max_tokens_of_anthropic_requests() -> None:
    manager = ContextManager(ContextSettings())
    tools = [{"name": "lookup", "description": "x " * 200, "input_schema": {"type": "object"}}]
    plain = request([user("hi")])
    rich = request([user("hi")], system="s " * 300, tools=tools, max_tokens=5000)
    a = manager.plan("k", plain.body, plain.model, plain.system_messages, plain.new_messages, [])
    b = manager.plan("k", rich.body, rich.model, rich.system_messages, rich.new_messages, [])
    assert a.window == b.window == 200_000  # the Claude model table applies
    assert (a.reserved_output, b.reserved_output) == (256, 5000)
    assert b.prompt_tokens - a.prompt_tokens > 500  # system prompt and tool schema
    assert a.margin == 0.25  # the Claude family's margin, reported


# --- replies --------------------------------------------------------------------------------


def test_json_reply_usage_adds_the_cached_prompt_back() -> None:
    reply = am.parse_messages_json(
        orjson.dumps(
            {
                "type": "message",
                "model": "claude-x",
                "content": [{"type": "text", "text": "hi", "citations": None}],
                "stop_reason": "max_tokens",
                "usage": {
                    "input_tokens": 10,
                    "output_tokens": 5,
                    "cache_read_input_tokens": 100,
                    "cache_creation_input_tokens": 20,
                },
            }
        ),
        0,
    )
    assert reply.complete and reply.finish_reason == "max_tokens"
    assert reply.message == {"role": "assistant", "content": "hi"}
    assert (reply.usage.prompt_tokens, reply.usage.cached_tokens) == (130, 100)
    assert reply.usage.cache_creation_tokens == 20 and not reply.usage.estimated
    error = am.parse_messages_json(
        b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}', 0
    )
    assert not error.complete and error.error == "overloaded_error: busy"
    assert not am.parse_messages_json(b"{nope", 7).complete


def mock_events(content: list[Any], stop: str = "end_turn", **faults: bool) -> bytes:
    """The mock provider's own SSE bytes for a reply."""
    from extproc import mock_anthropic, mock_llm

    knobs = mock_llm._Knobs(**faults)
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 9,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 4,
            "output_tokens": 7,
        },
    }
    return b"".join(mock_anthropic._events(message, knobs))


def accumulate(data: bytes, cuts: list[int]) -> Any:
    decoder = SSEDecoder()
    acc = am.MessagesStreamAccumulator()
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for a, b in itertools.pairwise(bounds):
        for event in decoder.feed(data[a:b]):
            acc.feed_event(event.data)
    return acc.result(0)


CONTENT = [
    {"type": "thinking", "thinking": "pensé ✓ 🧠", "signature": "c2ln"},
    {"type": "text", "text": "héllo wörld — ✓ 🎉 done"},
    {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"q": "ünïcode 🎉", "n": [1, 2]}},
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2000), max_size=12))
def test_stream_split_anywhere_accumulates_the_whole_reply(cuts: list[int]) -> None:
    reply = accumulate(mock_events(CONTENT, "tool_use"), cuts)
    assert reply.complete and reply.finish_reason == "tool_use"
    assert reply.message["content"] == "héllo wörld — ✓ 🎉 done"
    assert (
        reply.message["tool_calls"][0]["function"]["arguments"]
        == orjson.dumps(CONTENT[2]["input"]).decode()
    )
    assert reply.message[convert.ANTHROPIC_CONTENT] == CONTENT  # thinking and its signature
    assert (
        reply.usage.prompt_tokens,
        reply.usage.cached_tokens,
        reply.usage.completion_tokens,
    ) == (13, 4, 7)


def test_every_byte_boundary_including_inside_utf8_characters() -> None:
    data = mock_events(CONTENT[1:2])
    for cut in range(1, len(data)):
        assert accumulate(data, [cut]).message["content"] == CONTENT[1]["text"]


def test_an_error_event_or_a_missing_message_stop_records_nothing() -> None:
    error = accumulate(mock_events(CONTENT[1:2], error_event=True), [])
    assert not error.complete and error.error == "overloaded_error: Overloaded"
    unfinished = accumulate(mock_events(CONTENT[1:2], no_done=True), [])
    assert not unfinished.complete and unfinished.error is None


def test_stored_anthropic_blocks_are_not_counted_twice() -> None:
    """A stored message keeps its original blocks beside its `content`; only one of the two is
    ever sent, so the budget counts one (a PDF's base64 counted as text would make the session
    look huge)."""
    from extproc import tokens
    from extproc.protocols.anthropic_convert import ANTHROPIC_CONTENT

    assert ANTHROPIC_CONTENT in tokens.ALTERNATIVE_CONTENT_KEYS
    plain = {"role": "user", "content": "summarise the attached report"}
    blob = "JVBERi0xLjQK" * 20_000  # ~240 kB of base64
    with_blocks = {
        **plain,
        ANTHROPIC_CONTENT: [
            {"type": "document", "source": {"type": "base64", "data": blob}},
            {"type": "text", "text": "summarise the attached report"},
        ],
    }
    assert tokens.count_message(with_blocks) == tokens.count_message(plain)
