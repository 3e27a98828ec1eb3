"""The Redis warm tier: sessions shared by every replica, with a version and invalidations.

URLs accepted by `RedisBackend.from_url`:

    redis://[user:pass@]host:port/db
    rediss://[user:pass@]host:port/db[?ssl_ca_certs=/ca.pem]   TLS, certificate verified
    unix://[user:pass@]/path/redis.sock[?db=N]
    redis+sentinel://[user:pass@]host1:port1,host2:port2/<master-name>/<db>
        [?sentinel_password=...]   user:pass authenticate to the master, not the sentinels
    redis+cluster://[user:pass@]host:port[,host:port...]       (rediss+cluster:// with TLS)

Credentials: `user:pass@`, `:pass@`, or a bare `pass@` (the password, as in the sentinel form).
TLS query options: ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_check_hostname (default true),
ssl_cert_reqs (default "required"; "none" turns verification off and must be asked for).
Unknown query options are refused, so a misspelt option cannot silently weaken TLS.

Bounded calls (DESIGN, "Measured facts": redis-py's default retries once blocked a call 3.1 s):
every connection has explicit socket and connect timeouts, retries are bounded
(`Retry(ExponentialBackoff(cap=0.05), retries)`), and a circuit breaker fails calls at once
while Redis is known to be down. `asyncio.timeout` is not the bound: a cancelled command drops
its connection, so under load it would turn slowness into reconnect storms.

Layout: one session's keys share the hash tag `{first 32 hex chars of the session key}` (the
key is an HMAC-SHA256 hex digest; any other key is hashed first), so every script touches a
single slot and runs unchanged on a cluster. Scripts and the exact layout are in `store.redis_lua`.
A turn is stored in a sorted set scored by its seq: the codec cannot run in Lua (and may
encrypt), so the record is encoded in Python and the seq lives beside it as the score. A sorted
set rather than a list because callers of `append` may hand turns out of order (refill, the
conformance suite): the score keeps them ordered without a read-modify-write, trimming is
ZREMRANGEBYRANK and rewinding is ZREMRANGEBYSCORE.

Versions and invalidation: every change to a session's turns bumps `ver` and publishes the
session key on `<prefix>:inv`. Lua cannot SPUBLISH to a channel outside the script's slot, so
on a cluster the script does not publish; the backend then SPUBLISHes to one of
`INVALIDATION_SHARDS` shard channels after the script has committed. Pub/sub can lose
messages either way: readers compare versions, and subscribers flush on every (re)connect.

A session created again (expired, evicted, deleted) starts from a version taken from the
server clock in microseconds, never from 1: a replica still caching an older incarnation's
version can never see that number again. Documents do not bump the version (it versions
the turns, which is what hot tiers cache); they share the session's TTL. The TTL slides on
every write, not on reads (a read writes nothing: HMGET + ZRANGE in one MULTI/EXEC, or a
read-only script on a cluster).

Deletion leaves a tombstone (meta with `deleted`, a newer `ver`, one TTL long), so a stale
reader's late `fill` cannot resurrect the session. After a delete the session starts again
at seq 1, as the cold tiers do after theirs (no floor is needed: the tombstone says "empty").

Pending turns: `<prefix>:{tag}:pending` (a sorted set of turn ids scored by expiry) holds the
session's turns awaiting their reply, from every replica; readers wait for it to empty. The
PendingTurn itself (a versioned orjson record, see `store.pending.encode_pending`) is stored
at `<prefix>:{<hash_tag(turn id)>}:pturn`, so that a replica that receives a reply's capture
knowing only the turn id can find it; it lives in the turn id's slot, not the session's (on a
single server both are written in one MULTI; on a cluster the two may sit on two nodes and are
written by one pipeline, not atomically: a marker without its payload drops the turn, counted,
as a capture of an unknown turn always did; a payload without its marker is only memory until
its TTL). A replica completing a turn it did not begin claims it by deleting the payload
(`claim_pending_payload`: exactly one claimer gets True).

Retries are safe because every write is idempotent: a command that timed out may still have
run, and its retry then finds the turn id (`Duplicate(seq)`: the turn is stored). Needs
Redis >= 7.0 (sharded pub/sub).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import redis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from store import redis_lua
from store.base import StoreError, StoreUnavailable
from store.breaker import CircuitBreaker
from store.codec import DEFAULT_CODEC, Codec
from store.model import Turn

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Client = Redis | RedisCluster
# What a failing server, network or cluster raises (RedisClusterException, e.g. a slot no
# master covers, is not a RedisError).
_FAILURES = (RedisError, RedisClusterException, OSError)

# Shard channels a cluster's invalidations are spread over. Every replica must agree on it:
# changing it is a protocol change (publishers and subscribers of two releases would miss
# each other), hence a constant and not an option.
INVALIDATION_SHARDS = 16
HEALTH_CHECK_INTERVAL_S = 10
_BACKOFF_CAP_S = 0.05
# The shape of the session keys extproc mints: HMAC-SHA256 hex digests.
_HMAC_HEX = re.compile(r"[0-9a-f]{64}")
# Whether ConnectionPool.get_connection takes no arguments (redis-py >= 5.3).
_POOL_NO_ARGS = tuple(int(part) for part in re.findall(r"\d+", redis.__version__)[:2]) >= (5, 3)
_URL_OPTIONS = frozenset(
    {
        "db",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "sentinel_password",
    }
)


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """`append_next` stored the turn with this seq; the session is now at `version`."""

    seq: int
    version: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The turn id was already stored, with this seq; nothing changed."""

    seq: int


