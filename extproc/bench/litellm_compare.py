"""LiteLLM's proxy for `sessiongate bench gateway --litellm`: installed in a virtual environment
of its own, run in front of the benchmark's provider.

The environment lives in sessiongate's cache directory (`<user cache>/sessiongate/bench/
litellm-<version>-py<X.Y>`), is made with `python -m venv` and filled with
`pip install 'litellm[proxy]==<version>'` on first use (a few minutes; a marker file records a
finished install, so later runs reuse it). Only the package index is contacted. The proxy
runs with `LITELLM_LOCAL_MODEL_COST_MAP=True` (no download of the model cost map), one worker,
no database, the benchmark's model routed to the provider as an OpenAI-compatible endpoint,
and the same TLS certificate as the gateway's listener.

The version is pinned: `litellm[proxy]` of later releases depends on a `litellm-proxy`
distribution that the package index does not serve.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Final

import platformdirs

__all__ = [
    "LITELLM_VERSION",
    "LiteLLMUnavailable",
    "ensure_litellm",
    "free_port",
    "litellm_argv",
    "litellm_config",
    "litellm_env",
    "venv_dir",
]

LITELLM_VERSION: Final = "1.80.0"
INSTALL_TIMEOUT_S: Final = 1200.0
_MARKER: Final = "sessiongate-installed"


class LiteLLMUnavailable(Exception):
    """LiteLLM's proxy could not be installed or started here."""


def venv_dir(version: str = LITELLM_VERSION, cache: Path | None = None) -> Path:
    root = cache or Path(platformdirs.user_cache_dir("sessiongate", appauthor=False))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return root / "bench" / f"litellm-{version}-py{python}"


def _executable(venv: Path) -> Path:
    return venv / "bin" / "litellm"


async def _run(argv: list[str], log: Path, timeout_s: float) -> int:
    out = await asyncio.to_thread(open, log, "ab")
    with out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
        try:
            return await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise LiteLLMUnavailable(
                f"`{' '.join(argv[:4])} ...` took over {timeout_s:g} s"
            ) from None


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


async def ensure_litellm(
    version: str = LITELLM_VERSION, cache: Path | None = None, *, announce: bool = True
) -> Path:
    """The `litellm` executable of the pinned version, installing it first if needed."""
    venv = venv_dir(version, cache)
    executable = _executable(venv)
    if (venv / _MARKER).exists() and executable.exists():
        return executable
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"litellm-{version}-install.log"
    if announce:
        print(
            f"  installing LiteLLM {version} into {venv} (once; log: {log}) ...",
            end="",
            flush=True,
        )
    status = await _run([sys.executable, "-m", "venv", "--clear", str(venv)], log, 300)
    if status != 0:
        raise LiteLLMUnavailable(f"python -m venv failed (status {status}):\n{_tail(log)}")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    status = await _run([*pip, f"litellm[proxy]=={version}"], log, INSTALL_TIMEOUT_S)
    if status != 0 or not executable.exists():
        raise LiteLLMUnavailable(
            f"`pip install 'litellm[proxy]=={version}'` failed (status {status}); LiteLLM "
            f"cannot be installed here, so no comparison. The end of {log}:\n{_tail(log)}"
        )
    (venv / _MARKER).write_text(f"litellm[proxy]=={version}\n")
    if announce:
        print(" done", flush=True)
    return executable


def free_port() -> int:
    """A loopback port free right now (LiteLLM takes a port number, not 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def litellm_config(provider_base_url: str, model: str) -> str:
    """The proxy's config: `model` routed to the provider as an OpenAI-compatible API, no
    callbacks, no database, no telemetry, no retries (a failure shows as one)."""
    return f"""model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {provider_base_url}
      api_key: sk-bench-provider
litellm_settings:
  telemetry: false
  num_retries: 0
  request_timeout: 30
general_settings:
  disable_spend_logs: true
"""


def litellm_argv(
    executable: Path, config: Path, port: int, tls: tuple[Path, Path] | None
) -> list[str]:
    argv = [
        str(executable),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--telemetry",
        "False",
    ]
    if tls is not None:
        cert, key = tls
        argv += ["--ssl_certfile_path", str(cert), "--ssl_keyfile_path", str(key)]
    return argv


def litellm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "DISABLE_SCHEMA_UPDATE": "True",
        }
    )
    # No proxy settings of the caller's environment: the provider is on loopback.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    return env
