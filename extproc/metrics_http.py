"""A small loopback HTTP endpoint with sessiongate's counters (`metrics_listen`).

`/metrics` is Prometheus text, `/stats` the same as JSON. Counter names carry no request data.
OpenTelemetry export comes later; this keeps drops and fail-open events visible meanwhile.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from extproc.config import split_host_port

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_text(values: dict[str, int]) -> str:
    lines = []
    for name in sorted(values):
        metric = "sessiongate_" + _UNSAFE.sub("_", name)
        lines.append(f"{metric} {values[name]}")
    return "\n".join(lines) + "\n"


async def start_metrics_http(
    listen: str, snapshot: Callable[[], Awaitable[dict[str, int]]]
) -> tuple[web.AppRunner, int]:
    """`snapshot` is async: `up --workers` sums its workers' counters, fetched on each call."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=prometheus_text(await snapshot()), content_type="text/plain")

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(await snapshot())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_host_port(listen, "metrics_listen")
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])  # the real port when `listen` asked for port 0
    return runner, bound
