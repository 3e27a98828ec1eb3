"""The Envoy bootstrap for `sessiongate up`, built as data (dumped to YAML for Envoy).

Layout: one listener (TLS by default) -> HTTP connection manager -> [jwt_authn, when
`jwt_jwks_file` is set] -> rewrite ext_proc (blocking) -> capture ext_proc (observability mode)
-> router -> the provider. Only the LLM routes (OpenAI chat completions, Anthropic messages)
with a session header run the ext_proc filters; every other route disables both per route, so
it costs nothing.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi

from extproc.config import JWT_AUTHN_NAMESPACE, ConfigError, Settings, split_host_port
from extproc.mutations import AFFINITY_KEY, METADATA_NAMESPACE, PASS_THROUGH_MODE
from extproc.sockets import unix_path

EXT_PROC_CLUSTER = "sessiongate_ext_proc"
UPSTREAM_CLUSTER = "llm_upstream"
REWRITE_FILTER = "sessiongate.rewrite"
CAPTURE_FILTER = "sessiongate.capture"
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"  # Anthropic Messages (extproc.protocols.anthropic_messages)
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3"
JWT_FILTER = JWT_AUTHN_NAMESPACE  # the filter's canonical name is its metadata namespace
JWT_PROVIDER = "sessiongate"
# The key of the verified payload in jwt_authn's metadata namespace. extproc.identity takes
# any entry of the namespace that has a `sub`, so the name only has to be stable.
JWT_PAYLOAD_KEY = "payload"


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str
    port: int
    path_prefix: str  # "" or "/something", never ending in "/"

    @classmethod
    def parse(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        prefix = parts.path.rstrip("/")
        # Clients are given <listen>/v1 as their base URL, so an upstream written the way SDKs
        # spell base URLs (".../v1") must not become /v1/v1.
        if prefix.endswith("/v1"):
            prefix = prefix[: -len("/v1")]
        return cls(parts.scheme, host, port, prefix)

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


AFFINITY_HEADER = "x-sessiongate-affinity"


def _ext_proc_grpc_service(timeout_s: float, affinity_value: str | None) -> dict[str, Any]:
    service: dict[str, Any] = {
        "envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER},
        "timeout": _duration(timeout_s),
    }
    if affinity_value is not None:
        # Session affinity across replicas: the ext_proc cluster ring-hashes this metadata, so
        # both streams of a session reach the replica whose hot tier holds it.
        service["initial_metadata"] = [{"key": AFFINITY_HEADER, "value": affinity_value}]
    return service


def rewrite_filter(settings: Settings, affinity: bool = False) -> dict[str, Any]:
    """Blocking: request headers SEND (so headers wait for the rewritten body), body BUFFERED."""
    config: dict[str, Any] = {
        "@type": f"{_EXT_PROC}.ExternalProcessor",
        "grpc_service": _ext_proc_grpc_service(
            settings.message_timeout_ms / 1000 + 1,
            f"%REQ({settings.session_header})%" if affinity else None,
        ),
        "failure_mode_allow": settings.fail_open,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "message_timeout": _duration(settings.message_timeout_ms / 1000),
        "allow_mode_override": True,
        "allowed_override_modes": [PASS_THROUGH_MODE],
        "metadata_options": {
            "forwarding_namespaces": {
                "untyped": [settings.jwt_metadata_namespace, "sessiongate.identity"]
            },
            "receiving_namespaces": {"untyped": [METADATA_NAMESPACE]},
        },
        "stat_prefix": "rewrite",
        "status_on_error": {"code": 503},
    }
    if "mtls" in settings.identity_sources:
        config["request_attributes"] = [
            "connection.uri_san_peer_certificate",
            "connection.subject_peer_certificate",
        ]
    return {"name": REWRITE_FILTER, "typed_config": config}


def capture_filter(affinity: bool = False) -> dict[str, Any]:
    """Observability mode: Envoy never waits for us, and a capture failure never fails a request."""
    return {
        "name": CAPTURE_FILTER,
        "typed_config": {
            "@type": f"{_EXT_PROC}.ExternalProcessor",
            # The session header is gone by the time the reply arrives (removed before the
            # provider), so capture hashes the same value, left by rewrite in its metadata.
            "grpc_service": _ext_proc_grpc_service(
                30,
                f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{AFFINITY_KEY})%" if affinity else None,
            ),
            "failure_mode_allow": True,
            "observability_mode": True,
            # After the HTTP stream ends Envoy keeps the observed stream open this long so queued
            # messages still arrive. Long enough to ride out a stalled or overloaded server (at
            # 1 s, a 3 s stall lost completed turns); an aborted reply is abandoned only then,
            # so the session's next request may wait its pending_wait_ms (and go on without).
            "deferred_close_timeout": "10s",
            "processing_mode": {
                "request_header_mode": "SKIP",
                "response_header_mode": "SEND",
                "request_body_mode": "NONE",
                "response_body_mode": "STREAMED",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "metadata_options": {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]}},
            "stat_prefix": "capture",
        },
    }


def jwt_authn_filter(settings: Settings) -> dict[str, Any] | None:
    """Envoy's JWT verification in front of rewrite, or None without `jwt_jwks_file`.

    The verified payload goes to dynamic metadata (namespace `envoy.filters.http.jwt_authn`,
    forwarded to rewrite), where identity.py takes `sub`, `iss`, the tenant claim and scopes.
    `forward: false`: the token is removed once verified. It identifies the caller to the
    gateway; the provider has no use for it, and a third party should never see it.
    """
    if settings.jwt_jwks_file is None:
        return None
    shares_authorization = settings.jwt_header == "authorization"
    provider: dict[str, Any] = {
        "issuer": settings.jwt_issuer,
        **({"audiences": list(settings.jwt_audiences)} if settings.jwt_audiences else {}),
        "local_jwks": {"filename": str(settings.jwt_jwks_file)},
        "forward": False,
        # Explicit, so no other location (the default `access_token` query parameter) counts.
        "from_headers": [
            {"name": "authorization", "value_prefix": "Bearer "}
            if shares_authorization
            else {"name": settings.jwt_header}
        ],
        "payload_in_metadata": JWT_PAYLOAD_KEY,
    }
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": f"{_JWT_AUTHN}.JwtAuthentication",
            "providers": {JWT_PROVIDER: provider},
            # Every route: the gateway's authentication does not depend on the path.
            "rules": [{"match": {"prefix": "/"}, "requires": _jwt_requirement(settings)}],
        },
    }


def _jwt_requirement(settings: Settings) -> dict[str, Any]:
    """jwt_required: a valid token or 401. Otherwise a missing token is fine (the API-key
    identity applies); a token that fails verification is a 401 when it has a header of its
    own, but not in `Authorization`, where API keys travel too and Envoy cannot tell a bad JWT
    from an API key: there it is left for the API-key identity (it never yields a JWT identity
    or a tenant)."""
    if settings.jwt_required:
        return {"provider_name": JWT_PROVIDER}
    if settings.jwt_header == "authorization":
        return {"allow_missing_or_failed": {}}
    return {
        "requires_any": {"requirements": [{"provider_name": JWT_PROVIDER}, {"allow_missing": {}}]}
    }


def check_jwks_file(path: Path) -> None:
    """A readable JWKS (`{"keys": [...]}`), checked before Envoy starts: Envoy's own error for
    a bad one is a config rejection that names neither the file nor the setting."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"jwt_jwks_file: cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"jwt_jwks_file: {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise ConfigError(f'jwt_jwks_file: {path} is not a JWKS ({{"keys": [...]}})')


