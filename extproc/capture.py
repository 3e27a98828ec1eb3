"""The capture filter (observability mode): decode the reply as it streams past, never answer.

Envoy sends response headers, then body chunks, and does not wait for us. When the protocol's
terminal event arrives the completed turn is handed to the store's writer; the handler itself
only decodes and enqueues. Anything short of a complete 2xx reply records nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from extproc import mutations
from extproc.context.calibration import ESTIMATED_USAGE
from extproc.context.facts import facts_record
from extproc.decoding import BodyDecoder, DecodingError, UnsupportedEncoding, make_decoder
from extproc.metrics import Metrics
from extproc.protocols import formats
from extproc.protocols.formats import StreamAccumulator, WireFormat
from extproc.protocols.openai_chat import CapturedReply
from extproc.sse import SSEDecoder, SSEError
from extproc.tokens import turn_token_counts
from store import PendingTurn, TurnSink
from store.model import Message, Usage

log = logging.getLogger(__name__)

# (model, the plan's prompt estimate, the provider's prompt_tokens, has media): the model
# table's `observe_usage`, which learns the safety margins the budget applies.
UsageObserver = Callable[[str, int, int, bool], None]


def has_media(messages: tuple[Message, ...]) -> bool:
    """Image, audio or file parts: counted at fixed estimates, not by the tokenizer."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type", "text") != "text":
                    return True
    return False


