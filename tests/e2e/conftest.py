"""One mock provider and one `sessiongate up` (real Envoy, TLS) per test session."""

from __future__ import annotations

import json
import ssl
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.procs import Proc, start

MAX_BODY = 256 * 1024


@dataclass
class Mock:
    proc: Proc
    url: str  # http://127.0.0.1:PORT

    def requests(self) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/_mock/requests", timeout=5)
        reply.raise_for_status()
        data: list[dict[str, Any]] = reply.json()
        return data

    def request_with(self, marker: str) -> dict[str, Any]:
        """The last chat request whose newest message contains `marker`."""
        for request in reversed(self.requests()):
            body = request.get("body")
            if isinstance(body, dict) and marker in json.dumps(body.get("messages", [])[-1:]):
                return request
        raise AssertionError(f"the provider never received {marker!r}")


@dataclass
class Gateway:
    proc: Proc
    base_url: str
    state_dir: Path

    @property
    def ca(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    @property
    def admin(self) -> str:
        return "http://" + (self.state_dir / "envoy-admin-address").read_text().strip()

    def counters(self) -> dict[str, int]:
        """sessiongate's own counters (`--metrics-listen`), 0 for those never bumped."""
        log = (self.state_dir / "gateway.log").read_text()
        url = log.split("counters at ", 1)[1].split()[0].replace("/metrics", "/stats")
        data: dict[str, int] = httpx.get(url, timeout=5).json()
        return defaultdict(int, data)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def stats(self, prefix: str = "http.llm.ext_proc") -> dict[str, int]:
        text = httpx.get(f"{self.admin}/stats", params={"filter": prefix}, timeout=5).text
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def _client_options(self, session: str | None, api_key: str) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "api_key": api_key,
            "max_retries": 0,
            "timeout": 20,
            "default_headers": {"x-session-id": session} if session else {},
        }

    def client(
        self, session: str | None = None, api_key: str = "sk-test-1", **kw: Any
    ) -> openai.OpenAI:
        http = openai.DefaultHttpxClient(verify=self.ssl_context())
        return openai.OpenAI(**self._client_options(session, api_key), http_client=http, **kw)

    def async_client(
        self, session: str | None = None, api_key: str = "sk-test-1"
    ) -> openai.AsyncOpenAI:
        http = openai.DefaultAsyncHttpxClient(verify=self.ssl_context())
        return openai.AsyncOpenAI(**self._client_options(session, api_key), http_client=http)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, verify=self.ssl_context(), timeout=20)


def start_mock(directory: Path, *extra: str) -> Mock:
    directory.mkdir(parents=True, exist_ok=True)
    proc = start(["mock-llm", "--port", "0", *extra], directory / "mock.log")
    return Mock(proc, proc.ready.split()[-1])


def start_gateway(directory: Path, upstream: str, *extra: str) -> Gateway:
    directory.mkdir(parents=True, exist_ok=True)
    proc = start(
        [
            "up",
            "--upstream",
            upstream,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(directory),
            "--max-body-bytes",
            str(MAX_BODY),
            "--metrics-listen",
            "127.0.0.1:0",
            *extra,
        ],
        directory / "gateway.log",
    )
    return Gateway(proc, proc.ready.split()[1], directory)


def configured_gateway(directory: Path, upstream: str, config: str) -> Iterator[Gateway]:
    """For module fixtures (`yield from`): `up` with `config` as its TOML file (`version = 1`
    is prepended), stopped after the module, which must exit cleanly."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sessiongate.toml"
    path.write_text("version = 1\n" + config)
    gateway = start_gateway(directory, upstream, "--config", str(path))
    yield gateway
    assert gateway.proc.stop() == 0, gateway.proc.log()


@pytest.fixture(scope="session")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    m = start_mock(tmp_path_factory.mktemp("mock"))
    yield m
    m.proc.stop()


@pytest.fixture(scope="session")
def gateway(mock: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("gateway"), mock.url)
    yield g
    assert g.proc.stop() == 0, g.proc.log()


@pytest.fixture
def session_id() -> str:
    return "s-" + uuid.uuid4().hex[:12]


def marker() -> str:
    return "m" + uuid.uuid4().hex[:10]
