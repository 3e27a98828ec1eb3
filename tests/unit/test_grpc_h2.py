"""The built-in HTTP/2 gRPC transport against grpcio's client (a second, independent
implementation) and against raw frames for what a well-behaved client never sends."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import grpc_h2
from extproc.grpc_service import PROCESS_PATH, HealthState, start_h2_server

LIMIT = 64 * 1024 * 1024


def body_request(data: bytes) -> Any:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data))


def echoed(reply: Any) -> bytes:
    return bytes(reply.request_body.response.body_mutation.body)


class Servicer:
    """Echoes each request body; records what happened to each call."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.seen: list[int] = []

    def observe(self, _first: Any) -> None:
        """No observer: every call runs through Process (the observer path has its own tests)."""
        return None

    async def Process(self, requests: AsyncIterator[Any], _context: Any) -> AsyncIterator[Any]:
        outcome = "returned"
        try:
            async for request in requests:
                body = request.request_body.body
                self.seen.append(len(body))
                if body == b"boom":
                    raise RuntimeError("handler bug")
                if body == b"stop":
                    return  # answer early while the client still sends
                if body == b"slow":
                    await asyncio.sleep(30)
                mutation = ep.BodyMutation(body=body)
                yield ep.ProcessingResponse(
                    request_body=ep.BodyResponse(response=ep.CommonResponse(body_mutation=mutation))
                )
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.finished.append(outcome)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Servicer, int, HealthState, grpc_h2.GrpcServer]]:
    servicer = Servicer()
    server, port, health = await start_h2_server(servicer, "127.0.0.1", 0, LIMIT)
    try:
        yield servicer, port, health, server
    finally:
        await server.stop(1)


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", 2 * LIMIT),
            ("grpc.max_send_message_length", 2 * LIMIT),
        ],
    )


def process(ch: grpc.aio.Channel) -> Any:
    return ch.stream_stream(
        PROCESS_PATH,
        request_serializer=ep.ProcessingRequest.SerializeToString,
        response_deserializer=ep.ProcessingResponse.FromString,
    )


async def requests_of(*bodies: bytes) -> AsyncIterator[Any]:
    for body in bodies:
        yield body_request(body)


async def test_bidi_stream_round_trips_every_message(served: Any) -> None:
    _, port, _, _ = served
    async with channel(port) as ch:
        bodies = [f"message {i}".encode() for i in range(50)]
        replies = [echoed(r) async for r in process(ch)(requests_of(*bodies))]
    assert replies == bodies


async def test_large_messages_respect_flow_control_both_ways(served: Any) -> None:
    """8 MiB each way is far beyond every initial window (64 KiB) and frame size (16 KiB)."""
    servicer, port, _, _ = served
    big = bytes(range(256)) * (8 * 1024 * 4)
    async with channel(port) as ch:
        replies = [echoed(r) async for r in process(ch)(requests_of(big, b"x", big))]
    assert replies == [big, b"x", big]
    assert servicer.seen == [len(big), 1, len(big)]


async def test_many_concurrent_streams_on_one_connection(served: Any) -> None:
    _, port, _, _ = served
    async with channel(port) as ch:
        call = process(ch)

        async def one(i: int) -> list[bytes]:
            return [echoed(r) async for r in call(requests_of(b"a%d" % i, b"b%d" % i))]

        results = await asyncio.gather(*(one(i) for i in range(300)))
    assert results == [[b"a%d" % i, b"b%d" % i] for i in range(300)]


async def test_handler_returning_early_ends_the_call_cleanly(served: Any) -> None:
    servicer, port, _, _ = served

    async def endless() -> AsyncIterator[Any]:
        yield body_request(b"one")
        yield body_request(b"stop")
        for _ in range(1000):
            yield body_request(b"more")
            await asyncio.sleep(0.001)

    async with channel(port) as ch:
        replies = [echoed(r) async for r in process(ch)(endless())]
        # The connection is still good for the next call.
        again = [echoed(r) async for r in process(ch)(requests_of(b"next"))]
    assert replies == [b"one"]
    assert again == [b"next"]
    assert servicer.finished[0] == "returned"


