"""`extproc.bench.litellm_compare`: the pinned proxy's environment, config and command line
(installing it needs the package index and minutes: the full benchmark does that, not tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from extproc.bench import litellm_compare as ll


def test_venv_lives_in_the_cache_per_version_and_python(tmp_path: Path) -> None:
    venv = ll.venv_dir("1.2.3", tmp_path)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert venv == tmp_path / "bench" / f"litellm-1.2.3-py{python}"
    assert ll.venv_dir().name.startswith(f"litellm-{ll.LITELLM_VERSION}-")


async def test_an_installed_environment_is_reused(tmp_path: Path) -> None:
    venv = ll.venv_dir("9.9.9", tmp_path)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "litellm").write_text("#!/bin/sh\n")
    (venv / "sessiongate-installed").write_text("litellm[proxy]==9.9.9\n")
    assert await ll.ensure_litellm("9.9.9", tmp_path, announce=False) == venv / "bin" / "litellm"


def test_config_routes_the_model_to_the_provider() -> None:
    config = yaml.safe_load(ll.litellm_config("http://127.0.0.1:9999/v1", "gpt-4o-mini"))
    (entry,) = config["model_list"]
    assert entry["model_name"] == "gpt-4o-mini"
    assert entry["litellm_params"]["model"] == "openai/gpt-4o-mini"
    assert entry["litellm_params"]["api_base"] == "http://127.0.0.1:9999/v1"
    assert config["litellm_settings"]["num_retries"] == 0


def test_command_line_and_environment(tmp_path: Path) -> None:
    exe, config = tmp_path / "litellm", tmp_path / "c.yaml"
    plain = ll.litellm_argv(exe, config, 4000, None)
    assert plain[:3] == [str(exe), "--config", str(config)]
    assert "--num_workers" in plain and "--ssl_certfile_path" not in plain
    tls = ll.litellm_argv(exe, config, 4000, (tmp_path / "c.pem", tmp_path / "k.pem"))
    assert tls[-4:] == [
        "--ssl_certfile_path",
        str(tmp_path / "c.pem"),
        "--ssl_keyfile_path",
        str(tmp_path / "k.pem"),
    ]
    env = ll.litellm_env()
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert "HTTPS_PROXY" not in env
    assert 0 < ll.free_port() < 65536
