"""Two `sessiongate serve` replicas behind one Envoy, sharing Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import yaml

from extproc.config import Settings
from extproc.envoy_config import bootstrap
from extproc.supervisor import envoy_binary
from tests.e2e.conftest import Mock, marker
from tests.e2e.test_edges import _wait_envoy
from tests.procs import Proc, start
from tests.store.redis_servers import RedisServer, start_server

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass
class Replica:
    proc: Proc
    port: int
    metrics: str

    def counters(self) -> dict[str, int]:
        data: dict[str, int] = httpx.get(self.metrics, timeout=5).json()
        return data


@dataclass
class Cluster:
    replicas: list[Replica]
    base_url: str
    admin: Path

    def healthy_endpoints(self) -> int:
        """Ext_proc endpoints Envoy's health checks consider healthy."""
        address = self.admin.read_text().strip()
        text = httpx.get(f"http://{address}/clusters", timeout=5).text
        flags = [
            line
            for line in text.splitlines()
            if line.startswith("sessiongate_ext_proc::") and "::health_flags::" in line
        ]
        return sum(1 for line in flags if line.endswith("::healthy"))

    def client(self, session: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url,
            api_key="sk-replica",
            max_retries=0,
            timeout=20,
            default_headers={"x-session-id": session},
        )


def _start_replica(directory: Path, redis: RedisServer, schema: str, key: Path) -> Replica:
    directory.mkdir(parents=True, exist_ok=True)
    proc = start(
        [
            "serve",
            "--state-dir",
            str(directory),
            "--grpc-listen",
            "127.0.0.1:0",
            "--hmac-key-file",
            str(key),
            "--redis-url",
            redis.url,
            "--postgres-dsn",
            PG_DSN,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        directory / "serve.log",
        env={"SESSIONGATE_POSTGRES_SCHEMA": schema},
    )
    try:
        port = int(proc.ready.rsplit(":", 1)[1])
        log = (directory / "serve.log").read_text()
        metrics = log.split("counters at ", 1)[1].split()[0].replace("/metrics", "/stats")
    except (IndexError, ValueError):
        proc.stop()
        raise
    return Replica(proc, port, metrics)


@pytest.fixture
def cluster(mock: Mock, tmp_path: Path) -> Iterator[Cluster]:
    redis = start_server(tmp_path / "redis")
    schema = "e2e_" + uuid.uuid4().hex[:10]
    key = tmp_path / "hmac.key"
    key.write_text("r" * 64)
    key.chmod(0o600)
    replicas: list[Replica] = []
    envoy: subprocess.Popen[bytes] | None = None
    try:
        for i in range(2):
            replicas.append(_start_replica(tmp_path / f"r{i}", redis, schema, key))
        settings = Settings(upstream=mock.url, listen="127.0.0.1:0", tls=False)
        config = bootstrap(settings, [("127.0.0.1", r.port) for r in replicas], None)
        (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(config))
        admin = tmp_path / "admin"
        with open(tmp_path / "envoy.log", "w") as envoy_log:
            envoy = subprocess.Popen(
                [
                    envoy_binary(),
                    "-c",
                    str(tmp_path / "envoy.yaml"),
                    "--admin-address-path",
                    str(admin),
                    "--disable-hot-restart",
                    "--log-level",
                    "error",
                ],
                stderr=envoy_log,
            )
        base_url = _wait_envoy(admin)
        found = Cluster(replicas, base_url, admin)
        deadline = time.monotonic() + 10
        while found.healthy_endpoints() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield found
    finally:
        if envoy is not None:
            envoy.terminate()
            envoy.wait(10)
        for replica in replicas:
            replica.proc.stop()
        redis.kill()
        asyncio.run(_drop_schema(schema))


async def _drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def test_sessions_stick_to_one_replica_and_spread_over_both(cluster: Cluster) -> None:
    sessions = [f"rs-{i}" for i in range(12)]
    for _ in range(3):
        for session in sessions:
            reply = cluster.client(session).chat.completions.create(
                model="m", messages=[user(marker())]
            )
            assert reply.choices[0].message.content
    counters = [r.counters() for r in cluster.replicas]
    injected = [c.get("rewrite.injected", 0) for c in counters]
    completed = [c.get("capture.completed", 0) for c in counters]
    assert sum(injected) == 36 and all(n > 0 for n in injected), injected
    # Affinity: each replica captured exactly the turns it rewrote (both streams of a
    # request reached the same replica), and no capture met an unknown turn.
    assert completed == injected
    assert all(c.get("capture.unknown_turn", 0) == 0 for c in counters)


def test_a_session_moving_to_the_other_replica_sees_its_whole_history(
    cluster: Cluster, mock: Mock
) -> None:
    session = "move-" + uuid.uuid4().hex[:8]
    first, second = marker(), marker()
    cluster.client(session).chat.completions.create(model="m", messages=[user(first)])
    cluster.client(session).chat.completions.create(model="m", messages=[user(second)])
    owner = max(cluster.replicas, key=lambda r: r.counters().get("rewrite.injected", 0))
    owner.proc.stop()  # drains: health NOT_SERVING, then gone
    deadline = time.monotonic() + 10
    while cluster.healthy_endpoints() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.healthy_endpoints() == 1, httpx.get(
        "http://" + cluster.admin.read_text().strip() + "/clusters"
    ).text[-3000:]
    # Envoy's ring hash now sends the session to the survivor, which reads it from Redis.
    third = marker()
    cluster.client(session).chat.completions.create(model="m", messages=[user(third)])
    messages = mock.request_with(third)["body"]["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [first, second, third]
