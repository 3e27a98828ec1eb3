"""A small gRPC server over HTTP/2 on asyncio: the transport Envoy's ext_proc client talks to.

Why not grpcio's asyncio server: under load its own machinery (the completion-queue poller
thread, the connection thread, the per-call Cython/asyncio bridging) took about 80% of
sessiongate's CPU (py-spy, `sessiongate bench gateway --profile`), ~300 µs per ext_proc stream
before any of our code ran. Envoy needs very little of gRPC: bidirectional streams of
length-prefixed protobuf messages on one HTTP/2 connection per Envoy worker, plus the unary
health check. This module speaks exactly that and nothing more:

- HTTP/2 (RFC 9113) server side: preface, SETTINGS (+ACK), PING, GOAWAY, RST_STREAM, HEADERS
  with CONTINUATION and padding, DATA with padding, WINDOW_UPDATE; flow control both ways.
  Request headers are decoded with `hpack` (the dynamic table must follow the peer's), response
  headers use pre-encoded static-table literals (no encoder state, nothing to keep in sync).
- gRPC (PROTOCOL-HTTP2.md): 5-byte message prefix, no compression (a compressed message gets
  UNIMPLEMENTED), trailers-only responses, `grpc-status`/`grpc-message` trailers.
- Every method is served as a bidirectional stream: `handler(messages) -> async iterator of
  replies`. A unary method is the same with one message each way.

What it does not do, on purpose: TLS (Envoy calls the sidecar on loopback or a Unix-domain
path; mTLS between them is the mesh's job), server push, priorities, deadlines from
`grpc-timeout` (rewrite has its own deadline below Envoy's `message_timeout`).

grpcio remains available (`grpc_server = "grpcio"`); the tests run the same servicer on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import hpack

from extproc.sockets import remove_stale_socket, unix_path

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

# Settings identifiers.
HEADER_TABLE_SIZE, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 3, 4, 5

# Error codes.
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, CANCEL = 0, 1, 3, 6, 8

# gRPC status codes.
GRPC_OK, GRPC_NOT_FOUND, GRPC_RESOURCE_EXHAUSTED = 0, 5, 8
GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 12, 13

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
# We let the peer send up to 16 MiB frames: a buffered body arrives in few frames.
OUR_MAX_FRAME = 2**24 - 1
# Give credit back once this much was consumed (keeps the peer's windows far from zero).
REPLENISH_AT = 2**30

_U32 = struct.Struct(">I")
_WINDOW = struct.Struct(">I")
_GRPC_PREFIX = struct.Struct(">BI")

# ":status: 200" (static index 8) and "content-type: application/grpc" (literal without
# indexing, static name 31): no dynamic-table state on our side.
_RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as "literal without indexing, new name" (RFC 7541 §6.2.2), no Huffman."""
    return b"\x00" + _length(name) + name + _length(value) + value


def _length(data: bytes) -> bytes:
    """RFC 7541 §5.1 integer with a 7-bit prefix (H bit clear)."""
    n = len(data)
    if n < 127:
        return bytes([n])
    out = bytearray([127])
    n -= 127
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _trailers(status: int, message: str = "") -> bytes:
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        # PROTOCOL-HTTP2.md: grpc-message is percent-encoded UTF-8.
        encoded = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        block += _literal(b"grpc-message", encoded.encode("ascii"))
    return block


_OK_TRAILERS = _trailers(GRPC_OK)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _frame_header(kind, flags, stream_id, len(payload)) + payload


def _frame_header(kind: int, flags: int, stream_id: int, length: int) -> bytes:
    """9 bytes: 24-bit length, type, flags, 31-bit stream id (RFC 9113 §4.1)."""
    return (length << 48 | kind << 40 | flags << 32 | stream_id).to_bytes(9, "big")


class H2ProtocolError(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class GrpcAbort(Exception):
    """Raised by a handler to end its call with a gRPC status other than OK."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[AsyncIterator[Any]], AsyncIterator[Any]]


class Observer(Protocol):
    """Consumes a call's messages synchronously and never replies (Envoy's observability-mode
    streams): no task and no wake-up per message, which is most of a streamed chunk's cost."""

    def on_message(self, message: Any) -> bool:
        """Take one request message (the first included); False ends the call (status OK)."""
        ...

    def on_end(self) -> None:
        """Called exactly once, last, however the call ended (done, peer ended or reset)."""
        ...


