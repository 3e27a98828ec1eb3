"""The ext_proc and health services on the built-in HTTP/2 transport (`extproc.grpc_h2`).

Same servicer, same health semantics as the grpcio server in `extproc.server`; `runtime` picks
one by the `grpc_server` setting. Both objects returned here have the methods `server.drain`
calls (`enter_graceful_shutdown`, `stop`), so stopping does not care which transport runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from grpc_health.v1 import health_pb2

from extproc.grpc_h2 import GRPC_NOT_FOUND, GrpcAbort, GrpcServer, Method

PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthState:
    """grpc.health.v1 Check: "" (the server) and the ext_proc service; NOT_SERVING once
    draining, so Envoy's health checks take this replica out of the ring before it stops."""

    def __init__(self) -> None:
        self._status = {"": _SERVING, EXT_PROC_SERVICE: _SERVING}

    def status(self, service: str) -> int | None:
        return self._status.get(service)

    async def enter_graceful_shutdown(self) -> None:
        for service in self._status:
            self._status[service] = _NOT_SERVING

    async def check(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            status = self.status(request.service)
            if status is None:
                raise GrpcAbort(GRPC_NOT_FOUND, f"unknown service {request.service!r}")
            yield health_pb2.HealthCheckResponse(status=status)
            return


def methods(servicer: Any, health: HealthState) -> dict[str, Method]:
    """`servicer`: an `extproc.server.ExternalProcessor` (its Process ignores the context)."""

    def process(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return servicer.Process(requests, None)  # type: ignore[no-any-return]

    return {
        PROCESS_PATH: Method(
            ep.ProcessingRequest.FromString,
            ep.ProcessingResponse.SerializeToString,
            process,
            observe=servicer.observe,
        ),
        HEALTH_CHECK_PATH: Method(
            health_pb2.HealthCheckRequest.FromString,
            health_pb2.HealthCheckResponse.SerializeToString,
            health.check,
        ),
    }


async def start_h2_server(
    servicer: Any, host: str, port: int, max_message_bytes: int
) -> tuple[GrpcServer, int, HealthState]:
    health = HealthState()
    server = GrpcServer(methods(servicer, health), max_message_bytes=max_message_bytes)
    bound = await server.start(host, port)
    return server, bound, health
