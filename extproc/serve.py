"""`sessiongate serve`: the ext_proc server alone, for meshes where Envoy runs elsewhere."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from extproc.config import Settings
from extproc.identity import IdentityError
from extproc.runtime import ExtProcService, start_ext_proc
from extproc.sockets import unix_path

log = logging.getLogger(__name__)


async def run_serve(settings: Settings) -> int:
    def announce(service: ExtProcService) -> None:
        host = settings.grpc_listen.rpartition(":")[0]
        if service.metrics_port:
            metrics_host = settings.metrics_listen.rpartition(":")[0]
            print(
                f"sessiongate: counters at http://{metrics_host}:{service.metrics_port}/metrics",
                file=sys.stderr,
                flush=True,
            )
        if unix_path(settings.grpc_listen) is not None:
            print(f"ready {settings.grpc_listen}", flush=True)
        else:
            print(f"ready grpc://{host}:{service.port}", flush=True)

    return await serve_until_stopped(settings, announce)


async def serve_until_stopped(
    settings: Settings, announce: Callable[[ExtProcService], None]
) -> int:
    """Start the ext_proc service, `announce` it, serve until SIGINT/SIGTERM, stop cleanly.
    Shared by `serve` and `up`'s extra workers (extproc.workers)."""
    try:
        service = await start_ext_proc(settings, create_key=False)
    except IdentityError as exc:
        log.error("%s", exc)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(service)
    try:
        await stop.wait()
    finally:
        await service.stop()
    return 0