def _disabled_filters() -> dict[str, Any]:
    disabled = {"@type": f"{_EXT_PROC}.ExtProcPerRoute", "disabled": True}
    return {REWRITE_FILTER: disabled, CAPTURE_FILTER: disabled}


# Response header -> key of rewrite's dynamic metadata (namespace `sessiongate`).
CONTEXT_HEADERS = {
    "x-sessiongate-context": "context_outcome",
    "x-sessiongate-context-window": "context_window",
    "x-sessiongate-history-available": "context_history_available",
    "x-sessiongate-history-injected": "context_history_injected",
    "x-sessiongate-turns-injected": "context_turns_injected",
    "x-sessiongate-turns-dropped": "context_turns_dropped",
    "x-sessiongate-dropped-by": "context_dropped_by",
    "x-sessiongate-facts": "context_facts",
    "x-sessiongate-strategy": "context_strategy",
    "x-sessiongate-query": "context_query",
    "x-sessiongate-summary-tokens": "context_summary_tokens",
    "x-sessiongate-relevant-turns": "context_relevant_turns",
    "x-sessiongate-policy": "context_policy",
    "x-sessiongate-user-tokens": "context_user_tokens",
    "x-sessiongate-margin": "context_margin_permille",
}
# sessiongate's own API (extproc.user_context), answered by the rewrite filter.
API_PREFIX = "/sessiongate/"


