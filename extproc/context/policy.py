"""Context policies: the global context settings overridden per route and per tenant.

`[context.routes."<path prefix>"]` and `[tenants.<name>.context]` (config.py parses and
validates them at start) override any subset of `OVERRIDABLE` and `client_mode`. A request
gets, in increasing precedence: the global settings, then its route's (the longest configured
prefix of its `:path`, query string ignored), then its tenant's, then its own request headers
(`x-sessiongate-strategy`, the client mode header). Why tenant above route: a route describes
an application (what a support bot needs), a tenant a customer's contract (its limits, its
opt-outs, e.g. `facts_share = 0` for a tenant that forbids key-fact extraction), and a contract
must hold on every route; the request header still wins because it only picks among strategies
the operator offers, per request.

Resolution is cheap: the merged `Policy` is built once per (configured tenant, configured
route) pair and memoised, so a request costs a scan of the route prefixes and a dict lookup;
tenants and paths that match no override share the global policy (the memo stays bounded by the
config, whatever tenants and paths clients send).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc.context.manager import ContextSettings

# Override keys: ContextSettings fields a route or tenant may set (config name without the
# `context_` prefix). Not overridable: `models` and `image_tokens` (token counts are cached per
# turn keyed by the image estimate, shared by every policy) and the summarizer's endpoint
# (one background summarizer per process).
OVERRIDABLE = (
    "enabled",
    "default_window",
    "output_tokens",
    "reasoning_output_tokens",
    "step",
    "max_messages",
    "facts_share",
    "strategy",
    "relevance_share",
    "summary_share",
    "user_share",
)
CLIENT_MODE = "client_mode"
OVERRIDE_KEYS = frozenset((*OVERRIDABLE, CLIENT_MODE))
GLOBAL = "global"


@dataclass(frozen=True, slots=True)
class Policy:
    name: str  # reported as `context_policy`: global | route:/p | tenant:t | tenant:t,route:/p
    context: ContextSettings
    client_mode: str


def _merged(base: Policy, name: str, overrides: Mapping[str, Any]) -> Policy:
    fields = {k: v for k, v in overrides.items() if k != CLIENT_MODE}
    return Policy(
        name,
        dataclasses.replace(base.context, **fields) if fields else base.context,
        str(overrides.get(CLIENT_MODE, base.client_mode)),
    )


def route_of(path: str, prefixes: tuple[str, ...]) -> str:
    """The longest of `prefixes` (sorted longest first) that starts `path`; "" for none."""
    path = path.partition("?")[0]
    for prefix in prefixes:
        if path.startswith(prefix):
            return prefix
    return ""


class Policies:
    """Shared per process; `resolve` is the per-request call."""

    def __init__(
        self,
        context: ContextSettings,
        client_mode: str,
        routes: Mapping[str, Mapping[str, Any]] | None = None,
        tenants: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.default = Policy(GLOBAL, context, client_mode)
        self._routes = {p: dict(o) for p, o in (routes or {}).items()}
        self._tenants = {t: dict(o) for t, o in (tenants or {}).items()}
        self._prefixes = tuple(sorted(self._routes, key=len, reverse=True))
        self._memo: dict[tuple[str, str], Policy] = {("", ""): self.default}

    def resolve(self, tenant: str, path: str) -> Policy:
        route = route_of(path, self._prefixes) if self._prefixes else ""
        key = (tenant if tenant in self._tenants else "", route)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._build(*key)
        return found

    def _build(self, tenant: str, route: str) -> Policy:
        policy = self.default
        names: list[str] = []
        if tenant:
            names.append(f"tenant:{tenant}")
        if route:
            names.append(f"route:{route}")
            policy = _merged(policy, ",".join(names[-1:]), self._routes[route])
        if tenant:  # above the route: see the module docstring
            policy = _merged(policy, ",".join(names), self._tenants[tenant])
        return policy

    def all(self) -> list[Policy]:
        """Every policy a request can get (for settings that must hold for all of them)."""
        return [self.resolve(t, r) for t in ("", *self._tenants) for r in ("", *self._routes)]
