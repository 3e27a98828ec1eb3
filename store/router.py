"""Tenant isolation: a tenant pinned to its own store (its own Redis, its own database).

`StoreRouter` holds a default `SessionStore` and a mapping tenant -> `SessionStore`. Every
session-level call needs the tenant, so the gateway asks for the tenant's store first
(`router.for_tenant(identity.tenant).history(key)`); tenants not in the mapping (and the empty
tenant) share the default store, where the HMAC session keys, which include the tenant, keep
them apart. A pinned tenant's turns, documents and pending markers live only in its own store:
its session keys are never looked up anywhere else, so no other tenant's store can return them.

Turn-id routing. Capture completes a turn knowing only its turn id (the dynamic metadata rewrite
hands over). The router does not keep a turn id -> store map; the turn id says where it belongs:

    <32 hex>            a turn of the default store (what rewrite mints today)
    <32 hex>.<8 hex>    a turn of the pinned tenant whose tag is the 8 hex chars
                        (tag = first 32 bits of SHA-256 over a context string and the tenant name)

Rewrite mints it with `router.new_turn_id(tenant)`; `begin_turn` checks that the turn id names
the store the tenant is pinned to and refuses anything else (a turn id minted without the router
would otherwise be completed against the wrong store: a loud error beats silently lost turns).
Why not a map filled by `begin_turn`: it would be a second bounded, expiring copy of what the
store's pending registry already holds (same bound, same TTL, same removal on complete/abandon,
and its own ways to disagree with it), and it would be local to one process, while the tag
travels with the turn id: to another replica, into the stored record, into logs. The tag names
the tenant, not a position in the config, so replicas whose tenant lists are in a different
order still agree; a tag this process does not know (a tenant removed from the config while its
turn was in flight) goes to the default store, which counts it as an unknown turn like any
expired one. Tags are checked for collisions when the router is built.

`open_router(default_options, tenants)` builds every store with `open_store`. A tenant's options
are the default options overridden by its own (a tenant's `redis_url` or `redis_urls` replaces
the default warm tier as a whole); a tenant must not share a cold tier location (PostgreSQL
DSN + schema, or SQLite file) or a warm one (Redis server + prefix, for every node of a sharded
warm tier) with the default store or with another tenant: that is refused when the router is
built, so isolation never depends on remembering to change a prefix.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from store.model import Message, PendingTurn, Usage
from store.sharded import labelled, shard_name, sum_stats
from store.tiered import SessionStore

log = logging.getLogger(__name__)

_TAG_CONTEXT = b"sessiongate/tenant/v1:"
_TAG_LENGTH = 8
_SEPARATOR = "."


class TurnSink(Protocol):
    """The turn-id based calls of the capture filter: `SessionStore` and `StoreRouter`."""

    def pending(self, turn_id: str) -> PendingTurn | None: ...

    async def find_pending(self, turn_id: str) -> PendingTurn | None:
        """`pending`, or a turn another replica began, adopted from Redis (see SessionStore)."""
        ...

    def mark_responding(self, turn_id: str) -> None: ...

    def complete_turn(
        self,
        turn_id: str,
        response_message: Message,
        finish_reason: str | None,
        usage: Usage | None = None,
        token_counts: dict[str, int] | None = None,
        facts: dict[str, list[list[str]]] | None = None,
    ) -> bool: ...

    def abandon_turn(self, turn_id: str) -> None: ...


def tenant_tag(tenant: str) -> str:
    """The tenant's 8-hex-char tag in turn ids (no tenant name in ids, records or logs)."""
    return hashlib.sha256(_TAG_CONTEXT + tenant.encode()).hexdigest()[:_TAG_LENGTH]