async def test_handler_exception_is_an_internal_status_not_a_dead_server(served: Any) -> None:
    _, port, _, _ = served
    async with channel(port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            _ = [r async for r in process(ch)(requests_of(b"ok", b"boom"))]
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert [echoed(r) async for r in process(ch)(requests_of(b"fine"))] == [b"fine"]


async def test_client_cancel_cancels_the_handler(served: Any) -> None:
    servicer, port, _, _ = served
    async with channel(port) as ch:
        call = process(ch)(requests_of(b"slow"))
        task = asyncio.ensure_future(call.read())
        for _ in range(200):
            if servicer.seen:
                break
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if servicer.finished:
                break
            await asyncio.sleep(0.01)
    assert servicer.finished == ["cancelled"]


async def test_unknown_method_is_unimplemented(served: Any) -> None:
    _, port, _, _ = served
    async with channel(port) as ch:
        call = ch.unary_unary("/no.Such/Method")
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(b"")
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_message_over_the_limit_is_refused() -> None:
    servicer = Servicer()
    server, port, _, _ = await _small_server(servicer, limit=1000)
    try:
        async with channel(port) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                _ = [r async for r in process(ch)(requests_of(b"x" * 2000))]
            assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert [echoed(r) async for r in process(ch)(requests_of(b"y"))] == [b"y"]
    finally:
        await server.stop(1)


async def _small_server(servicer: Servicer, limit: int) -> Any:
    server, port, health = await start_h2_server(servicer, "127.0.0.1", 0, limit)
    return server, port, health, None


async def test_compressed_messages_are_refused(served: Any) -> None:
    _, port, _, _ = served
    async with channel(port) as ch:
        call = ch.stream_stream(
            PROCESS_PATH,
            request_serializer=ep.ProcessingRequest.SerializeToString,
            response_deserializer=ep.ProcessingResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            _ = [
                r async for r in call(requests_of(b"z" * 10_000), compression=grpc.Compression.Gzip)
            ]
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_follows_drain(served: Any) -> None:
    _, port, health, _ = served
    async with channel(port) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Check(health_pb2.HealthCheckRequest(service="other"))
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        await health.enter_graceful_shutdown()
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_stop_lets_running_calls_finish(served: Any) -> None:
    _, port, _, server = served
    async with channel(port) as ch:
        call = process(ch)

        async def slowish() -> AsyncIterator[Any]:
            yield body_request(b"first")
            await asyncio.sleep(0.3)
            yield body_request(b"second")

        running = asyncio.ensure_future(_collect(call(slowish())))
        await asyncio.sleep(0.1)
        await server.stop(5)
        assert await running == [b"first", b"second"]


async def _collect(call: Any) -> list[bytes]:
    return [echoed(r) async for r in call]


# --- raw frames ------------------------------------------------------------------------


class RawClient:
    """Speaks HTTP/2 by hand, one byte at a time if asked."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""

    def send(self, data: bytes, *, byte_by_byte: bool = False) -> None:
        if byte_by_byte:
            for i in range(len(data)):
                self.sock.sendall(data[i : i + 1])
        else:
            self.sock.sendall(data)

    def frames(self, until: int, stream_id: int | None = None) -> list[tuple[int, int, int, bytes]]:
        """Read frames until one of type `until` (on `stream_id` when given) arrives."""
        seen: list[tuple[int, int, int, bytes]] = []
        while True:
            while len(self.buffer) < 9:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return seen
                self.buffer += chunk
            length = int.from_bytes(self.buffer[:3], "big")
            while len(self.buffer) < 9 + length:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return seen
                self.buffer += chunk
            kind, flags = self.buffer[3], self.buffer[4]
            sid = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            payload = self.buffer[9 : 9 + length]
            self.buffer = self.buffer[9 + length :]
            seen.append((kind, flags, sid, payload))
            if kind == until and (stream_id is None or sid == stream_id):
                return seen

    def open_call(self, stream_id: int, messages: list[bytes], *, end: bool = True) -> bytes:
        block = self.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", PROCESS_PATH),
                (":authority", "sessiongate"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        out = grpc_h2.frame(grpc_h2.HEADERS, grpc_h2.END_HEADERS, stream_id, block)
        data = b"".join(struct.pack(">BI", 0, len(m)) + m for m in messages)
        return out + grpc_h2.frame(grpc_h2.DATA, grpc_h2.END_STREAM if end else 0, stream_id, data)


def _settings_frame() -> bytes:
    return grpc_h2.frame(grpc_h2.SETTINGS, 0, 0)


async def test_frames_split_into_single_bytes_still_make_a_call(served: Any) -> None:
    _, port, _, _ = served
    await asyncio.to_thread(_split_call, port)


def _split_call(port: int) -> None:
    client = RawClient(port)
    message = body_request("é😀 split".encode()).SerializeToString()
    wire = grpc_h2.PREFACE + _settings_frame() + client.open_call(1, [message, message])
    client.send(wire, byte_by_byte=True)
    frames = client.frames(grpc_h2.HEADERS, stream_id=1)
    frames += client.frames(grpc_h2.HEADERS, stream_id=1)  # response headers, then trailers
    data = b"".join(p for kind, _, sid, p in frames if kind == grpc_h2.DATA and sid == 1)
    replies = []
    while data:
        _, length = struct.unpack(">BI", data[:5])
        replies.append(ep.ProcessingResponse.FromString(data[5 : 5 + length]))
        data = data[5 + length :]
    assert [echoed(r) for r in replies] == ["é😀 split".encode()] * 2
    headers = [(f, p) for kind, f, sid, p in frames if kind == grpc_h2.HEADERS and sid == 1]
    decoded = [dict(client.decoder.decode(p, raw=True)) for _, p in headers]
    assert decoded[0][b":status"] == b"200"
    assert decoded[0][b"content-type"] == b"application/grpc"
    assert decoded[-1][b"grpc-status"] == b"0"
    assert headers[-1][0] & grpc_h2.END_STREAM


async def test_padded_frames_are_understood(served: Any) -> None:
    _, port, _, _ = served
    await asyncio.to_thread(_padded_call, port)


def _padded_call(port: int) -> None:
    client = RawClient(port)
    message = body_request(b"padded").SerializeToString()
    block = client.encoder.encode(
        [(":method", "POST"), (":path", PROCESS_PATH), ("content-type", "application/grpc")]
    )
    headers = grpc_h2.frame(
        grpc_h2.HEADERS, grpc_h2.END_HEADERS | grpc_h2.PADDED, 1, b"\x03" + block + b"\0\0\0"
    )
    payload = struct.pack(">BI", 0, len(message)) + message
    data = grpc_h2.frame(
        grpc_h2.DATA, grpc_h2.END_STREAM | grpc_h2.PADDED, 1, b"\x05" + payload + b"\0" * 5
    )
    client.send(grpc_h2.PREFACE + _settings_frame() + headers + data)
    frames = client.frames(grpc_h2.DATA, stream_id=1)
    body = frames[-1][3]
    assert echoed(ep.ProcessingResponse.FromString(body[5:])) == b"padded"


async def test_ping_is_answered(served: Any) -> None:
    _, port, _, _ = served
    await asyncio.to_thread(_ping, port)


def _ping(port: int) -> None:
    client = RawClient(port)
    client.send(
        grpc_h2.PREFACE + _settings_frame() + grpc_h2.frame(grpc_h2.PING, 0, 0, b"12345678")
    )
    frames = client.frames(grpc_h2.PING)
    assert frames[-1][1] & grpc_h2.ACK and frames[-1][3] == b"12345678"


@pytest.mark.parametrize(
    "wire",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        grpc_h2.PREFACE + grpc_h2.frame(grpc_h2.SETTINGS, 0, 0, b"\0\0\0"),  # bad length
        grpc_h2.PREFACE + grpc_h2.frame(grpc_h2.DATA, 0, 0, b"x"),  # DATA on stream 0
        grpc_h2.PREFACE + grpc_h2.frame(grpc_h2.HEADERS, grpc_h2.END_HEADERS, 1, b"\xff\xff"),
    ],
    ids=["http1", "bad-settings", "data-on-0", "bad-hpack"],
)
async def test_protocol_errors_close_only_that_connection(served: Any, wire: bytes) -> None:
    _, port, _, _ = served
    await asyncio.to_thread(_protocol_error, port, wire)


def _protocol_error(port: int, wire: bytes) -> None:
    client = RawClient(port)
    client.send(wire)
    frames = client.frames(grpc_h2.GOAWAY)
    assert not frames or frames[-1][0] == grpc_h2.GOAWAY
    assert client.sock.recv(1) == b""  # closed
    # The server still serves everyone else.
    other = RawClient(port)
    other.send(grpc_h2.PREFACE + _settings_frame() + other.open_call(1, [b""]))
    assert other.frames(grpc_h2.HEADERS, stream_id=1)


async def test_repeated_header_blocks_follow_the_dynamic_table(served: Any) -> None:
    """The same header-block bytes mean another path once the peer's dynamic table changed:
    the transport's memo of decoded blocks must not serve the old meaning."""
    _, port, _, _ = served
    await asyncio.to_thread(_same_block_new_meaning, port)


def _same_block_new_meaning(port: int) -> None:
    client = RawClient(port)
    common = b"\x83\x86"  # static :method POST, :scheme http
    health_path = b"/grpc.health.v1.Health/Check"

    def insert_path(path: bytes) -> bytes:  # literal with incremental indexing, name :path
        return bytes([0x44, len(path)]) + path

    same = common + b"\xbe"  # indexed: dynamic entry 62, the newest insertion
    ping = struct.pack(">BI", 0, 0)  # an empty message: HealthCheckRequest(service="")
    body = body_request(b"echo").SerializeToString()
    call = struct.pack(">BI", 0, len(body)) + body

    def stream(sid: int, block: bytes, data: bytes) -> bytes:
        return grpc_h2.frame(grpc_h2.HEADERS, grpc_h2.END_HEADERS, sid, block) + grpc_h2.frame(
            grpc_h2.DATA, grpc_h2.END_STREAM, sid, data
        )

    wire = grpc_h2.PREFACE + _settings_frame()
    wire += stream(1, common + insert_path(health_path), ping)
    wire += stream(3, same, ping)  # health again, from the memo or not
    wire += stream(5, common + insert_path(PROCESS_PATH.encode()), call)
    wire += stream(7, same, call)  # the very same bytes as stream 3, now the ext_proc path
    client.send(wire)
    replies: dict[int, bytes] = {}
    while len(replies) < 4:
        frames = client.frames(grpc_h2.DATA)
        assert frames, "connection closed early"
        _, _, sid, payload = frames[-1]
        replies[sid] = payload[5:]
    assert replies[1] == replies[3] == b"\x08\x01"  # HealthCheckResponse(SERVING)
    assert echoed(ep.ProcessingResponse.FromString(replies[5])) == b"echo"
    assert echoed(ep.ProcessingResponse.FromString(replies[7])) == b"echo"


# --- observers: calls consumed synchronously, without a task ------------------------------


class Recorder:
    """An observer: records bodies, ends the call at b"done", fails at b"bug"."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def on_message(self, message: Any) -> bool:
        body = bytes(message.request_body.body)
        if body == b"bug":
            raise RuntimeError("observer bug")
        self.log.append(body.decode())
        return body != b"done"

    def on_end(self) -> None:
        self.log.append("end")


@pytest.fixture
async def observed() -> AsyncIterator[tuple[int, list[str], Servicer]]:
    log: list[str] = []
    servicer = Servicer()

    def observe(first: Any) -> Recorder | None:
        return Recorder(log) if first.request_body.body.startswith(b"observe") else None

    def handler(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return servicer.Process(requests, None)

    method = grpc_h2.Method(
        ep.ProcessingRequest.FromString,
        ep.ProcessingResponse.SerializeToString,
        handler,
        observe=observe,
    )
    server = grpc_h2.GrpcServer({PROCESS_PATH: method}, max_message_bytes=LIMIT)
    port = await server.start("127.0.0.1", 0)
    try:
        yield port, log, servicer
    finally:
        await server.stop(1)


async def _until(condition: Any) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)


async def test_an_observer_takes_the_whole_call_and_ends_it(observed: Any) -> None:
    port, log, servicer = observed

    async def more_after_done() -> AsyncIterator[Any]:
        for body in (b"observe", b"a", b"b", b"done"):
            yield body_request(body)
        await asyncio.sleep(0.05)
        yield body_request(b"ignored")

    async with channel(port) as ch:
        assert [r async for r in process(ch)(more_after_done())] == []
    assert log == ["observe", "a", "b", "done", "end"]
    assert servicer.seen == []  # the handler never ran


async def test_an_observer_learns_when_the_peer_ends_or_cancels(observed: Any) -> None:
    port, log, _ = observed
    async with channel(port) as ch:
        assert [r async for r in process(ch)(requests_of(b"observe", b"x"))] == []
        assert log == ["observe", "x", "end"]
        log.clear()

        async def hang() -> AsyncIterator[Any]:
            yield body_request(b"observe")
            await asyncio.sleep(30)

        call = process(ch)(hang())
        reading = asyncio.ensure_future(call.read())
        await _until(lambda: log)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await _until(lambda: "end" in log)
    assert log == ["observe", "end"]


async def test_a_failing_observer_is_an_internal_status_and_still_ends(observed: Any) -> None:
    port, log, _ = observed
    async with channel(port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            _ = [r async for r in process(ch)(requests_of(b"observe", b"bug", b"z"))]
        assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert log == ["observe", "end"]


async def test_without_an_observer_the_handler_gets_every_message(observed: Any) -> None:
    port, log, servicer = observed
    async with channel(port) as ch:
        replies = [echoed(r) async for r in process(ch)(requests_of(b"first", b"second"))]
    assert replies == [b"first", b"second"]
    assert servicer.seen == [5, 6] and log == []
