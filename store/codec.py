"""Turn <-> bytes, the one place that knows the stored record layout.

Versioning rule (rolling upgrades): adding a field does NOT bump `v`; readers ignore fields they
do not know and writers give new fields a default, so release N reads what N+1 writes. `v` is
bumped only for a change an older reader would misread; such a record is refused with a
`StoreError`, and the release that starts writing it must come after one that can read it.

The codec is an object (not module functions) so the encryption layer of a later issue can wrap
it: `AeadCodec(inner=TurnCodec(), key=...)` exposes the same `encode`/`decode`, and backends only
ever see a `Codec`.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from store.base import StoreError
from store.model import RECORD_VERSION, Message, Turn, Usage

# Versions this release can decode. Widen it when a new `v` is introduced.
SUPPORTED_VERSIONS = frozenset({RECORD_VERSION})


class Codec(Protocol):
    """What a backend needs to turn records into bytes and back."""

    def encode(self, turn: Turn) -> bytes: ...

    def decode(self, data: bytes) -> Turn: ...


class TurnCodec:
    """Plain orjson records: `{"v": 1, "turn_id": ..., ...}`."""

    def encode(self, turn: Turn) -> bytes:
        usage = turn.usage
        usage_record: dict[str, Any] = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "estimated": usage.estimated,
        }
        if usage.cached_tokens or usage.cache_creation_tokens:
            # Only when reported: a record without them is the layout older releases wrote
            # (and they read these: unknown usage fields are ignored), so `v` stays.
            usage_record["cached_tokens"] = usage.cached_tokens
            usage_record["cache_creation_tokens"] = usage.cache_creation_tokens
        record = {
            "v": RECORD_VERSION,
            "turn_id": turn.turn_id,
            "seq": turn.seq,
            "created_at": turn.created_at,
            "model": turn.model,
            "finish_reason": turn.finish_reason,
            "usage": usage_record,
            "system_messages": turn.system_messages,
            "request_messages": turn.request_messages,
            "response_message": turn.response_message,
        }
        if turn.token_counts:
            record["token_counts"] = turn.token_counts
        if turn.facts:
            record["facts"] = turn.facts
        try:
            return orjson.dumps(record)
        except TypeError as exc:  # orjson.JSONEncodeError subclasses TypeError
            # orjson names the kind of problem (lone surrogate, int > 64 bit), never the content.
            raise StoreError(f"turn {turn.turn_id!r} cannot be encoded: {exc}") from None

    def decode(self, data: bytes) -> Turn:
        record = load_record(data, "turn record", SUPPORTED_VERSIONS)
        try:
            return _turn_from_record(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"corrupt turn record: {type(exc).__name__} {exc}") from None


def load_record(data: bytes, what: str, versions: frozenset[int]) -> dict[str, Any]:
    """A versioned JSON record as a dict: `StoreError` naming `what` when it is not JSON, not
    an object, or of a version outside `versions` (shared by every record kind we store)."""
    try:
        record = _loads(data)
    except orjson.JSONDecodeError:
        raise StoreError(f"corrupt {what}: not valid JSON") from None
    if type(record) is not dict:
        raise StoreError(f"corrupt {what}: not a JSON object")
    version = record.get("v")
    # type() not isinstance(): True and 1.0 compare equal to 1 but are not a version.
    if type(version) is not int or version not in versions:
        raise StoreError(
            f"unsupported {what} version {version!r} (this release reads {sorted(versions)})"
        )
    return record


_loads = orjson.loads
# Defaults for absent fields; only read, never mutated.
_NO_USAGE: dict[str, Any] = {}
_NO_MESSAGES: list[Message] = []
_NO_COUNTS: dict[str, int] = {}
_NO_FACTS: dict[str, list[list[str]]] = {}


def _turn_from_record(record: dict[str, Any]) -> Turn:
    """Build the Turn, checking every field's type. On the warm-read path (50 turns a read;
    ~2 µs a turn on top of `orjson.loads`, measured), so the checks are inline `type() is`
    tests (which also refuse a bool where an int belongs: bool is an int subclass) and the
    constructors are called positionally."""
    get = record.get
    turn_id = record["turn_id"]
    seq = get("seq", 0)
    model = get("model", "")
    finish_reason = get("finish_reason")
    if type(turn_id) is not str or type(model) is not str or type(seq) is not int:
        raise TypeError("turn_id and model must be str, seq an int")
    if finish_reason is not None and type(finish_reason) is not str:
        raise TypeError("finish_reason must be str or null")
    usage = get("usage") or _NO_USAGE
    if type(usage) is not dict:
        raise TypeError("usage must be an object")
    prompt_tokens = usage.get("prompt_tokens", 0)
    completion_tokens = usage.get("completion_tokens", 0)
    cached_tokens = usage.get("cached_tokens", 0)
    cache_creation_tokens = usage.get("cache_creation_tokens", 0)
    if (
        type(prompt_tokens) is not int
        or type(completion_tokens) is not int
        or type(cached_tokens) is not int
        or type(cache_creation_tokens) is not int
    ):
        raise TypeError("token counts must be int")
    request = record["request_messages"]
    system = get("system_messages", _NO_MESSAGES)
    response = record["response_message"]
    if type(request) is not list or type(system) is not list:
        raise TypeError("request_messages and system_messages must be lists")
    if type(response) is not dict:
        raise TypeError("response_message must be an object")
    for message in request:
        if type(message) is not dict:
            raise TypeError("request_messages must hold objects")
    for message in system:
        if type(message) is not dict:
            raise TypeError("system_messages must hold objects")
    counts = get("token_counts") or _NO_COUNTS
    if type(counts) is not dict or any(type(n) is not int for n in counts.values()):
        raise TypeError("token_counts must map names to int")
    facts = get("facts") or _NO_FACTS
    if type(facts) is not dict or any(type(f) is not list for f in facts.values()):
        raise TypeError("facts must map versions to lists")
    # Positional, in field order (Turn: turn_id, request_messages, response_message,
    # system_messages, model, finish_reason, usage, created_at, seq, token_counts, facts):
    # keywords cost twice as much.
    return Turn(
        turn_id,
        tuple(request),
        response,
        tuple(system),
        model,
        finish_reason,
        Usage(
            prompt_tokens,
            completion_tokens,
            bool(usage.get("estimated", False)),
            cached_tokens,
            cache_creation_tokens,
        ),
        float(get("created_at", 0.0)),
        seq,
        counts if counts is not _NO_COUNTS else {},
        facts if facts is not _NO_FACTS else {},
    )


# The codec the backends use unless given another (e.g. an encrypting wrapper).
DEFAULT_CODEC = TurnCodec()


def encode_turn(turn: Turn) -> bytes:
    return DEFAULT_CODEC.encode(turn)


def decode_turn(data: bytes) -> Turn:
    return DEFAULT_CODEC.decode(data)
