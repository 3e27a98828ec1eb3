"""OpenAI Chat Completions wire format.

Requests (rewrite side)
-----------------------
The client's body is parsed into its leading system/developer messages and the new messages
of this turn; the history is spliced between them (`build_body`). A body we cannot parse is
not rewritten: it passes through and the provider answers it.

Responses (capture side)
------------------------
A reply becomes a `CapturedReply` whose `message` is the assistant message exactly as the next
request's history should carry it: `{"role": "assistant", "content": str | None}` plus
`"tool_calls"` only if the model called tools and `"refusal"` only if it refused. `content` is
`None` when it is empty and the reply has tool calls or a refusal (as the API itself returns
it), otherwise a string (possibly `""`, which the API accepts in history where `null` alone is
rejected).

A streamed reply is complete only when its terminal event, `data: [DONE]`, arrives and no error
was seen; the end of the byte stream alone is not completion. A non-streamed reply is complete
when it is a well-formed `chat.completion` with a choice. Only choice 0 is recorded (n>1 replies
keep their first choice).

How the edge cases are stored:
- `finish_reason: "length"` (truncated by `max_tokens`/the context window), `"content_filter"`
  (the provider cut or withheld output) and refusals (`refusal` text, usually with
  `finish_reason: "stop"`) are all *complete* replies, stored as the provider sent them: the
  partial content and/or the `refusal` string go into the message and `finish_reason` is kept on
  the turn, so a caller can see why the reply stopped.
- An `error` object, either as the whole body or as an SSE event under HTTP 200 (some providers
  send `data: {"error": {...}}` mid-stream), records `error` and makes the reply not complete,
  even if `[DONE]` follows. Malformed JSON does the same; nothing here ever raises.
- No usage in the reply (streams only carry it with `stream_options.include_usage`, which we
  never inject): the completion tokens are counted over the captured message with
  `extproc.tokens`, the prompt tokens are the caller's estimate, and `Usage.estimated` is True.

Streamed tool calls are merged by `index` as the official SDK does, except that `id`, `type` and
`function.name` are taken from the first fragment that carries them rather than concatenated
(some providers repeat them in every fragment; the SDK would then produce `"call_1call_1"`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.context.window import turn_starts_clean
from extproc.protocols.anthropic_convert import strip_for_openai
from extproc.protocols.events import EventAccumulator, preview
from extproc.protocols.wire import TurnWireCache, joined
from extproc.tokens import count_reply
from store.model import Message, Turn, Usage

# --- responses ---


@dataclass(slots=True)
class CapturedReply:
    """The assistant reply decoded from a response, ready to complete a pending turn."""

    message: Message
    finish_reason: str | None
    usage: Usage
    complete: bool
    error: str | None
    model: str


def _assistant_message(content: Any, tool_calls: list[Message], refusal: Any) -> Message:
    refusal = refusal if isinstance(refusal, str) and refusal else None
    if not isinstance(content, str) or not content:
        content = None if tool_calls or refusal else ""
    message: Message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if refusal is not None:
        message["refusal"] = refusal
    return message


def _count(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def _cache_tokens(raw: dict[str, Any]) -> tuple[int, int]:
    """(read from the prompt cache, written to it): OpenAI's
    `prompt_tokens_details.cached_tokens`, else the Anthropic-style names some
    OpenAI-compatible servers (LiteLLM, Bedrock gateways) put in the same usage object."""
    details = raw.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    if not cached:
        cached = _count(raw.get("cache_read_input_tokens"))
    return cached, _count(raw.get("cache_creation_input_tokens"))


def _usage(raw: Any, message: Message, prompt_tokens_estimate: int) -> Usage:
    """Parsed once per reply (the JSON body, or the last usage an SSE stream carried)."""
    if isinstance(raw, dict):
        prompt = raw.get("prompt_tokens")
        completion = raw.get("completion_tokens")
        if type(prompt) is int and type(completion) is int:
            cached, created = _cache_tokens(raw)
            return Usage(prompt, completion, False, cached, created)
    return Usage(
        prompt_tokens=prompt_tokens_estimate,
        completion_tokens=count_reply(message),
        estimated=True,
    )


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("code") or error.get("type")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) and kind else message
    return "provider error: " + orjson.dumps(error, default=str).decode()


class _ToolCallSlot:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id = ""
        self.type = ""
        self.name = ""
        self.arguments: list[str] = []

    def to_message(self) -> Message:
        return {
            "id": self.id,
            "type": self.type or "function",
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


class ChatStreamAccumulator(EventAccumulator):
    """Accumulates the `data:` payloads of a `chat.completion.chunk` SSE stream.

    Feed every event's data string to `feed_event` in order, then call `result`. Per event the
    work is one `orjson.loads` and a few dict lookups; content fragments are joined only once,
    in `result`.
    """

    __slots__ = (
        "_content",
        "_finish_reason",
        "_model",
        "_refusal",
        "_saw_choice",
        "_tools",
        "_usage",
    )

    SHAPE = "chunk"

    def __init__(self) -> None:
        super().__init__()
        self._content: list[str] = []
        self._refusal: list[str] = []
        self._tools: dict[int, _ToolCallSlot] = {}
        self._finish_reason: str | None = None
        self._usage: Any = None
        self._model = ""
        self._saw_choice = False

    def _terminal(self, data: str) -> bool:
        """OpenAI ends a stream with the payload `[DONE]`, not JSON."""
        return data == "[DONE]" or (data[:1] != "{" and data.strip() == "[DONE]")

    def _apply(self, chunk: dict[str, Any]) -> None:
        error = chunk.get("error")
        if error or chunk.get("object") == "error":  # vLLM-style bare error objects too
            self._fail(_error_text(error or chunk))
            return
        if not self._model:
            model = chunk.get("model")
            if isinstance(model, str):
                self._model = model
        usage = chunk.get("usage")
        if usage:
            self._usage = usage
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            self._saw_choice = True
            delta = choice.get("delta")
            if delta:
                text = delta.get("content")
                if text and isinstance(text, str):
                    self._content.append(text)
                refusal = delta.get("refusal")
                if refusal and isinstance(refusal, str):
                    self._refusal.append(refusal)
                tool_calls = delta.get("tool_calls")
                if tool_calls:
                    self._merge_tool_calls(tool_calls)
            finish_reason = choice.get("finish_reason")
            if finish_reason and isinstance(finish_reason, str):
                self._finish_reason = finish_reason

    def _merge_tool_calls(self, fragments: list[dict[str, Any]]) -> None:
        tools = self._tools
        for fragment in fragments:
            call_id = fragment.get("id")
            if not isinstance(call_id, str):
                call_id = ""
            index = fragment.get("index")
            if type(index) is not int:
                # No index (seen from some OpenAI-compatible servers): a new id starts a new
                # call, anything else continues the last one.
                last = max(tools, default=-1)
                if last < 0 or (call_id and tools[last].id and call_id != tools[last].id):
                    last += 1
                index = last
            slot = tools.get(index)
            if slot is None:
                slot = tools[index] = _ToolCallSlot()
            if call_id and not slot.id:
                slot.id = call_id
            kind = fragment.get("type")
            if kind and not slot.type and isinstance(kind, str):
                slot.type = kind
            function = fragment.get("function")
            if function:
                name = function.get("name")
                if name and not slot.name and isinstance(name, str):
                    slot.name = name
                arguments = function.get("arguments")
                if arguments and isinstance(arguments, str):
                    slot.arguments.append(arguments)

    def result(self, prompt_tokens_estimate: int) -> CapturedReply:
        """The reply as accumulated so far; `complete` only after `[DONE]` without errors."""
        tool_calls = [self._tools[i].to_message() for i in sorted(self._tools)]
        message = _assistant_message("".join(self._content), tool_calls, "".join(self._refusal))
        error = self._error
        if error is None and self._done and not self._saw_choice:
            error = "stream ended without a choice"
        return CapturedReply(
            message=message,
            finish_reason=self._finish_reason,
            usage=_usage(self._usage, message, prompt_tokens_estimate),
            complete=self._done and error is None,
            error=error,
            model=self._model,
        )


def _message_tool_calls(raw: Any) -> list[Message]:
    if not isinstance(raw, list):
        return []
    calls: list[Message] = []
    for call in raw:
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        if isinstance(function, dict):
            calls.append(
                {
                    "id": call.get("id") or "",
                    "type": call.get("type") or "function",
                    "function": {
                        "name": function.get("name") or "",
                        "arguments": function.get("arguments") or "",
                    },
                }
            )
        else:  # other tool kinds (e.g. custom tools) are kept as the provider sent them
            calls.append(call)
    return calls


def parse_chat_json(body: bytes, prompt_tokens_estimate: int) -> CapturedReply:
    """Decode a non-streamed `chat.completion` body. Never raises."""
    empty = _assistant_message("", [], None)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        return CapturedReply(
            message=empty,
            finish_reason=None,
            usage=_usage(None, empty, prompt_tokens_estimate),
            complete=False,
            error=f"malformed body: {preview(body)}",
            model="",
        )
    model = obj.get("model")
    model = model if isinstance(model, str) else ""
    error: str | None = _error_text(obj["error"]) if obj.get("error") else None
    choices = obj.get("choices")
    choice: dict[str, Any] = {}
    if isinstance(choices, list):
        firsts = [c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0]
        choice = firsts[0] if firsts else {}
    raw = choice.get("message")
    if not isinstance(raw, dict):
        return CapturedReply(
            message=empty,
            finish_reason=None,
            usage=_usage(obj.get("usage"), empty, prompt_tokens_estimate),
            complete=False,
            error=error or "completion without a choice message",
            model=model,
        )
    message = _assistant_message(
        raw.get("content"), _message_tool_calls(raw.get("tool_calls")), raw.get("refusal")
    )
    finish_reason = choice.get("finish_reason")
    return CapturedReply(
        message=message,
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        usage=_usage(obj.get("usage"), message, prompt_tokens_estimate),
        complete=error is None,
        error=error,
        model=model,
    )


# --- requests ---

SYSTEM_ROLES = frozenset({"system", "developer"})


class RequestError(ValueError):
    """The body is not a chat request we can add memory to; the request passes through."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    system_messages: tuple[Message, ...]  # the request's leading system/developer messages
    new_messages: tuple[Message, ...]  # everything after them: what this turn adds
    model: str
    stream: bool