@dataclass(frozen=True, slots=True)
class Method:
    """One gRPC method: how to read its requests, run it and write its replies.

    `observe`, when set, sees the first request message and may return an `Observer` that
    takes the whole call instead of `handler` (None: `handler` runs, first message included).
    """

    deserialize: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    handler: Handler
    observe: Callable[[Any], Observer | None] | None = None


class _Inbox:
    """The request messages of one stream, as an async iterator (the handler's input)."""

    __slots__ = ("_closed", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def put(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> _Inbox:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class _Stream:
    __slots__ = (
        "buffer",
        "headers_sent",
        "id",
        "inbox",
        "local_closed",
        "method",
        "observer",
        "out",
        "received",
        "remote_closed",
        "send_window",
        "started",
        "task",
        "trailers",
    )

    def __init__(self, stream_id: int, method: Method | None, send_window: int) -> None:
        self.id = stream_id
        self.method = method
        self.inbox = _Inbox()
        self.buffer = bytearray()  # a partial gRPC message
        self.send_window = send_window
        # DATA waiting for flow-control credit, as views (a rewritten body can be megabytes:
        # cutting frames off a bytearray moved the rest of it every time).
        self.out: deque[memoryview] = deque()
        self.trailers: bytes | None = None  # to send once `out` is empty
        self.headers_sent = False
        self.remote_closed = False
        self.local_closed = False
        self.task: asyncio.Task[None] | None = None
        self.started = False  # the handler task runs, or an observer took the call
        self.observer: Observer | None = None
        self.received = 0  # bytes since we last gave this stream credit back


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection (Envoy opens one per worker thread)."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.decoder = hpack.Decoder()
        self.header_memo: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.inbuf = bytearray()
        self.preface_seen = False
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        self.peer_window = DEFAULT_WINDOW  # connection-level credit for what we send
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16_384
        self.received = 0  # connection bytes since we last gave credit back
        self.headers_block: bytearray | None = None  # HEADERS awaiting CONTINUATION
        self.headers_stream = 0
        self.headers_end_stream = False
        self.out: list[bytes | memoryview] = []
        self.flush_scheduled = False
        self.goaway_sent = False
        self.closed = False
        self.drained: asyncio.Future[None] | None = None  # set by drain(): no stream left

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its methods.
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        settings = b"".join(
            struct.pack(">HI", key, value)
            for key, value in (
                (INITIAL_WINDOW_SIZE, MAX_WINDOW),
                (MAX_FRAME_SIZE, OUR_MAX_FRAME),
            )
        )
        self._write(frame(SETTINGS, 0, 0, settings))
        self._write(frame(WINDOW_UPDATE, 0, 0, _WINDOW.pack(MAX_WINDOW - DEFAULT_WINDOW)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for stream in list(self.streams.values()):
            self._cancel(stream)
            self._forget(stream.id)

    def data_received(self, data: bytes) -> None:
        buf = self.inbuf
        buf += data
        try:
            offset = 0
            if not self.preface_seen:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise H2ProtocolError("not an HTTP/2 connection preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise H2ProtocolError("not an HTTP/2 connection preface")
                self.preface_seen = True
                offset = len(PREFACE)
            end = len(buf)
            while end - offset >= 9:
                header = int.from_bytes(buf[offset : offset + 9], "big")
                length = header >> 48
                if length > OUR_MAX_FRAME:
                    raise H2ProtocolError("frame larger than SETTINGS_MAX_FRAME_SIZE", 6)
                if end - offset - 9 < length:
                    break
                kind = (header >> 40) & 0xFF
                flags = (header >> 32) & 0xFF
                stream_id = header & 0x7FFFFFFF
                payload = bytes(buf[offset + 9 : offset + 9 + length])
                offset += 9 + length
                self._on_frame(kind, flags, stream_id, payload)
            del buf[:offset]
        except H2ProtocolError as exc:
            log.warning("gRPC connection closed: %s", exc)
            self._goaway(exc.code, str(exc))
            self._close()
        self._flush()

    # --- frames in ----------------------------------------------------------------------

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.headers_block is not None and kind != CONTINUATION:
            raise H2ProtocolError("expected CONTINUATION")
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == PING:
            if stream_id != 0 or len(payload) != 8:
                raise H2ProtocolError("bad PING")
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif kind == GOAWAY:
            self.goaway_sent = True  # the peer is going away: no new streams either way
        elif kind == PUSH_PROMISE:
            raise H2ProtocolError("PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5).

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise H2ProtocolError("SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise H2ProtocolError("SETTINGS length not a multiple of 6", FRAME_SIZE_ERROR)
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2ProtocolError("initial window too large", FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == MAX_FRAME_SIZE:
                if not 16_384 <= value <= OUR_MAX_FRAME:
                    raise H2ProtocolError("bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self._write(frame(SETTINGS, ACK, 0))
        self._pump_all()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ProtocolError("bad WINDOW_UPDATE", FRAME_SIZE_ERROR)
        increment = _WINDOW.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise H2ProtocolError("WINDOW_UPDATE of 0")
            self.peer_window += increment
            if self.peer_window > MAX_WINDOW:
                raise H2ProtocolError("connection window overflow", FLOW_CONTROL_ERROR)
            self._pump_all()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window += increment
            self._pump(stream)

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or len(payload) != 4:
            raise H2ProtocolError("bad RST_STREAM")
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._forget(stream_id)
            stream.local_closed = stream.remote_closed = True
            self._cancel(stream)

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise H2ProtocolError("HEADERS on an invalid stream id")
        payload = _strip_padding(flags, payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        self.headers_stream = stream_id
        self.headers_end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self._headers_complete(stream_id, payload, self.headers_end_stream)
        else:
            self.headers_block = bytearray(payload)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.headers_block is None or stream_id != self.headers_stream:
            raise H2ProtocolError("unexpected CONTINUATION")
        self.headers_block += payload
        if flags & END_HEADERS:
            block, self.headers_block = bytes(self.headers_block), None
            self._headers_complete(stream_id, block, self.headers_end_stream)

    def _decode_headers(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """hpack-decode, remembering blocks that leave the dynamic table as it was: Envoy sends
        the same few bytes for every stream once its headers are indexed, and decoding them
        (Huffman included) was a tenth of the transport's CPU. A block that changes the table
        clears the memo, since its references may now mean something else."""
        memo = self.header_memo
        known = memo.get(block)
        if known is not None:
            return known
        entries = self.decoder.header_table.dynamic_entries
        before = (len(entries), entries[0] if entries else None)
        try:
            headers = [(bytes(k), bytes(v)) for k, v in self.decoder.decode(block, raw=True)]
        except hpack.HPACKError as exc:
            raise H2ProtocolError(f"bad header block: {exc}", 9) from None  # COMPRESSION_ERROR
        if (len(entries), entries[0] if entries else None) != before:
            memo.clear()
        elif len(memo) < 64:
            memo[block] = headers
        return headers

    def _headers_complete(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        headers = self._decode_headers(block)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client (gRPC clients send none)
            if end_stream:
                self._remote_end(stream)
            return
        if stream_id <= self.last_stream_id:
            return  # a stream we already closed
        self.last_stream_id = stream_id
        if self.goaway_sent:
            self._write(frame(RST_STREAM, 0, stream_id, _U32.pack(7)))  # REFUSED_STREAM
            return
        path = next((v for k, v in headers if k == b":path"), b"").decode("latin-1")
        method = self.server.methods.get(path)
        stream = _Stream(stream_id, method, self.peer_initial_window)
        self.streams[stream_id] = stream
        if method is None:
            self._finish(stream, GRPC_UNIMPLEMENTED, f"unknown method {path}")
            return
        if end_stream:
            stream.remote_closed = True
            stream.inbox.close()
        if method.observe is None or end_stream:
            self._start(stream, method)
        # else: the first message decides between an observer and the handler (`_deliver`).

    def _start(self, stream: _Stream, method: Method) -> None:
        stream.started = True
        stream.task = self.loop.create_task(self._run(stream, method))

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise H2ProtocolError("DATA on stream 0")
        self._credit_connection(len(payload))
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # reset or finished by us: the credit above is all it needs
        stream.received += len(payload)
        if stream.received >= REPLENISH_AT:
            self._write(frame(WINDOW_UPDATE, 0, stream_id, _WINDOW.pack(stream.received)))
            stream.received = 0
        data = _strip_padding(flags, payload)
        if data:
            self._on_grpc_bytes(stream, data)
        if flags & END_STREAM and stream_id in self.streams:
            self._remote_end(stream)

    def _credit_connection(self, length: int) -> None:
        self.received += length
        if self.received >= REPLENISH_AT:
            self._write(frame(WINDOW_UPDATE, 0, 0, _WINDOW.pack(self.received)))
            self.received = 0

    def _on_grpc_bytes(self, stream: _Stream, data: bytes) -> None:
        """Split the stream's bytes into gRPC messages (5-byte prefix: flag, length)."""
        buf = stream.buffer
        if not buf and len(data) >= 5:
            # Fast path: whole messages in this frame, nothing buffered.
            compressed, length = _GRPC_PREFIX.unpack_from(data)
            if (
                len(data) == 5 + length
                and not compressed
                and length <= self.server.max_message_bytes
            ):
                self._deliver(stream, data[5:])
                return
        buf += data
        limit = self.server.max_message_bytes
        while len(buf) >= 5:
            compressed, length = _GRPC_PREFIX.unpack_from(buf)
            if compressed:
                self._reset(stream, GRPC_UNIMPLEMENTED, "compressed messages are not supported")
                return
            if length > limit:
                self._reset(
                    stream, GRPC_RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds {limit}"
                )
                return
            if len(buf) < 5 + length:
                return
            message = bytes(buf[5 : 5 + length])
            del buf[: 5 + length]
            self._deliver(stream, message)

    def _deliver(self, stream: _Stream, raw: bytes) -> None:
        assert stream.method is not None
        try:
            message = stream.method.deserialize(raw)
        except Exception as exc:  # protobuf's DecodeError and friends
            self._reset(stream, GRPC_INTERNAL, f"cannot parse the request message: {exc}")
            return
        if stream.observer is not None:
            self._observe(stream, message)
            return
        stream.inbox.put(message)
        if not stream.started:
            self._choose(stream, stream.method, message)

    def _choose(self, stream: _Stream, method: Method, first: Any) -> None:
        """The first message arrived: an observer takes the call, or the handler runs."""
        assert method.observe is not None
        stream.started = True
        try:
            observer = method.observe(first)
        except Exception:
            log.exception("gRPC observer hook failed")
            self._finish(stream, GRPC_INTERNAL, "internal error")
            return
        if observer is None:
            self._start(stream, method)
            return
        stream.observer = observer
        stream.inbox = _Inbox()  # the observer takes the message instead
        self._observe(stream, first)

    def _observe(self, stream: _Stream, message: Any) -> None:
        assert stream.observer is not None
        try:
            more = stream.observer.on_message(message)
        except Exception:
            log.exception("gRPC observer failed")
            self._end_observer(stream)
            self._finish(stream, GRPC_INTERNAL, "internal error")
            return
        if not more:
            self._end_observer(stream)
            self._finish(stream, GRPC_OK)

    def _end_observer(self, stream: _Stream) -> None:
        observer, stream.observer = stream.observer, None
        if observer is not None:
            try:
                observer.on_end()
            except Exception:
                log.exception("gRPC observer failed at its end")

    def _remote_end(self, stream: _Stream) -> None:
        stream.remote_closed = True
        stream.inbox.close()
        if stream.observer is not None:
            self._end_observer(stream)
            self._finish(stream, GRPC_OK)
        elif not stream.started and stream.method is not None and not stream.local_closed:
            self._start(stream, stream.method)  # no message at all: the handler sees none
        if stream.local_closed:
            self._forget(stream.id)

    # --- running a call -----------------------------------------------------------------

    async def _run(self, stream: _Stream, method: Method) -> None:
        status, message = GRPC_OK, ""
        try:
            async for reply in method.handler(stream.inbox):
                if stream.local_closed:
                    return
                self._send_message(stream, method.serialize(reply))
        except GrpcAbort as exc:
            status, message = exc.status, exc.message
        except asyncio.CancelledError:
            return  # reset by the peer or connection gone: nobody to answer
        except Exception:
            log.exception("gRPC handler failed")
            status, message = GRPC_INTERNAL, "internal error"
        if not stream.local_closed:
            self._finish(stream, status, message)

    def _send_message(self, stream: _Stream, payload: bytes) -> None:
        if not stream.headers_sent:
            stream.headers_sent = True
            self._write_headers(stream.id, _RESPONSE_HEADERS, end_stream=False)
        stream.out.append(memoryview(_GRPC_PREFIX.pack(0, len(payload))))
        stream.out.append(memoryview(payload))
        self._pump(stream)
        self._schedule_flush()

    def _finish(self, stream: _Stream, status: int, message: str = "") -> None:
        """Trailers (or a trailers-only response); then stop the peer's half if still open."""
        trailers = _OK_TRAILERS if status == GRPC_OK and not message else _trailers(status, message)
        if not stream.headers_sent:
            stream.headers_sent = True
            stream.local_closed = True
            self._write_headers(stream.id, _RESPONSE_HEADERS + trailers, end_stream=True)
            self._closed_locally(stream)
        else:
            stream.trailers = trailers
            self._pump(stream)
        self._schedule_flush()

    def _closed_locally(self, stream: _Stream) -> None:
        if not stream.remote_closed:
            # We answered before the client finished sending (capture returns early): tell it
            # to stop (RFC 9113 §8.1: RST_STREAM NO_ERROR after a complete response).
            self._write(frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))
            stream.remote_closed = True
            stream.inbox.close()
        self._forget(stream.id)

    def _reset(self, stream: _Stream, status: int, message: str) -> None:
        """End a call whose input we refuse: the status, then no more input."""
        log.warning("gRPC stream %d refused: %s", stream.id, message)
        self._end_observer(stream)
        if stream.task is not None:
            stream.task.cancel()
        if not stream.local_closed:
            stream.out.clear()
            self._finish(stream, status, message)

    def _cancel(self, stream: _Stream) -> None:
        self._end_observer(stream)
        stream.inbox.close()
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    # --- frames out ---------------------------------------------------------------------

    def _write_headers(self, stream_id: int, block: bytes, *, end_stream: bool) -> None:
        # Our blocks are a few dozen bytes; a long grpc-message is cut to fit one frame.
        block = block[: self.peer_max_frame]
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        self._write(_frame_header(HEADERS, flags, stream_id, len(block)) + block)

    def _pump(self, stream: _Stream) -> None:
        """Send what flow control allows; trailers once everything else is out."""
        out = stream.out
        while out:
            allowed = min(stream.send_window, self.peer_window, self.peer_max_frame)
            if allowed <= 0:
                return
            size = 0
            parts: list[memoryview] = []
            while out and size < allowed:
                head = out[0]
                take = min(len(head), allowed - size)
                parts.append(head[:take])
                size += take
                if take == len(head):
                    out.popleft()
                else:
                    out[0] = head[take:]
            stream.send_window -= size
            self.peer_window -= size
            self._write(_frame_header(DATA, 0, stream.id, size))
            for part in parts:
                self._write(part)
        if stream.trailers is not None and not stream.local_closed:
            trailers, stream.trailers = stream.trailers, None
            stream.local_closed = True
            self._write_headers(stream.id, trailers, end_stream=True)
            self._closed_locally(stream)

    def _pump_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.out or stream.trailers is not None:
                self._pump(stream)

    def _write(self, data: bytes | memoryview) -> None:
        self.out.append(data)

    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _goaway(self, code: int, debug: str = "") -> None:
        if self.transport is None or self.closed:
            return
        self.goaway_sent = True
        payload = _U32.pack(self.last_stream_id) + _U32.pack(code) + debug.encode()[:256]
        self._write(frame(GOAWAY, 0, 0, payload))
        self._flush()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    async def drain(self, grace_s: float) -> None:
        """GOAWAY (no new streams), let running calls finish within the grace, then close."""
        self._goaway(NO_ERROR)
        if self.streams and not self.closed:
            self.drained = self.loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.drained), grace_s)
        self._close()

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if not self.streams and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)


def _strip_padding(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload:
        raise H2ProtocolError("PADDED frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2ProtocolError("padding longer than the frame")
    return payload[1 : len(payload) - pad]


class GrpcServer:
    """`methods`: gRPC path ("/package.Service/Method") -> `Method`."""

    def __init__(self, methods: dict[str, Method], *, max_message_bytes: int) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._unix_path: str | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0). `host` `unix:/path`: a Unix
        socket (mode 0600, replacing a stale one), port 0."""
        loop = asyncio.get_running_loop()
        path = unix_path(host)
        if path is not None:
            remove_stale_socket(path)
            self._server = await loop.create_unix_server(lambda: _Connection(self), path)
            os.chmod(path, 0o600)
            self._unix_path = path
            return 0
        self._server = await loop.create_server(
            lambda: _Connection(self), host or None, port, reuse_port=False
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is None:
            return
        self._server.close()
        await asyncio.gather(*(c.drain(grace_s) for c in list(self.connections)))
        await self._server.wait_closed()
        if self._unix_path is not None:
            remove_stale_socket(self._unix_path)