@dataclass(frozen=True, slots=True)
class NeedsFloor:
    """Redis does not have the session: call again with the cold tier's last seq."""


AppendResult = Stored | Duplicate | NeedsFloor


@dataclass(frozen=True, slots=True)
class WarmSnapshot:
    """A session as Redis holds it, read atomically.

    `turns` are every turn with `first_seq <= seq <= last_seq` that exists; older ones (trimmed,
    or from before the warm copy was created) are in the cold tier only. `last_seq` is the last
    seq assigned (the next `append_next` gets `last_seq + 1`). A deleted session is an empty
    snapshot with `deleted` set: it exists, and it is authoritative (do not go to the cold tier).
    """

    turns: list[Turn]
    version: int
    first_seq: int
    last_seq: int
    deleted: bool = False
    record_sizes: list[int] = field(default_factory=list)  # bytes per turn, for the hot tier


# --- keys -------------------------------------------------------------------------------


def hash_tag(session_key: str) -> str:
    """The session's hash tag, which also names its keys: the first 32 hex chars of an
    HMAC-SHA256 session key (128 random bits: unique enough), or of the SHA-256 of any other
    key (tests, a foreign caller). Never the raw prefix of another shape: two keys sharing
    their first 32 chars would share one session."""
    if _HMAC_HEX.fullmatch(session_key):
        return session_key[:32]
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class _Keys:
    meta: str
    turns: str
    ids: str
    docs: str
    tag: str

    @classmethod
    def of(cls, prefix: str, session_key: str) -> _Keys:
        tag = hash_tag(session_key)
        base = f"{prefix}:{{{tag}}}"
        return cls(f"{base}:meta", f"{base}:turns", f"{base}:ids", f"{base}:docs", tag)

    @property
    def all(self) -> list[str]:
        return [self.meta, self.turns, self.ids, self.docs]


def _member(turn: Turn, record: bytes) -> bytes:
    turn_id = turn.turn_id.encode()
    return b"%d:%s%s" % (len(turn_id), turn_id, record)


# --- the backend ------------------------------------------------------------------------


