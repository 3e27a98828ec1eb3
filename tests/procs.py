"""Start the project's real processes for tests and read their one `ready` line."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    ready: str
    log_path: Path
    args: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start(
    args: list[str], log_path: Path, *, timeout: float = 30, env: dict[str, str] | None = None
) -> Proc:
    """Run `sessiongate ARGS...`; stderr goes to log_path; wait for the `ready` line on stdout."""
    cmd = [sys.executable, "-m", "extproc.cli", *args]
    stderr = open(log_path, "a")  # noqa: SIM115 - kept open for the process's lifetime
    popen = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout
    assert popen.stdout is not None
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{args[0]} exited {popen.returncode}:\n{log_path.read_text()}")
        readable, _, _ = select.select([popen.stdout], [], [], 0.1)
        if readable:
            line = popen.stdout.readline()
            if "ready" in line.split(" ", 2)[:2]:
                return Proc(popen, line.strip(), log_path, args)
    popen.kill()
    raise RuntimeError(f"{args[0]} not ready in {timeout}s:\n{log_path.read_text()}")
