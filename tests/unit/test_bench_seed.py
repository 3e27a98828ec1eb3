"""`extproc.bench.seed`: sessions written before the gateway starts are the ones it serves
(same HMAC key, same identity -> same store keys), in SQLite and, when asked, in Redis."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio

from extproc.bench.seed import TurnText, seed_sessions, session_key_for
from extproc.context.facts import facts_record
from extproc.identity import IdentityResolver, load_hmac_key
from extproc.tokens import turn_token_counts
from store import open_store

TEXT = TurnText("be brief", "where is my parcel?", "at the depot", "gpt-4o-mini")
REDIS_URL = "redis://127.0.0.1:6379/0"


async def test_seeded_sessions_are_read_under_the_gateways_keys(tmp_path: Path) -> None:
    result = await seed_sessions(
        sqlite_path=tmp_path / "sessions.db",
        hmac_key_path=tmp_path / "hmac.key",
        api_key="sk-test",
        session_ids=["a", "b"],
        turns_per_session=30,
        text=TEXT,
    )
    assert (result.sessions, result.turns) == (2, 60)
    # What the gateway derives (rewrite.py: resolver.session_key(identity, session id)).
    resolver = IdentityResolver(load_hmac_key(tmp_path / "hmac.key", create=False))
    identity = resolver.resolve({"authorization": "Bearer sk-test"}, {}, {})
    assert identity is not None
    key = resolver.session_key(identity, "b")
    assert session_key_for(tmp_path / "hmac.key", "sk-test", "b") == key
    store = await open_store(tmp_path / "sessions.db")
    try:
        turns = await store.history(key)
        assert [t.seq for t in turns] == list(range(1, 31))
        assert turns[0].messages() == [
            {"role": "user", "content": "where is my parcel?"},
            {"role": "assistant", "content": "at the depot"},
        ]
        assert turns[0].system_messages == ({"role": "system", "content": "be brief"},)
        # As capture stores them: the token count and key facts travel with each turn.
        assert turns[0].token_counts == turn_token_counts(turns[0].messages(), 765)
        assert turns[0].facts == facts_record(turns[0].request_messages)
        assert await store.history(resolver.session_key(identity, "c")) == []
    finally:
        await store.close()


async def test_seeded_sessions_in_redis_are_warm_hits(tmp_path: Path) -> None:
    client = redis_asyncio.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    prefix = f"sgtest-seed-{uuid.uuid4().hex[:8]}"
    try:
        await seed_sessions(
            sqlite_path=tmp_path / "sessions.db",
            hmac_key_path=tmp_path / "hmac.key",
            api_key="sk-test",
            session_ids=["w"],
            turns_per_session=5,
            text=TEXT,
            redis_url=REDIS_URL,
            redis_prefix=prefix,
        )
        key = session_key_for(tmp_path / "hmac.key", "sk-test", "w")
        store = await open_store(tmp_path / "sessions.db", redis_url=REDIS_URL, redis_prefix=prefix)
        try:
            assert len(await store.history(key)) == 5
            assert store.stats["warm_hits"] == 1 and store.stats["promotions"] == 0
        finally:
            await store.close()
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.unlink(*keys)
        await client.aclose()
