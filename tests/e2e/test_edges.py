"""Bad input, limits, pass-through cost and failure modes, through the real Envoy."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from extproc.config import Settings
from extproc.envoy_config import bootstrap
from extproc.supervisor import envoy_binary
from tests.e2e.conftest import MAX_BODY, Gateway, Mock, marker


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def chat_body(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [user(text)]}


@pytest.mark.parametrize(
    "bad_id",
    ["", "has space", "x" * 129, "semi;colon", "ünï".encode(), "a/b", "%2e%2e"],
)
def test_invalid_session_id_gets_400_in_openai_shape(gateway: Gateway, bad_id: str | bytes) -> None:
    reply = gateway.http().post(
        "/chat/completions",
        json=chat_body("hi"),
        headers={"authorization": "Bearer sk-test-1", "x-session-id": bad_id},
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_session_id"
    assert "x-session-id" in error["message"]


def test_invalid_session_id_is_a_typed_sdk_error(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        gateway.client("not valid!").chat.completions.create(model="m", messages=[user("hi")])
    assert err.value.code == "invalid_session_id"
    assert "x-session-id" in err.value.message


def test_body_just_under_the_limit_passes_and_just_over_gets_413(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    http = gateway.http()
    headers = {
        "authorization": "Bearer sk-test-1",
        "x-session-id": session_id,
        "content-type": "application/json",
    }
    envelope = len(httpx.Request("POST", "/", json=chat_body("")).content)
    mark = marker()
    under = chat_body(mark + "a" * (MAX_BODY - envelope - len(mark)))
    raw = httpx.Request("POST", "/", json=under).content
    assert len(raw) == MAX_BODY
    ok = http.post("/chat/completions", content=raw, headers=headers)
    assert ok.status_code == 200, ok.text
    over = http.post("/chat/completions", content=raw + b" ", headers=headers)
    assert over.status_code == 413
    error = over.json()["error"]
    assert "max_body_bytes" in error["message"] and error["type"] == "invalid_request_error"
    # The SDK turns it into a typed error too.
    with pytest.raises(openai.APIStatusError) as err:
        gateway.client(session_id).chat.completions.create(
            model="m", messages=[user("b" * MAX_BODY)]
        )
    assert err.value.status_code == 413


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"model": "m", "messages": [', "application/json"),
        (b"", "application/json"),
        (b"hello", "text/plain"),
        (b'{"model": "m"}', "application/json"),
        (b"[1, 2]", "application/json"),
    ],
)
def test_unparseable_requests_pass_through_to_the_provider(
    gateway: Gateway, mock: Mock, session_id: str, content: bytes, content_type: str
) -> None:
    http = gateway.http()
    headers = {
        "authorization": "Bearer sk-test-1",
        "x-session-id": session_id,
        "content-type": content_type,
    }
    reply = http.post("/chat/completions", content=content, headers=headers)
    # The provider's own answer reaches the client: the mock rejects these with a 400.
    assert reply.status_code == 400
    assert "error" in reply.json()
    # ...and the gateway keeps serving the same session.
    mark = marker()
    answer = gateway.client(session_id).chat.completions.create(model="m", messages=[user(mark)])
    assert answer.choices[0].message.content == f"echo: {mark} [n=1]"


def _ext_proc_stats(gateway: Gateway) -> dict[str, int]:
    return gateway.stats("http.llm.ext_proc")


def test_requests_without_session_or_identity_cost_nothing(gateway: Gateway, mock: Mock) -> None:
    before = _ext_proc_stats(gateway)
    for _ in range(5):
        gateway.client().chat.completions.create(model="m", messages=[user(marker())])
        gateway.http().get("/models")
    after = _ext_proc_stats(gateway)
    # No session header: the route disables both filters, Envoy opens no ext_proc stream.
    assert after.get("http.llm.ext_proc.rewrite.streams_started") == before.get(
        "http.llm.ext_proc.rewrite.streams_started"
    )
    assert after.get("http.llm.ext_proc.capture.streams_started") == before.get(
        "http.llm.ext_proc.capture.streams_started"
    )
    # A session but no credential: one headers message, then the body is skipped.
    http = gateway.http()
    sent_before = after["http.llm.ext_proc.rewrite.stream_msgs_sent"]
    reply = http.post(
        "/chat/completions", json=chat_body(marker()), headers={"x-session-id": "anon-1"}
    )
    assert reply.status_code == 200
    final = _ext_proc_stats(gateway)
    assert final["http.llm.ext_proc.rewrite.stream_msgs_sent"] - sent_before == 1


def test_session_header_is_removed_before_the_provider(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    mark = marker()
    gateway.client(session_id).chat.completions.create(model="m", messages=[user(mark)])
    headers = mock.request_with(mark)["headers"]
    assert "x-session-id" not in headers
    assert headers["authorization"] == "Bearer sk-test-1"


def test_slow_capture_is_still_read_before_the_next_turn(mock: Mock, tmp_path: Path) -> None:
    """Capture held back 300 ms on purpose: the next request waits for the pending turn."""
    from tests.e2e.conftest import start_gateway

    slow = start_gateway(tmp_path / "slow", mock.url, "--config", str(_config(tmp_path)))
    try:
        client = slow.client("slow-1")
        for i in range(5):
            answer = client.chat.completions.create(model="m", messages=[user(marker())])
            assert (answer.choices[0].message.content or "").endswith(f"[n={2 * i + 1}]")
        assert slow.counters()["rewrite.pending_wait_timeout"] == 0
        # The last turn lands 300 ms after its reply, like the others did.
        deadline = time.monotonic() + 5
        while slow.counters()["store.completed"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow.counters()["store.completed"] == 5
    finally:
        assert slow.proc.stop() == 0


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "slow.toml"
    path.write_text("version = 1\ndebug_capture_delay_ms = 300\n")
    return path


def test_restart_and_continue(mock: Mock, tmp_path: Path) -> None:
    from tests.e2e.conftest import start_gateway

    state = tmp_path / "state"
    first = start_gateway(state, mock.url)
    texts = [marker(), marker()]
    try:
        first.client("restart-1").chat.completions.create(model="m", messages=[user(texts[0])])
    finally:
        assert first.proc.stop() == 0
    second = start_gateway(state, mock.url)
    try:
        answer = second.client("restart-1").chat.completions.create(
            model="m", messages=[user(texts[1])]
        )
    finally:
        assert second.proc.stop() == 0
    assert answer.choices[0].message.content == f"echo: {texts[1]} [n=3]"


# --- a dead ext_proc server: plain Envoy with the generated config, pointing at nothing ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_envoy(admin_file: Path) -> str:
    """Wait for /ready LIVE; return the base URL of the `llm` listener."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        address = admin_file.read_text().strip() if admin_file.exists() else ""
        if address:
            try:
                if httpx.get(f"http://{address}/ready").text.strip() == "LIVE":
                    listeners = httpx.get(f"http://{address}/listeners?format=json").json()
                    socket_address = listeners["listener_statuses"][0]["local_address"]
                    return f"http://127.0.0.1:{socket_address['socket_address']['port_value']}/v1"
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    raise AssertionError("envoy did not become ready")