class RedisBackend:
    """Warm tier. Build it with `from_url`; every call goes through the circuit breaker and
    raises `StoreUnavailable` (naming the operation, never message content) when Redis fails.
    """

    def __init__(
        self,
        client: Client,
        *,
        prefix: str = "sg",
        ttl_s: int = 86400,
        max_turns: int = 2000,
        breaker: CircuitBreaker | None = None,
        codec: Codec | None = None,
        call_bound_s: float = 1.0,
        closers: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        if ttl_s < 1:
            raise ValueError("ttl_s must be at least 1 second")
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        # The client when it is a single server (plain or found by Sentinel), else None.
        self._plain: Redis | None = None if isinstance(client, RedisCluster) else client
        self._prefix = prefix
        self._ttl_s = int(ttl_s)
        self._max_turns = max_turns
        self._breaker = breaker or CircuitBreaker(name="redis")
        self._codec = codec or DEFAULT_CODEC
        self.call_bound_s = call_bound_s
        self._closers = list(closers)
        self._subscriptions: list[Subscription] = []
        # On a cluster the scripts do not publish (see the module docstring).
        self._channel = "" if self._cluster else f"{prefix}:inv"
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(getattr(redis_lua, name))
            for name in (
                "APPEND_NEXT",
                "APPEND",
                "FILL",
                "TRUNCATE_AFTER",
                "DELETE",
                "EVICT",
                "PUT_DOC",
                "PUT_DOCS",
                "SNAPSHOT",
                "PENDING_AND_VERSION",
                "PENDING_SETTLED",
            )
        }
        self._counts = dict.fromkeys(
            (
                "calls",
                "errors",
                "snapshot_hits",
                "snapshot_misses",
                "publish_errors",
                "corrupt_records",
            ),
            0,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "sg",
        ttl_s: int = 86400,
        max_turns: int = 2000,
        socket_timeout_s: float = 0.25,
        connect_timeout_s: float = 0.25,
        retries: int = 1,
        breaker_failures: int = 5,
        breaker_reset_s: float = 2.0,
        codec: Codec | None = None,
    ) -> RedisBackend:
        """Build the client for `url` (forms in the module docstring). Connects lazily."""
        if retries < 0:
            raise ValueError("retries must not be negative")
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
            "retry": Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S), retries),
            "health_check_interval": HEALTH_CHECK_INTERVAL_S,
            # No CLIENT SETINFO round trip on every new connection.
            "driver_info": None,
            # RESP2: no HELLO round trip per connection, and the same replies whatever
            # redis-py's default protocol is (version 8 switched it to RESP3).
            "protocol": 2,
        }
        client, closers = _build_client(url, common)
        # The longest a call can take before failing: every attempt may wait for a connect
        # and a reply, with a capped backoff between attempts.
        bound = (retries + 1) * (connect_timeout_s + socket_timeout_s) + retries * _BACKOFF_CAP_S
        return cls(
            client,
            prefix=prefix,
            ttl_s=ttl_s,
            max_turns=max_turns,
            breaker=CircuitBreaker(breaker_failures, breaker_reset_s, name="redis"),
            codec=codec,
            call_bound_s=bound,
            closers=closers,
        )

    @property
    def client(self) -> Client:
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def is_cluster(self) -> bool:
        return self._cluster

    def keys(self, session_key: str) -> list[str]:
        """The session's Redis keys: meta, turns, ids, docs (for admin tools and tests)."""
        return _Keys.of(self._prefix, session_key).all

    # --- warm-tier API ---------------------------------------------------------------------

    async def append_next(
        self, session_key: str, turn: Turn, floor_seq: int | None = None
    ) -> AppendResult:
        """Store `turn` as the session's next turn, assigning its seq atomically.

        `NeedsFloor` when Redis does not have the session and `floor_seq` is None: the caller
        loads the cold tier's last seq and calls again with it; the seq is then
        `max(redis last seq, floor_seq) + 1`. `Duplicate` when the turn id is already stored
        (also what a retry after a timed-out but executed call gets: the turn is stored).
        """
        keys = _Keys.of(self._prefix, session_key)
        member = _member(turn, self._codec.encode(turn))
        floor = "" if floor_seq is None else str(int(floor_seq))
        reply = await self._run(
            "append_next",
            "APPEND_NEXT",
            keys,
            session_key,
            turn.turn_id,
            member,
            floor,
            self._max_turns,
        )
        status, seq, version = (int(value) for value in reply)
        if status == 1:
            return Duplicate(seq)
        if status == 2:
            return NeedsFloor()
        await self._publish_sharded(keys, session_key)
        return Stored(seq, version)

    async def snapshot(self, session_key: str) -> WarmSnapshot | None:
        """The session at one instant; None when Redis does not have it (expired or never
        written). A tombstone is an empty snapshot with `deleted` set."""
        keys = _Keys.of(self._prefix, session_key)
        if self._plain is None:  # cluster: the atomic read is the SNAPSHOT script
            reply = await self._call(
                "snapshot",
                lambda: self._scripts["SNAPSHOT"](keys=[keys.meta, keys.turns], args=[]),
            )
            if reply is None:
                self._counts["snapshot_misses"] += 1
                return None
            version, first, last, deleted, items = reply
        else:
            head, items = await self._call("snapshot", lambda: self._read_snapshot(keys))
            version, first, last, deleted = head
            if version is None:
                self._counts["snapshot_misses"] += 1
                return None
            # HMGET gives None for an absent field: the script's `or` defaults.
            first, last = first or b"1", last or b"0"
        self._counts["snapshot_hits"] += 1
        turns, sizes = self._decode_turns(items)
        return WarmSnapshot(
            turns, int(version), int(first), int(last), deleted not in (None, b"0", 0), sizes
        )

    async def _read_snapshot(self, keys: _Keys) -> list[Any]:
        """HMGET meta + ZRANGE turns in one MULTI/EXEC: as atomic as the SNAPSHOT script, but
        the records do not pass through Lua, which copies them in and out at ~2 ns a byte
        (Redis 7.0, a 50-turn session of 87 KB: ~260 µs of server time as the script, ~65 µs
        as MULTI/EXEC, measured). Not on a cluster: the oldest redis-py this supports has no
        transactions in cluster pipelines.

        Sent on a pooled connection directly rather than through `Pipeline`, whose bookkeeping
        costs ~90 µs of Python per call (redis-py 8.1, measured); the calls used are redis-py's
        own connection API, with its retry policy. Any error or cancellation disconnects the
        connection before it goes back to the pool, so no unread reply is left on it."""
        assert self._plain is not None
        pool = self._plain.connection_pool
        # redis-py < 5.3 requires a command name here; later releases deprecate passing one.
        # (Unannotated upstream, like the other ignores in this file.)
        get = pool.get_connection
        conn = await (get() if _POOL_NO_ARGS else get("MULTI"))  # type: ignore[no-untyped-call]
        commands = (
            ("MULTI",),
            ("HMGET", keys.meta, "ver", "first", "seq", "deleted"),
            ("ZRANGE", keys.turns, 0, -1, "WITHSCORES"),
            ("EXEC",),
        )

        async def exchange() -> Any:
            await conn.send_packed_command(conn.pack_commands(commands))
            await conn.read_response()  # OK
            await conn.read_response()  # QUEUED
            await conn.read_response()  # QUEUED
            return await conn.read_response()  # [HMGET reply, ZRANGE reply]

        async def failed(_error: Exception) -> None:
            await conn.disconnect()

        try:
            reply = await conn.retry.call_with_retry(exchange, failed)
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        for part in reply:  # a command that failed inside EXEC (WRONGTYPE) is an error value
            if isinstance(part, Exception):
                raise part
        return list(reply)

    async def version(self, session_key: str) -> int | None:
        """The session's version (one HGET); None when Redis does not have it."""
        keys = _Keys.of(self._prefix, session_key)
        value = await self._call("version", lambda: self._client.hget(keys.meta, "ver"))
        return None if value is None else int(value)

    async def fill(self, session_key: str, turns: Sequence[Turn]) -> int | None:
        """Refill Redis from the cold tier, only if Redis has neither the session nor its
        tombstone (atomic: a concurrent append or delete wins). Returns the new version, or
        None when nothing was written. Keeps the newest `max_turns`. Publishes nothing: it
        adds no turn a replica could have cached a newer view of."""
        keys = _Keys.of(self._prefix, session_key)
        unique: dict[str, Turn] = {}
        for turn in sorted(turns, key=lambda t: t.seq):
            unique.setdefault(turn.turn_id, turn)
        kept = list(unique.values())[-self._max_turns :]
        first = kept[0].seq if kept else 1
        last = kept[-1].seq if kept else 0
        args: list[str | int | bytes] = [first, last]
        for turn in kept:
            args += [turn.seq, turn.turn_id, _member(turn, self._codec.encode(turn))]
        reply = await self._run("fill", "FILL", keys, session_key, *args)
        return None if reply is None else int(reply)

    async def evict(self, session_key: str) -> None:
        """Drop Redis's copy of the session (turns, documents, meta) without a tombstone: it
        missed writes while Redis was unreachable, and the next read refills it from the cold
        tier. Other replicas are told (and would see the refill's new version anyway)."""
        keys = _Keys.of(self._prefix, session_key)
        await self._run("evict", "EVICT", keys, session_key)
        await self._publish_sharded(keys, session_key)

    # --- pending-turn markers (read-your-writes across replicas) ---------------------------

    def _pending_key(self, session_key: str) -> str:
        return f"{self._prefix}:{{{hash_tag(session_key)}}}:pending"

    def _payload_key(self, turn_id: str) -> str:
        return f"{self._prefix}:{{{hash_tag(turn_id)}}}:pturn"

    async def add_pending(
        self, session_key: str, turn_id: str, ttl_s: float, payload: bytes | None = None
    ) -> None:
        """Mark a turn of the session as awaiting its reply (a sorted set scored by expiry,
        so a marker whose capture never comes stops counting by itself), and store its
        `payload` (the encoded PendingTurn, for a replica that gets the capture) for as long:
        one round trip, one MULTI on a single server."""
        key = self._pending_key(session_key)
        ttl_ms = int(ttl_s * 1000)
        expires_ms = int(time.time() * 1000) + ttl_ms

        async def call() -> None:
            async with self._client.pipeline(transaction=not self._cluster) as pipe:
                pipe.zadd(key, {turn_id: expires_ms})
                pipe.pexpire(key, ttl_ms + 1000)
                if payload is not None:
                    pipe.set(self._payload_key(turn_id), payload, px=max(1, ttl_ms))
                await pipe.execute()

        await self._call("add_pending", call)

    async def put_pending_payload(self, turn_id: str, payload: bytes, ttl_s: float) -> None:
        """The payload alone (`ShardedRedis`: the turn's shard is not the session's)."""
        key = self._payload_key(turn_id)
        px = max(1, int(ttl_s * 1000))
        await self._call("put_pending_payload", lambda: self._client.set(key, payload, px=px))

    async def remove_pending(self, session_key: str, turn_id: str) -> None:
        """The turn is settled: drop its marker and its payload (one round trip)."""
        marker, payload = self._pending_key(session_key), self._payload_key(turn_id)

        async def call() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(marker, turn_id)
                pipe.delete(payload)
                await pipe.execute()

        await self._call("remove_pending", call)

    async def get_pending_payload(self, turn_id: str) -> bytes | None:
        """The payload `add_pending` stored; None when absent (expired, claimed, settled)."""
        key = self._payload_key(turn_id)
        value = await self._call("get_pending_payload", lambda: self._client.get(key))
        return value if value is None or isinstance(value, bytes) else value.encode()

    async def claim_pending_payload(self, turn_id: str) -> bool:
        """Take the turn: delete its payload. True for exactly one caller (a DEL that
        removed it); False when another replica claimed it or it expired or was settled."""
        key = self._payload_key(turn_id)
        return int(await self._call("claim_pending", lambda: self._client.delete(key))) == 1

    async def pending_count(self, session_key: str) -> int:
        """How many unexpired markers the session has, from every replica."""
        key = self._pending_key(session_key)
        now_ms = int(time.time() * 1000)
        count = await self._call("pending_count", lambda: self._client.zcount(key, now_ms, "+inf"))
        return int(count)

    async def pending_and_version(
        self, session_key: str, exclude: Sequence[str] = ()
    ) -> tuple[int, int | None]:
        """`pending_count` (not counting the markers in `exclude`) and `version`, read at one
        instant in one round trip: a rewrite's checks before it reads history. A script, as
        fast as the two commands pipelined by hand (measured), and atomic on a cluster too."""
        keys = [self._pending_key(session_key), _Keys.of(self._prefix, session_key).meta]
        args: list[int | str] = [int(time.time() * 1000), *exclude]
        script = self._scripts["PENDING_AND_VERSION"]
        count, version = await self._call(
            "pending_and_version", lambda: script(keys=keys, args=args)
        )
        return int(count), int(version) if version else None

    async def pending_settled(self, session_key: str, turn_ids: Sequence[str]) -> list[bool]:
        """Per turn id: settled (stored in the session, or its marker gone or expired)."""
        if not turn_ids:
            return []
        keys = [self._pending_key(session_key), _Keys.of(self._prefix, session_key).ids]
        args: list[int | str] = [int(time.time() * 1000), *turn_ids]
        script = self._scripts["PENDING_SETTLED"]
        reply = await self._call("pending_settled", lambda: script(keys=keys, args=args))
        return [bool(int(flag)) for flag in reply]

    # --- TurnBackend -----------------------------------------------------------------------

    async def append(self, session_key: str, turn: Turn) -> bool:
        """Store `turn` at the seq the caller gave it (refill, tests). False for a turn id the
        session already has; `StoreError` when another turn has that seq."""
        if turn.seq < 1:
            raise StoreError("append needs turn.seq > 0 (append_next assigns one)")
        keys = _Keys.of(self._prefix, session_key)
        member = _member(turn, self._codec.encode(turn))
        reply = int(
            await self._run(
                "append",
                "APPEND",
                keys,
                session_key,
                turn.turn_id,
                member,
                turn.seq,
                self._max_turns,
            )
        )
        if reply == -1:
            raise StoreError(f"seq {turn.seq} already used by another turn in this session")
        if reply == 1:
            await self._publish_sharded(keys, session_key)
        return reply == 1

    async def load(self, session_key: str) -> list[Turn]:
        snapshot = await self.snapshot(session_key)
        return [] if snapshot is None else snapshot.turns

    async def delete(self, session_key: str) -> None:
        """Drop turns and documents; leave a tombstone with a newer version for one TTL."""
        keys = _Keys.of(self._prefix, session_key)
        await self._run("delete", "DELETE", keys, session_key)
        await self._publish_sharded(keys, session_key)

    async def truncate_after(self, session_key: str, seq: int) -> int:
        keys = _Keys.of(self._prefix, session_key)
        dropped = int(await self._run("truncate_after", "TRUNCATE_AFTER", keys, session_key, seq))
        await self._publish_sharded(keys, session_key)
        return dropped

    async def put_doc(self, session_key: str, name: str, data: bytes) -> None:
        """Upsert a document; it shares the session's sliding TTL and dies with `delete`.
        Documents do not bump the version: it versions the turns (the hot tier's cache)."""
        keys = _Keys.of(self._prefix, session_key)
        await self._run("put_doc", "PUT_DOC", keys, session_key, name, data)

    async def get_doc(self, session_key: str, name: str) -> bytes | None:
        keys = _Keys.of(self._prefix, session_key)
        value = await self._call("get_doc", lambda: self._client.hget(keys.docs, name))
        # decode_responses is off: Redis hands back the bytes that were stored.
        return value if value is None or isinstance(value, bytes) else value.encode()

    async def put_docs(self, session_key: str, docs: Mapping[str, bytes]) -> None:
        """`put_doc` for several documents in one script call (a commit writes up to four)."""
        if not docs:
            return
        keys = _Keys.of(self._prefix, session_key)
        pairs = [part for name, data in docs.items() for part in (name, data)]
        await self._run("put_docs", "PUT_DOCS", keys, session_key, *pairs)

    async def get_docs(self, session_key: str, names: Sequence[str]) -> dict[str, bytes | None]:
        """`get_doc` for several documents in one HMGET."""
        keys = _Keys.of(self._prefix, session_key)
        values = await self._call("get_docs", lambda: self._client.hmget(keys.docs, list(names)))
        return {
            name: value if value is None or isinstance(value, bytes) else value.encode()
            for name, value in zip(names, values, strict=True)
        }

    async def flush(self, timeout_s: float | None = None) -> None:
        """Nothing to do: a call returns once Redis has applied it."""

    async def close(self) -> None:
        for subscription in self._subscriptions:
            await subscription.close()
        self._subscriptions.clear()
        await self._client.aclose()
        for closer in self._closers:
            with contextlib.suppress(*_FAILURES):
                await closer()
        self._closers.clear()

    @property
    def stats(self) -> dict[str, int]:
        stats = {**self._counts, **self._breaker.stats}
        stats["subscription_connects"] = sum(s.connects for s in self._subscriptions)
        stats["invalidations_received"] = sum(s.received for s in self._subscriptions)
        return stats

    # --- invalidations ---------------------------------------------------------------------

    def invalidation_channels(self) -> list[str]:
        if self._cluster:
            return [f"{self._prefix}:inv:{{{shard}}}" for shard in range(INVALIDATION_SHARDS)]
        return [self._channel]

    async def subscribe_invalidations(
        self,
        callback: Callable[[str], None],
        on_reconnect: Callable[[], None] | None = None,
        *,
        backoff_max_s: float = 2.0,
        keepalive_s: float = 5.0,
    ) -> Subscription:
        """Call `callback(session_key)` for every invalidation, from a background task that
        reconnects with backoff. `on_reconnect` runs once the subscription is confirmed, on the
        first connect and on every reconnect: messages published while disconnected are lost,
        so the caller flushes what they would have invalidated."""
        subscription = Subscription(
            self._client,
            self.invalidation_channels(),
            callback,
            on_reconnect,
            backoff_max_s=backoff_max_s,
            keepalive_s=keepalive_s,
            confirm_timeout_s=max(1.0, self.call_bound_s),
        )
        self._subscriptions.append(subscription)
        return subscription

    # --- internals -------------------------------------------------------------------------

    async def _call(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        self._counts["calls"] += 1
        with self._breaker.attempt(operation):
            try:
                return await call()
            except _FAILURES as exc:
                self._counts["errors"] += 1
                raise StoreUnavailable(f"redis {operation} failed: {_describe(exc)}") from exc

    async def _run(
        self, operation: str, script: str, keys: _Keys, session_key: str, *args: str | int | bytes
    ) -> Any:
        """Run a writing script: common arguments first (see store.redis_lua)."""
        argv = [self._channel, session_key, self._ttl_s, *args]
        return await self._call(operation, lambda: self._scripts[script](keys=keys.all, args=argv))

    async def _publish_sharded(self, keys: _Keys, session_key: str) -> None:
        """On a cluster, publish after the script committed. A lost message is tolerated by
        design (readers check versions), so a failure is counted, not raised: the write
        itself succeeded and must not be retried."""
        if not self._cluster:
            return
        channel = f"{self._prefix}:inv:{{{int(keys.tag[:8], 16) % INVALIDATION_SHARDS}}}"
        try:
            await self._client.spublish(channel, session_key)
        except _FAILURES as exc:
            self._counts["publish_errors"] += 1
            log.warning("redis invalidation publish failed: %s", _describe(exc))

    def _decode_turns(self, items: list[bytes]) -> tuple[list[Turn], list[int]]:
        """The turns of a `ZRANGE ... WITHSCORES` reply (member, score, member, ...) and their
        records' sizes. The warm read's hot loop: 50 turns a read."""
        decode = self._codec.decode
        turns: list[Turn] = []
        sizes: list[int] = []
        try:
            for member, score in zip(items[::2], items[1::2], strict=True):
                try:
                    colon = member.index(b":")
                    record = member[colon + 1 + int(member[:colon]) :]
                except ValueError:  # the framing around the record, not the record
                    raise StoreError("corrupt turn entry in redis: bad turn id framing") from None
                turn = decode(record)
                seq = int(score)
                if turn.seq != seq:
                    # The score is the seq: append_next encodes the record before the seq
                    # exists. The Turn was just decoded and nobody else holds it, so setting
                    # the field in place is safe (and far cheaper than dataclasses.replace).
                    object.__setattr__(turn, "seq", seq)
                turns.append(turn)
                sizes.append(len(record))
        except StoreError:
            self._counts["corrupt_records"] += 1
            raise
        return turns, sizes


def _describe(exc: BaseException) -> str:
    """The error's kind and, for transport errors, its text (addresses, never data). Server
    replies are reduced to their error code: a script error would quote the script."""
    if isinstance(exc, ResponseError):
        code = str(exc).split(" ", 1)[0]
        return f"{type(exc).__name__} {code}"
    text = str(exc)[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- invalidation subscription ----------------------------------------------------------


class Subscription:
    """The task reading invalidations. See `RedisBackend.subscribe_invalidations`.

    One reader per connection (one on a single server, one per master on a cluster, where
    redis-py's round-robin `get_sharded_message` would make a message wait for every idle
    node's read timeout). Anything unusual (an error, a keepalive unanswered, redis-py
    reconnecting by itself, the server dropping a subscription because a slot moved) ends
    the round; the next one subscribes afresh and calls `on_reconnect` again.
    """

    _INITIAL_BACKOFF_S = 0.05
    _READ_WAIT_S = 1.0

    def __init__(
        self,
        client: Client,
        channels: list[str],
        callback: Callable[[str], None],
        on_reconnect: Callable[[], None] | None,
        *,
        backoff_max_s: float,
        keepalive_s: float,
        confirm_timeout_s: float,
    ) -> None:
        self._client = client
        self._channels = channels
        self._callback = callback
        self._on_reconnect = on_reconnect
        self._backoff_max_s = backoff_max_s
        self._keepalive_s = keepalive_s
        self._confirm_timeout_s = confirm_timeout_s
        self._reconnected_inside = False
        self._watched: list[AbstractConnection] = []
        self.connects = 0
        self.received = 0
        self.errors = 0
        self.connected = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="redis-invalidations")

    async def close(self) -> None:
        self._closing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        delay = self._INITIAL_BACKOFF_S
        while True:
            pubsub = self._client.pubsub()
            try:
                nodes = await self._subscribe(pubsub)
                delay = self._INITIAL_BACKOFF_S
                await self._read_all(nodes)
            except _Resubscribe as why:
                log.info("redis invalidations: %s; subscribing again", why)
            except _FAILURES as exc:
                self.errors += 1
                log.warning("redis invalidations: %s; reconnecting in %.2fs", _describe(exc), delay)
            except Exception:  # a bug here must not end invalidations for good
                self.errors += 1
                log.exception("redis invalidations: unexpected error; reconnecting")
            finally:
                self.connected.clear()
                # The pool hands these connections out again: our callback must not follow.
                for connection in self._watched:
                    connection.deregister_connect_callback(  # type: ignore[no-untyped-call]
                        self._redis_py_reconnected
                    )
                self._watched.clear()
                with contextlib.suppress(*_FAILURES):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated upstream
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max_s)

    async def _subscribe(self, pubsub: PubSub) -> list[PubSub]:
        if isinstance(self._client, RedisCluster):
            await self._client.initialize()  # ssubscribe routes by the slot map it loads
            await pubsub.ssubscribe(*self._channels)
        else:
            await pubsub.subscribe(*self._channels)
        nodes = (
            list(pubsub.node_pubsub_mapping.values())
            if isinstance(pubsub, ClusterPubSub)
            else [pubsub]
        )
        # Only once the server confirmed do we report: a message published before that could
        # be missed, and a reader refilling the hot tier in between would keep stale data.
        deadline = time.monotonic() + self._confirm_timeout_s
        await asyncio.gather(*(self._confirm(node, deadline) for node in nodes))
        # redis-py reconnects (and resubscribes) a pub/sub connection by itself inside a
        # read; we would not notice, and the caller's flush must follow every reconnect.
        for node in nodes:
            if node.connection is not None:
                node.connection.register_connect_callback(self._redis_py_reconnected)
                self._watched.append(node.connection)
        self._reconnected_inside = False
        self.connects += 1
        self.connected.set()
        if self._on_reconnect is not None:
            self._on_reconnect()
        return nodes

    async def _confirm(self, node: PubSub, deadline: float) -> None:
        expected = len(node.channels) + len(node.shard_channels)
        confirmed = 0
        while confirmed < expected:
            if time.monotonic() > deadline:
                raise _SubscribeTimeout("subscription not confirmed in time")
            message = await node.get_message(timeout=0.05)
            if message is None:
                continue
            if _kind(message) in ("subscribe", "ssubscribe"):
                confirmed += 1
            else:
                self._handle(message)

    async def _read_all(self, nodes: list[PubSub]) -> None:
        tasks = [asyncio.create_task(self._read(node)) for node in nodes]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raises what ended the round
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, node: PubSub) -> None:
        """Read one connection until something ends the round (never returns normally).

        A server that vanished without a FIN/RST (paused VM, dropped route) never fails a read:
        ping every `keepalive_s` and give up when the previous ping was not answered.
        """
        pong_due = False
        next_ping = time.monotonic() + self._keepalive_s
        while True:
            # redis-py's get_message can swallow a cancellation (seen: close() hung with the
            # reader looping on); honour it, and the closing flag, on every round.
            task = asyncio.current_task()
            if self._closing or (task is not None and task.cancelling()):
                raise asyncio.CancelledError
            if self._reconnected_inside:
                raise _Resubscribe("redis-py reconnected a subscription connection")
            now = time.monotonic()
            if now >= next_ping:
                if pong_due:
                    raise _SubscribeTimeout("keepalive ping unanswered")
                await node.ping()
                pong_due = True
                next_ping = now + self._keepalive_s
            wait_s = min(self._READ_WAIT_S, max(0.0, next_ping - now))
            message = await node.get_message(timeout=wait_s)
            if message is None:
                continue
            kind = _kind(message)
            if kind == "pong":
                pong_due = False
            elif kind in ("unsubscribe", "sunsubscribe"):
                raise _Resubscribe("the server dropped a subscription (slot moved?)")
            else:
                self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        if _kind(message) not in ("message", "smessage"):
            return
        data = message["data"]
        try:
            session_key = data.decode() if isinstance(data, bytes) else str(data)
        except UnicodeDecodeError:
            return
        self.received += 1
        try:
            self._callback(session_key)
        except Exception:  # the caller's bug must not stop invalidations
            log.exception("redis invalidations: callback failed")

    def _redis_py_reconnected(self, _connection: object) -> None:
        self._reconnected_inside = True


