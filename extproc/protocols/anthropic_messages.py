"""Anthropic Messages wire format (`POST /v1/messages`).

Requests (rewrite side)
-----------------------
`parse_request` reads `system` (a string or text blocks), `messages` (string content or
blocks: text, image, tool_use, tool_result, thinking...), `model`, `stream`; `tools` and
`max_tokens` stay in the body, where the budget reads them (extproc/context/budget.py). The
request's system prompt and new messages are also converted to the store's message shape
(extproc/protocols/anthropic_convert.py): that is what the context planner counts and what
the pending turn records. `build_body` puts the session back in Anthropic's shape: the system
prompt (the request's own blocks, else the session's pinned prompt) plus the user context,
summary and facts as system text blocks, the history into `messages` ahead of the request's
own, roles merged so they alternate and the first message is a user's, and prompt-cache
breakpoints on that prefix (extproc/protocols/anthropic_cache.py). A body that is not a
Messages request passes through unchanged (`RequestError`).

Replies (capture side)
----------------------
A JSON reply (`"type": "message"`) or an SSE stream (`message_start`,
`content_block_start/delta/stop` with `text_delta`, `input_json_delta`, `thinking_delta`,
`signature_delta`, `citations_delta`; `message_delta` with `stop_reason` and usage;
`message_stop`; `ping`; `error`) becomes a `CapturedReply` whose message is in the store's
shape (thinking blocks and their signatures kept under `anthropic_content`).

- Complete = `message_stop` with no `error` event before it; a JSON body with
  `"type": "message"`. `stop_reason` (`end_turn`, `max_tokens`, `tool_use`, `stop_sequence`,
  `refusal`, `pause_turn`) is stored verbatim as the turn's `finish_reason`: a truncated or
  refused reply is complete and stored as sent.
- `event: error` under HTTP 200 (e.g. `overloaded_error` mid-stream) or an error body makes
  the reply incomplete: nothing is recorded. Malformed JSON does the same; nothing raises.
- Usage: Anthropic's `input_tokens` excludes the cached prompt, so `prompt_tokens` is
  `input_tokens + cache_read_input_tokens + cache_creation_input_tokens` and `cached_tokens`
  is `cache_read_input_tokens`. Without usage, completion tokens are counted and `estimated`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.context.window import turn_starts_clean
from extproc.protocols import anthropic_cache as cache
from extproc.protocols import anthropic_convert as convert
from extproc.protocols.events import EventAccumulator, preview
from extproc.protocols.openai_chat import CapturedReply, RequestError, _loads
from extproc.protocols.wire import TurnCache, dumps_exact
from extproc.tokens import count_reply
from store.model import Message, Turn, Usage

PATH_SUFFIX = "/v1/messages"
ROLES = frozenset({"user", "assistant"})
# Put in front of a history that would otherwise start with an assistant message.
CONTINUED = "(conversation continued)"

__all__ = ["CapturedReply", "RequestError"]


# --- errors the gateway answers itself --------------------------------------------------------


def error_body(
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """Anthropic's error shape (the SDK raises its typed error with this message); `code`
    and `param`, which Anthropic's shape has no field for, go into the message."""
    detail = f" ({code})" if code else ""
    return orjson.dumps({"type": "error", "error": {"type": type_, "message": message + detail}})


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    body: dict[str, Any]
    system_messages: tuple[Message, ...]  # `system` in the store's shape
    new_messages: tuple[Message, ...]  # `messages` in the store's shape
    model: str
    stream: bool
    # The request's own `messages` as sent, used as they are while `new_messages` is still
    # `converted` (a client mode may replace it with the part not yet stored).
    raw_messages: tuple[dict[str, Any], ...] = ()
    converted: tuple[Message, ...] = ()


def _valid_content(content: Any) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(b, dict) for b in content)


def parse_request(raw: bytes) -> MessagesRequest:
    if not raw:
        raise RequestError("empty body")
    try:
        body = _loads(raw)
    except ValueError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("body is not a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` is missing or empty")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError("every message needs a role of user or assistant")
        if not _valid_content(message.get("content")):
            raise RequestError("message content must be a string or a list of blocks")
    system = body.get("system")
    if system is not None and not _valid_content(system):
        raise RequestError("`system` must be a string or a list of text blocks")
    converted = convert.messages_to_stored(messages)
    model = body.get("model")
    return MessagesRequest(
        body=body,
        system_messages=convert.system_to_stored(system),
        new_messages=converted,
        model=model if isinstance(model, str) else "",
        stream=body.get("stream") is True,
        raw_messages=tuple(messages),
        converted=converted,
    )


@dataclass(frozen=True, slots=True)
class _WireTurn:
    """A history turn as Anthropic messages (cached per turn; never mutated)."""

    messages: tuple[Message, ...]
    size: int  # encoded bytes, for the body size limit


