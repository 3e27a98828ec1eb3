"""`up --workers 2`: two ext_proc processes behind one Envoy, sessions pinned by ring hash."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Gateway, Mock, marker, start_gateway


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def _converse(gateway: Gateway, mock: Mock, session: str, turns: int) -> list[Any]:
    client = gateway.client(session)
    sent: list[Any] = []
    for _ in range(turns):
        text = marker()
        reply = client.chat.completions.create(model="m", messages=[user(text)])
        sent += [user(text), {"role": "assistant", "content": reply.choices[0].message.content}]
    # The last request carried every earlier turn of this session, whichever worker it met.
    last = mock.request_with(sent[-2]["content"])["body"]["messages"]
    assert last == sent[:-1]
    return sent


def _requests_per_worker(gateway: Gateway) -> dict[str, int]:
    with urllib.request.urlopen(f"{gateway.admin}/clusters") as response:
        text = response.read().decode()
    # A host is ADDRESS:PORT, or a Unix socket's path (`up` listens on those by default).
    found = re.findall(r"^sessiongate_ext_proc::(\S+?)::rq_total::(\d+)$", text, re.M)
    return {host: int(n) for host, n in found}


def _worker_pids(state_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            # (the pdeathsig shim execs into the worker: one process per worker)
            if b"extproc.workers" in cmdline and str(state_dir).encode() in b" ".join(cmdline):
                pids.append(int(entry.name))
    return pids


def test_sessions_stick_to_a_worker_and_both_workers_serve(mock: Mock, tmp_path: Path) -> None:
    state = tmp_path / "state"
    gateway = start_gateway(state, mock.url, "--workers", "2")
    try:
        sessions = [f"w-{i}-{marker()}" for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda s: _converse(gateway, mock, s, 4), sessions))
        per_worker = _requests_per_worker(gateway)
        assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
        # /metrics sums both workers' counters.
        counters = gateway.counters()
        assert counters["capture.completed"] == 48 and counters["rewrite.injected"] == 48
    finally:
        assert gateway.proc.stop() == 0, gateway.proc.log()
    with contextlib.closing(sqlite3.connect(state / "sessions.db")) as db:
        rows = db.execute("SELECT session_key, COUNT(*), MAX(seq) FROM turns GROUP BY 1").fetchall()
    assert sorted((n, top) for _, n, top in rows) == [(4, 4)] * 12


def test_a_dead_worker_stops_up_with_an_error(mock: Mock, tmp_path: Path) -> None:
    state = tmp_path / "state"
    gateway = start_gateway(state, mock.url, "--workers", "2")
    try:
        pids = _worker_pids(state)
        assert len(pids) == 1, pids  # one child worker besides `up` itself
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while gateway.proc.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway.proc.popen.returncode == 1
        assert "ext_proc worker exited" in gateway.proc.log()
    finally:
        gateway.proc.stop()