def chat_paths(settings: Settings, api_path: str = CHAT_PATH) -> list[str]:
    """The API path, and one per `[context.routes]` prefix that does not already cover it
    (`/support` -> `/support/v1/chat/completions`: clients use `<listen>/support/v1`)."""
    from extproc.config import context_table

    paths = [api_path]
    for prefix in context_table(settings.context).get("routes", {}):
        if not api_path.startswith(prefix):
            paths.append(prefix.rstrip("/") + api_path)
    return paths


def routes(settings: Settings, upstream: Upstream) -> list[dict[str, Any]]:
    action = {
        "cluster": UPSTREAM_CLUSTER,
        "timeout": "0s",  # Envoy's 15 s default would cut long completions
        "host_rewrite_literal": upstream.authority,
    }
    # With the session header as the only source, a request without it never reaches
    # sessiongate. Cookie, body and fingerprint sources need every chat request: rewrite
    # passes those without a session through (a mode override after the headers, or the body
    # unchanged when only the body could have named one).
    header_only = tuple(settings.session_sources) == ("header",)
    chats = [
        _chat_route(settings, upstream, action, path, header_only, api_path)
        for api_path in (CHAT_PATH, MESSAGES_PATH)
        for path in chat_paths(settings, api_path)
    ]
    api = {
        # Answered by the rewrite filter (an immediate response); reached only when it is
        # down and fails open: then this 503, never the provider.
        "name": "sessiongate_api",
        "match": {"prefix": API_PREFIX},
        "direct_response": {
            "status": 503,
            "body": {"inline_string": "sessiongate is unavailable; try again"},
        },
        "typed_per_filter_config": {
            CAPTURE_FILTER: {"@type": f"{_EXT_PROC}.ExtProcPerRoute", "disabled": True}
        },
        "request_body_buffer_limit": settings.max_body_bytes,
    }
    other = {
        "name": "pass_through",
        "match": {"prefix": "/"},
        "route": {**action, "prefix_rewrite": upstream.path_prefix + "/"},
        "typed_per_filter_config": _disabled_filters(),
        "request_body_buffer_limit": settings.upstream_body_limit,
    }
    return [*chats, api, other]


