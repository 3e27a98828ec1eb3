"""Two `sessiongate serve` replicas behind one Envoy, sharing Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
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
from extproc.envoy_config import EXT_PROC_CLUSTER, bootstrap
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


def _without_affinity(config: dict[str, Any], lb_policy: str) -> None:
    """No session affinity over the ext_proc replicas: a reply's capture stream may reach
    another replica than its request's rewrite stream (what affinity normally prevents)."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == EXT_PROC_CLUSTER:
            cluster["lb_policy"] = lb_policy
            for options in cluster["typed_extension_protocol_options"].values():
                options.pop("hash_policy", None)


@contextlib.contextmanager
def _run_cluster(mock: Mock, tmp_path: Path, *, lb_policy: str | None = None) -> Iterator[Cluster]:
    """Two replicas behind one Envoy: with session affinity (the generated config), or with
    the ext_proc cluster balanced by `lb_policy` instead."""
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
        if lb_policy is not None:
            _without_affinity(config, lb_policy)
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


@pytest.fixture
def cluster(mock: Mock, tmp_path: Path) -> Iterator[Cluster]:
    with _run_cluster(mock, tmp_path) as found:
        yield found


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


@pytest.mark.parametrize("lb_policy", ["ROUND_ROBIN", "RANDOM"])
def test_without_affinity_every_turn_is_recorded_whichever_replica_captures_it(
    mock: Mock, tmp_path: Path, lb_policy: str
) -> None:
    """No ext_proc affinity: rewrite and capture of one request often run on different
    replicas (round robin over the two streams of each request: always). The capturing
    replica takes the pending turn from Redis: no turn is lost, the history stays in order,
    and no request waits out pending_wait_ms for a capture that went elsewhere."""
    with _run_cluster(mock, tmp_path, lb_policy=lb_policy) as cluster:
        _converse_and_check(cluster, mock, round_robin=lb_policy == "ROUND_ROBIN")


def _converse_and_check(cluster: Cluster, mock: Mock, *, round_robin: bool) -> None:
    session = "rr-" + uuid.uuid4().hex[:8]
    client = cluster.client(session)
    sent: list[str] = []
    for n in range(13):  # the 13th request checks that the 12th turn was stored too
        text = marker()
        stream = n % 2 == 1  # streamed (SSE) and plain JSON replies alike
        if stream:
            chunks = client.chat.completions.create(model="m", messages=[user(text)], stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            reply = client.chat.completions.create(model="m", messages=[user(text)])
            assert reply.choices[0].message.content
        # The provider saw the whole history so far, in order: every earlier turn was stored.
        messages = mock.request_with(text)["body"]["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == [*sent, text]
        sent.append(text)
    counters = [r.counters() for r in cluster.replicas]
    names = {name for c in counters for name in c}
    total = {name: sum(c.get(name, 0) for c in counters) for name in names}
    assert total["rewrite.injected"] == total["capture.completed"] == 13
    assert total.get("capture.unknown_turn", 0) == 0
    assert total["store.remote_adopted"] == total["store.remote_completed"]
    if round_robin:  # deterministic: the two streams of a request alternate replicas
        assert total["store.remote_completed"] > 0, total
    assert total.get("rewrite.pending_wait_timeout", 0) == 0
    assert total["store.wait_timeouts"] == total["store.shared_wait_timeouts"] == 0
    assert total["store.dropped"] == 0