def parse_request(raw: bytes) -> ChatRequest:
    if not raw:
        raise RequestError("empty body")
    try:
        body = _loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError and json.JSONDecodeError alike
        raise RequestError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("body is not a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` is missing or empty")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise RequestError("every message needs a string `role`")
    split = 0
    while split < len(messages) and messages[split]["role"] in SYSTEM_ROLES:
        split += 1
    model = body.get("model")
    return ChatRequest(
        body=body,
        system_messages=tuple(messages[:split]),
        new_messages=tuple(messages[split:]),
        model=model if isinstance(model, str) else "",
        stream=body.get("stream") is True,
    )


def pinned_system(history: Sequence[Turn]) -> tuple[Message, ...]:
    """The most recent system prompt the session was given."""
    for turn in reversed(history):
        if turn.system_messages:
            return turn.system_messages
    return ()


def _turn_wire(turn: Turn) -> bytes:
    # Once per stored turn (cached): a turn taken from an Anthropic request may carry its
    # original blocks under a key the OpenAI API would reject.
    return joined([strip_for_openai(m) for m in turn.messages()])


# A history turn's messages as spliced into the body (see extproc/protocols/wire.py).
WIRE_CACHE = TurnWireCache(_turn_wire)
# Stands in for the messages array while the rest of the body is encoded; random per process
# so no client content can equal it (and build_body checks it found exactly one).
_SPLICE_MARK = f"sessiongate-splice-{secrets.token_hex(16)}"
_SPLICE_BYTES = b'"' + _SPLICE_MARK.encode() + b'"'