class StoreRouter:
    """The default store, and the stores of pinned tenants. Owns them all (`close`)."""

    def __init__(
        self, default: SessionStore, tenants: Mapping[str, SessionStore] | None = None
    ) -> None:
        self.default = default
        self._tenants = dict(tenants or {})
        if "" in self._tenants:
            raise ValueError("the empty tenant is the default store's; it cannot be pinned")
        self._by_tag: dict[str, SessionStore] = {}
        tags: dict[str, str] = {}
        for tenant, store in self._tenants.items():
            tag = tenant_tag(tenant)
            if tag in tags:
                raise ValueError(
                    f"tenants {tags[tag]!r} and {tenant!r} have the same turn-id tag; "
                    "rename one of them"
                )
            tags[tag] = tenant
            self._by_tag[tag] = store
        self._tags = {tenant: tag for tag, tenant in tags.items()}
        self._unrouted = 0

    # --- session level: the tenant's store ------------------------------------------------

    @property
    def tenants(self) -> tuple[str, ...]:
        """The pinned tenants."""
        return tuple(self._tenants)

    def is_pinned(self, tenant: str) -> bool:
        return tenant in self._tenants

    def for_tenant(self, tenant: str) -> SessionStore:
        """The tenant's store: its own when pinned, else the default one."""
        return self._tenants.get(tenant, self.default)

    # --- turn-id level ----------------------------------------------------------------------

    def new_turn_id(self, tenant: str) -> str:
        """A fresh turn id that routes back to `for_tenant(tenant)`."""
        tag = self._tags.get(tenant)
        base = uuid.uuid4().hex
        return base if tag is None else f"{base}{_SEPARATOR}{tag}"

    def store_for_turn(self, turn_id: str) -> SessionStore:
        """The store a turn id belongs to (the default one for an untagged or unknown id)."""
        _, separator, tag = turn_id.rpartition(_SEPARATOR)
        if not separator:
            return self.default
        store = self._by_tag.get(tag)
        if store is None:
            self._unrouted += 1
            return self.default
        return store

    def begin_turn(self, pending: PendingTurn) -> None:
        """Register the pending turn in its tenant's store. `ValueError` when its turn id was
        not minted by `new_turn_id(pending.tenant)`: capture could not find it again."""
        store = self.for_tenant(pending.tenant)
        if self.store_for_turn(pending.turn_id) is not store:
            raise ValueError("turn id does not route to its tenant's store (use new_turn_id)")
        store.begin_turn(pending)

    def pending(self, turn_id: str) -> PendingTurn | None:
        return self.store_for_turn(turn_id).pending(turn_id)

    async def find_pending(self, turn_id: str) -> PendingTurn | None:
        return await self.store_for_turn(turn_id).find_pending(turn_id)

    def mark_responding(self, turn_id: str) -> None:
        self.store_for_turn(turn_id).mark_responding(turn_id)

    def complete_turn(
        self,
        turn_id: str,
        response_message: Message,
        finish_reason: str | None,
        usage: Usage | None = None,
        token_counts: dict[str, int] | None = None,
        facts: dict[str, list[list[str]]] | None = None,
    ) -> bool:
        return self.store_for_turn(turn_id).complete_turn(
            turn_id, response_message, finish_reason, usage, token_counts, facts
        )

    def abandon_turn(self, turn_id: str) -> None:
        self.store_for_turn(turn_id).abandon_turn(turn_id)

    # --- every store ---------------------------------------------------------------------

    def _stores(self) -> list[SessionStore]:
        """Every distinct store, the default first (a store may serve several tenants)."""
        stores: dict[int, SessionStore] = {id(self.default): self.default}
        for store in self._tenants.values():
            stores.setdefault(id(store), store)
        return list(stores.values())

    async def start(self) -> None:
        for store in self._stores():
            await store.start()

    async def flush(self, timeout_s: float | None = None) -> None:
        await asyncio.gather(*(store.flush(timeout_s) for store in self._stores()))

    async def close(self) -> None:
        """Close every store, even when one fails; then raise the first failure."""
        first: Exception | None = None
        for store in self._stores():
            try:
                await store.close()
            except Exception as exc:  # keep closing the others
                log.warning("closing a session store failed: %s", exc)
                if first is None:
                    first = exc
        if first is not None:
            raise first

    @property
    def stats(self) -> dict[str, int]:
        """Totals over every store (with only a default store: exactly its stats), then
        `tenant.<name>.<counter>` per pinned tenant, and the router's own counters."""
        stats = sum_stats(store.stats for store in self._stores())
        for tenant, store in self._tenants.items():
            stats.update(labelled(f"tenant.{tenant}", store.stats))
        stats["router_tenants"] = len(self._tenants)
        stats["router_unrouted_turns"] = self._unrouted
        return stats


