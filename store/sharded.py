"""Sessions spread over several independent Redis nodes by rendezvous hashing.

`ShardedRedis` has the warm-tier interface `SessionStore` uses (`WarmBackend`, below, which
`RedisBackend` satisfies as well) and sends every per-session call to one of N `RedisBackend`s.
Redis Cluster needs none of this (`redis+cluster://` URLs are handled inside RedisBackend);
this is for nodes that know nothing of each other: several standalone servers, sentinel-managed
masters, or even several clusters.

Placement: rendezvous (highest-random-weight) hashing. Every shard has a name; a session goes to
the shard whose `blake2b(tag, key=sha256(name))` is highest, where `tag` is the session's Redis
hash tag (`store.redis.hash_tag`: the first 128 bits of the HMAC session key). So:

* the placement depends only on the set of names, not on their order or on the URLs'
  credentials and TLS options (a default name is the URL without userinfo and query);
* adding a shard moves only the sessions the new shard now wins, ~1/N of them, all onto the new
  shard; removing one moves only its own sessions, spread over the others;
* placement is by hash tag, which every Redis key of the session carries, so a node's keys can
  be mapped back to their owner: `sweep_misplaced` drops the copies a node keeps of sessions it
  no longer owns (see "Rebalancing").

Failure isolation: every shard has its own connection pool and circuit breaker, so a dead node
fails only its own sessions (`StoreUnavailable`, on which `SessionStore` degrades to hot + cold
for them) while the others keep working.

Rebalancing: a session that moved is simply absent on its new shard: the next read is a warm
miss refilled from the cold tier (the source of truth), and the next write gets its seq floor
from the cold tier (`NeedsFloor`). Nothing is lost. What is left behind is the old copy on the
old shard. It is never read while the new placement holds and expires after the Redis TTL; but
were the placement to change back within that TTL (a node added then removed again), the old
copy would come back to life stale. Call `sweep_misplaced()` once every replica runs the new
shard list (it is idempotent, and skips a shard it cannot reach), or wait one `ttl_s` before
reverting.

Invalidations: one subscription per shard, all calling the same callback; `on_reconnect` runs
whenever any shard's subscription (re)connects, which makes the caller flush its whole hot
tier (the callback takes no argument, so it cannot say which sessions that shard held):
correct, and rare.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from redis.exceptions import RedisClusterException, RedisError

from store.base import StoreUnavailable
from store.model import Turn
from store.redis import AppendResult, RedisBackend, Subscription, WarmSnapshot, hash_tag

log = logging.getLogger(__name__)

# Domain-separates shard seeds from every other hash of a name.
_SEED_CONTEXT = b"sessiongate/shard/v1:"
_TAG_LENGTH = 32
_HEX = frozenset("0123456789abcdef")
# What a failing server or network raises (as in store.redis).
_FAILURES = (RedisError, RedisClusterException, OSError)


# --- the warm-tier protocol -------------------------------------------------------------


class InvalidationSubscription(Protocol):
    """What `subscribe_invalidations` returns: something that stops the subscription."""

    async def close(self) -> None: ...


class WarmBackend(Protocol):
    """The warm-tier interface `SessionStore` uses: `RedisBackend` and `ShardedRedis`.

    The semantics are `RedisBackend`'s (see `store.redis`); a sharded backend gives them per
    session, which is all the store relies on (nothing spans sessions).
    """

    async def append_next(
        self, session_key: str, turn: Turn, floor_seq: int | None = None
    ) -> AppendResult: ...

    async def snapshot(self, session_key: str) -> WarmSnapshot | None: ...

    async def version(self, session_key: str) -> int | None: ...

    async def fill(self, session_key: str, turns: Sequence[Turn]) -> int | None: ...

    async def evict(self, session_key: str) -> None: ...

    async def add_pending(
        self, session_key: str, turn_id: str, ttl_s: float, payload: bytes | None = None
    ) -> None: ...

    async def remove_pending(self, session_key: str, turn_id: str) -> None: ...

    async def get_pending_payload(self, turn_id: str) -> bytes | None: ...

    async def claim_pending_payload(self, turn_id: str) -> bool: ...

    async def pending_count(self, session_key: str) -> int: ...

    async def pending_and_version(
        self, session_key: str, exclude: Sequence[str] = ()
    ) -> tuple[int, int | None]: ...

    async def pending_settled(self, session_key: str, turn_ids: Sequence[str]) -> list[bool]: ...

    async def append(self, session_key: str, turn: Turn) -> bool: ...

    async def load(self, session_key: str) -> list[Turn]: ...

    async def delete(self, session_key: str) -> None: ...

    async def truncate_after(self, session_key: str, seq: int) -> int: ...

    async def put_doc(self, session_key: str, name: str, data: bytes) -> None: ...

    async def get_doc(self, session_key: str, name: str) -> bytes | None: ...

    async def put_docs(self, session_key: str, docs: Mapping[str, bytes]) -> None: ...

    async def get_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes | None]: ...

    async def flush(self, timeout_s: float | None = None) -> None: ...

    async def close(self) -> None: ...

    @property
    def stats(self) -> dict[str, int]: ...

    async def subscribe_invalidations(
        self,
        callback: Callable[[str], None],
        on_reconnect: Callable[[], None] | None = None,
        *,
        backoff_max_s: float = ...,
        keepalive_s: float = ...,
    ) -> InvalidationSubscription: ...


# --- stats ------------------------------------------------------------------------------


def sum_stats(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Counters of several backends as one: summed, except the `*breaker_state` gauges, which
    take the worst state."""
    totals: dict[str, int] = {}
    for counters in parts:
        for counter, value in counters.items():
            if counter.endswith("breaker_state"):
                totals[counter] = max(totals.get(counter, 0), value)
            else:
                totals[counter] = totals.get(counter, 0) + value
    return totals