def _chat_route(
    settings: Settings,
    upstream: Upstream,
    action: dict[str, Any],
    path: str,
    header_only: bool,
    api_path: str = CHAT_PATH,
) -> dict[str, Any]:
    """An LLM API route (OpenAI chat or Anthropic Messages) running both filters."""
    name = "chat_completions" if api_path == CHAT_PATH else "messages"
    if header_only:
        name += "_with_session"
    if path != api_path:
        name += ":" + path[: -len(api_path)]
    return {
        "name": name,
        "match": (
            {
                "path": path,
                "headers": [{"name": settings.session_header, "present_match": True}],
            }
            if header_only
            else {"path": path}
        ),
        "route": {**action, "prefix_rewrite": upstream.path_prefix + api_path},
        # Envoy buffers the body for the rewrite filter and holds the rewritten one in the same
        # buffer, so its limit is the rewritten maximum; sessiongate itself answers 413 above
        # max_body_bytes (Envoy's own 413 only covers HTTP/1.1 clients).
        "request_body_buffer_limit": settings.upstream_body_limit,
        # What context management did to this request, from rewrite's dynamic metadata; a
        # header whose value is missing (pass-through, no session) is left out.
        "response_headers_to_add": [
            {
                "header": {"key": name, "value": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                "keep_empty_value": False,
            }
            for name, key in CONTEXT_HEADERS.items()
        ],
    }


def local_reply_config(settings: Settings) -> dict[str, Any]:
    """Errors Envoy or sessiongate make themselves, in OpenAI's error shape."""

    def json_error(type_: str) -> dict[str, Any]:
        return {
            "json_format": {
                "error": {
                    "message": "%LOCAL_REPLY_BODY%",
                    "type": type_,
                    "code": "%RESPONSE_CODE_DETAILS%",
                }
            }
        }

    def status_at_least(code: int) -> dict[str, Any]:
        return {
            "status_code_filter": {
                "comparison": {
                    "op": "GE",
                    "value": {"default_value": code, "runtime_key": f"sessiongate.ge_{code}"},
                }
            }
        }

    too_large = {
        "filter": {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {"default_value": 413, "runtime_key": "sessiongate.eq_413"},
                }
            }
        },
        "body": {
            "inline_string": f"request body exceeds the gateway's buffer limit of "
            f"{settings.upstream_body_limit} bytes"
        },
        "body_format_override": json_error("invalid_request_error"),
    }
    ours = {
        # sessiongate's own immediate responses are already in the provider's shape.
        "filter": {
            "metadata_filter": {
                "matcher": {
                    "filter": METADATA_NAMESPACE,
                    "path": [{"key": "gateway_error"}],
                    "value": {"bool_match": True},
                },
                "match_if_key_not_found": False,
            }
        },
        "body_format_override": {
            "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        },
    }
    return {
        "mappers": [
            ours,
            too_large,
            {"filter": status_at_least(500), "body_format_override": json_error("server_error")},
            {
                "filter": status_at_least(400),
                "body_format_override": json_error("invalid_request_error"),
            },
        ]
    }


def http_connection_manager(
    settings: Settings, upstream: Upstream, affinity: bool = False
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{_HCM}.HttpConnectionManager",
            "stat_prefix": "llm",
            "codec_type": "AUTO",
            # Long SSE streams may pause between tokens (reasoning models think for minutes).
            "stream_idle_timeout": _duration(settings.stream_idle_timeout_s),
            "request_timeout": "0s",
            "common_http_protocol_options": {"idle_timeout": "3600s"},
            "local_reply_config": local_reply_config(settings),
            "route_config": {
                "name": "llm",
                "virtual_hosts": [
                    {"name": "llm", "domains": ["*"], "routes": routes(settings, upstream)}
                ],
            },
            "http_filters": [
                *filter(None, [jwt_authn_filter(settings)]),
                rewrite_filter(settings, affinity),
                capture_filter(affinity),
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": f"{_ROUTER}.Router"},
                },
            ],
        },
    }


def _socket_address(host: str, port: int) -> dict[str, Any]:
    """`host` `unix:/path` (extproc.sockets): a Unix socket, Envoy's `pipe` address."""
    path = unix_path(host)
    if path is not None:
        return {"pipe": {"path": path}}
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": _socket_address(host, port)}}


_HEALTH_CHECKS = [
    {
        "timeout": "1s",
        "interval": "1s",
        "no_traffic_interval": "1s",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "grpc_health_check": {},
    }
]


