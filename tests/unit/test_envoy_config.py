"""The generated Envoy configs are valid for the real Envoy, and the shipped ones are current."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.cli import main
from extproc.config import Settings
from extproc.envoy_config import CAPTURE_FILTER, REWRITE_FILTER, Upstream, bootstrap
from extproc.supervisor import envoy_binary

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
    chat, other = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert "typed_per_filter_config" not in chat
    assert chat["match"]["headers"] == [{"name": "x-session-id", "present_match": True}]
    assert chat["route"]["timeout"] == "0s"
    disabled = other["typed_per_filter_config"]
    assert disabled[REWRITE_FILTER]["disabled"] and disabled[CAPTURE_FILTER]["disabled"]
    names = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    assert names == [REWRITE_FILTER, CAPTURE_FILTER, "envoy.filters.http.router"]
    capture = hcm["typed_config"]["http_filters"][1]["typed_config"]
    assert capture["observability_mode"] and capture["failure_mode_allow"]
