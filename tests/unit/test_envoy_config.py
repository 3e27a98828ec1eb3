"""The generated Envoy configs are valid for the real Envoy, and the shipped ones are current."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli import main
from extproc.config import ConfigError, Settings, split_host_port
from extproc.envoy_config import (
    CAPTURE_FILTER,
    JWT_FILTER,
    JWT_PAYLOAD_KEY,
    JWT_PROVIDER,
    REWRITE_FILTER,
    Upstream,
    bootstrap,
    check_jwks_file,
    jwt_authn_filter,
)
from extproc.supervisor import envoy_binary, ext_proc_listens
from tests.e2e.jwt_helpers import Issuer

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"sidecar.yaml": "127.0.0.1:10000", "compose.yaml": "0.0.0.0:10000"}


def generator_command(listen: str) -> list[str]:
    return [
        *("envoy-config", "--no-tls", "--listen", listen, "--grpc-listen", "127.0.0.1:50051"),
        *("--upstream", "https://api.openai.com"),
        *("--upstream-ca-file", "/etc/ssl/certs/ca-certificates.crt"),
    ]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            envoy_binary(),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--disable-hot-restart",
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(("name", "listen"), SHIPPED.items())
def test_shipped_configs_are_what_the_generator_prints(
    capsys: pytest.CaptureFixture[str], name: str, listen: str
) -> None:
    assert main(generator_command(listen)) == 0
    generated = capsys.readouterr().out
    shipped = (ROOT / "envoy" / name).read_text()
    assert yaml.safe_load(shipped) == yaml.safe_load(generated)


@pytest.mark.parametrize("path", sorted((ROOT / "envoy").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    if not Path("/etc/ssl/certs/ca-certificates.crt").exists():
        pytest.skip("the shipped config names the Debian CA bundle")
    result = validate(path)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize(
    "upstream",
    ["https://api.openai.com", "http://127.0.0.1:9000/openai/v1", "https://[::1]:8443/x"],
)
def test_generated_config_validates(tmp_path: Path, upstream: str) -> None:
    from extproc.tls import ensure_local_tls

    tls = ensure_local_tls(tmp_path / "tls")
    config = bootstrap(Settings(upstream=upstream), [("127.0.0.1", 50051)], (tls.cert, tls.key))
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = validate(path)
    assert result.returncode == 0, result.stderr + result.stdout


def test_upstream_prefix_and_sdk_style_v1() -> None:
    assert Upstream.parse("https://api.openai.com").path_prefix == ""
    assert Upstream.parse("https://api.openai.com/v1").path_prefix == ""
    assert Upstream.parse("https://gw.example/openai/v1/").path_prefix == "/openai"
    up = Upstream.parse("http://127.0.0.1:9000/p")
    assert (up.is_ip, up.authority, up.path_prefix) == (True, "127.0.0.1:9000", "/p")


def test_only_the_chat_route_runs_the_filters() -> None:
    config = bootstrap(Settings(), [("127.0.0.1", 1)], None)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    chat, messages, api, other = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert "typed_per_filter_config" not in chat
    # Anthropic Messages: the same filters, the same session match, its own upstream path.
    assert "typed_per_filter_config" not in messages
    assert messages["match"]["path"] == "/v1/messages"
    assert messages["route"]["prefix_rewrite"] == "/v1/messages"
    assert messages["match"]["headers"] == chat["match"]["headers"]
    # sessiongate's own API: rewrite answers it; without rewrite, a 503, never the provider.
    assert api["match"] == {"prefix": "/sessiongate/"} and "route" not in api
    assert list(api["typed_per_filter_config"]) == [CAPTURE_FILTER]
    assert chat["match"]["headers"] == [{"name": "x-session-id", "present_match": True}]
    assert chat["route"]["timeout"] == "0s"
    disabled = other["typed_per_filter_config"]
    assert disabled[REWRITE_FILTER]["disabled"] and disabled[CAPTURE_FILTER]["disabled"]
    names = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    assert names == [REWRITE_FILTER, CAPTURE_FILTER, "envoy.filters.http.router"]
    capture = hcm["typed_config"]["http_filters"][1]["typed_config"]
    assert capture["observability_mode"] and capture["failure_mode_allow"]


# --- JWT authentication ----------------------------------------------------------------------


def jwt_settings(tmp_path: Path, **overrides: Any) -> Settings:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(Issuer("https://idp.test", "aud").jwks()))
    options: dict[str, Any] = {"jwt_jwks_file": jwks, "jwt_issuer": "https://idp.test"}
    return Settings(**{**options, **overrides})


def http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters: list[dict[str, Any]] = hcm["typed_config"]["http_filters"]
    return filters


def test_no_jwt_filter_without_a_jwks_file() -> None:
    assert jwt_authn_filter(Settings()) is None
    names = [f["name"] for f in http_filters(bootstrap(Settings(), [("127.0.0.1", 1)], None))]
    assert JWT_FILTER not in names


def test_the_jwt_filter_feeds_what_identity_reads(tmp_path: Path) -> None:
    settings = jwt_settings(tmp_path, jwt_audiences=("a", "b"))
    filters = http_filters(bootstrap(settings, [("127.0.0.1", 1)], None))
    assert [f["name"] for f in filters][:2] == [JWT_FILTER, REWRITE_FILTER]
    config = filters[0]["typed_config"]
    provider = config["providers"][JWT_PROVIDER]
    assert provider["issuer"] == "https://idp.test"
    assert provider["audiences"] == ["a", "b"]
    assert provider["local_jwks"] == {"filename": str(settings.jwt_jwks_file)}
    assert provider["forward"] is False  # the provider never sees the caller's token
    assert provider["payload_in_metadata"] == JWT_PAYLOAD_KEY
    # The namespace jwt_authn writes is the one rewrite forwards to sessiongate.
    rewrite = filters[1]["typed_config"]["metadata_options"]["forwarding_namespaces"]
    assert settings.jwt_metadata_namespace == JWT_FILTER
    assert JWT_FILTER in rewrite["untyped"]
    assert config["rules"] == [
        {"match": {"prefix": "/"}, "requires": {"allow_missing_or_failed": {}}}
    ]


@pytest.mark.parametrize(
    ("required", "header", "requirement"),
    [
        (True, "authorization", {"provider_name": JWT_PROVIDER}),
        (True, "x-caller-jwt", {"provider_name": JWT_PROVIDER}),
        (False, "authorization", {"allow_missing_or_failed": {}}),
        (
            False,
            "x-caller-jwt",
            {
                "requires_any": {
                    "requirements": [{"provider_name": JWT_PROVIDER}, {"allow_missing": {}}]
                }
            },
        ),
    ],
)
def test_jwt_requirement_and_header_validate(
    tmp_path: Path, required: bool, header: str, requirement: dict[str, Any]
) -> None:
    settings = jwt_settings(tmp_path, jwt_required=required, jwt_header=header)
    config = bootstrap(settings, [("127.0.0.1", 50051)], None)
    jwt = http_filters(config)[0]["typed_config"]
    assert jwt["rules"][0]["requires"] == requirement
    expected = (
        {"name": "authorization", "value_prefix": "Bearer "}
        if header == "authorization"
        else {"name": header}
    )
    assert jwt["providers"][JWT_PROVIDER]["from_headers"] == [expected]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = validate(path)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("{not json", "is not JSON"),
        ('{"keys": []}', "is not a JWKS"),
        ("[1, 2]", "is not a JWKS"),
    ],
)
def test_a_bad_jwks_file_is_named(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=f"jwt_jwks_file: .*{expected}"):
        check_jwks_file(path)


def test_up_refuses_a_missing_jwks_file_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        *("up", "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0"),
        *("--jwt-jwks-file", str(tmp_path / "missing.json"), "--jwt-issuer", "https://idp"),
    ]
    assert main(argv) == 2
    assert "jwt_jwks_file: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


def test_envoy_config_lists_unix_socket_replicas_as_pipes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sockets = [f"unix:{tmp_path}/a.sock", f"unix:{tmp_path}/b.sock"]
    argv = ["envoy-config", "--no-tls", "--upstream", "https://api.openai.com"]
    assert main([*argv, "--ext-proc-endpoints", ",".join(sockets)]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    (cluster,) = (
        c for c in config["static_resources"]["clusters"] if c["name"] == "sessiongate_ext_proc"
    )
    addresses = [
        e["endpoint"]["address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert addresses == [{"pipe": {"path": s.removeprefix("unix:")}} for s in sockets]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = validate(path)
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("unix:/run/sessiongate/extproc.sock", True),
        ("unix:relative.sock", False),
        ("unix:/" + "x" * 120, False),
        ("127.0.0.1:50051", True),
    ],
)
def test_grpc_listen_takes_a_unix_socket_path(value: str, ok: bool) -> None:
    if ok:
        assert split_host_port(value, "grpc_listen", unix_ok=True)[0] in (value, "127.0.0.1")
    else:
        with pytest.raises(ConfigError, match="unix:/absolute/path"):
            split_host_port(value, "grpc_listen", unix_ok=True)
    with pytest.raises(ConfigError):  # where a TCP address is expected, never a socket
        split_host_port("unix:/run/x.sock", "listen")


def test_up_falls_back_to_loopback_tcp_when_the_state_path_is_too_long(tmp_path: Path) -> None:
    short = Settings(state_dir=tmp_path / "s", workers=2)
    short.state_dir.mkdir()
    assert ext_proc_listens(short) == [
        f"unix:{tmp_path.resolve()}/s/run/extproc-0.sock",
        f"unix:{tmp_path.resolve()}/s/run/extproc-1.sock",
    ]
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert ext_proc_listens(Settings(state_dir=deep)) == ["127.0.0.1:0"]
    off = Settings(state_dir=tmp_path / "s", ext_proc_unix_socket=False)
    assert ext_proc_listens(off) == ["127.0.0.1:0"]
