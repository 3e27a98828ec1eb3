"""Both gRPC transports carry the same conversation: the built-in HTTP/2 one (the default) and
grpcio's asyncio server (`--grpc-server grpcio`)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.conftest import Gateway, Mock, marker, start_gateway


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _conversation(gateway: Gateway, mock: Mock, session: str) -> None:
    client = gateway.client(session)
    first, second = marker(), marker()
    reply = client.chat.completions.create(model="m", messages=[user(first)])
    with client.chat.completions.stream(model="m", messages=[user(second)]) as stream:
        streamed = stream.get_final_completion()
    third = marker()
    client.chat.completions.create(model="m", messages=[user(third)])
    messages = mock.request_with(third)["body"]["messages"]
    assert messages == [
        user(first),
        {"role": "assistant", "content": reply.choices[0].message.content},
        user(second),
        {"role": "assistant", "content": streamed.choices[0].message.content},
        user(third),
    ]


def test_grpcio_transport_serves_the_same_conversation(mock: Mock, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "grpcio", mock.url, "--grpc-server", "grpcio")
    try:
        _conversation(gateway, mock, "s-grpcio")
        counters = gateway.counters()
        assert counters["capture.completed"] == 3 and counters["rewrite.injected"] == 3
        assert counters["server.capture.handler"] == 3  # grpcio has no observer hook
    finally:
        assert gateway.proc.stop() == 0, gateway.proc.log()


def test_builtin_transport_serves_the_conversation(
    gateway: Gateway, mock: Mock, session_id: str
) -> None:
    before = gateway.counters()
    _conversation(gateway, mock, session_id)
    after = gateway.counters()
    assert after["capture.completed"] - before.get("capture.completed", 0) == 3

    def grew(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    # Every capture of a turn this process rewrote was consumed synchronously by the transport.
    assert grew("server.capture.observer") == 3
    assert grew("server.capture.handler") == 0


def test_an_unknown_transport_is_a_config_error() -> None:
    import pytest

    from extproc.config import ConfigError, Settings, validate

    with pytest.raises(ConfigError, match="grpc_server"):
        validate(Settings(grpc_server="grpc-go"))


def _ext_proc_addresses(gateway: Gateway) -> list[dict[str, Any]]:
    config = yaml.safe_load((gateway.state_dir / "envoy.yaml").read_text())
    (cluster,) = (
        c for c in config["static_resources"]["clusters"] if c["name"] == "sessiongate_ext_proc"
    )
    return [
        endpoint["endpoint"]["address"]
        for group in cluster["load_assignment"]["endpoints"]
        for endpoint in group["lb_endpoints"]
    ]


def test_up_reaches_its_ext_proc_server_over_a_private_unix_socket(gateway: Gateway) -> None:
    (address,) = _ext_proc_addresses(gateway)
    path = Path(address["pipe"]["path"])
    assert path == gateway.state_dir.resolve() / "run" / "extproc-0.sock"
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # only sessiongate's user connects
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_loopback_tcp_when_unix_sockets_are_off(mock: Mock, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "tcp", mock.url, "--ext-proc-unix-socket", "false")
    try:
        (address,) = _ext_proc_addresses(gateway)
        assert address["socket_address"]["address"] == "127.0.0.1"
        assert address["socket_address"]["port_value"] > 0
        assert not (gateway.state_dir / "run").exists()
        _conversation(gateway, mock, "s-tcp")
    finally:
        assert gateway.proc.stop() == 0, gateway.proc.log()