# --- building from options --------------------------------------------------------------


async def open_router(
    default_options: Mapping[str, Any], tenants: Mapping[str, Mapping[str, Any]]
) -> StoreRouter:
    """Build every store with `open_store(**options)`: the default one from `default_options`,
    each pinned tenant's from `{**default_options, **its options}`. `ValueError` (before
    anything is opened) for an unknown option or two stores sharing a tier location."""
    from store import open_store  # store/__init__ imports this module

    if "" in tenants:
        raise ValueError("the empty tenant is the default store's; it cannot be pinned")
    parameters = inspect.signature(open_store).parameters
    defaults = {n: p.default for n, p in parameters.items() if p.default is not p.empty}
    defaults.setdefault("sqlite_path", None)
    resolved: dict[str, dict[str, Any]] = {}
    owners: dict[str, str] = {}
    for tenant, options in {"": default_options, **tenants}.items():
        label = f"tenant {tenant!r}" if tenant else "the default store"
        unknown = set(options) - set(parameters)
        if unknown:
            raise ValueError(f"{label}: unknown store option(s) {', '.join(sorted(unknown))}")
        merged = {**defaults, **_with_own_warm_tier(default_options, options)}
        if merged.get("redis_url") and merged.get("redis_urls"):
            raise ValueError(f"{label}: redis_url and redis_urls are exclusive")
        # A node listed twice in one store's redis_urls is not sharing with another store
        # (ShardedRedis refuses it with its own message).
        for location in dict.fromkeys(_locations(merged)):
            if location in owners:
                raise ValueError(
                    f"{label} shares {location.split(':', 1)[0]} storage with {owners[location]}:"
                    " give it its own (redis_url, redis_urls or redis_prefix; postgres_dsn or"
                    " postgres_schema; sqlite_path)"
                )
            owners[location] = label
        resolved[tenant] = merged
    stores: dict[str, SessionStore] = {}
    try:
        for tenant, options in resolved.items():
            stores[tenant] = await open_store(**options)
    except BaseException:
        for store in stores.values():
            try:
                await store.close()
            except Exception as exc:  # the original failure is the one to raise
                log.warning("closing a session store after a failed open: %s", exc)
        raise
    default = stores.pop("")
    return StoreRouter(default, stores)


_WARM_TIER = ("redis_url", "redis_urls")


def _with_own_warm_tier(
    default_options: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """A tenant's options over the defaults. A tenant naming its own Redis (one node or
    several) replaces the default warm tier as a whole rather than adding to it: `redis_url`
    under a default `redis_urls` means "this one server", not "this one too"."""
    merged = {**default_options, **options}
    if any(name in options for name in _WARM_TIER):
        for name in _WARM_TIER:
            merged[name] = options.get(name, None if name == "redis_url" else ())
    return merged


def _locations(options: Mapping[str, Any]) -> list[str]:
    """Where a store's shared tiers live, credentials left out (memory is per store)."""
    locations = []
    if options.get("postgres_dsn"):
        dsn = _without_password(str(options["postgres_dsn"]))
        locations.append(f"postgres:{dsn}#{options.get('postgres_schema')}")
    elif options.get("sqlite_path") is not None:
        locations.append(f"sqlite:{os.path.abspath(options['sqlite_path'])}")
    # Every node of a sharded warm tier counts: a node shared with another store under the
    # same prefix is shared storage, whichever sessions the hashing happens to put there.
    urls = [options.get("redis_url"), *(options.get("redis_urls") or ())]
    for url in filter(None, urls):
        locations.append(f"redis:{shard_name(str(url))}#{options['redis_prefix']}")
    return locations


def _without_password(dsn: str) -> str:
    """A URL DSN without its userinfo password (rotating it must not make a store "new")."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return dsn
    userinfo, at, hostpart = rest.partition("@")
    if not at or "/" in userinfo:
        return dsn
    return f"{scheme}://{userinfo.partition(':')[0]}@{hostpart}"


__all__ = ["StoreRouter", "TurnSink", "open_router", "tenant_tag"]
