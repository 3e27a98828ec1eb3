"""The mock provider's Anthropic Messages endpoint: ``POST {prefix}/v1/messages``.

Same test peer as extproc.mock_llm (its request log, knobs, compression, splits and faults),
answering in Anthropic's shapes. Replies follow the OpenAI side's rules on the text of the
last user message (its text blocks): ``[[tool:NAME]]`` -> a ``tool_use`` block (id
``toolu_<n>``, input ``{"q": "<text>"}``, ``stop_reason: tool_use``); ``[[long:N]]``;
``[[think]]`` -> a ``thinking`` block (with a signature) before the text; else
``"echo: <text> [n=<n>]"`` (``n``: messages received). ``[[refuse]]`` is not special here.

What it checks, as Anthropic does (400 ``invalid_request_error``): ``model``, ``max_tokens``
(an integer >= 1), non-empty ``messages`` whose roles alternate starting with ``user``, every
``tool_result`` answering a ``tool_use`` of the assistant message just before it and every
``tool_use`` answered in the next message, no ``cache_control`` on thinking blocks or empty
text, at most 4 ``cache_control`` blocks. The window (``--context-window``,
``x-mock-context-window``): prompt tokens + ``max_tokens`` above it is a 400 ("input length
and `max_tokens` exceed context limit").

Token counts (cl100k, times the token factor): the strings of ``tools`` and ``system`` blocks,
3 per message plus the strings of its blocks (an image block: 765), ``cache_control`` never
counted. Prompt cache, per ``x-api-key``: the prompt is a sequence of blocks (tools, system
blocks, each message's blocks), each with a chained digest. A request reads from the cache the
longest prefix, ending at a block boundary at or before one of its breakpoints, whose digest an
earlier request stored; it stores the digest at each of its breakpoints, the part beyond what
it read counted as written. ``usage``: ``input_tokens`` (not cached), ``output_tokens``,
``cache_read_input_tokens``, ``cache_creation_input_tokens``.

Streams: ``message_start`` (usage with the input counts and ``output_tokens: 1``), ``ping``,
per block ``content_block_start``, deltas (a word of text per ``text_delta``, 6-character
``input_json_delta`` fragments, ``thinking_delta`` then ``signature_delta``),
``content_block_stop``; ``message_delta`` (``stop_reason``, ``usage.output_tokens``),
``message_stop``. Faults: ``no-done`` leaves ``message_stop`` out; ``sse-error`` sends an
``event: error`` (``overloaded_error``) after the first block instead of finishing;
``truncate-json`` cuts a JSON body in half.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from aiohttp import web

from extproc import mock_llm as m

IMAGE_TOKENS = 765
MAX_BREAKPOINTS = 4
SIGNATURE = "c2lnbmF0dXJlLW9mLXRoZS1tb2Nr"  # any base64 text: clients must send it back


class _Invalid(m._MockError):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error") -> None:
        super().__init__(status, message)
        self.body = {"type": "error", "error": {"type": type_, "message": message}}


def _strings(encoding: Any, value: Any) -> int:
    if isinstance(value, str):
        return len(encoding.encode(value, disallowed_special=()))
    if isinstance(value, dict):
        if value.get("type") == "image":
            return IMAGE_TOKENS
        return sum(_strings(encoding, v) for k, v in value.items() if k != "cache_control")
    if isinstance(value, list):
        return sum(_strings(encoding, v) for v in value)
    return 0


def _blocks(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def _canonical(block: Any) -> bytes:
    if isinstance(block, dict):
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return orjson.dumps(block, option=orjson.OPT_SORT_KEYS)


def _prompt_blocks(body: dict[str, Any]) -> list[tuple[bytes, Any, bool, int]]:
    """(canonical bytes, value counted, has a breakpoint, framing tokens) per prompt block."""
    out: list[tuple[bytes, Any, bool, int]] = []
    for tool in body.get("tools") or ():
        out.append((b"tool" + _canonical(tool), tool, "cache_control" in tool, 0))
    for block in _blocks(body.get("system")):
        marked = isinstance(block, dict) and "cache_control" in block
        out.append((b"system" + _canonical(block), block, marked, 0))
    for message in body["messages"]:
        role = message["role"].encode()
        for i, block in enumerate(_blocks(message.get("content"))):
            marked = isinstance(block, dict) and "cache_control" in block
            # 3 tokens of framing per message, charged on its first block.
            out.append((role + _canonical(block), block, marked, 3 if i == 0 else 0))
    return out


def _validate(body: Any) -> None:
    if not isinstance(body, dict):
        raise _Invalid(400, "request body: expected an object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _Invalid(400, "model: Field required")
    max_tokens = body.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        raise _Invalid(400, "max_tokens: Field required (an integer >= 1)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Invalid(400, "messages: at least one message is required")
    previous_uses: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _Invalid(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise _Invalid(400, f"messages.{i}: roles must alternate, starting with user")
        blocks = _blocks(message.get("content"))
        if not blocks:
            raise _Invalid(400, f"messages.{i}: all messages must have non-empty content")
        results = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if message["role"] == "user":
            if results - previous_uses:
                raise _Invalid(400, f"messages.{i}: unexpected `tool_use_id` in tool_result")
            if previous_uses - results:
                raise _Invalid(
                    400,
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                    "immediately after",
                )
            previous_uses = set()
        else:
            previous_uses = {b.get("id") for b in blocks if b.get("type") == "tool_use"}
        for block in blocks:
            if "cache_control" in block:
                if block.get("type") in ("thinking", "redacted_thinking"):
                    raise _Invalid(400, f"messages.{i}: thinking blocks cannot be cached")
                if block.get("type") == "text" and not block.get("text"):
                    raise _Invalid(400, f"messages.{i}: cache_control on an empty text block")
    marked = sum(1 for *_, has, _f in _prompt_blocks(body) if has)
    if marked > MAX_BREAKPOINTS:
        raise _Invalid(
            400,
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {marked}.",
        )


def _usage_of(
    state: m.MockState, org: str, body: dict[str, Any], factor: float
) -> tuple[int, int, int]:
    """(prompt tokens, read from the cache, written to it)."""
    digest = hashlib.sha256(b"anthropic\0" + org.encode()).digest()
    cache = state.prefixes
    tokens = 0
    read = 0
    best_at_breakpoint = 0
    marks: list[tuple[bytes, int]] = []
    for canonical, value, marked, framing in _prompt_blocks(body):
        digest = hashlib.sha256(digest + canonical).digest()
        tokens += framing + _strings(state.encoding, value)
        if digest in cache:
            cache.move_to_end(digest)
            read = tokens
        if marked:
            best_at_breakpoint = read  # only prefixes at or before a breakpoint are read
            marks.append((digest, tokens))
    written = 0
    for digest, upto in marks:
        if digest not in cache:
            cache[digest] = None
            written = max(written, upto - best_at_breakpoint)
            if len(cache) > m.PREFIX_CACHE_ENTRIES:
                cache.popitem(last=False)
    prompt = round(tokens * factor)
    read_tokens = min(prompt, round(best_at_breakpoint * factor))
    written_tokens = min(prompt - read_tokens, round(written * factor))
    return prompt, read_tokens, written_tokens


def _check_window(window: int, prompt: int, max_tokens: int) -> None:
    if window > 0 and prompt + max_tokens > window:
        raise _Invalid(
            400,
            f"input length and `max_tokens` exceed context limit: {prompt} + {max_tokens} > "
            f"{window}, decrease input length or `max_tokens` and try again",
        )


def _content(reply: m._Reply, think: bool) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if think:
        blocks.append({"type": "thinking", "thinking": "thinking it over", "signature": SIGNATURE})
    if reply.kind == "tool":
        tool_id = "toolu_" + reply.tool_id.removeprefix("call_")
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_id,
                "name": reply.tool_name,
                "input": orjson.loads(reply.text),
            }
        )
    else:
        blocks.append({"type": "text", "text": reply.text})
    return blocks


def _events(message: dict[str, Any], knobs: m._Knobs) -> list[bytes]:
    def event(kind: str, data: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    usage = message["usage"]
    start = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
    out = [event("message_start", {"type": "message_start", "message": start})]
    out.append(event("ping", {"type": "ping"}))
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        first: dict[str, Any]
        deltas: list[dict[str, Any]]
        if kind == "text":
            first, deltas = (
                {"type": "text", "text": ""},
                [{"type": "text_delta", "text": w} for w in m._words(block["text"])],
            )
        elif kind == "tool_use":
            text = orjson.dumps(block["input"]).decode()
            first = dict(block, input={})
            deltas = [
                {"type": "input_json_delta", "partial_json": text[i : i + m.ARGUMENT_FRAGMENT]}
                for i in range(0, len(text), m.ARGUMENT_FRAGMENT)
            ]
        else:  # thinking
            first = {"type": "thinking", "thinking": "", "signature": ""}
            deltas = [
                {"type": "thinking_delta", "thinking": block["thinking"]},
                {"type": "signature_delta", "signature": block["signature"]},
            ]
        out.append(
            event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": first},
            )
        )
        for delta in deltas:
            out.append(
                event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        out.append(event("content_block_stop", {"type": "content_block_stop", "index": index}))
        if knobs.error_event:
            error = {"type": "overloaded_error", "message": "Overloaded"}
            out.append(event("error", {"type": "error", "error": error}))
            return out
    stop: dict[str, Any] = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    out.append(
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": stop,
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    if not knobs.no_done:
        out.append(event("message_stop", {"type": "message_stop"}))
    return out


def _error(state: m.MockState, error: m._MockError, knobs: m._Knobs) -> web.Response:
    if not isinstance(error, _Invalid):  # a knob or fault error: Anthropic's shape too
        type_ = "overloaded_error" if error.status == 529 else "api_error"
        if error.status < 500:
            type_ = "rate_limit_error" if error.status == 429 else "invalid_request_error"
        error.body = {"type": "error", "error": {"type": type_, "message": str(error)}}
    return m._error_response(state, error, knobs)


async def messages(request: web.Request) -> web.StreamResponse:
    state = request.app[m.STATE_KEY]
    knobs = m._Knobs()
    try:
        knobs = m._parse_knobs(request.headers)
        if knobs.hang:
            await state.stopping.wait()
            m._abort(request)
            return web.Response(status=503)
        if knobs.status is not None:
            raise m._status_fault(knobs.status)
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Invalid(400, "There was an error parsing the body of your request") from None
        _validate(body)
        options = state.options
        factor = options.token_factor if knobs.token_factor is None else knobs.token_factor
        org = request.headers.get("x-api-key", "")
        prompt, read, written = _usage_of(state, org, body, factor)
        window = options.context_window if knobs.context_window is None else knobs.context_window
        _check_window(window, prompt, body["max_tokens"])
    except m._MockError as error:
        return _error(state, error, knobs)

    messages_ = body["messages"]
    reply = m._make_reply(messages_)
    think = "[[think]]" in m._last_user_text(messages_)
    content = _content(reply, think)
    output = m._completion_tokens(state, reply) + (state.count("thinking it over") if think else 0)
    message: dict[str, Any] = {
        "id": "msg_" + hashlib.sha256(raw).hexdigest()[:24],
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": content,
        "stop_reason": "tool_use" if reply.kind == "tool" else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": prompt - read - written,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "output_tokens": output,
        },
    }
    headers = m._response_headers(state, knobs.encoding)
    headers["request-id"] = f"req_mock_{state.seq:08d}"
    if body.get("stream"):
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        events = m._encode_pieces(_events(message, knobs), knobs.encoding)
        return await m._send(request, response, events, knobs)
    payload = orjson.dumps(message)
    if knobs.truncate_json:
        payload = payload[: len(payload) // 2]
    encoded = b"".join(m._encode_pieces([payload], knobs.encoding))
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "application/json"
    response.content_length = len(encoded)
    return await m._send(request, response, [encoded], knobs)
