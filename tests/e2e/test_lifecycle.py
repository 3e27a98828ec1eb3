"""`sessiongate up` and `serve` as processes: readiness, signals, Envoy's death, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest
import yaml

from extproc.config import Settings
from extproc.envoy_config import bootstrap
from extproc.supervisor import envoy_binary
from tests.e2e.conftest import Mock, marker, start_gateway
from tests.procs import start


def envoy_pids_for(state_dir: Path) -> list[int]:
    """Envoys running with this state directory's config."""
    needle = str(state_dir / "envoy.yaml")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [
            p
            for p in pids
            if Path(f"/proc/{p}").exists()
            and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
        ]
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_stops_both_and_exits_zero(mock: Mock, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "s", mock.url)
    assert gateway.proc.ready.startswith("ready https://127.0.0.1:")
    envoys = envoy_pids_for(gateway.state_dir)
    assert len(envoys) == 1
    assert gateway.proc.stop(signal.SIGTERM) == 0
    assert wait_gone(envoys)
    # The state directory holds everything `up` promised.
    names = {p.name for p in gateway.state_dir.iterdir()}
    assert {"sessions.db", "hmac.key", "envoy.yaml", "tls"} <= names
    assert (gateway.state_dir / "hmac.key").stat().st_mode & 0o777 == 0o600


def test_ctrl_c_stops_both(mock: Mock, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "s", mock.url)
    envoys = envoy_pids_for(gateway.state_dir)
    assert gateway.proc.stop(signal.SIGINT) == 0
    assert wait_gone(envoys)


def test_envoy_dying_stops_sessiongate_with_an_error(mock: Mock, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "s", mock.url)
    (envoy,) = envoy_pids_for(gateway.state_dir)
    os.kill(envoy, signal.SIGKILL)
    assert gateway.proc.popen.wait(15) != 0
    assert "envoy exited" in gateway.proc.log()


def test_kill_9_leaves_no_orphan_envoy(mock: Mock, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "s", mock.url)
    envoys = envoy_pids_for(gateway.state_dir)
    gateway.proc.popen.send_signal(signal.SIGKILL)
    gateway.proc.popen.wait(5)
    assert wait_gone(envoys), "Envoy outlived a kill -9 of sessiongate"


def test_listen_port_in_use_fails_clearly(mock: Mock, tmp_path: Path) -> None:
    first = start_gateway(tmp_path / "a", mock.url)
    try:
        port = first.base_url.rsplit(":", 1)[1].split("/")[0]
        with pytest.raises(RuntimeError, match="exited"):
            start(
                [
                    "up",
                    "--upstream",
                    mock.url,
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--state-dir",
                    str(tmp_path / "b"),
                ],
                tmp_path / "b.log",
                timeout=30,
            )
    finally:
        assert first.proc.stop() == 0


def test_config_check_reports_bad_settings(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\nsession_header = "Bad Header"\n')
    result = subprocess.run(
        ["sessiongate", "config", "check", "--config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "session_header" in result.stderr
    good = tmp_path / "good.toml"
    good.write_text('version = 1\nupstream = "http://127.0.0.1:1"\nfail_open = false\n')
    env = {**os.environ, "SESSIONGATE_SESSION_HEADER": "x-conversation"}
    result = subprocess.run(
        ["sessiongate", "config", "check", "--config", str(good), "--fail-open"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)  # JSON is YAML
    # The flag beats the file; the variable beats the default.
    assert shown["fail_open"] is True and shown["session_header"] == "x-conversation"


def test_serve_requires_its_hmac_key(tmp_path: Path) -> None:
    result = subprocess.run(
        ["sessiongate", "serve", "--state-dir", str(tmp_path), "--grpc-listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "hmac" in result.stderr.lower()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_serve_behind_a_plain_envoy(mock: Mock, tmp_path: Path, transport: str) -> None:
    """The mesh deployment: `sessiongate serve` + an Envoy started with plain `envoy -c`, over
    loopback TCP or a Unix socket."""
    listen = "127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/extproc.sock"
    key = tmp_path / "hmac.key"
    key.write_text("k" * 64)
    key.chmod(0o600)
    serve = start(
        [
            "serve",
            "--state-dir",
            str(tmp_path),
            "--grpc-listen",
            listen,
            "--hmac-key-file",
            str(key),
        ],
        tmp_path / "serve.log",
    )
    if transport == "tcp":
        endpoint = ("127.0.0.1", int(serve.ready.rsplit(":", 1)[1]))
    else:
        assert serve.ready == f"ready {listen}"
        endpoint = (listen, 0)
    settings = Settings(upstream=mock.url, listen="127.0.0.1:0", tls=False)
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(bootstrap(settings, [endpoint], None)))
    admin_file = tmp_path / "admin"
    envoy = subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            str(config_path),
            "--admin-address-path",
            str(admin_file),
            "--disable-hot-restart",
            "--log-level",
            "error",
        ]
    )
    try:
        from tests.e2e.test_edges import _wait_envoy

        base_url = _wait_envoy(admin_file)
        client = openai.OpenAI(
            base_url=base_url,
            api_key="k",
            max_retries=0,
            timeout=10,
            default_headers={"x-session-id": "mesh-1"},
        )
        first, second = marker(), marker()
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": first}])
        answer = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": second}]
        )
        assert answer.choices[0].message.content == f"echo: {second} [n=3]"
    finally:
        envoy.terminate()
        envoy.wait(10)
        assert serve.stop() == 0
