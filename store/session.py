"""The parts of a session besides its turns, kept as named documents beside them.

| document   | what                                                        | written by          |
|------------|-------------------------------------------------------------|---------------------|
| `meta`     | created, last activity, user agent, turn and token counters | every commit        |
| `security` | tenant, principal (an HMAC, never a credential), scopes     | every commit        |
| `state`    | phase, pending tool calls, intermediate tool results        | derived each commit |
| `derived`  | pinned system prompt, rolling summary, key facts            | commit; summarizer  |
| `user`     | preferences, personalisation settings, account information | admin calls (per    |
|            | (stored under the principal's key, not a session's)         | principal)          |

Each document is a small versioned JSON object; unknown fields are ignored on read so
neighbouring releases can read each other's documents (same rule as turn records).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from store.base import StoreError
from store.model import Message, PendingTurn, Turn

DOC_VERSION = 1
META, SECURITY, STATE, DERIVED, USER = "meta", "security", "state", "derived", "user"

_D = TypeVar("_D")


@dataclass(frozen=True, slots=True)
class SessionMeta:
    created_at: float = 0.0
    last_activity: float = 0.0
    user_agent: str = ""
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_usage_turns: int = 0  # turns whose usage sessiongate had to estimate
    cached_tokens: int = 0  # of prompt_tokens, served from the provider's prompt cache
    forked_from_seq: int = 0  # > 0: the session began as a fork holding this many turns


@dataclass(frozen=True, slots=True)
class SecurityContext:
    tenant: str = ""
    principal: str = ""
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionState:
    """Derived from the turns: nothing here is trusted input, it is recomputed on commit."""

    phase: str = "new"  # new | chatting | awaiting_tool_results | tool_loop
    pending_tool_calls: tuple[dict[str, str], ...] = ()  # {"id", "name"} without a result yet
    intermediate_results: tuple[Message, ...] = ()  # tool results since the last user message
    last_finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class DerivedContext:
    pinned_system: tuple[Message, ...] = ()
    summary: str = ""
    summary_through_seq: int = 0
    facts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UserContext:
    preferences: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    account: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    meta: SessionMeta
    security: SecurityContext
    state: SessionState
    derived: DerivedContext


def encode_doc(doc: Any) -> bytes:
    """`{"v": DOC_VERSION, <the dataclass's fields>}`. orjson serializes dataclasses itself:
    ~0.7 µs where `dataclasses.asdict` (a recursive deep copy) took ~10 µs, and the writer
    encodes a few documents per captured turn."""
    body = orjson.dumps(doc)
    head = b'{"v":%d' % DOC_VERSION
    return head + b"}" if body == b"{}" else head + b"," + body[1:]


def decode_doc(data: bytes | None, kind: type[_D]) -> _D:
    """The document, or its empty default when absent. Unknown fields are ignored."""
    if data is None:
        return kind()
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise StoreError(f"corrupt {kind.__name__} document") from None
    if not isinstance(record, dict) or type(record.get("v")) is not int:
        raise StoreError(f"corrupt {kind.__name__} document")
    if record["v"] > DOC_VERSION:
        raise StoreError(f"unsupported {kind.__name__} document version {record['v']}")
    names = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for name, value in record.items():
        if name in names:
            values[name] = tuple(value) if isinstance(value, list) else value
    try:
        return kind(**values)
    except TypeError as exc:
        raise StoreError(f"corrupt {kind.__name__} document: {exc}") from None


def derive_state(turns: list[Turn]) -> SessionState:
    """Phase and open tool work, read off the history."""
    if not turns:
        return SessionState()
    last = turns[-1]
    reply = last.response_message
    calls = reply.get("tool_calls") or ()
    pending = tuple(
        {"id": str(c.get("id", "")), "name": str((c.get("function") or {}).get("name", ""))}
        for c in calls
        if isinstance(c, dict)
    )
    results: list[Message] = []
    for message in reversed(last.request_messages):
        if message.get("role") == "user":
            break
        if message.get("role") == "tool":
            results.insert(0, message)
    if pending:
        phase = "awaiting_tool_results"
    elif results:
        phase = "tool_loop"
    else:
        phase = "chatting"
    return SessionState(phase, pending, tuple(results), last.finish_reason)


def next_meta(meta: SessionMeta, turn: Turn, pending: PendingTurn | None) -> SessionMeta:
    return dataclasses.replace(
        meta,
        created_at=meta.created_at or turn.created_at,
        last_activity=max(meta.last_activity, turn.created_at),
        user_agent=(pending.user_agent if pending and pending.user_agent else meta.user_agent),
        turns=meta.turns + 1,
        prompt_tokens=meta.prompt_tokens + turn.usage.prompt_tokens,
        completion_tokens=meta.completion_tokens + turn.usage.completion_tokens,
        estimated_usage_turns=meta.estimated_usage_turns + int(turn.usage.estimated),
        cached_tokens=meta.cached_tokens + turn.usage.cached_tokens,
    )


def next_derived(derived: DerivedContext, turn: Turn) -> DerivedContext:
    """A turn that carried a system prompt replaces the pinned one (it is always kept)."""
    if turn.system_messages and turn.system_messages != derived.pinned_system:
        return dataclasses.replace(derived, pinned_system=turn.system_messages)
    return derived
