"""`up --workers N`: N-1 more ext_proc processes beside the one inside `up`, so Python uses
every core.

One asyncio process runs on one core; Envoy's HTTP/2 streams do not spread over SO_REUSEPORT
sockets. So each worker listens on its own loopback port and is its own endpoint of the
ext_proc cluster, which ring-hashes on the session's affinity key (the capture stream carries
the same key): a session always meets the same worker, whose hot tier stays its only copy.
That is only true while the ring does not change, so `up` stops (non-zero) when a worker dies,
the workers have no Envoy health checks, and the hot tier's byte budget is split between them.
With Redis configured, the usual replica machinery (versions, invalidations, shared pending
markers) applies on top.

A worker is `python -m extproc.workers SETTINGS_FILE`, started through `extproc.pdeathsig`
(it dies with `up`, even on SIGKILL), reading the parent's pickled `Settings` from a 0600 file
in the state directory. It prints one line, `worker GRPC_PORT METRICS_PORT` (0: no metrics),
then serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import uvloop

from extproc.config import Settings
from extproc.metrics import merge

if TYPE_CHECKING:
    from extproc.runtime import ExtProcService

log = logging.getLogger(__name__)

READY_PREFIX = "worker "
START_TIMEOUT_S = 30.0


class WorkerError(RuntimeError):
    pass


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    grpc_port: int
    metrics_port: int


def worker_settings(settings: Settings, workers: int) -> Settings:
    """A worker's settings: its own free ports, its share of the hot tier."""
    return dataclasses.replace(
        settings,
        grpc_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0" if settings.metrics_listen else "",
        hot_max_bytes=max(1, settings.hot_max_bytes // workers),
        workers=1,
    )


async def start_workers(settings: Settings, listens: Sequence[str]) -> list[Worker]:
    """Start a worker process per address in `listens` (`HOST:0` or `unix:/path`); all or
    none (a failed start stops the others)."""
    if not listens:
        return []
    path = settings.state_dir / "worker-settings.pickle"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(worker_settings(settings, len(listens) + 1), fh)
    started: list[Worker] = []
    try:
        for listen in listens:
            started.append(await _start_one(path, listen))
    except BaseException:
        await stop_workers(started)
        raise
    return started


async def _start_one(settings_path: Path, listen: str) -> Worker:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "extproc.pdeathsig",
        str(os.getpid()),
        sys.executable,
        "-m",
        "extproc.workers",
        str(settings_path),
        listen,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise WorkerError("an ext_proc worker did not start in time") from None
    text = line.decode(errors="replace").strip()
    if not text.startswith(READY_PREFIX):
        await proc.wait()
        raise WorkerError(f"an ext_proc worker failed to start (exit {proc.returncode})")
    grpc_port, metrics_port = (int(part) for part in text.removeprefix(READY_PREFIX).split())
    return Worker(proc, grpc_port, metrics_port)


async def stop_workers(workers: Sequence[Worker], timeout_s: float = 10.0) -> None:
    for worker in workers:
        if worker.proc.returncode is None:
            worker.proc.terminate()
    for worker in workers:
        try:
            await asyncio.wait_for(worker.proc.wait(), timeout_s)
        except TimeoutError:
            worker.proc.kill()
            await worker.proc.wait()


async def first_exit(workers: Sequence[Worker]) -> Worker:
    """The first worker to exit (waits forever when there are none)."""
    if not workers:
        await asyncio.Event().wait()
    waits = {asyncio.ensure_future(w.proc.wait()): w for w in workers}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return waits[next(iter(done))]
    finally:
        for wait in waits:
            wait.cancel()


async def worker_counters(workers: Sequence[Worker]) -> dict[str, int]:
    """The workers' counters, summed, and their gauges' maxima (fetched now, so a reading
    is never stale)."""
    total: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for worker in workers:
            if not worker.metrics_port:
                continue
            url = f"http://127.0.0.1:{worker.metrics_port}/stats"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as response:
                    for name, value in (await response.json()).items():
                        merge(total, name, int(value))
    return total


# --- the worker process -----------------------------------------------------------------


async def _serve(settings: Settings) -> int:
    from extproc.serve import serve_until_stopped

    def announce(service: ExtProcService) -> None:
        print(f"{READY_PREFIX}{service.port} {service.metrics_port or 0}", flush=True)

    return await serve_until_stopped(settings, announce)


def main(argv: Sequence[str]) -> int:
    with open(argv[0], "rb") as fh:
        settings = pickle.load(fh)  # written 0600 by our own parent, never by a client
    settings = dataclasses.replace(settings, grpc_listen=argv[1])
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s worker {os.getpid()} %(name)s: %(message)s",
    )
    return uvloop.run(_serve(settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