def _run_envoy(config: dict[str, Any], directory: Path) -> Iterator[str]:
    directory.mkdir(parents=True, exist_ok=True)
    path, admin_file = directory / "envoy.yaml", directory / "admin"
    path.write_text(yaml.safe_dump(config))
    with open(directory / "envoy.log", "w") as log:
        proc = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(path),
                "--admin-address-path",
                str(admin_file),
                "--disable-hot-restart",
                "--log-level",
                "error",
            ],
            stderr=log,
        )
    try:
        yield _wait_envoy(admin_file)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("fail_open", [True, False])
def test_dead_ext_proc_server(mock: Mock, tmp_path: Path, fail_open: bool) -> None:
    settings = Settings(
        upstream=mock.url,
        listen="127.0.0.1:0",
        fail_open=fail_open,
        message_timeout_ms=500,
        pending_wait_ms=100,
    )
    config = bootstrap(settings, [("127.0.0.1", _free_port())], None)
    for base_url in _run_envoy(config, tmp_path):
        client = openai.OpenAI(
            base_url=base_url,
            api_key="k",
            max_retries=0,
            timeout=10,
            default_headers={"x-session-id": "dead-1"},
        )
        mark = marker()
        if fail_open:
            answer = client.chat.completions.create(model="m", messages=[user(mark)])
            assert answer.choices[0].message.content == f"echo: {mark} [n=1]"
        else:
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model="m", messages=[user(mark)])
            assert err.value.status_code == 503
            assert isinstance(err.value.body, dict) and err.value.body["type"] == "server_error"
        # Without a session header the filters are off: the provider is reached either way.
        plain = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=10)
        assert plain.chat.completions.create(model="m", messages=[user("x")]).choices