def ext_proc_cluster(
    grpc_endpoints: list[tuple[str, int]], health_checks: bool = True
) -> dict[str, Any]:
    """`health_checks=False` for `up`'s own worker processes: `up` stops when one dies, so the
    ring never changes and a session never moves to a worker whose hot copy of it is old (the
    embedded store has no Redis to tell workers apart writes)."""
    options: dict[str, Any] = {
        "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
        "explicit_http_config": {
            "http2_protocol_options": {"connection_keepalive": {"interval": "30s", "timeout": "5s"}}
        },
    }
    replicated = len(grpc_endpoints) > 1
    if replicated:
        options["hash_policy"] = [{"header": {"header_name": AFFINITY_HEADER}}]
    return {
        "name": EXT_PROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        **({"lb_policy": "RING_HASH"} if replicated else {}),
        # gRPC health checks: a replica that stops or drains (NOT_SERVING) leaves the ring
        # within about a second, instead of failing its sessions' requests.
        "health_checks": copy.deepcopy(_HEALTH_CHECKS) if health_checks else [],
        "typed_extension_protocol_options": {_HTTP_OPTIONS: options},
        # Every HTTP request opens up to two ext_proc streams; the default of 1,024 concurrent
        # requests per cluster would turn load into 500s.
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 100000,
                    "max_pending_requests": 100000,
                    "max_requests": 100000,
                }
            ]
        },
        "load_assignment": {
            "cluster_name": EXT_PROC_CLUSTER,
            "endpoints": [{"lb_endpoints": [_endpoint(h, p) for h, p in grpc_endpoints]}],
        },
    }


def upstream_cluster(upstream: Upstream, ca_file: Path | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": UPSTREAM_CLUSTER,
        "type": "STATIC" if upstream.is_ip else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": UPSTREAM_CLUSTER,
            "endpoints": [{"lb_endpoints": [_endpoint(upstream.host, upstream.port)]}],
        },
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000}
            ]
        },
    }
    if upstream.scheme == "https":
        san_type = "IP_ADDRESS" if upstream.is_ip else "DNS"
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{_TLS}.UpstreamTlsContext",
                "sni": upstream.host,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "validation_context": {
                        "trusted_ca": {"filename": str(ca_file or certifi.where())},
                        "match_typed_subject_alt_names": [
                            {"san_type": san_type, "matcher": {"exact": upstream.host}}
                        ],
                    },
                },
            },
        }
        cluster["typed_extension_protocol_options"] = {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
            }
        }
    return cluster


def downstream_tls(cert: Path, key: Path) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TLS}.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert)},
                        "private_key": {"filename": str(key)},
                    }
                ],
            },
        },
    }


def bootstrap(
    settings: Settings,
    grpc_endpoints: list[tuple[str, int]],
    tls_files: tuple[Path, Path] | None,
    *,
    health_checks: bool = True,
) -> dict[str, Any]:
    """The whole Envoy config. `tls_files` = (certificate chain, private key) or None."""
    upstream = Upstream.parse(settings.upstream)
    host, port = split_host_port(settings.listen, "listen")
    affinity = len(grpc_endpoints) > 1
    chain: dict[str, Any] = {"filters": [http_connection_manager(settings, upstream, affinity)]}
    if tls_files is not None:
        chain["transport_socket"] = downstream_tls(*tls_files)
    return {
        "node": {"id": "sessiongate", "cluster": "sessiongate"},
        # Admin is bound to loopback on a free port and never exposed.
        "admin": {"address": _socket_address("127.0.0.1", 0)},
        "static_resources": {
            "listeners": [
                {
                    "name": "llm",
                    "address": _socket_address(host, port),
                    "per_connection_buffer_limit_bytes": 1024 * 1024,
                    # Envoy's default SO_REUSEPORT would let a second gateway silently share
                    # (and split the traffic of) a port that is already taken.
                    "enable_reuse_port": False,
                    "filter_chains": [chain],
                }
            ],
            "clusters": [
                ext_proc_cluster(grpc_endpoints, health_checks),
                upstream_cluster(upstream, settings.upstream_ca_file),
            ],
        },
    }