class _SubscribeTimeout(RedisError):
    """The subscription stopped answering; handled like a lost connection."""


class _Resubscribe(Exception):
    """Not an error: the subscription must be set up again (and the caller told)."""


def _kind(message: dict[str, Any]) -> str:
    kind = message.get("type")
    return kind.decode() if isinstance(kind, bytes) else str(kind)


# --- URL -> client ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Url:
    scheme: str
    username: str | None
    password: str | None
    hosts: list[tuple[str, int]]
    path: str
    options: dict[str, str]


def _parse_url(url: str) -> _Url:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("redis URL needs a scheme (redis://, rediss://, unix://, ...)")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    path = slash + path
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
        if not has_password:  # redis://secret@host: a bare userinfo is the password
            username, password = None, unquote(user)
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - _URL_OPTIONS
    if unknown:
        raise ValueError(f"unknown option(s) in redis URL: {', '.join(sorted(unknown))}")
    hosts = [_host_port(item) for item in netloc.split(",") if item] if netloc else []
    return _Url(scheme.lower(), username, password, hosts, path, options)


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:6379
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    return host, int(port) if port else 6379


def _tls_options(url: _Url) -> dict[str, Any]:
    options = url.options
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs not in ("required", "optional", "none"):
        raise ValueError("ssl_cert_reqs must be required, optional or none")
    return {
        "ssl": True,
        "ssl_cert_reqs": reqs,
        "ssl_check_hostname": options.get("ssl_check_hostname", "true").lower()
        not in ("0", "false", "no"),
        "ssl_ca_certs": options.get("ssl_ca_certs"),
        "ssl_certfile": options.get("ssl_certfile"),
        "ssl_keyfile": options.get("ssl_keyfile"),
    }


