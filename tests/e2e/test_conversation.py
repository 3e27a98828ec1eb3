"""A user's view: an unmodified OpenAI SDK app sends only its newest message each turn."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.e2e.conftest import Gateway, Mock, marker


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def received(mock: Mock, mark: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = mock.request_with(mark)["body"]["messages"]
    return messages


def test_multi_turn_history_is_sent_once_and_in_order(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    client = gateway.client(session_id)
    sent: list[str] = []
    replies: list[str] = []
    for turn in range(3):
        text = f"turn {turn} {marker()}"
        sent.append(text)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[user(text)])
        replies.append(reply.choices[0].message.content or "")
    messages = received(mock, sent[-1])
    expected: list[dict[str, Any]] = []
    for text, answer in zip(sent[:-1], replies[:-1], strict=True):
        expected += [user(text), {"role": "assistant", "content": answer}]
    assert messages == [*expected, user(sent[-1])]
    # The mock says how many messages it saw: the app's reply is the provider's, untouched.
    assert replies[-1] == f"echo: {sent[-1]} [n=5]"


def test_system_prompt_first_then_history(gateway: Gateway, mock: Mock, session_id: str) -> None:
    client = gateway.client(session_id)
    first, second = marker(), marker()
    system = {"role": "system", "content": "You are terse."}
    client.chat.completions.create(model="m", messages=[system, user(first)])
    client.chat.completions.create(model="m", messages=[user(second)])
    messages = received(mock, second)
    # The pinned system prompt leads even when the client no longer sends it.
    assert messages[0] == system
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]


def test_streaming_capture_equals_sdk_accumulated_result(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    client = gateway.client(session_id)
    first = f"[[long:40]] {marker()}"
    with client.chat.completions.stream(model="m", messages=[user(first)]) as stream:
        final = stream.get_final_completion()
    second = marker()
    client.chat.completions.create(model="m", messages=[user(second)])
    messages = received(mock, second)
    assert messages[1]["role"] == "assistant"
    assert messages[1]["content"] == final.choices[0].message.content
    assert len((final.choices[0].message.content or "").split()) >= 40


def test_tool_calls_and_results_are_remembered(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    client = gateway.client(session_id)
    ask = f"[[tool:lookup]] {marker()}"
    with client.chat.completions.stream(model="m", messages=[user(ask)]) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    result = {"role": "tool", "tool_call_id": call.id, "content": "42"}
    follow = marker()
    client.chat.completions.create(model="m", messages=[result, user(follow)])  # type: ignore[list-item]
    messages = received(mock, follow)
    assistant = messages[1]
    assert assistant["role"] == "assistant" and assistant["content"] is None
    assert assistant["tool_calls"] == [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": "lookup", "arguments": call.function.arguments},
        }
    ]
    assert messages[2] == result
    assert messages[3] == user(follow)


async def test_async_client_streaming_and_not(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    async with gateway.async_client(session_id) as client:
        first, second, third = marker(), marker(), marker()
        reply = await client.chat.completions.create(model="m", messages=[user(first)])
        chunks = []
        stream = await client.chat.completions.create(
            model="m", messages=[user(second)], stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks.append(chunk.choices[0].delta.content)
        await client.chat.completions.create(model="m", messages=[user(third)])
    messages = received(mock, third)
    assert messages == [
        user(first),
        {"role": "assistant", "content": reply.choices[0].message.content},
        user(second),
        {"role": "assistant", "content": "".join(chunks)},
        user(third),
    ]


def test_interleaved_sessions_never_mix(gateway: Gateway, mock: Mock) -> None:
    a, b = gateway.client("mix-a-" + marker()), gateway.client("mix-b-" + marker())
    texts = {"a": [marker() for _ in range(3)], "b": [marker() for _ in range(3)]}
    for i in range(3):
        a.chat.completions.create(model="m", messages=[user(texts["a"][i])])
        b.chat.completions.create(model="m", messages=[user(texts["b"][i])])
    for name, other in (("a", "b"), ("b", "a")):
        seen = str(received(mock, texts[name][-1]))
        assert all(t in seen for t in texts[name])
        assert not any(t in seen for t in texts[other])


def test_another_credential_with_the_same_session_id_sees_nothing(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    secret = marker()
    gateway.client(session_id, api_key="sk-alice").chat.completions.create(
        model="m", messages=[user(f"my secret is {secret}")]
    )
    probe = marker()
    gateway.client(session_id, api_key="sk-mallory").chat.completions.create(
        model="m", messages=[user(probe)]
    )
    assert received(mock, probe) == [user(probe)]
    # The same credential written differently (scheme case, spacing) is the same principal.
    again = marker()
    reply = gateway.http().post(
        "/chat/completions",
        json={"model": "m", "messages": [user(again)]},
        headers={"authorization": "bearer   sk-alice", "x-session-id": session_id},
    )
    assert reply.status_code == 200
    assert secret in str(received(mock, again))


def test_non_ascii_history_keeps_byte_exact_content_length(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    client = gateway.client(session_id)
    texts = [f"héllo wörld 😀 日本語 {marker()}", f"ça va? 🚀 {marker()}", marker()]
    for text in texts:
        client.chat.completions.create(model="m", messages=[user(text)])
    messages = received(mock, texts[-1])
    assert [m["content"] for m in messages if m["role"] == "user"] == texts
    assert messages[1]["content"].startswith("echo: héllo wörld 😀 日本語")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("stream", [False, True])
def test_compressed_replies_are_captured(
    gateway: Gateway, mock: Mock, session_id: str, encoding: str, stream: bool
) -> None:
    # The SDK cannot decode zstd, so this client is plain httpx; the mock is deterministic,
    # so the reply to be remembered is what the same first message gets uncompressed.
    first = f"[[long:12]] {marker()} ünïcode"
    body = {"model": "m", "messages": [user(first)], "stream": stream}
    headers = {
        "authorization": "Bearer sk-test-1",
        "x-session-id": session_id,
        "x-mock-encoding": encoding,
    }
    reply = gateway.http().post("/chat/completions", json=body, headers=headers)
    assert reply.status_code == 200 and reply.headers["content-encoding"] == encoding
    expected = gateway.client().chat.completions.create(model="m", messages=[user(first)])
    second = marker()
    gateway.client(session_id).chat.completions.create(model="m", messages=[user(second)])
    assert received(mock, second)[1] == {
        "role": "assistant",
        "content": expected.choices[0].message.content,
    }


def test_sse_split_mid_line_and_mid_utf8_is_captured(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    client = gateway.client(session_id)
    first = f"😀😀 é {marker()} 日本"
    # Offsets every 3 bytes cut lines, JSON and multi-byte characters anywhere.
    split = ",".join(str(i) for i in range(1, 4000, 3))
    with client.chat.completions.stream(
        model="m", messages=[user(first)], extra_headers={"x-mock-split": split}
    ) as s:
        answer = s.get_final_completion().choices[0].message.content
    second = marker()
    client.chat.completions.create(model="m", messages=[user(second)])
    assert received(mock, second)[1] == {"role": "assistant", "content": answer}


@pytest.mark.parametrize(
    "fault", ["status:500", "status:429", "no-done", "reset-after:60", "truncate-json"]
)
def test_failed_or_aborted_replies_record_nothing(
    gateway: Gateway, mock: Mock, session_id: str, fault: str
) -> None:
    client = gateway.client(session_id)
    abandoned_before = gateway.counters()["store.abandoned"]
    kept = marker()
    client.chat.completions.create(model="m", messages=[user(kept)])
    lost = marker()
    stream = fault in {"no-done", "reset-after:60"}
    with pytest.raises(Exception):  # noqa: B017 - each fault surfaces differently in the SDK
        if stream:
            with client.chat.completions.stream(
                model="m", messages=[user(lost)], extra_headers={"x-mock-fault": fault}
            ) as s:
                s.get_final_completion()
            raise RuntimeError("the stream ended without [DONE]")  # no-done ends "cleanly"
        client.chat.completions.create(
            model="m", messages=[user(lost)], extra_headers={"x-mock-fault": fault}
        )
    after = marker()
    client.chat.completions.create(model="m", messages=[user(after)])
    seen = str(received(mock, after))
    assert kept in seen
    assert lost not in seen
    # An aborted stream is abandoned when Envoy closes the observed stream (at the latest its
    # deferred_close_timeout after the reply ended).
    deadline = time.monotonic() + 15
    while gateway.counters()["store.abandoned"] == abandoned_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.counters()["store.abandoned"] == abandoned_before + 1


def test_read_your_writes_200_turns_back_to_back(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    """Each request goes out the instant the previous reply ends; every one sees them all."""
    client = gateway.client(session_id)
    timeouts_before = gateway.counters()["rewrite.pending_wait_timeout"]
    for i in range(200):
        stream = i % 2 == 1
        text = f"{i} {marker()}"
        if stream:
            with client.chat.completions.stream(model="m", messages=[user(text)]) as s:
                answer = s.get_final_completion().choices[0].message.content or ""
        else:
            answer = (
                client.chat.completions.create(model="m", messages=[user(text)])
                .choices[0]
                .message.content
                or ""
            )
        # The mock reports how many messages it received: 2 per earlier turn, plus this one.
        assert answer.endswith(f"[n={2 * i + 1}]"), (i, answer)
    # Not one of them had to give up waiting for its predecessor.
    assert gateway.counters()["rewrite.pending_wait_timeout"] == timeouts_before


async def test_concurrent_requests_on_one_session_all_land(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    async with gateway.async_client(session_id) as client:
        texts = [marker() for _ in range(8)]
        await asyncio.gather(
            *(client.chat.completions.create(model="m", messages=[user(t)]) for t in texts)
        )
        final = marker()
        await client.chat.completions.create(model="m", messages=[user(final)])
    messages = received(mock, final)
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert sorted(users[:-1]) == sorted(texts) and users[-1] == final
    # Each turn stays together: a user message is followed by its own assistant reply.
    for i in range(0, 16, 2):
        assert messages[i + 1]["content"].startswith(f"echo: {messages[i]['content']}")