def _orphans(history: Sequence[Turn], skip: int) -> bool:
    """Cutting before history[skip] would leave tool results without their calls."""
    return skip > 0 and not turn_starts_clean(history[skip])


def build_body(
    request: ChatRequest,
    history: Sequence[Turn],
    max_bytes: int,
    system: tuple[Message, ...] | None = None,
) -> tuple[bytes, int]:
    """System prompt, then history, then the request's new messages.

    `history` is what extproc.context selected to fit the model's window; `system` what it
    chose to start with (None: the request's own, else the pinned one of `history`). Returns the
    body and how many of the oldest turns were left out so it stays within `max_bytes` (Envoy's
    buffer limit for the rewritten request): the last safety net, which like the context window
    never starts the history with tool results whose calls it left out. History turns are
    spliced in from their cached encoding; only the request's own parts are encoded here.
    """
    if system is None:
        system = request.system_messages or pinned_system(history)
    body = dict(request.body)
    body["messages"] = _SPLICE_MARK
    frame = _dumps(body)
    before, mark, after = frame.partition(_SPLICE_BYTES)
    if not mark or _SPLICE_BYTES in after:  # cannot happen short of a 128-bit guess
        return _build_body_slowly(request, system, history, max_bytes)
    head = [joined(system)] if system else []
    tail = [joined(request.new_messages)] if request.new_messages else []
    pieces = [WIRE_CACHE.get(turn) for turn in history]
    # Every item costs its bytes plus one comma, minus one comma overall; the brackets and the
    # rest of the body are fixed.
    fixed = len(before) + len(after) + 2 - 1 + sum(len(p) + 1 for p in head + tail)
    budget, skip = max_bytes - fixed, 0
    total = sum(len(p) + 1 for p in pieces)
    while skip < len(pieces) and (total > budget or _orphans(history, skip)):
        total -= len(pieces[skip]) + 1
        skip += 1
    items = b",".join([*head, *pieces[skip:], *tail])
    return b"".join((before, b"[", items, b"]", after)), skip


def _build_body_slowly(
    request: ChatRequest, system: tuple[Message, ...], history: Sequence[Turn], max_bytes: int
) -> tuple[bytes, int]:
    body = dict(request.body)
    body["messages"] = [*system, *request.new_messages]
    base = len(_dumps(body))
    sizes = [len(WIRE_CACHE.get(turn)) + 1 for turn in history]
    budget, skip = max_bytes - base, 0
    total = sum(sizes)
    while skip < len(history) and (total > budget or _orphans(history, skip)):
        total -= sizes[skip]
        skip += 1
    messages: list[Message] = list(system)
    for turn in history[skip:]:
        messages.extend(strip_for_openai(m) for m in turn.messages())
    messages.extend(request.new_messages)
    body["messages"] = messages
    return _dumps(body), skip


# orjson reads integers beyond 64 bits as floats, which would change a field like `seed` on
# its way upstream. Bodies with a run of 19+ digits (rare: a C-speed scan finds them) take the
# exact stdlib path instead.
_LONG_DIGITS = re.compile(rb"\d{19,}")


def _loads(raw: bytes) -> Any:
    if _LONG_DIGITS.search(raw):
        return json.loads(raw)
    return orjson.loads(raw)


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # an integer orjson cannot represent: only from the exact path
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