def _db(value: str) -> int:
    try:
        return int(value or 0)
    except ValueError:
        raise ValueError("redis URL database must be an integer") from None


def _build_client(
    raw: str, common: dict[str, Any]
) -> tuple[Client, list[Callable[[], Awaitable[None]]]]:
    url = _parse_url(raw)
    auth: dict[str, Any] = {"username": url.username, "password": url.password}
    if url.scheme in ("redis", "rediss"):
        if len(url.hosts) != 1:
            raise ValueError(f"{url.scheme}:// takes exactly one host")
        host, port = url.hosts[0]
        tls = _tls_options(url) if url.scheme == "rediss" else {}
        db = _db(url.path.strip("/") or url.options.get("db", "0"))
        return Redis(host=host, port=port, db=db, **auth, **common, **tls), []
    if url.scheme == "unix":
        if not url.path:
            raise ValueError("unix:// needs a socket path")
        db = _db(url.options.get("db", "0"))
        return Redis(unix_socket_path=url.path, db=db, **auth, **common), []
    if url.scheme in ("redis+cluster", "rediss+cluster"):
        if not url.hosts:
            raise ValueError("redis+cluster:// needs at least one host:port")
        if url.path.strip("/") not in ("", "0"):
            raise ValueError("Redis Cluster has only database 0")
        tls = _tls_options(url) if url.scheme == "rediss+cluster" else {}
        nodes = [ClusterNode(host, port) for host, port in url.hosts]
        return RedisCluster(startup_nodes=nodes, **auth, **common, **tls), []
    if url.scheme == "redis+sentinel":
        return _sentinel_client(url, auth, common)
    raise ValueError(f"unsupported redis URL scheme {url.scheme!r}")


