"""The grpc.aio ext_proc server: one Process() stream per filter per HTTP request.

Both filters call the same service. Which one a stream belongs to is told by its first message:
the rewrite filter always starts with request headers (SEND), the capture filter skips them and
starts with response headers. Every handler returns as soon as it has nothing left to do, so
Envoy never holds a stream open for the length of an LLM call.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import mutations
from extproc.capture import CaptureObserver, CaptureStream
from extproc.config import Settings
from extproc.metrics import Metrics
from extproc.rewrite import Rewriter
from extproc.sockets import remove_stale_socket, unix_path
from store import TurnSink

log = logging.getLogger(__name__)

# gRPC frames carry a whole buffered body plus a little protobuf overhead.
GRPC_OVERHEAD_BYTES = 64 * 1024
GRPC_RECEIVE_FLOOR_BYTES = 64 * 1024 * 1024


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, rewriter: Rewriter, store: TurnSink, metrics: Metrics, settings: Settings):
        self.rewriter = rewriter
        self.store = store
        self.metrics = metrics
        self.settings = settings

    async def Process(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        kind = first.WhichOneof("request")
        if kind == "request_headers":
            async for response in self._rewrite(first, request_iterator):
                yield response
        elif kind == "response_headers":
            await self._capture(first, request_iterator)
        else:
            self.metrics.inc("server.unexpected_first_message")
            log.warning("ext_proc stream began with %s; check the filter's processing_mode", kind)

    async def _rewrite(self, first: Any, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        response, session = self.rewriter.on_request_headers(first)
        if inspect.isawaitable(response):  # sessiongate's own API (GET/DELETE) needs the store
            response = await response
        yield response
        if session is None:
            return
        async for request in requests:
            if request.WhichOneof("request") == "request_body":
                yield await self.rewriter.on_request_body(session, request)
                return
            self.metrics.inc("server.unexpected_message")

    def _capture_stream(self) -> CaptureStream:
        models = self.rewriter.context.models
        return CaptureStream(
            self.store,
            self.metrics,
            max_json_bytes=self.settings.max_body_bytes * 8,
            delay_s=self.settings.debug_capture_delay_ms / 1000,
            image_tokens=(
                self.settings.context_image_tokens if self.settings.context_enabled else None
            ),
            # Reported usage teaches the margins the rewrite side's budget applies.
            usage_observer=models.observe_usage if models.calibration is not None else None,
            extract_facts=self.rewriter.context.extract_facts,
        )

    def observe(self, first: Any) -> CaptureObserver | None:
        """The built-in transport's hook (extproc.grpc_h2.Observer): a capture stream whose
        turn this process already knows is consumed synchronously, without a task or a wake-up
        per chunk. Rewrite streams, and captures of a turn another replica rewrote (fetched
        from Redis, which needs `await`), run through `Process`."""
        if first.WhichOneof("request") != "response_headers":
            return None
        turn_id = mutations.turn_id_of(first)
        known = self.store.pending(turn_id) if turn_id is not None else None
        if turn_id is not None and known is None:
            return None
        self.metrics.inc("server.capture.observer")
        return CaptureObserver(self._capture_stream(), known)

    async def _capture(self, first: Any, requests: AsyncIterator[Any]) -> None:
        self.metrics.inc("server.capture.handler")
        stream = self._capture_stream()
        try:
            turn_id = mutations.turn_id_of(first)
            if turn_id is not None:
                # A turn another replica rewrote (Envoy sent its capture here) is fetched from
                # Redis now, so that the stream's decoding below stays synchronous.
                await self.store.find_pending(turn_id)
            if not stream.on_response_headers(first):
                return
            async for request in requests:
                is_body = request.WhichOneof("request") == "response_body"
                if is_body and not stream.on_response_body(request):
                    return
        finally:
            stream.on_stream_end()


def grpc_receive_limit(settings: Settings) -> int:
    return max(settings.upstream_body_limit, GRPC_RECEIVE_FLOOR_BYTES) + GRPC_OVERHEAD_BYTES


async def start_grpc_server(
    settings: Settings, rewriter: Rewriter, store: TurnSink, metrics: Metrics
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Bind, start, mark SERVING. Returns the server, its bound port and the health servicer."""
    server = grpc.aio.server(
        options=[
            # Envoy sends whatever it buffered: up to its buffer limit for HTTP/1.1, unbounded
            # for HTTP/2 (Envoy 1.40 answers 413 only on HTTP/1.1). Rewrite answers 413 above
            # max_body_bytes itself, so accept generously; above this the stream fails and the
            # failure mode applies.
            ("grpc.max_receive_message_length", grpc_receive_limit(settings)),
            ("grpc.max_send_message_length", settings.upstream_body_limit + GRPC_OVERHEAD_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(rewriter, store, metrics, settings), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    path = unix_path(settings.grpc_listen)
    if path is not None:
        remove_stale_socket(path)
    port = server.add_insecure_port(settings.grpc_listen)
    if port == 0:
        raise OSError(f"cannot bind the gRPC server to {settings.grpc_listen}")
    if path is not None:
        port = 0  # grpcio answers 1 for a Unix socket: there is no port
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(
        "envoy.service.ext_proc.v3.ExternalProcessor", health_pb2.HealthCheckResponse.SERVING
    )
    return server, port, health_servicer


async def drain(server: grpc.aio.Server, health_servicer: Any, grace_s: float = 5.0) -> None:
    """Stop taking new streams, let running ones finish."""
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
    await asyncio.sleep(0)
