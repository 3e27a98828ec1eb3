"""A small HTTP/1.1 keep-alive client for `sessiongate bench gateway`: prep requests, the
streaming rows (time to the first body byte, i.e. the first SSE event, and to the end) and the
memory measurement. One request at a time per connection; chunked or content-length bodies."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass
from typing import cast

__all__ = ["Client", "Connection", "Reply", "RequestError", "request"]


class RequestError(Exception):
    """A request failed: no reply, a bad reply, or a status other than 200."""


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    start_ns: int
    first_byte_ns: int  # first body byte (streaming: the first SSE event)
    end_ns: int


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.head_done = False
        self.status = 0
        self.length = -1
        self.chunked = False
        self.position = 0
        self.body = bytearray()
        self.start_ns = 0
        self.first_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(RequestError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[Reply]:
        if self.transport is None:
            raise RequestError("connection closed")
        self._reset()
        self.buffer.clear()
        self.waiter = asyncio.get_running_loop().create_future()
        self.start_ns = time.perf_counter_ns()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self.buffer += data
        try:
            self._parse(now)
        except (ValueError, IndexError) as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(RequestError(f"bad response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def _parse(self, now: int) -> None:
        buffer = self.buffer
        if not self.head_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buffer[:end]).split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
            self.head_done = True
            self.position = end + 4
        if self.chunked:
            while True:
                line_end = buffer.find(b"\r\n", self.position)
                if line_end < 0:
                    return
                size = int(bytes(buffer[self.position : line_end]).split(b";", 1)[0], 16)
                if size == 0:
                    if len(buffer) < line_end + 4:
                        return
                    self._finish(now)
                    return
                start = line_end + 2
                if len(buffer) < start + size + 2:
                    return
                if not self.first_ns:
                    self.first_ns = now
                self.body += buffer[start : start + size]
                self.position = start + size + 2
        else:
            have = len(buffer) - self.position
            if have > 0 and not self.first_ns:
                self.first_ns = now
            if self.length < 0:
                if self.status in (204, 304):
                    self._finish(now)
                return  # read-until-close is not used by Envoy for these replies
            if have >= self.length:
                self.body += buffer[self.position : self.position + self.length]
                self._finish(now)

    def _finish(self, now: int) -> None:
        waiter, self.waiter = self.waiter, None
        reply = Reply(self.status, bytes(self.body), self.start_ns, self.first_ns or now, now)
        self.buffer.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Client:
    """Requests to one gateway listener over its own keep-alive connections."""

    def __init__(
        self, port: int, ssl_context: ssl.SSLContext | None, *, api_key: str, path: str
    ) -> None:
        self.port = port
        self.ssl_context = ssl_context
        self.api_key = api_key
        self.path = path
        self.connections: list[Connection] = []

    async def connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            Connection,
            "127.0.0.1",
            self.port,
            ssl=self.ssl_context,
            server_hostname="127.0.0.1" if self.ssl_context is not None else None,
        )
        self.connections.append(protocol)
        return protocol

    def request_bytes(
        self, body: bytes, session: str, extra: dict[str, str] | None = None
    ) -> bytes:
        headers = {
            "host": f"127.0.0.1:{self.port}",
            "content-type": "application/json",
            "authorization": f"Bearer {self.api_key}",
            "x-session-id": session,
            **(extra or {}),
            "content-length": str(len(body)),
        }
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return f"POST {self.path} HTTP/1.1\r\n{head}\r\n".encode() + body

    async def close(self) -> None:
        for connection in self.connections:
            connection.close()
        for connection in self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(connection.closed), 2)
        self.connections.clear()


async def request(
    connection: Connection, request: bytes, what: str, timeout_s: float = 30.0
) -> Reply:
    try:
        reply = await asyncio.wait_for(connection.send(request), timeout_s)
    except TimeoutError:
        raise RequestError(f"{what}: no reply in {timeout_s:g} s") from None
    if reply.status != 200:
        raise RequestError(f"{what}: HTTP {reply.status}: {reply.body[:300]!r}")
    return reply