def labelled(label: str, counters: Mapping[str, int]) -> dict[str, int]:
    """`counters` renamed `<label>.<counter>` (e.g. `shard.eu1.calls`)."""
    return {f"{label}.{counter}": value for counter, value in counters.items()}


# --- placement --------------------------------------------------------------------------


def shard_name(url: str) -> str:
    """The default name of a shard: its URL without credentials or query options (only `db`,
    which selects data, is kept). Rotating a password or a CA file moves no session."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("redis URL needs a scheme (redis://, rediss://, unix://, ...)")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    netloc = netloc.rpartition("@")[2]
    name = f"{scheme.lower()}://{netloc}{slash}{path}"
    db = dict(parse_qsl(query)).get("db")
    return f"{name}?db={db}" if db else name


class Rendezvous:
    """Highest-random-weight placement over a fixed set of names, with a bounded cache of
    recent placements (a turn makes several calls for one session; hashing costs ~1 us per
    shard, a cache hit ~0.1 us)."""

    def __init__(self, names: Sequence[str], cache_size: int = 65_536) -> None:
        if not names:
            raise ValueError("rendezvous hashing needs at least one name")
        if len(set(names)) != len(names):
            raise ValueError("shard names must be unique")
        self.names = tuple(names)
        self._hashers = tuple(
            hashlib.blake2b(digest_size=8, key=hashlib.sha256(_SEED_CONTEXT + n.encode()).digest())
            for n in names
        )
        self._cache: dict[str, int] = {}
        self._cache_size = cache_size

    def index_of_tag(self, tag: str) -> int:
        """The winning name's index for a session hash tag (uncached)."""
        if len(self.names) == 1:
            return 0
        data = tag.encode()
        best_index, best_score = 0, b""
        for index, hasher in enumerate(self._hashers):
            scorer = hasher.copy()
            scorer.update(data)
            score = scorer.digest()
            # A tie (2**-64) goes to the smaller name, so every replica agrees.
            if score > best_score or (
                score == best_score and self.names[index] < self.names[best_index]
            ):
                best_index, best_score = index, score
        return best_index

    def index_of(self, session_key: str) -> int:
        index = self._cache.get(session_key)
        if index is None:
            index = self.index_of_tag(hash_tag(session_key))
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest entry
            self._cache[session_key] = index
        return index

    def name_of(self, session_key: str) -> str:
        return self.names[self.index_of(session_key)]


# --- the sharded backend ----------------------------------------------------------------


class ShardedSubscription:
    """One invalidation subscription per shard; `close` stops them all."""

    def __init__(self, subscriptions: Mapping[str, Subscription]) -> None:
        self.subscriptions = dict(subscriptions)

    @property
    def connected(self) -> bool:
        """Every shard's subscription is confirmed (now)."""
        return all(s.connected.is_set() for s in self.subscriptions.values())

    @property
    def connects(self) -> int:
        return sum(s.connects for s in self.subscriptions.values())

    @property
    def received(self) -> int:
        return sum(s.received for s in self.subscriptions.values())

    async def close(self) -> None:
        await _close_all(s.close for s in self.subscriptions.values())