def _wire_turn(turn: Turn) -> _WireTurn:
    messages = tuple(convert.stored_to_messages(turn.messages()))
    return _WireTurn(messages, len(dumps_exact(list(messages))) + 1)


WIRE_CACHE: TurnCache[_WireTurn] = TurnCache(_wire_turn, 32 * 1024 * 1024, lambda w: w.size)


def _as_blocks(content: Any) -> list[Message]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content) if isinstance(content, list) else []


def _join(messages: Sequence[Message]) -> list[Message]:
    """Consecutive messages of one role merged (Anthropic alternates roles), a first
    assistant message preceded by a user one. Merged messages are new dicts."""
    out: list[Message] = []
    for message in messages:
        if out and out[-1].get("role") == message.get("role"):
            content = [*_as_blocks(out[-1].get("content")), *_as_blocks(message.get("content"))]
            out[-1] = {**out[-1], "content": content}
        else:
            out.append(message)
    if out and out[0].get("role") != "user":
        out.insert(0, {"role": "user", "content": CONTINUED})
    return out


def _system_blocks(request: MessagesRequest, system: tuple[Message, ...]) -> list[Message]:
    """The request's own system blocks as sent (its breakpoints kept), then the rest of
    `system` (pinned prompt, user context, summary, facts) as text blocks."""
    own = request.system_messages
    if own and system[: len(own)] == own:
        raw = request.body.get("system")
        return [*_as_blocks(raw), *convert.stored_to_system(system[len(own) :])]
    return convert.stored_to_system(system)


def _orphans(history: Sequence[Turn], skip: int) -> bool:
    return skip > 0 and not turn_starts_clean(history[skip])


def build_body(
    request: MessagesRequest,
    history: Sequence[Turn],
    max_bytes: int,
    system: tuple[Message, ...] | None = None,
    cache_breakpoints: bool = True,
) -> tuple[bytes, int]:
    """System blocks, then history, then the request's messages, with cache breakpoints on
    the injected prefix (`cache_breakpoints`). Returns the body and how many of the oldest
    turns were left out to stay within `max_bytes` (never starting with orphan tool results).
    """
    if system is None:
        system = request.system_messages or _pinned(history)
    body = dict(request.body)
    system_blocks = _system_blocks(request, system)
    if request.new_messages is request.converted:
        new: list[Message] = list(request.raw_messages)
    else:
        new = convert.stored_to_messages(request.new_messages)
    wires = [WIRE_CACHE.get(turn) for turn in history]
    spare = cache.MAX_BREAKPOINTS - cache.count_breakpoints(body) if cache_breakpoints else 0
    body["system"] = system_blocks
    body["messages"] = new
    fixed = len(dumps_exact(body)) + 64 * max(spare, 0)  # a breakpoint adds ~40 bytes
    total = sum(w.size for w in wires)
    skip = 0
    while skip < len(wires) and (fixed + total > max_bytes or _orphans(history, skip)):
        total -= wires[skip].size
        skip += 1
    injected = [m for w in wires[skip:] for m in w.messages]
    if spare > 0 and injected:
        marked = cache.mark_message(injected[-1])
        if marked is not None:
            injected[-1] = marked
            spare -= 1
    if spare > 0 and system_blocks and not cache.ends_marked(system_blocks):
        marked_system = cache.mark_blocks(system_blocks)
        if marked_system is not None:
            system_blocks = marked_system
    if system_blocks:
        body["system"] = system_blocks
    else:
        body.pop("system", None)
    body["messages"] = _join([*injected, *new])
    return dumps_exact(body), skip


def _pinned(history: Sequence[Turn]) -> tuple[Message, ...]:
    for turn in reversed(history):
        if turn.system_messages:
            return turn.system_messages
    return ()


# --- replies --------------------------------------------------------------------------------


def _count(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def _usage(raw: Any, message: Message, prompt_tokens_estimate: int) -> Usage:
    if isinstance(raw, dict) and type(raw.get("output_tokens")) is int:
        read = _count(raw.get("cache_read_input_tokens"))
        created = _count(raw.get("cache_creation_input_tokens"))
        prompt = _count(raw.get("input_tokens")) + read + created
        return Usage(prompt, raw["output_tokens"], False, read, created)
    return Usage(prompt_tokens_estimate, count_reply(message), True)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("type")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) and kind else message
    return "provider error: " + orjson.dumps(error, default=str).decode()


def reply_message(blocks: list[Any]) -> Message:
    """The assistant's content blocks as the stored assistant message."""
    return convert.message_to_stored({"role": "assistant", "content": blocks})[0]


