"""Where Envoy reaches the ext_proc server(s): loopback TCP ports, or Unix sockets.

A listen address is `HOST:PORT` or `unix:/absolute/path`; endpoints keep the `(host, port)`
shape everywhere, a Unix socket being `("unix:/path", 0)` (Envoy's `pipe` address).

`up` puts its servers on Unix sockets in `<state_dir>/run` (`ext_proc_unix_socket`, default
on). Every request crosses this connection three times (rewrite headers, rewrite body,
capture), and on this 2-core machine a loopback TCP write costs about twice a Unix socket's,
in CPU and in latency, on both sides (a ping-pong of 2 kB messages: 71 us vs 36 us a round
trip). When the state directory's path is too long for a socket name, `up` uses loopback TCP.
"""

from __future__ import annotations

import os
from pathlib import Path

UNIX_PREFIX = "unix:"
# sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107


def unix_path(listen: str) -> str | None:
    """The socket path of a `unix:` address, else None."""
    return listen[len(UNIX_PREFIX) :] if listen.startswith(UNIX_PREFIX) else None


def valid_unix_path(path: str) -> bool:
    return path.startswith("/") and 0 < len(path.encode()) <= MAX_SOCKET_PATH


def socket_dir(state_dir: Path, sockets: int) -> Path | None:
    """`<state_dir>/run` (made 0700) for `sockets` sockets, or None when their paths would be
    too long for socket names."""
    directory = state_dir.resolve() / "run"
    if not valid_unix_path(str(socket_path(directory, sockets - 1))):
        return None
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    return directory


def socket_path(directory: Path, index: int) -> Path:
    return directory / f"extproc-{index}.sock"


def unix_listen(directory: Path, index: int) -> str:
    return f"{UNIX_PREFIX}{socket_path(directory, index)}"


def grpc_target(host: str, port: int) -> str:
    """A grpcio channel target for an endpoint."""
    return host if host.startswith(UNIX_PREFIX) else f"{host}:{port}"


def remove_stale_socket(path: str) -> None:
    """A socket file left by a process that died: binding fails while it exists."""
    try:
        if Path(path).is_socket():
            os.unlink(path)
    except FileNotFoundError:
        pass
