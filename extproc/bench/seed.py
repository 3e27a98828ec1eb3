"""Sessions written straight into the store a `sessiongate up` will use, before it starts.

`sessiongate bench gateway` needs sessions of 10,000 stored messages, and pools of thousands of
sessions for its warm (Redis) and cold (SQLite) rows. Through the gateway that means 5,000
requests per big session, or a fork per pool session (a fork re-reads the target's history for
every copied turn: ~1.5 s for 5,000 turns, near the rewrite deadline; on a gateway with a tiny
hot tier every one of those reads goes to Redis or SQLite). Here the turns go to the cold tier
(`store.SQLiteBackend`, group commit) and, optionally, to Redis (`RedisBackend.fill`, one
round trip per session) under the session keys the gateway derives: the same HMAC key file
(created here as `up` would), the same identity (`authorization: Bearer <api key>`, default
tenant). Each turn is what capture stores for the benchmark's request and reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from extproc.context import ContextSettings
from extproc.context.facts import facts_record
from extproc.identity import IdentityResolver, load_hmac_key
from extproc.tokens import turn_token_counts
from store.model import Turn, Usage
from store.redis import RedisBackend
from store.sqlite import SQLiteBackend

__all__ = ["SeedResult", "TurnText", "seed_sessions", "session_key_for"]


@dataclass(frozen=True, slots=True)
class TurnText:
    """What every seeded turn holds (the benchmark's request and the provider's reply)."""

    system: str
    question: str
    answer: str
    model: str


@dataclass(frozen=True, slots=True)
class SeedResult:
    sessions: int
    turns: int
    seconds: float


def session_key_for(hmac_key_path: Path, api_key: str, session_id: str) -> str:
    """The store key sessiongate derives for (default tenant, this API key, session id);
    creates the HMAC key file if it does not exist yet (as `up` does on first start)."""
    resolver = IdentityResolver(load_hmac_key(hmac_key_path, create=True))
    identity = resolver.resolve({"authorization": f"Bearer {api_key}"}, {}, {})
    if identity is None:  # cannot happen: an API key is always an identity
        raise ValueError("no identity for the API key")
    return resolver.session_key(identity, session_id)


def _turns(text: TurnText, count: int, tag: str) -> list[Turn]:
    """Turns as capture stores them: with their token count and key facts (a session read
    from Redis or SQLite is then neither re-tokenized nor re-scanned, as in production)."""
    system = ({"role": "system", "content": text.system},)
    request = ({"role": "user", "content": text.question},)
    response = {"role": "assistant", "content": text.answer}
    counts = turn_token_counts([*request, response], ContextSettings().image_tokens)
    facts = facts_record(request)
    now = time.time()
    return [
        Turn(
            turn_id=f"seed-{tag}-{seq}",
            request_messages=request,
            response_message=response,
            system_messages=system,
            model=text.model,
            finish_reason="stop",
            usage=Usage(prompt_tokens=120, completion_tokens=60),
            created_at=now,
            seq=seq,
            token_counts=counts,
            facts=facts,
        )
        for seq in range(1, count + 1)
    ]


async def seed_sessions(
    *,
    sqlite_path: Path,
    hmac_key_path: Path,
    api_key: str,
    session_ids: Sequence[str],
    turns_per_session: int,
    text: TurnText,
    redis_url: str | None = None,
    redis_prefix: str = "sg",
    redis_concurrency: int = 16,
) -> SeedResult:
    """Write `turns_per_session` turns into each session (SQLite, and Redis when given).
    Run it before the gateway that owns `sqlite_path` starts."""
    started = time.monotonic()
    resolver = IdentityResolver(load_hmac_key(hmac_key_path, create=True))
    identity = resolver.resolve({"authorization": f"Bearer {api_key}"}, {}, {})
    if identity is None:
        raise ValueError("no identity for the API key")
    keys = [resolver.session_key(identity, sid) for sid in session_ids]
    cold = await SQLiteBackend.open(sqlite_path, queue_size=50_000, append_timeout_s=30.0)
    try:
        for index, key in enumerate(keys):
            for turn in _turns(text, turns_per_session, f"{index}"):
                await cold.append(key, turn)
        await cold.flush(300.0)
    finally:
        await cold.close()
    if redis_url is not None:
        warm = RedisBackend.from_url(redis_url, prefix=redis_prefix)
        try:
            semaphore = asyncio.Semaphore(redis_concurrency)

            async def fill(index: int, key: str) -> None:
                async with semaphore:
                    await warm.fill(key, _turns(text, turns_per_session, f"{index}"))

            await asyncio.gather(*(fill(i, k) for i, k in enumerate(keys)))
        finally:
            await warm.close()
    return SeedResult(len(keys), len(keys) * turns_per_session, time.monotonic() - started)
