"""A cheap streaming provider for `sessiongate bench gateway`: never the bottleneck.

A raw `asyncio.Protocol` HTTP/1.1 keep-alive server (uvloop) that answers every `POST` with the
same OpenAI `chat.completion.chunk` Server-Sent-Events stream: `chunks` events (the first
carries `delta.role`, the last an empty delta with `finish_reason: "stop"`, the others one word
of content each) and `data: [DONE]`, in chunked transfer encoding, one HTTP chunk per event.
The whole reply is built once at start-up; serving a request costs a header scan and writes.

Pacing: with a per-chunk delay of 0 the reply leaves in one write. With a delay of D ms the
response headers and the first event leave at once and every further event D ms after the
previous one (one timer per event, no coroutine), the way a model streams tokens; this is what
makes Envoy hand the capture filter one body message per event, as with a real provider. The
request header `x-sse-delay-ms: D` overrides the server's delay for one request (e.g. 0 to
fill sessions quickly).

Anything but `POST` gets an empty 404. Requests on one connection are answered in order
(pipelined requests wait for the previous reply). The request body is read (by
`content-length` or chunked transfer encoding) and discarded.

Run it with `python -m extproc.bench.sse_server --port 0 [--chunks 200] [--delay-ms 0]`: one
stdout line, `sse-server ready http://HOST:PORT`, once listening; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import deque
from collections.abc import Sequence
from typing import Final, cast

import orjson
import uvloop

__all__ = [
    "DEFAULT_CHUNKS",
    "DELAY_HEADER",
    "build_events",
    "build_reply",
    "main",
    "start_sse_server",
]

DEFAULT_CHUNKS: Final = 200
DELAY_HEADER: Final = b"x-sse-delay-ms"
MAX_HEADER_BYTES: Final = 64 * 1024
MODEL: Final = "gpt-4o-mini"
_TEXT: Final = (
    "The order left the warehouse on Tuesday and the carrier expects to deliver it within "
    "three working days; returns are free for thirty days and refunds arrive within a week."
)
_WORDS: Final = tuple(_TEXT.split(" "))
_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)
_NOT_FOUND: Final = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_BAD_REQUEST: Final = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


def build_events(chunks: int = DEFAULT_CHUNKS) -> list[bytes]:
    """The SSE events of one reply (`chunks` chunk events, then `[DONE]`), each `data: ...`."""
    if chunks < 2:
        raise ValueError("at least 2 chunks (the role chunk and the finish chunk)")

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        payload = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_750_000_000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    for index in range(chunks - 2):
        events.append(chunk({"content": " " + _WORDS[index % len(_WORDS)]}, None))
    events.append(chunk({}, "stop"))
    events.append(b"data: [DONE]\n\n")
    return events


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def build_reply(chunks: int = DEFAULT_CHUNKS) -> list[bytes]:
    """The wire pieces of one reply: [headers + first event, event, ..., event + last chunk]."""
    pieces = [_http_chunk(event) for event in build_events(chunks)]
    pieces[0] = _HEAD + pieces[0]
    pieces[-1] += _LAST_CHUNK
    return pieces


class _Request:
    __slots__ = ("delay_s", "is_post", "wants_close")

    def __init__(self, is_post: bool, delay_s: float, wants_close: bool) -> None:
        self.is_post = is_post
        self.delay_s = delay_s
        self.wants_close = wants_close


class _BadRequest(Exception):
    pass


class SSEProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, pieces: Sequence[bytes], delay_s: float) -> None:
        self._pieces = pieces
        self._whole = b"".join(pieces)
        self._delay_s = delay_s
        self._buffer = bytearray()
        self._queue: deque[_Request] = deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (request := self._parse()) is not None:
                self._queue.append(request)
        except _BadRequest:
            if self._transport is not None:
                self._transport.write(_BAD_REQUEST)
                self._transport.close()
            return
        if not self._busy:
            self._next()

    # --- parsing ---

    def _parse(self) -> _Request | None:
        """One complete request off the buffer, or None when more bytes are needed."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise _BadRequest
            return None
        head = bytes(buffer[:end]).split(b"\r\n")
        method = head[0].split(b" ", 1)[0]
        length = 0
        chunked = False
        delay_s = self._delay_s
        wants_close = head[0].endswith(b"HTTP/1.0")
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _BadRequest from None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == DELAY_HEADER:
                try:
                    delay_s = max(0.0, float(value) / 1000)
                except ValueError:
                    raise _BadRequest from None
            elif name == b"connection":
                wants_close = b"close" in value.lower()
        start = end + 4
        if chunked:
            consumed = self._chunked_body_end(start)
            if consumed is None:
                return None
            del buffer[:consumed]
        else:
            if len(buffer) < start + length:
                return None
            del buffer[: start + length]
        return _Request(method == b"POST", delay_s, wants_close)

    def _chunked_body_end(self, position: int) -> int | None:
        """The offset just past a chunked body starting at `position`, or None if incomplete."""
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            try:
                size = int(bytes(buffer[position:line_end]).split(b";", 1)[0], 16)
            except ValueError:
                raise _BadRequest from None
            position = line_end + 2
            if size == 0:  # trailers (if any) end with an empty line
                trailer_end = buffer.find(b"\r\n\r\n", position - 2)
                return None if trailer_end < 0 else trailer_end + 4
            if len(buffer) < position + size + 2:
                return None
            position += size + 2

    # --- replying ---

    def _next(self) -> None:
        transport = self._transport
        if transport is None or not self._queue or self._closing:
            return
        request = self._queue.popleft()
        if request.wants_close:
            self._closing = True
        if not request.is_post:
            transport.write(_NOT_FOUND)
            self._done()
        elif request.delay_s <= 0:
            transport.write(self._whole)
            self._done()
        else:
            self._busy = True
            transport.write(self._pieces[0])
            self._schedule(1, request.delay_s)

    def _schedule(self, index: int, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay_s, self._send, index, delay_s)

    def _send(self, index: int, delay_s: float) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        transport.write(self._pieces[index])
        if index + 1 < len(self._pieces):
            self._schedule(index + 1, delay_s)
        else:
            self._busy = False
            self._done()

    def _done(self) -> None:
        if self._closing:
            if self._transport is not None:
                self._transport.close()
            return
        if self._queue:
            self._next()


async def start_sse_server(
    host: str = "127.0.0.1", port: int = 0, chunks: int = DEFAULT_CHUNKS, delay_ms: float = 0.0
) -> asyncio.Server:
    """Start serving (in the running loop); the bound port is `server.sockets[0]`."""
    pieces = build_reply(chunks)
    delay_s = max(0.0, delay_ms / 1000)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SSEProtocol(pieces, delay_s), host, port, backlog=1024)


async def _serve(args: argparse.Namespace) -> int:
    server = await start_sse_server(args.host, args.port, args.chunks, args.delay_ms)
    host, port = server.sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"sse-server ready http://{shown}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sse_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="events per reply")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="delay between events (0: one write)"
    )
    args = parser.parse_args(argv)
    if args.chunks < 2:
        parser.error("--chunks: at least 2")
    status: int = uvloop.run(_serve(args))
    return status


if __name__ == "__main__":
    sys.exit(main())
