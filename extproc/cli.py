"""The `sessiongate` command: up, serve, mock-llm, config check, envoy-config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop

from extproc.config import ConfigError, Settings, load_settings, split_host_port


def _add_settings_flags(parser: argparse.ArgumentParser, *, for_up: bool) -> None:
    """Flags that map 1:1 onto settings; defaults are None so unset flags don't override."""
    add = parser.add_argument
    add("--config", type=Path, help="TOML config file (also SESSIONGATE_CONFIG)")
    if for_up:
        add("--upstream", help="provider URL, e.g. https://api.openai.com")
        add("--listen", help="HOST:PORT of the TLS listener (port 0: pick one)")
        add("--no-tls", dest="tls", action="store_const", const=False, help="plain HTTP listener")
        add("--upstream-ca-file", type=Path, help="CA bundle that verifies the provider")
    add("--grpc-listen", help="HOST:PORT of the ext_proc gRPC server")
    add("--state-dir", type=Path, help="SQLite file, local CA, HMAC key, Envoy config")
    add("--hmac-key-file", type=Path, help="file holding the HMAC key for identities")
    add("--sqlite-path", type=Path, help="session database (default <state-dir>/sessions.db)")
    add("--redis-url", help="Redis warm tier (redis://, rediss://, redis+cluster://, ...)")
    add(
        "--redis-urls",
        action="append",
        metavar="URL[,URL...]",
        help="several Redis nodes, sessions sharded over them (repeat or comma-separate)",
    )
    add("--postgres-dsn", help="PostgreSQL cold tier shared by replicas (default: SQLite)")
    add("--session-header", help="request header carrying the session id")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--fail-open",
        dest="fail_open",
        action="store_const",
        const=True,
        help="if memory cannot be loaded, forward the request without it",
    )
    mode.add_argument(
        "--fail-closed",
        dest="fail_open",
        action="store_const",
        const=False,
        help="if memory cannot be loaded, answer 503",
    )
    add("--max-body-bytes", type=int, help="largest request body accepted")
    add("--log-level", help="debug, info, warning, error")
    add("--metrics-listen", help="HOST:PORT serving /metrics and /stats (loopback advised)")
    _add_remaining_settings(parser, for_up=for_up)


# Settings only `up` (or `envoy-config`) uses: the listener, the provider, Envoy's JWT filter.
_UP_ONLY = {
    "upstream",
    "listen",
    "tls",
    "upstream_ca_file",
    "ext_proc_endpoints",
    "ext_proc_unix_socket",
    "jwt_jwks_file",
    "jwt_issuer",
    "jwt_audiences",
    "jwt_required",
    "jwt_header",
}
# Settings that only make sense as TOML tables.
_FILE_ONLY = {"tenants"}


def _add_remaining_settings(parser: argparse.ArgumentParser, *, for_up: bool) -> None:
    """Every other setting as `--<name> VALUE` (converted and validated like the file's); a
    list setting's flag may be repeated, each value itself comma-separated."""
    taken = {action.dest for action in parser._actions}
    for item in dataclasses.fields(Settings):
        if item.name in taken or item.name in _FILE_ONLY:
            continue
        if item.name in _UP_ONLY and not for_up:
            continue
        is_list = str(item.type).startswith("tuple")
        parser.add_argument(
            "--" + item.name.replace("_", "-"),
            dest=item.name,
            metavar="VALUE[,VALUE...]" if is_list else "VALUE",
            action="append" if is_list else "store",
            help=f"setting `{item.name}` (see the README's configuration table)",
        )


_NOT_SETTINGS = {
    "command",
    "config",
    "func",
    "config_command",
    "bench_command",
    # user-context's own arguments
    "action",
    "tenant",
    "principal",
    "jwt_subject",
    "api_key_stdin",
    "data",
}


def _settings(args: argparse.Namespace, **defaults: Any) -> Settings:
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None}
    return load_settings(args.config, flags, defaults=defaults)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return uvloop.run(coro)


def cmd_up(args: argparse.Namespace) -> int:
    from extproc.supervisor import run_up

    # `up` owns its gRPC server: a free loopback port unless one is configured.
    settings = _settings(args, grpc_listen="127.0.0.1:0")
    _setup_logging(settings.log_level)
    return _run(run_up(settings))


def cmd_serve(args: argparse.Namespace) -> int:
    from extproc.serve import run_serve

    settings = _settings(args)
    _setup_logging(settings.log_level)
    return _run(run_serve(settings))


def cmd_mock_llm(args: argparse.Namespace) -> int:
    from extproc import mock_llm

    return mock_llm.run(args)


def cmd_user_context(args: argparse.Namespace) -> int:
    from extproc import user_context_cli

    settings = _settings(args)
    _setup_logging(settings.log_level)
    return _run(user_context_cli.run(args, settings))


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(json.dumps(settings.redacted(), indent=2, default=str))
    return 0


def cmd_envoy_config(args: argparse.Namespace) -> int:
    import yaml

    from extproc.envoy_config import bootstrap

    settings = _settings(args)
    endpoints = [
        split_host_port(e, "ext_proc_endpoints", unix_ok=True)
        for e in (settings.ext_proc_endpoints or (settings.grpc_listen,))
    ]
    tls = (Path("/etc/sessiongate/tls/cert.pem"), Path("/etc/sessiongate/tls/key.pem"))
    config = bootstrap(settings, endpoints, tls if settings.tls else None)
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sessiongate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run Envoy (TLS) + sessiongate in the foreground")
    _add_settings_flags(up, for_up=True)
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run only the ext_proc server (Envoy runs elsewhere)")
    _add_settings_flags(serve, for_up=False)
    serve.set_defaults(func=cmd_serve)

    from extproc import mock_llm

    mock = sub.add_parser("mock-llm", help="the simulated LLM provider used by the tests")
    mock_llm.add_arguments(mock)
    mock.set_defaults(func=cmd_mock_llm)

    from extproc.bench import store_bench

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_store = bench_sub.add_parser("store", help="per-tier store latency and throughput")
    store_bench.add_arguments(bench_store)
    bench_store.set_defaults(func=store_bench.run)
    from extproc.bench import gateway_bench

    bench_gateway = bench_sub.add_parser("gateway", help="sessiongate vs plain Envoy, same run")
    gateway_bench.add_arguments(bench_gateway)
    bench_gateway.set_defaults(func=gateway_bench.run)
    from extproc.bench import context_bench

    bench_context = bench_sub.add_parser("context", help="context assembly CPU per request")
    context_bench.add_arguments(bench_context)
    bench_context.set_defaults(func=context_bench.run)
    from extproc.bench import context_eval

    bench_eval = bench_sub.add_parser(
        "context-eval", help="recall, tokens sent and prompt-cache hits per context strategy"
    )
    context_eval.add_arguments(bench_eval)
    bench_eval.set_defaults(func=context_eval.run)

    from extproc import user_context_cli

    user_context = sub.add_parser(
        "user-context", help="get, put or delete a principal's user context in the store"
    )
    user_context_cli.add_arguments(user_context)
    _add_settings_flags(user_context, for_up=False)
    user_context.set_defaults(func=cmd_user_context)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate and print the effective settings")
    _add_settings_flags(check, for_up=True)
    check.set_defaults(func=cmd_config_check)

    envoy = sub.add_parser("envoy-config", help="print the Envoy config `up` would run")
    _add_settings_flags(envoy, for_up=True)  # incl. --ext-proc-endpoints HOST:PORT,...
    envoy.set_defaults(func=cmd_envoy_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"sessiongate: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