class ShardedRedis:
    """The warm tier over independent Redis nodes (see the module docstring).

    `shards` maps a name (the placement identity: keep it when a node changes address) to its
    backend. The backends should share a prefix and TTL; they may differ in URL, credentials,
    TLS and timeouts.
    """

    def __init__(self, shards: Mapping[str, RedisBackend]) -> None:
        self._shards = dict(shards)
        self._names = list(self._shards)
        self._ring = Rendezvous(self._names)
        self._backends = [self._shards[name] for name in self._names]
        self.call_bound_s = max(backend.call_bound_s for backend in self._backends)

    @classmethod
    def from_urls(cls, urls: Sequence[str] | Mapping[str, str], **opts: Any) -> ShardedRedis:
        """A `RedisBackend.from_url(url, **opts)` per URL. A sequence names each shard by
        `shard_name(url)`; a mapping names them explicitly (name -> URL)."""
        named = dict(urls) if isinstance(urls, Mapping) else {shard_name(u): u for u in urls}
        if not isinstance(urls, Mapping) and len(named) != len(urls):
            raise ValueError("two redis URLs name the same shard (give names with a mapping)")
        if not named:
            raise ValueError("ShardedRedis needs at least one redis URL")
        backends: dict[str, RedisBackend] = {}
        for name, url in named.items():
            backends[name] = RedisBackend.from_url(url, **opts)
        return cls(backends)

    # --- placement -------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return self._ring.names

    @property
    def shards(self) -> Mapping[str, RedisBackend]:
        return self._shards

    def shard_name(self, session_key: str) -> str:
        return self._ring.name_of(session_key)

    def shard_for(self, session_key: str) -> RedisBackend:
        return self._backends[self._ring.index_of(session_key)]

    # --- warm-tier API: one shard per call ----------------------------------------------------

    async def append_next(
        self, session_key: str, turn: Turn, floor_seq: int | None = None
    ) -> AppendResult:
        return await self.shard_for(session_key).append_next(session_key, turn, floor_seq)

    async def snapshot(self, session_key: str) -> WarmSnapshot | None:
        return await self.shard_for(session_key).snapshot(session_key)

    async def version(self, session_key: str) -> int | None:
        return await self.shard_for(session_key).version(session_key)

    async def fill(self, session_key: str, turns: Sequence[Turn]) -> int | None:
        return await self.shard_for(session_key).fill(session_key, turns)

    async def evict(self, session_key: str) -> None:
        await self.shard_for(session_key).evict(session_key)

    # A pending turn's marker lives on its session's shard; its payload on its turn id's shard
    # (a capture knows only the turn id). When they differ, both are written concurrently.

    def shard_for_turn(self, turn_id: str) -> RedisBackend:
        # Uncached: turn ids are single-use and would only push sessions out of the cache.
        return self._backends[self._ring.index_of_tag(hash_tag(turn_id))]

    async def add_pending(
        self, session_key: str, turn_id: str, ttl_s: float, payload: bytes | None = None
    ) -> None:
        marker, holder = self.shard_for(session_key), self.shard_for_turn(turn_id)
        if payload is None or holder is marker:
            await marker.add_pending(session_key, turn_id, ttl_s, payload)
            return
        await _all(
            marker.add_pending(session_key, turn_id, ttl_s),
            holder.put_pending_payload(turn_id, payload, ttl_s),
        )

    async def remove_pending(self, session_key: str, turn_id: str) -> None:
        marker, holder = self.shard_for(session_key), self.shard_for_turn(turn_id)
        if holder is marker:
            await marker.remove_pending(session_key, turn_id)
            return
        await _all(
            marker.remove_pending(session_key, turn_id), holder.claim_pending_payload(turn_id)
        )

    async def get_pending_payload(self, turn_id: str) -> bytes | None:
        return await self.shard_for_turn(turn_id).get_pending_payload(turn_id)

    async def claim_pending_payload(self, turn_id: str) -> bool:
        return await self.shard_for_turn(turn_id).claim_pending_payload(turn_id)

    async def pending_count(self, session_key: str) -> int:
        return await self.shard_for(session_key).pending_count(session_key)

    async def pending_and_version(
        self, session_key: str, exclude: Sequence[str] = ()
    ) -> tuple[int, int | None]:
        return await self.shard_for(session_key).pending_and_version(session_key, exclude)

    async def pending_settled(self, session_key: str, turn_ids: Sequence[str]) -> list[bool]:
        return await self.shard_for(session_key).pending_settled(session_key, turn_ids)

    async def append(self, session_key: str, turn: Turn) -> bool:
        return await self.shard_for(session_key).append(session_key, turn)

    async def load(self, session_key: str) -> list[Turn]:
        return await self.shard_for(session_key).load(session_key)

    async def delete(self, session_key: str) -> None:
        await self.shard_for(session_key).delete(session_key)

    async def truncate_after(self, session_key: str, seq: int) -> int:
        return await self.shard_for(session_key).truncate_after(session_key, seq)

    async def put_doc(self, session_key: str, name: str, data: bytes) -> None:
        await self.shard_for(session_key).put_doc(session_key, name, data)

    async def get_doc(self, session_key: str, name: str) -> bytes | None:
        return await self.shard_for(session_key).get_doc(session_key, name)

    async def put_docs(self, session_key: str, docs: Mapping[str, bytes]) -> None:
        await self.shard_for(session_key).put_docs(session_key, docs)

    async def get_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        return await self.shard_for(session_key).get_docs(session_key, names)

    # --- every shard ---------------------------------------------------------------------

    async def flush(self, timeout_s: float | None = None) -> None:
        await asyncio.gather(*(backend.flush() for backend in self._backends))

    async def close(self) -> None:
        """Close every shard (and its subscriptions), even when one fails; then raise."""
        await _close_all(backend.close for backend in self._backends)

    @property
    def stats(self) -> dict[str, int]:
        """Totals (as one RedisBackend would report them), `shard.<name>.<counter>` per shard,
        and `shards` (how many)."""
        per_shard = {name: backend.stats for name, backend in self._shards.items()}
        stats = sum_stats(per_shard.values())
        for name, counters in per_shard.items():
            stats.update(labelled(f"shard.{name}", counters))
        stats["shards"] = len(self._backends)
        return stats

    async def subscribe_invalidations(
        self,
        callback: Callable[[str], None],
        on_reconnect: Callable[[], None] | None = None,
        *,
        backoff_max_s: float = 2.0,
        keepalive_s: float = 5.0,
    ) -> ShardedSubscription:
        """Subscribe on every shard with the same callbacks (see the module docstring)."""
        subscriptions: dict[str, Subscription] = {}
        try:
            for name, backend in self._shards.items():
                subscriptions[name] = await backend.subscribe_invalidations(
                    callback, on_reconnect, backoff_max_s=backoff_max_s, keepalive_s=keepalive_s
                )
        except BaseException:
            await _close_all(s.close for s in subscriptions.values())
            raise
        return ShardedSubscription(subscriptions)

    # --- rebalancing ---------------------------------------------------------------------

    async def sweep_misplaced(self, batch: int = 500) -> dict[str, int]:
        """Drop, on every shard, the sessions (turns, documents, tombstones, pending markers)
        whose owner under the current shard list is another shard. Returns how many sessions
        per shard (-1: the shard could not be reached; run it again). Run it once every replica
        uses this shard list: a replica still on the old list only refills what it misses from
        the cold tier. Without it, a copy left behind comes back stale if the placement returns
        to its old shard within the Redis TTL (the tests show it)."""
        swept: dict[str, int] = {}
        for index, (name, backend) in enumerate(zip(self._names, self._backends, strict=True)):
            try:
                swept[name] = await self._sweep_shard(index, backend, batch)
            except StoreUnavailable as exc:
                log.warning("sweep of shard %s failed: %s", name, exc)
                swept[name] = -1
        return swept

    async def _sweep_shard(self, index: int, backend: RedisBackend, batch: int) -> int:
        """Every key `<prefix>:{<tag>}:<anything>` of a tag this shard does not own (turns,
        documents, meta or tombstone, pending markers: whatever the layout holds)."""
        head = len(backend.prefix) + 2  # "<prefix>:{"
        pattern = _glob_escape(backend.prefix) + ":{*}:*"
        tags: set[str] = set()
        try:
            doomed: list[bytes | str] = []
            async for key in backend.client.scan_iter(match=pattern, count=batch):
                text = key.decode() if isinstance(key, bytes) else str(key)
                tag = text[head : head + _TAG_LENGTH]
                if text[head + _TAG_LENGTH : head + _TAG_LENGTH + 2] != "}:":
                    continue  # not one of a session's keys
                if len(tag) != _TAG_LENGTH or not set(tag) <= _HEX:
                    continue
                if self._ring.index_of_tag(tag) != index:
                    tags.add(tag)
                    doomed.append(key)
            for start in range(0, len(doomed), batch):
                await backend.client.delete(*doomed[start : start + batch])
        except _FAILURES as exc:
            raise StoreUnavailable(f"redis sweep failed: {type(exc).__name__}: {exc}") from exc
        return len(tags)


# --- helpers ----------------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


async def _all(*calls: Awaitable[object]) -> None:
    """Run the calls concurrently; every one finishes before the first failure is raised
    (gather would return at the first error and leave the others running unobserved)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _close_all(closers: Iterable[Callable[[], Awaitable[None]]]) -> None:
    """Run every closer even when some fail; raise the first failure afterwards."""
    first: Exception | None = None
    for close in closers:
        try:
            await close()
        except Exception as exc:  # keep closing the others
            log.warning("close failed: %s", type(exc).__name__)
            if first is None:
                first = exc
    if first is not None:
        raise first


if TYPE_CHECKING:  # mypy checks that both backends satisfy the protocol SessionStore needs

    def _conforms(redis: RedisBackend, sharded: ShardedRedis) -> list[WarmBackend]:
        return [redis, sharded]


__all__ = [
    "InvalidationSubscription",
    "Rendezvous",
    "ShardedRedis",
    "ShardedSubscription",
    "WarmBackend",
    "labelled",
    "shard_name",
    "sum_stats",
]
