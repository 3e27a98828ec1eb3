"""Real redis-server processes for the Redis tests: standalone (plain, TLS, Unix socket), a
3-master cluster, and a sentinel. Each test owns its servers; `kill` is a real SIGKILL.

Every server runs without persistence (`--save "" --appendonly no`) in its own temp directory,
on a free loopback port. Servers are killed when the fixture that started them ends; as a safety
net they are also killed at interpreter exit and (Linux) when the test process itself dies
(PR_SET_PDEATHSIG), so no redis-server outlives the test run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import hashlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from store.redis import RedisBackend

# The Redis every developer machine and CI job has; tests use it only under their own prefix.
SHARED_URL = os.environ.get("SESSIONGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

_LIVE: set[subprocess.Popen[bytes]] = set()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register
def _kill_leftovers() -> None:
    for popen in list(_LIVE):
        with contextlib.suppress(OSError):
            popen.kill()
            popen.wait(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """One redis-server; `start` again after `kill` reuses the same port and arguments."""

    directory: Path
    port: int
    args: list[str]
    tls_port: int | None = None
    sentinel: bool = False
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_socket(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        assert self.popen is None or self.popen.poll() is not None, "already running"
        cmd = ["redis-server", *self.args]
        if self.sentinel:
            cmd.append("--sentinel")
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                cmd,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        _LIVE.add(self.popen)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log_path.read_text()[-2000:]}")
            try:
                if self.admin().ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server not ready in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-conversation, no graceful shutdown."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        if self.popen is not None:
            _LIVE.discard(self.popen)

    def freeze(self) -> None:
        """SIGSTOP: the server stops answering but its sockets stay open (no FIN, no RST),
        like a paused VM or a dropped route."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGCONT)

    def admin(self) -> redis.Redis:
        """A synchronous client for test set-up (never the code under test)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, protocol=2)


def start_server(directory: Path, *extra: str, port: int | None = None) -> RedisServer:
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    server = RedisServer(directory, port, _base_args(directory, port, *extra))
    server.start()
    return server


def _base_args(directory: Path, port: int, *extra: str) -> list[str]:
    return [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--unixsocket",
        str(directory / "redis.sock"),
        "--unixsocketperm",
        "700",
        "--enable-debug-command",
        "local",
        *extra,
    ]


@contextlib.contextmanager
def redis_server(directory: Path, *extra: str) -> Iterator[RedisServer]:
    server = start_server(directory, *extra)
    try:
        yield server
    finally:
        server.kill()


# --- TLS --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path  # a CA that did not sign the server's certificate


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate it signs for 127.0.0.1/localhost, and a second,
    unrelated CA for the verification-failure test."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca("sessiongate test CA")
    _, other_ca = _make_ca("unrelated CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        other_ca_cert=directory / "other-ca.pem",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.other_ca_cert.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


class TlsUnsupported(RuntimeError):
    """This redis-server build has no TLS (built without BUILD_TLS=yes)."""


def start_tls_server(directory: Path, tls: TlsFiles) -> RedisServer:
    """Plain port for the admin client (set-up only), TLS port for the code under test."""
    tls_port = free_port()
    try:
        server = start_server(
            directory,
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(tls.server_cert),
            "--tls-key-file",
            str(tls.server_key),
            "--tls-ca-cert-file",
            str(tls.ca_cert),
            "--tls-auth-clients",
            "no",
        )
    except RuntimeError as exc:
        if "Bad directive" in str(exc) or "TLS" in str(exc):
            raise TlsUnsupported(str(exc)) from None
        raise
    server.tls_port = tls_port
    return server


# --- cluster ----------------------------------------------------------------------------


@dataclass
class RedisClusterServers:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


def start_cluster(directory: Path, masters: int = 3, timeout: float = 20.0) -> RedisClusterServers:
    """`masters` cluster-enabled servers joined by `redis-cli --cluster create` (no replicas),
    returned once every node reports cluster_state:ok."""
    nodes: list[RedisServer] = []
    try:
        for index in range(masters):
            node_dir = directory / f"node{index}"
            nodes.append(
                start_server(
                    node_dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    # Explicit: the default (port + 10000) may be taken, or above 65535.
                    "--cluster-port",
                    str(free_port()),
                )
            )
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            check=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not all(_cluster_ok(node) for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return RedisClusterServers(nodes)


def _cluster_ok(node: RedisServer) -> bool:
    info = node.admin().execute_command("CLUSTER", "INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


# --- sentinel ---------------------------------------------------------------------------


def start_sentinel(directory: Path, master: RedisServer, name: str) -> RedisServer:
    """One sentinel monitoring `master` under `name` (quorum 1); sentinel rewrites its config
    file, so it gets its own."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = directory / "sentinel.conf"
    conf.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f'dir "{directory}"\n'
        f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {name} 5000\n"
    )
    sentinel = RedisServer(directory, port, [str(conf)], sentinel=True)
    sentinel.start()
    return sentinel


# --- the conformance suite's case -------------------------------------------------------


def _conformance_prefix(directory: Path) -> str:
    return "sgtest:conformance:" + hashlib.sha256(str(directory).encode()).hexdigest()[:16]


async def open_shared_backend(directory: Path) -> RedisBackend:
    """A RedisBackend on the shared Redis for the TurnBackend conformance suite.

    The prefix is derived from the test's directory, so opening again reaches the same data
    (the suite's reopen tests) while tests stay apart; `delete_shared_keys` removes them, and
    they expire after ten minutes should a run be killed first. Skips only when the server
    cannot be reached at all (refused, timed out); a wrong password fails the test.
    """
    backend = RedisBackend.from_url(SHARED_URL, prefix=_conformance_prefix(directory), ttl_s=600)
    try:
        await backend.client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError):
        await backend.close()
        raise
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        await backend.close()
        pytest.skip(
            f"shared Redis at {SHARED_URL} unreachable ({exc}); set SESSIONGATE_TEST_REDIS_URL"
        )
    return backend


async def delete_shared_keys(directory: Path) -> None:
    """The conformance case's cleanup: every key under the directory's prefix."""
    client = aioredis.Redis.from_url(SHARED_URL, socket_timeout=5, protocol=2)
    try:
        keys = [key async for key in client.scan_iter(match=f"{_conformance_prefix(directory)}:*")]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        pass  # unreachable: the test skipped, nothing was created
    finally:
        await client.aclose()