def parse_messages_json(body: bytes, prompt_tokens_estimate: int) -> CapturedReply:
    """Decode a non-streamed Messages reply. Never raises."""
    empty: Message = {"role": "assistant", "content": ""}
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return CapturedReply(
            empty, None, _usage(None, empty, prompt_tokens_estimate), False,
            f"malformed body: {preview(body)}", "",
        )  # fmt: skip
    raw_model = obj.get("model")
    model = raw_model if isinstance(raw_model, str) else ""
    if obj.get("type") == "error" or obj.get("error"):
        return CapturedReply(
            empty, None, _usage(None, empty, prompt_tokens_estimate), False,
            _error_text(obj.get("error")), model,
        )  # fmt: skip
    content = obj.get("content")
    if obj.get("type") != "message" or not isinstance(content, list):
        return CapturedReply(
            empty, None, _usage(obj.get("usage"), empty, prompt_tokens_estimate), False,
            "reply is not a message", model,
        )  # fmt: skip
    message = reply_message(content)
    stop = obj.get("stop_reason")
    return CapturedReply(
        message=message,
        finish_reason=stop if isinstance(stop, str) else None,
        usage=_usage(obj.get("usage"), message, prompt_tokens_estimate),
        complete=True,
        error=None,
        model=model,
    )


class _Block:
    """One content block being streamed: its start object plus the deltas' fragments."""

    __slots__ = ("block", "citations", "json", "signature", "text", "thinking")

    def __init__(self, block: dict[str, Any]) -> None:
        self.block = block
        self.text: list[str] = []
        self.json: list[str] = []
        self.thinking: list[str] = []
        self.signature: list[str] = []
        self.citations: list[Any] = []

    def result(self) -> dict[str, Any]:
        block = dict(self.block)
        kind = block.get("type")
        if kind == "text":
            block["text"] = str(block.get("text") or "") + "".join(self.text)
            if self.citations:
                block["citations"] = [*(block.get("citations") or []), *self.citations]
        elif kind == "thinking":
            block["thinking"] = str(block.get("thinking") or "") + "".join(self.thinking)
            block["signature"] = str(block.get("signature") or "") + "".join(self.signature)
        elif self.json:  # tool_use, server_tool_use: the input arrives as JSON text
            text = "".join(self.json)
            try:
                block["input"] = json.loads(text) if text.strip() else {}
            except ValueError:
                block["input"] = {"arguments": text}
        return block


class MessagesStreamAccumulator(EventAccumulator):
    """Accumulates the `data:` payloads of a Messages SSE stream (every payload carries its
    event's `type`, so the `event:` lines are not needed). Feed each in order, then `result`."""

    __slots__ = ("_blocks", "_model", "_started", "_stop", "_usage")

    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, _Block] = {}
        self._usage: dict[str, Any] = {}
        self._stop: str | None = None
        self._model = ""
        self._started = False

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "content_block_delta":
            slot = self._blocks.get(event["index"])
            if slot is None:
                self._fail("delta for a block that never started")
                return
            delta = event.get("delta") or {}
            dkind = delta.get("type")
            if dkind == "text_delta":
                slot.text.append(delta.get("text") or "")
            elif dkind == "input_json_delta":
                slot.json.append(delta.get("partial_json") or "")
            elif dkind == "thinking_delta":
                slot.thinking.append(delta.get("thinking") or "")
            elif dkind == "signature_delta":
                slot.signature.append(delta.get("signature") or "")
            elif dkind == "citations_delta" and delta.get("citation") is not None:
                slot.citations.append(delta["citation"])
        elif kind == "content_block_start":
            block = event.get("content_block")
            if not isinstance(block, dict):
                self._fail("content_block_start without a block")
                return
            self._blocks[event["index"]] = _Block(block)
        elif kind == "message_start":
            self._started = True
            message = event.get("message") or {}
            model = message.get("model")
            if isinstance(model, str):
                self._model = model
            if isinstance(message.get("usage"), dict):
                self._usage.update(message["usage"])
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            if isinstance(delta.get("stop_reason"), str):
                self._stop = delta["stop_reason"]
            usage = event.get("usage")
            if isinstance(usage, dict):  # cumulative counts; absent or null ones are kept
                self._usage.update({k: v for k, v in usage.items() if v is not None})
        elif kind == "message_stop":
            self._done = True
        elif kind == "error":
            self._fail(_error_text(event.get("error")))
        # ping, content_block_stop and event types added later need nothing

    def result(self, prompt_tokens_estimate: int) -> CapturedReply:
        """The reply so far; `complete` only after `message_stop` without errors."""
        blocks = [self._blocks[i].result() for i in sorted(self._blocks)]
        message = reply_message(blocks)
        error = self._error
        if error is None and self._done and not self._started:
            error = "stream ended without message_start"
        return CapturedReply(
            message=message,
            finish_reason=self._stop,
            usage=_usage(self._usage or None, message, prompt_tokens_estimate),
            complete=self._done and error is None,
            error=error,
            model=self._model,
        )
