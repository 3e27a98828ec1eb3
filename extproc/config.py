"""Settings: defaults < config file (TOML, versioned) < SESSIONGATE_* variables < flags.

Every setting has one name used in all three places: `listen` is `listen = "..."` in the file,
`SESSIONGATE_LISTEN` in the environment and `--listen` on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

from extproc.sockets import MAX_SOCKET_PATH, unix_path, valid_unix_path

CONFIG_VERSION = 1
ENV_PREFIX = "SESSIONGATE_"

_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
IDENTITY_SOURCES = ("jwt", "mtls", "api-key")
# Envoy's jwt_authn filter always writes verified payloads under its own name, whatever the
# filter instance is called (see envoy_config.jwt_authn_filter).
JWT_AUTHN_NAMESPACE = "envoy.filters.http.jwt_authn"
REDIS_SCHEMES = frozenset(
    {
        "redis",
        "rediss",
        "unix",
        "redis+sentinel",
        "redis+cluster",
        "rediss+cluster",
        "rediss+sentinel",
    }
)
# A comma starts a new URL only when a scheme follows it: Sentinel and Cluster URLs list
# their hosts with commas (`redis+sentinel://h1:1,h2:2/master`).
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


GRPC_SERVERS = ("h2", "grpcio")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting."""


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir("sessiongate", appauthor=False))


