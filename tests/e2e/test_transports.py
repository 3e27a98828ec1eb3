"""Both gRPC transports carry the same conversation: the built-in HTTP/2 one (the default) and
grpcio's asyncio server (`--grpc-server grpcio`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