def _sentinel_client(
    url: _Url, auth: dict[str, Any], common: dict[str, Any]
) -> tuple[Client, list[Callable[[], Awaitable[None]]]]:
    if not url.hosts:
        raise ValueError("redis+sentinel:// needs at least one sentinel host:port")
    parts = [part for part in url.path.split("/") if part]
    if not 1 <= len(parts) <= 2:
        raise ValueError("redis+sentinel:// path is /<master-name>[/<db>]")
    master_name = unquote(parts[0])
    db = _db(parts[1] if len(parts) == 2 else "0")
    sentinel_kwargs = {
        "socket_timeout": common["socket_timeout"],
        "socket_connect_timeout": common["socket_connect_timeout"],
        "retry": common["retry"],
        "driver_info": None,
        "password": url.options.get("sentinel_password"),
    }
    # redis-py leaves Sentinel's constructor unannotated.
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        url.hosts, sentinel_kwargs=sentinel_kwargs, db=db, **auth, **common
    )
    client: Redis = sentinel.master_for(master_name)
    closers: list[Callable[[], Awaitable[None]]] = [
        sentinel_client.aclose for sentinel_client in sentinel.sentinels
    ]
    return client, closers


__all__ = [
    "INVALIDATION_SHARDS",
    "AppendResult",
    "Duplicate",
    "NeedsFloor",
    "RedisBackend",
    "Stored",
    "Subscription",
    "WarmSnapshot",
    "hash_tag",
]