@dataclass(frozen=True, slots=True)
class Settings:
    # --- traffic (used by `up`, which generates the Envoy config) ---
    upstream: str = "https://api.openai.com"
    listen: str = "127.0.0.1:8443"
    tls: bool = True
    upstream_ca_file: Path | None = None  # CAs that verify the provider; default: certifi's
    # --- the ext_proc server ---
    grpc_listen: str = "127.0.0.1:50051"  # HOST:PORT or unix:/absolute/path
    # `up` only: Envoy reaches its ext_proc server(s) over Unix sockets in <state_dir>/run
    # (extproc.sockets: half the cost of loopback TCP per message); false: loopback TCP ports.
    ext_proc_unix_socket: bool = True
    # The gRPC transport: "h2" (built in, extproc.grpc_h2: several times less CPU per stream)
    # or "grpcio" (grpcio's asyncio server).
    grpc_server: str = "h2"
    # `up` only: ext_proc worker processes (each an endpoint of the ext_proc cluster, sessions
    # ring-hashed onto them; the hot tier's bytes are split between them). 2 uses both cores.
    workers: int = 1
    # `envoy-config` only: the ext_proc replicas Envoy should call (default: grpc_listen). With
    # several, the cluster ring-hashes on the session so each session sticks to one replica.
    ext_proc_endpoints: tuple[str, ...] = ()
    state_dir: Path = field(default_factory=default_state_dir)
    hmac_key_file: Path | None = None  # default: <state_dir>/hmac.key (created by `up` only)
    sqlite_path: Path | None = None  # default: <state_dir>/sessions.db
    redis_url: str | None = None  # the warm tier (shared by replicas)
    # Several independent Redis nodes as one warm tier: each session lives on one of them
    # (rendezvous hashing, store.ShardedRedis). Exclusive with redis_url.
    redis_urls: tuple[str, ...] = ()
    redis_prefix: str = "sg"
    redis_ttl_s: int = 86400  # sliding: idle sessions leave Redis and stay in the cold tier
    redis_max_turns: int = 2000  # newest turns kept per session in Redis
    postgres_dsn: str | None = None  # the cold tier shared by replicas; default: SQLite
    postgres_schema: str = "sessiongate"
    # [tenants.<name>]: a tenant pinned to its own Redis and/or database (store.open_router).
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    session_header: str = "x-session-id"
    session_op_header: str = "x-session-op"
    # Where a session id comes from, in order: "header", "cookie", "body", "fingerprint"
    # (extproc.session_sources). Any but "header" makes the chat route send every chat
    # request to rewrite, not only those with the session header.
    session_sources: tuple[str, ...] = ("header",)
    session_cookie: str = "sessiongate_session"
    # Dotted body fields tried in order by the "body" source (first non-empty string wins).
    session_body_fields: tuple[str, ...] = (
        "metadata.session_id",
        "metadata.conversation_id",
        "user",
    )
    # "append" (the client sends only new messages), "manage" (it sends its whole history:
    # deduplicated against the store) or "auto" (extproc.client_modes); per request: the header.
    client_mode: str = "append"
    client_mode_header: str = "x-sessiongate-mode"
    # Append clients: a request repeating the last turn's message(s) replaces that turn (a
    # regenerate) instead of adding one. Off: such clients may send "continue" twice.
    append_regenerate: bool = False
    fail_open: bool = True
    allow_anonymous: bool = False
    identity_sources: tuple[str, ...] = ("jwt", "api-key")  # "mtls" is opt-in
    jwt_metadata_namespace: str = JWT_AUTHN_NAMESPACE
    tenant_claim: str = "tenant"
    # --- JWT verified by Envoy (`up`/`envoy-config` add a jwt_authn filter when set) ---
    jwt_jwks_file: Path | None = None  # local JWKS file Envoy verifies signatures with
    jwt_issuer: str = ""  # required with jwt_jwks_file: tokens must carry this `iss`
    jwt_audiences: tuple[str, ...] = ()  # accepted `aud` values; empty: not checked
    # False: a request without a JWT keeps its API-key identity; True: Envoy answers 401.
    jwt_required: bool = False
    jwt_header: str = "authorization"  # `Authorization: Bearer <jwt>`, or a header of its own
    # --- limits and timings ---
    max_body_bytes: int = 8 * 1024 * 1024
    # The largest body sent upstream after history is injected (0: 4 x max_body_bytes).
    max_upstream_body_bytes: int = 0
    message_timeout_ms: int = 2000
    pending_wait_ms: int = 1500
    stream_idle_timeout_s: int = 600
    hot_max_bytes: int = 256 * 1024 * 1024
    # Idle seconds after which a session leaves the in-process hot tier (it is read again from
    # Redis or the cold tier). 0: no expiry, only LRU eviction by hot_max_bytes.
    hot_ttl_s: float = 0.0
    commit_interval_ms: int = 20
    # Full garbage collections skip objects that survived the previous one (extproc.gc_tuning:
    # 60-85 ms pauses became 12-22 ms); every this many seconds they are all looked at again,
    # which bounds what a reference cycle among them can hold on to. 0: CPython's default GC.
    gc_unfreeze_every_s: float = 600.0
    log_level: str = "info"
    metrics_listen: str = ""  # HOST:PORT for /metrics and /stats; empty: off
    # Fault injection for tests: hold each captured turn this long before handing it over.
    debug_capture_delay_ms: int = 0
    # --- context window management (extproc.context) ---
    context_enabled: bool = True  # false: history is only trimmed to max_upstream_body_bytes
    # The window of a model neither the built-in table nor [context.models] knows.
    context_default_window: int = 32768
    # Output reserved when a request sets no max_tokens/max_completion_tokens (capped at the
    # model's max output and a quarter of its window); reasoning models reserve the second.
    context_output_tokens: int = 4096
    context_reasoning_output_tokens: int = 25000
    # Learn each tokenizer family's (and, with enough turns, each model's) safety margin from
    # the provider's reported usage: margin = high quantile of reported/estimated prompt tokens
    # - 1 + 2%, within [floor, cap]. Per process; the fixed margins hold until min_samples
    # turns were seen. An explicit [context.models."<m>"] margin is never replaced.
    context_calibrate_margins: bool = True
    context_calibration_min_samples: int = 20
    context_calibration_window: int = 200  # the last this many turns per family / model
    context_calibration_quantile: float = 0.98
    context_calibration_floor: float = 0.02
    context_calibration_cap: float = 0.5
    # Cut history in blocks of this fraction of its budget, so the injected prefix stays
    # byte-identical (provider prompt caches keep hitting) until the next block goes.
    context_step: float = 0.2
    context_max_messages: int = 0  # at most this many history messages (whole turns); 0: off
    # Tokens counted per image part (`detail: low` parts: 85).
    context_image_tokens: int = 765
    # Key facts the user stated in turns the window left out (names, "my X is Y", preferences,
    # decisions, dates) go in a system message after the system prompt, within this fraction
    # of the prompt the window allows (less the system prompt); 0: off.
    context_facts_share: float = 0.1
    # Which history a request gets: auto (by query kind: a recall question gets relevance, a
    # tool loop its whole exchange, anything else the sliding window), window or relevance.
    # A request may choose with the x-sessiongate-strategy header.
    context_strategy: str = "auto"
    # With relevance, this fraction of the history budget goes to the older turns most relevant
    # to the query (BM25 blended with recency), the rest to the newest turns.
    context_relevance_share: float = 0.7
    # A rolling summary of the turns left out, made in the background (no request waits for
    # it) and injected after the system prompt within this fraction of the prompt; 0: off.
    context_summary_share: float = 0.0
    # Summaries by a model (an OpenAI-compatible base URL such as https://api.openai.com/v1,
    # called directly, never through Envoy) instead of extractive ones; empty: extractive.
    context_summarizer_url: str = ""
    context_summarizer_model: str = "gpt-4o-mini"
    context_summarizer_api_key_file: Path | None = None  # its bearer key (one line)
    context_summarizer_timeout_s: float = 30.0
    # The principal's own user context (preferences and settings, set through
    # /sessiongate/v1/user-context) goes in a system message after the system prompt, within
    # this fraction of the prompt (less the system prompt); 0: never injected.
    context_user_share: float = 0.05
    # Seconds a process keeps a principal's user context before reading it again (its own
    # writes are seen at once; another worker's or replica's within this delay). 0: no cache.
    context_user_cache_s: float = 5.0
    context_user_max_bytes: int = 16384  # largest user-context document a principal may PUT
    # Anthropic Messages: mark the injected prefix (system blocks, last history message) with
    # cache_control breakpoints, within Anthropic's 4 per request (the client's own first).
    context_cache_breakpoints: bool = True
    # [context.models."<model>"] window / max_output / margin / family / reasoning;
    # [context.routes."<path prefix>"] and [tenants.<name>.context]: overrides (context.policy).
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def hmac_key_path(self) -> Path:
        return self.hmac_key_file or self.state_dir / "hmac.key"

    @property
    def sqlite_file(self) -> Path:
        return self.sqlite_path or self.state_dir / "sessions.db"

    @property
    def upstream_body_limit(self) -> int:
        return self.max_upstream_body_bytes or 4 * self.max_body_bytes

    @property
    def server_deadline_s(self) -> float:
        """The server's own budget for a rewrite: safely below Envoy's message_timeout."""
        return max(0.05, self.message_timeout_ms / 1000 * 0.8)

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data, without the passwords in Redis and PostgreSQL URLs."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(_redacted_store_options(out))
        out["tenants"] = {
            name: {k: (str(v) if isinstance(v, Path) else v) for k, v in table.items()}
            | _redacted_store_options(table)
            for name, table in self.tenants.items()
        }
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def _redacted_url(url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:  # e.g. a malformed port: nothing to find, show it as given
        return url
    return url.replace(f":{password}@", ":***@") if password else url


def _redacted_store_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The URL-valued store options of a settings or tenant mapping, passwords masked."""
    out: dict[str, Any] = {}
    for name in ("redis_url", "postgres_dsn"):
        if options.get(name):
            out[name] = _redacted_url(str(options[name]))
    if options.get("redis_urls"):
        out["redis_urls"] = [_redacted_url(str(url)) for url in options["redis_urls"]]
    return out


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a file/env/flag value into the field's type, or raise ConfigError naming it."""
    kind = str(_FIELDS[name].type)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("not an integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("not a number")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"not a finite number: {value!r}")
            return number
        if kind.startswith("Path"):
            if value in (None, ""):
                if kind == "Path":
                    raise ValueError("a path is required")
                return None
            return Path(str(value)).expanduser()
        if kind.startswith("tuple"):
            return split_list(value, urls=name == "redis_urls")
        if name == "context":
            return context_table(value)
        if kind.startswith("dict"):
            return _tenants(value)
        if kind == "str | None":
            return None if value in (None, "") else str(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def split_list(value: Any, *, urls: bool = False) -> tuple[str, ...]:
    """A list setting from a TOML array, a comma-separated string, or repeated flags (a list
    whose items may themselves be comma-separated). `urls`: split only at commas that start a
    new URL, so the host lists of Sentinel and Cluster URLs stay whole."""
    items = value if isinstance(value, list | tuple) else [value]
    out: list[str] = []
    for item in items:
        values: list[str] = []
        for part in (p.strip() for p in str(item).split(",")):
            if urls and values and part and not _URL_START.match(part):
                values[-1] += "," + part  # another host of the previous URL
            elif part:
                values.append(part)
        out.extend(values)
    return tuple(out)


TENANT_KEYS = frozenset(
    {"redis_url", "redis_urls", "redis_prefix", "postgres_dsn", "postgres_schema", "sqlite_path"}
)


def _tenants(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(t, dict) for t in value.values()):
        raise ValueError("expected [tenants.<name>] tables (config file only)")
    out: dict[str, dict[str, Any]] = {}
    for name, table in value.items():
        unknown = set(table) - TENANT_KEYS
        if unknown or not name:
            raise ValueError(f"tenant {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
        out[name] = {k: _tenant_value(k, v) for k, v in table.items()}
    return out


CONTEXT_KEYS = frozenset({"models", "routes", "tenants"})


def context_table(value: Any) -> dict[str, Any]:
    """The `[context]` table: `[context.models."<model>"]` overrides of the windows table,
    `[context.routes."<path prefix>"]` overrides of the context settings per route, and the
    tenants' (`[tenants.<name>.context]`, moved here by `load_settings`). From a flag or the
    environment it is TOML text: `models."my-model" = {window = 4096}`."""
    if isinstance(value, str):
        value = tomllib.loads(value)  # TOMLDecodeError is a ValueError
    if not isinstance(value, dict):
        raise ValueError("expected a [context] table")
    unknown = set(value) - CONTEXT_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    models = value.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(t, dict) for t in models.values()):
        raise ValueError('expected [context.models."<model>"] tables')
    from extproc.context.models import parse_override

    out: dict[str, Any] = {
        "models": {name: parse_override(name, table) for name, table in models.items()}
    }
    for kind in ("routes", "tenants"):
        if kind in value:
            out[kind] = _context_overrides(kind, value[kind])
    return out


def _context_overrides(kind: str, tables: Any) -> dict[str, dict[str, Any]]:
    """Route or tenant overrides, each value converted like its global setting (`step` like
    `context_step`); their ranges are checked by `_validate_context`."""
    from extproc.context.policy import CLIENT_MODE, OVERRIDE_KEYS

    where = 'context.routes."<path prefix>"' if kind == "routes" else "tenants.<name>.context"
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ValueError(f"expected [{where}] tables")
    out: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        label = f'routes."{name}"' if kind == "routes" else f"tenants.{name}.context"
        if kind == "routes" and (not name.startswith("/") or "?" in name):
            raise ValueError(f"{label}: a path prefix starts with / and has no query string")
        if not name:
            raise ValueError(f"{label}: a tenant name is required")
        unknown = set(table) - OVERRIDE_KEYS
        if unknown:
            raise ValueError(
                f"{label}: unknown key(s) {', '.join(sorted(unknown))} "
                f"(choose from {', '.join(sorted(OVERRIDE_KEYS))})"
            )
        try:
            out[name] = {
                k: str(v) if k == CLIENT_MODE else _coerce("context_" + k, v)
                for k, v in table.items()
            }
        except ConfigError as exc:
            raise ValueError(f"{label}: {exc}") from None
    return out


def _move_tenant_context(merged: dict[str, Any]) -> None:
    """`[tenants.<name>.context]` joins the `[context]` table as `tenants.<name>`, so that
    `tenants` keeps meaning "pinned to its own store" (a tenant with only a context table is
    not pinned) and the context settings live in one place."""
    tenants = merged.get("tenants")
    if not isinstance(tenants, dict):
        return
    moved: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for name, table in tenants.items():
        if isinstance(table, dict) and "context" in table:
            moved[name] = table["context"]
            table = {k: v for k, v in table.items() if k != "context"}
            if not table:
                continue
        kept[name] = table
    if not moved:
        return
    context = merged.get("context", {})
    if isinstance(context, str):
        try:
            context = tomllib.loads(context)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"context: {exc}") from None
    if not isinstance(context, dict):
        return  # _coerce reports it
    if "tenants" in context:
        raise ConfigError(
            "context.tenants: tenant overrides go in [tenants.<name>.context], not both"
        )
    merged["context"] = {**context, "tenants": moved}
    merged["tenants"] = kept


def _tenant_value(key: str, value: Any) -> Any:
    if key == "sqlite_path":
        return Path(str(value)).expanduser()
    if key == "redis_urls":
        return split_list(value, urls=True)
    return str(value)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    version = data.pop("version", None)
    if type(version) is not int or version != CONFIG_VERSION:
        raise ConfigError(f"{path}: `version = {CONFIG_VERSION}` is required (found {version!r})")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    return data


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            out[name] = environ[key]
    return out


def load_settings(
    config_file: Path | None,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the layers and validate. `flags` holds only the flags the user actually gave;
    `defaults` replaces built-in defaults for one command (e.g. `up` picks a free gRPC port)."""
    env = os.environ if environ is None else environ
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    merged: dict[str, Any] = dict(defaults or {})
    if config_file is not None:
        merged.update(read_config_file(config_file))
    merged.update(settings_from_env(env))
    merged.update({k: v for k, v in flags.items() if v is not None})
    _move_tenant_context(merged)
    settings = Settings(**{k: _coerce(k, v) for k, v in merged.items()})
    validate(settings)
    return settings


def split_host_port(value: str, name: str, *, unix_ok: bool = False) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); with `unix_ok`, `unix:/path` -> ("unix:/path", 0)."""
    path = unix_path(value) if unix_ok else None
    if path is not None:
        if not valid_unix_path(path):
            raise ConfigError(
                f"{name}: expected unix:/absolute/path of at most {MAX_SOCKET_PATH} bytes"
            )
        return value, 0
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def validate(s: Settings) -> None:
    parts = urlsplit(s.upstream)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"upstream: expected an http(s) URL, got {s.upstream!r}")
    if parts.query or parts.fragment:
        raise ConfigError("upstream: a query string or fragment is not allowed")
    split_host_port(s.listen, "listen")
    split_host_port(s.grpc_listen, "grpc_listen", unix_ok=True)
    if s.grpc_server not in GRPC_SERVERS:
        raise ConfigError(f"grpc_server: choose from {', '.join(GRPC_SERVERS)}")
    if not (s.gc_unfreeze_every_s >= 0 and math.isfinite(s.gc_unfreeze_every_s)):
        raise ConfigError("gc_unfreeze_every_s: 0 (CPython's default GC) or more seconds")
    if not 1 <= s.workers <= 64:
        raise ConfigError("workers: 1 to 64 ext_proc processes")
    for endpoint in s.ext_proc_endpoints:
        split_host_port(endpoint, "ext_proc_endpoints", unix_ok=True)
    if s.metrics_listen:
        split_host_port(s.metrics_listen, "metrics_listen")
    for name in ("session_header", "session_op_header"):
        value = getattr(s, name)
        if not _HEADER_NAME.fullmatch(value):
            raise ConfigError(f"{name}: not a lower-case header name: {value!r}")
    if s.session_header == s.session_op_header:
        raise ConfigError("session_op_header: must differ from session_header")
    _validate_session_sources(s)
    unknown = set(s.identity_sources) - set(IDENTITY_SOURCES)
    if unknown or not s.identity_sources:
        raise ConfigError(f"identity_sources: choose from {', '.join(IDENTITY_SOURCES)}")
    _validate_warm_tier("", s.redis_url, s.redis_urls)
    for tenant, table in s.tenants.items():
        _validate_warm_tier(tenant, table.get("redis_url"), table.get("redis_urls", ()))
    if s.postgres_dsn and urlsplit(s.postgres_dsn).scheme not in {"postgresql", "postgres"}:
        raise ConfigError("postgres_dsn: expected postgresql://")
    if not 1024 <= s.max_body_bytes <= 512 * 1024 * 1024:
        raise ConfigError("max_body_bytes: between 1 KiB and 512 MiB")
    if s.max_upstream_body_bytes and s.max_upstream_body_bytes < s.max_body_bytes:
        raise ConfigError("max_upstream_body_bytes: must be at least max_body_bytes")
    if s.message_timeout_ms < 100:
        raise ConfigError("message_timeout_ms: at least 100")
    if not 0 <= s.pending_wait_ms < s.message_timeout_ms * 0.8:
        raise ConfigError("pending_wait_ms: must stay below 80% of message_timeout_ms")
    if s.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError("log_level: debug, info, warning or error")
    if s.hot_ttl_s < 0:
        raise ConfigError("hot_ttl_s: 0 (no expiry) or more seconds")
    _validate_calibration(s)
    _validate_context(s)
    _validate_jwt(s)


def _validate_calibration(s: Settings) -> None:
    if s.context_calibration_min_samples < 1:
        raise ConfigError("context_calibration_min_samples: at least 1 turn")
    if s.context_calibration_window < s.context_calibration_min_samples:
        raise ConfigError("context_calibration_window: at least context_calibration_min_samples")
    if not 0.5 <= s.context_calibration_quantile <= 1:
        raise ConfigError("context_calibration_quantile: from 0.5 to 1")
    if not 0 <= s.context_calibration_floor <= s.context_calibration_cap <= 1:
        raise ConfigError(
            "context_calibration_floor, context_calibration_cap: 0 <= floor <= cap <= 1"
        )


_COOKIE_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_BODY_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")
SESSION_SOURCES = ("header", "cookie", "body", "fingerprint")
CLIENT_MODES = ("append", "manage", "auto")


def _validate_session_sources(s: Settings) -> None:
    sources = s.session_sources
    if not sources or set(sources) - set(SESSION_SOURCES) or len(set(sources)) != len(sources):
        raise ConfigError(
            f"session_sources: one or more of {', '.join(SESSION_SOURCES)}, each once"
        )
    if not _COOKIE_NAME.fullmatch(s.session_cookie):
        raise ConfigError(f"session_cookie: not a cookie name: {s.session_cookie!r}")
    if "body" in sources and not s.session_body_fields:
        raise ConfigError("session_body_fields: at least one field for the body source")
    for name in s.session_body_fields:
        if not _BODY_FIELD.fullmatch(name):
            raise ConfigError(f"session_body_fields: not a dotted field path: {name!r}")
    if s.client_mode not in CLIENT_MODES:
        raise ConfigError(f"client_mode: choose from {', '.join(CLIENT_MODES)}")
    if not _HEADER_NAME.fullmatch(s.client_mode_header):
        raise ConfigError(
            f"client_mode_header: not a lower-case header name: {s.client_mode_header!r}"
        )
    if s.client_mode_header in {s.session_header, s.session_op_header}:
        raise ConfigError(
            "client_mode_header: must differ from session_header and session_op_header"
        )
    # Several ext_proc processes are ring-hashed on the session header; a request without one
    # lands on any of them, and only a shared Redis tier keeps their view of a session whole.
    spread = s.workers > 1 or len(s.ext_proc_endpoints) > 1
    if spread and set(sources) != {"header"} and not (s.redis_url or s.redis_urls):
        raise ConfigError(
            "session_sources: cookie, body and fingerprint sessions with several workers or "
            "ext_proc_endpoints need a Redis tier (redis_url or redis_urls)"
        )


def _validate_warm_tier(tenant: str, redis_url: str | None, redis_urls: tuple[str, ...]) -> None:
    """One node (`redis_url`) or several (`redis_urls`), never both; every URL a Redis one;
    no node listed twice (it would be two shards of one server)."""
    where = f"tenants.{tenant}." if tenant else ""
    if redis_url and redis_urls:
        raise ConfigError(
            f"{where}redis_urls: set either redis_url (one Redis) or redis_urls (sessions "
            "sharded over several), not both (an empty value clears a setting from a lower layer)"
        )
    for name, url in [("redis_url", redis_url), *(("redis_urls", u) for u in redis_urls)]:
        if not url:
            continue
        scheme = urlsplit(url).scheme
        if scheme not in REDIS_SCHEMES:
            raise ConfigError(
                f"{where}{name}: expected redis://, rediss://, unix://, "
                f"redis+sentinel:// or redis+cluster:// (got {_redacted_url(url)!r})"
            )
        if "," in url and not scheme.endswith(("+sentinel", "+cluster")):
            # Most likely two URLs where the second lost its scheme (see split_list).
            raise ConfigError(
                f"{where}{name}: one host per {scheme}:// URL (got {_redacted_url(url)!r})"
            )
    # Imported here: `store` pulls in every backend, which reading a config file does not need.
    from store.sharded import shard_name

    seen: set[str] = set()
    for url in redis_urls:
        name = shard_name(url)
        if name in seen:
            raise ConfigError(f"{where}redis_urls: {name} is listed twice")
        seen.add(name)


def _validate_context(s: Settings) -> None:
    _validate_context_values(s)
    if s.context_summarizer_url:
        if urlsplit(s.context_summarizer_url).scheme not in ("http", "https"):
            raise ConfigError("context_summarizer_url: an http:// or https:// base URL")
        if not s.context_summarizer_model:
            raise ConfigError("context_summarizer_model: required with context_summarizer_url")
        if s.context_summary_share <= 0:
            raise ConfigError("context_summarizer_url: needs context_summary_share above 0")
    key_file = s.context_summarizer_api_key_file
    if key_file is not None and not key_file.is_file():
        raise ConfigError(f"context_summarizer_api_key_file: no such file: {key_file}")
    if s.context_summarizer_timeout_s <= 0:
        raise ConfigError("context_summarizer_timeout_s: above 0 seconds")
    from extproc.context.models import ModelTable

    try:  # Settings built directly (not from a file) are checked too
        tables = context_table(s.context)
        ModelTable(tables["models"], s.context_default_window)
    except ValueError as exc:
        raise ConfigError(f"context: {exc}") from None
    for kind in ("routes", "tenants"):
        for name, overrides in tables.get(kind, {}).items():
            label = f'context.routes."{name}"' if kind == "routes" else f"tenants.{name}.context"
            fields = {f"context_{k}": v for k, v in overrides.items() if k != "client_mode"}
            if "client_mode" in overrides:
                fields["client_mode"] = overrides["client_mode"]
            try:  # the same rules as the global settings, on the settings this table makes
                _validate_context_values(dataclasses.replace(s, **fields))
                if overrides.get("client_mode", s.client_mode) not in CLIENT_MODES:
                    raise ConfigError(f"client_mode: choose from {', '.join(CLIENT_MODES)}")
            except ConfigError as exc:
                raise ConfigError(f"{label}: {exc}") from None


def _validate_context_values(s: Settings) -> None:
    if s.context_default_window < 256:
        raise ConfigError("context_default_window: at least 256 tokens")
    for name in ("context_output_tokens", "context_reasoning_output_tokens"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name}: 0 or more tokens")
    if not 0 < s.context_step <= 1:
        raise ConfigError("context_step: a fraction of the history budget, above 0 and at most 1")
    if s.context_max_messages < 0:
        raise ConfigError("context_max_messages: 0 (no limit) or more messages")
    if s.context_image_tokens < 0:
        raise ConfigError("context_image_tokens: 0 or more tokens")
    if not 0 <= s.context_facts_share <= 0.5:
        raise ConfigError("context_facts_share: a fraction of the prompt budget, 0 to 0.5")
    if s.context_strategy not in ("auto", "window", "relevance"):
        raise ConfigError("context_strategy: auto, window or relevance")
    if not 0 <= s.context_relevance_share <= 0.95:
        raise ConfigError("context_relevance_share: a fraction of the history budget, 0 to 0.95")
    if not 0 <= s.context_summary_share <= 0.5:
        raise ConfigError("context_summary_share: a fraction of the prompt budget, 0 to 0.5")
    if not 0 <= s.context_user_share <= 0.5:
        raise ConfigError("context_user_share: a fraction of the prompt budget, 0 to 0.5")
    if s.context_facts_share + s.context_summary_share + s.context_user_share > 0.8:
        raise ConfigError(
            "context_facts_share + context_summary_share + context_user_share: at most 0.8"
        )
    if s.context_user_cache_s < 0:
        raise ConfigError("context_user_cache_s: 0 (no cache) or more seconds")
    if not 256 <= s.context_user_max_bytes <= 1024 * 1024:
        raise ConfigError("context_user_max_bytes: 256 bytes to 1 MiB")


def _validate_jwt(s: Settings) -> None:
    """The jwt_* settings describe Envoy's jwt_authn filter; they need its JWKS file, and the
    filter only helps if its output reaches the identity resolver."""
    if s.jwt_jwks_file is None:
        for name in ("jwt_issuer", "jwt_audiences", "jwt_required", "jwt_header"):
            if getattr(s, name) != _FIELDS[name].default:
                raise ConfigError(f"{name}: needs jwt_jwks_file (the JWKS that verifies tokens)")
        return
    if not s.jwt_issuer:
        raise ConfigError("jwt_issuer: required with jwt_jwks_file (the tokens' `iss`)")
    if s.jwt_metadata_namespace != JWT_AUTHN_NAMESPACE:
        raise ConfigError(
            f"jwt_metadata_namespace: Envoy's jwt_authn filter writes {JWT_AUTHN_NAMESPACE}; "
            "leave it at that when jwt_jwks_file is set"
        )
    if "jwt" not in s.identity_sources:
        raise ConfigError("identity_sources: add jwt, or the verified tokens are ignored")
    if not _HEADER_NAME.fullmatch(s.jwt_header):
        raise ConfigError(f"jwt_header: not a lower-case header name: {s.jwt_header!r}")
    if s.jwt_header in {s.session_header, s.session_op_header}:
        raise ConfigError("jwt_header: must differ from session_header and session_op_header")