class CaptureStream:
    """One reply. `on_*` return False once nothing more is needed (the handler then returns)."""

    def __init__(
        self,
        store: TurnSink,
        metrics: Metrics,
        max_json_bytes: int,
        delay_s: float = 0.0,
        image_tokens: int | None = None,
        usage_observer: UsageObserver | None = None,
        extract_facts: bool = True,
    ) -> None:
        self.store = store
        self.usage_observer = usage_observer
        self.planned = 0  # the plan's prompt count (PendingTurn.planned_prompt_tokens)
        # With context management on: the turn's token count is taken here and stored with it,
        # and its key facts when some context policy uses them.
        self.image_tokens = image_tokens
        self.extract_facts = extract_facts
        self.delay_s = delay_s
        self.metrics = metrics
        self.max_json_bytes = max_json_bytes
        self.pending: PendingTurn | None = None
        self.decoder: BodyDecoder | None = None
        self.sse: SSEDecoder | None = None
        self.accumulator: StreamAccumulator | None = None
        self.wire: WireFormat = formats.OPENAI
        self.json_body = bytearray()
        self.finished = False

    def on_response_headers(self, request: Any, known: PendingTurn | None = None) -> bool:
        """`known`: the pending turn, when the caller already looked it up."""
        if known is None:
            turn_id = mutations.turn_id_of(request)
            if turn_id is None:
                return False  # not a request we rewrote: close the stream at once
            known = self.store.pending(turn_id)
        self.pending = known
        if self.pending is None:
            self.metrics.inc("capture.unknown_turn")
            self.finished = True
            return False
        self.store.mark_responding(self.pending.turn_id)
        self.planned = self.pending.planned_prompt_tokens
        self.wire = formats.by_name(self.pending.wire_format)
        headers = mutations.headers_dict(request.response_headers)
        status = headers.get(":status", "")
        if not status.startswith("2"):
            return self._abandon(f"status.{status or 'missing'}")
        try:
            self.decoder = make_decoder(headers.get("content-encoding"))
        except UnsupportedEncoding:
            return self._abandon("unsupported_encoding")
        if headers.get("content-type", "").lower().startswith("text/event-stream"):
            self.sse = SSEDecoder()
            self.accumulator = self.wire.stream_accumulator()
        if request.response_headers.end_of_stream:
            return self._finish()
        return True

    def on_response_body(self, request: Any) -> bool:
        if self.finished or self.decoder is None:
            return False
        body = request.response_body
        try:
            data = self.decoder.decompress(body.body)
            if body.end_of_stream:
                data += self.decoder.flush()
            if self.sse is not None and self.accumulator is not None:
                for event in self.sse.feed(data):
                    self.accumulator.feed_event(event.data)
                    if self.accumulator.done:
                        return self._finish()
            else:
                self.json_body += data
                if len(self.json_body) > self.max_json_bytes:
                    return self._abandon("reply_too_large")
        except (DecodingError, SSEError) as exc:
            log.info("capture: undecodable reply: %s", exc)
            return self._abandon("undecodable")
        if body.end_of_stream:
            return self._finish()
        return True

    def on_stream_end(self) -> None:
        """Envoy closed the stream (reply aborted, client gone): record nothing."""
        if self.pending is not None and not self.finished:
            self._abandon("aborted")

    def _finish(self) -> bool:
        assert self.pending is not None
        estimate = self.pending.prompt_tokens_estimate
        if self.accumulator is not None:
            reply: CapturedReply = self.accumulator.result(estimate)
        else:
            reply = self.wire.parse_json(bytes(self.json_body), estimate)
        if not reply.complete or reply.error:
            return self._abandon("incomplete" if not reply.error else "provider_error")
        self.finished = True
        if self.delay_s:  # debug_capture_delay_ms: a slow capture, on purpose
            asyncio.get_running_loop().call_later(self.delay_s, self._complete, reply)
        else:
            self._complete(reply)
        return False

    def _complete(self, reply: CapturedReply) -> None:
        pending = self.pending
        assert pending is not None
        counts = facts = None
        if self.image_tokens is not None:  # context management on
            messages = [*pending.request_messages, reply.message]
            counts = turn_token_counts(messages, self.image_tokens)
            if self.extract_facts:
                facts = facts_record(pending.request_messages)
        if self.store.complete_turn(
            pending.turn_id, reply.message, reply.finish_reason, reply.usage, counts, facts
        ):
            self.metrics.inc("capture.completed")
        else:
            self.metrics.inc("capture.dropped")
        self._count_usage(pending, reply.usage)

    def _count_usage(self, pending: PendingTurn, usage: Usage) -> None:
        """Provider-reported prompt and cached tokens (their ratio is the prompt-cache hit
        rate), and the calibration's sample."""
        if usage.estimated:
            if self.usage_observer is not None and self.planned:
                self.metrics.inc(f"context.calibration.ignored.{ESTIMATED_USAGE}")
            return
        inc = self.metrics.inc
        inc("capture.prompt_tokens", usage.prompt_tokens)
        inc("capture.cached_tokens", usage.cached_tokens)
        if usage.cache_creation_tokens:
            inc("capture.cache_creation_tokens", usage.cache_creation_tokens)
        if self.usage_observer is not None:
            if self.planned:
                media = has_media(pending.request_messages)
                self.usage_observer(pending.model, self.planned, usage.prompt_tokens, media)
            else:
                inc("context.calibration.ignored.unplanned")

    def _abandon(self, reason: str) -> bool:
        assert self.pending is not None
        self.finished = True
        self.store.abandon_turn(self.pending.turn_id)
        self.metrics.inc(f"capture.abandoned.{reason}")
        return False


class CaptureObserver:
    """A `CaptureStream` driven message by message by the transport (extproc.grpc_h2.Observer):
    the first message is the response headers, then body chunks; `on_end` always comes last."""

    __slots__ = ("_known", "_started", "stream")

    def __init__(self, stream: CaptureStream, known: PendingTurn | None = None) -> None:
        self.stream = stream
        self._known = known  # the pending turn the transport's hook already found
        self._started = False

    def on_message(self, request: Any) -> bool:
        if not self._started:
            self._started = True
            return self.stream.on_response_headers(request, self._known)
        if request.WhichOneof("request") == "response_body":
            return self.stream.on_response_body(request)
        return True  # trailers and the like: nothing to record

    def on_end(self) -> None:
        self.stream.on_stream_end()
