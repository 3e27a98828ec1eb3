"""Capture's usage figures: cached prompt tokens from JSON and SSE replies (OpenAI's and the
Anthropic-style names), the metrics a prompt-cache hit rate is computed from, and the samples
capture hands to margin calibration (only for requests the plan sent)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf.struct_pb2 import Struct

from extproc.capture import CaptureStream, has_media
from extproc.metrics import Metrics
from extproc.mutations import METADATA_NAMESPACE, turn_metadata_bytes
from extproc.protocols.openai_chat import ChatStreamAccumulator, parse_chat_json
from extproc.rewrite import planned_prompt_tokens
from store.model import Message, PendingTurn, Usage

OPENAI_USAGE = {
    "prompt_tokens": 2006,
    "completion_tokens": 300,
    "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
}


def completion(usage: dict[str, Any] | None) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


def sse(usage: dict[str, Any] | None) -> bytes:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    if usage is not None:
        chunks.append({**base, "choices": [], "usage": usage})
    events = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks]
    return b"".join(events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("usage", "cached", "created"),
    [
        (OPENAI_USAGE, 1920, 0),
        ({"prompt_tokens": 10, "completion_tokens": 2}, 0, 0),
        ({**OPENAI_USAGE, "prompt_tokens_details": None}, 0, 0),
        ({**OPENAI_USAGE, "prompt_tokens_details": {"cached_tokens": "9"}}, 0, 0),
        # OpenAI-compatible servers in front of Anthropic models (LiteLLM and the like).
        (
            {
                "prompt_tokens": 3000,
                "completion_tokens": 5,
                "cache_read_input_tokens": 2048,
                "cache_creation_input_tokens": 512,
            },
            2048,
            512,
        ),
        # Both: OpenAI's own figure wins.
        ({**OPENAI_USAGE, "cache_read_input_tokens": 7}, 1920, 0),
    ],
)
def test_cached_tokens_from_json_and_sse(usage: dict[str, Any], cached: int, created: int) -> None:
    expected = Usage(usage["prompt_tokens"], usage["completion_tokens"], False, cached, created)
    assert parse_chat_json(completion(usage), 42).usage == expected
    accumulator = ChatStreamAccumulator()
    for event in sse(usage).split(b"\n\n")[:-1]:
        accumulator.feed_event(event.removeprefix(b"data: ").decode())
    assert accumulator.result(42).usage == expected


def test_no_usage_means_no_cache_figures() -> None:
    usage = parse_chat_json(completion(None), 42).usage
    assert usage.estimated and (usage.cached_tokens, usage.cache_creation_tokens) == (0, 0)


class Sink:
    """The capture filter's side of the store, in memory."""

    def __init__(self, pending: PendingTurn) -> None:
        self.turn = pending
        self.completed: list[Usage | None] = []

    def pending(self, turn_id: str) -> PendingTurn | None:
        return self.turn if turn_id == self.turn.turn_id else None

    async def find_pending(self, turn_id: str) -> PendingTurn | None:
        return self.pending(turn_id)

    def mark_responding(self, turn_id: str) -> None:
        pass

    def complete_turn(
        self,
        turn_id: str,
        response_message: Message,
        finish_reason: str | None,
        usage: Usage | None = None,
        token_counts: dict[str, int] | None = None,
        facts: dict[str, list[list[str]]] | None = None,
    ) -> bool:
        self.completed.append(usage)
        return True

    def abandon_turn(self, turn_id: str) -> None:
        pass


def figures(outcome: str | None, estimate: int) -> dict[str, str | int]:
    """The context figures rewrite computed for the request."""
    found: dict[str, str | int] = {"context_prompt_estimate": estimate}
    if outcome is not None:
        found["context_outcome"] = outcome
    return found


def headers(content_type: str) -> Any:
    request = ep.ProcessingRequest()
    for key, value in ((":status", "200"), ("content-type", content_type)):
        request.response_headers.headers.headers.append(
            base_pb2.HeaderValue(key=key, raw_value=value.encode())
        )
    # What rewrite sets as dynamic metadata is what Envoy forwards to the capture filter.
    sent = Struct.FromString(turn_metadata_bytes("turn-1", "s", {}))[METADATA_NAMESPACE]
    request.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(sent)
    return request


def body(data: bytes) -> Any:
    request = ep.ProcessingRequest()
    request.response_body.body = data
    request.response_body.end_of_stream = True
    return request


def capture(
    data: bytes, outcome: str | None, *, stream: bool, content: Any = "hello"
) -> tuple[Metrics, list[tuple[str, int, int, bool]], Sink]:
    # Rewrite hands capture the plan's prompt count with the pending turn.
    planned = planned_prompt_tokens(figures(outcome, 1900))
    pending = PendingTurn(
        "turn-1",
        "k",
        ({"role": "user", "content": content},),
        model="gpt-4o",
        planned_prompt_tokens=planned,
    )
    sink = Sink(pending)
    metrics = Metrics()
    seen: list[tuple[str, int, int, bool]] = []

    def observe(model: str, estimated: int, reported: int, media: bool) -> None:
        seen.append((model, estimated, reported, media))

    capture = CaptureStream(sink, metrics, 1 << 20, usage_observer=observe)
    kind = "text/event-stream" if stream else "application/json"
    assert capture.on_response_headers(headers(kind))
    assert not capture.on_response_body(body(data))
    return metrics, seen, sink


@pytest.mark.parametrize("stream", [False, True])
def test_metrics_count_prompt_and_cached_tokens(stream: bool) -> None:
    data = sse(OPENAI_USAGE) if stream else completion(OPENAI_USAGE)
    metrics, seen, sink = capture(data, "trimmed", stream=stream)
    counts = metrics.snapshot()
    assert counts["capture.prompt_tokens"] == 2006
    assert counts["capture.cached_tokens"] == 1920
    assert sink.completed[0] is not None and sink.completed[0].cached_tokens == 1920
    assert seen == [("gpt-4o", 1900, 2006, False)]


@pytest.mark.parametrize("outcome", ["request_exceeds_window", "disabled", None])
def test_requests_the_plan_did_not_send_teach_nothing(outcome: str | None) -> None:
    metrics, seen, _ = capture(completion(OPENAI_USAGE), outcome, stream=False)
    assert seen == []
    assert metrics.snapshot()["context.calibration.ignored.unplanned"] == 1


def test_estimated_usage_teaches_nothing_and_counts_no_prompt_tokens() -> None:
    metrics, seen, _ = capture(sse(None), "fit", stream=True)
    assert seen == []
    counts = metrics.snapshot()
    assert "capture.prompt_tokens" not in counts
    assert counts["context.calibration.ignored.estimated_usage"] == 1


def test_media_is_flagged() -> None:
    image = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]
    _, seen, _ = capture(completion(OPENAI_USAGE), "fit", stream=False, content=image)
    assert seen == [("gpt-4o", 1900, 2006, True)]
    assert not has_media(({"role": "user", "content": [{"type": "text", "text": "x"}]},))


def test_planned_prompt_tokens_reads_the_rewrite_figures() -> None:
    assert planned_prompt_tokens(figures("fit", 1234)) == 1234
    assert planned_prompt_tokens(figures("pinned_system_dropped", 1234)) == 0
    assert planned_prompt_tokens({}) == 0
