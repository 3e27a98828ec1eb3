"""The ext_proc side of sessiongate, assembled: store + identity + filters + gRPC server.

Shared by `serve` (Envoy runs elsewhere) and `up` (which also runs an Envoy).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from extproc.config import Settings, split_host_port
from extproc.context.calibration import Calibration, CalibrationSettings
from extproc.context.models import FAMILY_MARGINS
from extproc.gc_tuning import GcTuning
from extproc.grpc_service import start_h2_server
from extproc.identity import IdentityResolver, load_hmac_key
from extproc.metrics import Metrics, merge
from extproc.metrics_http import start_metrics_http
from extproc.rewrite import Rewriter
from extproc.server import ExternalProcessor, drain, grpc_receive_limit, start_grpc_server
from store import StoreRouter, open_router

log = logging.getLogger(__name__)


@dataclass
class ExtProcService:
    settings: Settings
    store: StoreRouter
    metrics: Metrics
    server: Any  # grpc.aio.Server or extproc.grpc_h2.GrpcServer: both have stop(grace)
    health: Any
    port: int
    metrics_runner: web.AppRunner | None = None
    metrics_port: int | None = None

    # Counters of other processes to add in (`up --workers`: the other workers').
    more_counters: Callable[[], Awaitable[dict[str, int]]] | None = None
    gc_tuning: GcTuning | None = None

    def counters(self) -> dict[str, int]:
        stats = {f"store.{k}": v for k, v in self.store.stats.items()}
        gc_stats = self.gc_tuning.stats() if self.gc_tuning is not None else {}
        return {**self.metrics.snapshot(), **stats, **gc_stats}

    async def all_counters(self) -> dict[str, int]:
        total = self.counters()
        if self.more_counters is not None:
            for name, value in (await self.more_counters()).items():
                merge(total, name, value)
        return total

    async def stop(self) -> None:
        await drain(self.server, self.health)
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        await self.store.close()
        if self.gc_tuning is not None:
            self.gc_tuning.uninstall()
        log.info("stopped; counters: %s", self.metrics.snapshot())


def store_options(settings: Settings) -> dict[str, Any]:
    """The default store's `open_store` options (pinned tenants override some of them)."""
    return {
        "sqlite_path": settings.sqlite_file,
        "hot_max_bytes": settings.hot_max_bytes,
        # 0 means no idle expiry; the hot tier takes None for that.
        "hot_ttl_s": settings.hot_ttl_s or None,
        "commit_interval_ms": settings.commit_interval_ms,
        "postgres_dsn": settings.postgres_dsn,
        "postgres_schema": settings.postgres_schema,
        "redis_url": settings.redis_url,
        "redis_urls": settings.redis_urls,
        "redis_prefix": settings.redis_prefix,
        "redis_ttl_s": settings.redis_ttl_s,
        "redis_max_turns": settings.redis_max_turns,
    }


def margin_gauge(family: str) -> str:
    return f"context.margin_permille.{family}"


def attach_calibration(rewriter: Rewriter, settings: Settings, metrics: Metrics) -> None:
    """Margins learnt from reported usage: capture feeds the calibration that the rewrite's
    model table reads (`ModelTable.lookup`), one per process. The gauges start at the fixed
    family margins and follow the learnt ones."""
    if not (settings.context_enabled and settings.context_calibrate_margins):
        return
    for family, margin in FAMILY_MARGINS.items():
        metrics.set(margin_gauge(family), round(margin * 1000))

    def on_margin(family: str, margin: float) -> None:
        metrics.set(margin_gauge(family), round(margin * 1000))

    def on_event(name: str) -> None:
        metrics.inc("context.calibration." + name)

    calibration = CalibrationSettings(
        min_samples=settings.context_calibration_min_samples,
        window=settings.context_calibration_window,
        quantile=settings.context_calibration_quantile,
        floor=settings.context_calibration_floor,
        cap=settings.context_calibration_cap,
    )
    rewriter.context.models.calibration = Calibration(calibration, on_margin, on_event)


async def start_ext_proc(settings: Settings, *, create_key: bool) -> ExtProcService:
    """`create_key`: `up` makes the HMAC key on first start; `serve` requires it to exist."""
    key = load_hmac_key(settings.hmac_key_path, create=create_key)
    resolver = IdentityResolver(
        key,
        settings.identity_sources,
        jwt_namespace=settings.jwt_metadata_namespace,
        tenant_claim=settings.tenant_claim,
        allow_anonymous=settings.allow_anonymous,
    )
    store = await open_router(store_options(settings), settings.tenants)
    metrics = Metrics()
    rewriter = Rewriter(settings, resolver, store, metrics)
    attach_calibration(rewriter, settings, metrics)
    try:
        if settings.grpc_server == "h2":
            host, port = split_host_port(settings.grpc_listen, "grpc_listen", unix_ok=True)
            server, port, health = await start_h2_server(
                ExternalProcessor(rewriter, store, metrics, settings),
                host,
                port,
                grpc_receive_limit(settings),
            )
        else:
            server, port, health = await start_grpc_server(settings, rewriter, store, metrics)
    except BaseException:
        await store.close()
        raise
    service = ExtProcService(settings, store, metrics, server, health, port)
    if settings.gc_unfreeze_every_s > 0:
        service.gc_tuning = GcTuning(settings.gc_unfreeze_every_s)
        service.gc_tuning.install()
    if settings.metrics_listen:
        service.metrics_runner, service.metrics_port = await start_metrics_http(
            settings.metrics_listen, service.all_counters
        )
    return service
