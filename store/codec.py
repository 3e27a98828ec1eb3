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

from typing import Any, Protocol, TypeVar

import orjson

from store.base import StoreError
from store.model import RECORD_VERSION, Message, Turn, Usage

# Versions this release can decode. Widen it when a new `v` is introduced.
SUPPORTED_VERSIONS = frozenset({RECORD_VERSION})

_T = TypeVar("_T")


class Codec(Protocol):
    """What a backend needs to turn records into bytes and back."""

    def encode(self, turn: Turn) -> bytes: ...

    def decode(self, data: bytes) -> Turn: ...


class TurnCodec:
    """Plain orjson records: `{"v": 1, "turn_id": ..., ...}`."""

    def encode(self, turn: Turn) -> bytes:
        record = {
            "v": RECORD_VERSION,
            "turn_id": turn.turn_id,
            "seq": turn.seq,
            "created_at": turn.created_at,
            "model": turn.model,
            "finish_reason": turn.finish_reason,
            "usage": {
                "prompt_tokens": turn.usage.prompt_tokens,
                "completion_tokens": turn.usage.completion_tokens,
                "estimated": turn.usage.estimated,
            },
            "system_messages": turn.system_messages,
            "request_messages": turn.request_messages,
            "response_message": turn.response_message,
        }
        try:
            return orjson.dumps(record)
        except TypeError as exc:  # orjson.JSONEncodeError subclasses TypeError
            # orjson names the kind of problem (lone surrogate, int > 64 bit), never the content.
            raise StoreError(f"turn {turn.turn_id!r} cannot be encoded: {exc}") from None

    def decode(self, data: bytes) -> Turn:
        try:
            record = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StoreError("corrupt turn record: not valid JSON") from None
        if not isinstance(record, dict):
            raise StoreError("corrupt turn record: not a JSON object")
        version = record.get("v")
        # type() not isinstance(): True and 1.0 compare equal to 1 but are not a version.
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise StoreError(
                f"unsupported turn record version {version!r} "
                f"(this release reads {sorted(SUPPORTED_VERSIONS)})"
            )
        try:
            return _turn_from_record(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"corrupt turn record: {type(exc).__name__} {exc}") from None


def _turn_from_record(record: dict[str, Any]) -> Turn:
    """Build the Turn, checking every field's type. On the warm-read path (50 turns per
    read), so checks are inline `type() is` tests rather than helper calls."""
    usage = record.get("usage") or {}
    turn_id = record["turn_id"]
    seq = record.get("seq", 0)
    model = record.get("model", "")
    prompt_tokens = usage.get("prompt_tokens", 0)
    completion_tokens = usage.get("completion_tokens", 0)
    # bool is an int subclass: `type() is int` also refuses a bool where an int belongs.
    if type(turn_id) is not str or type(model) is not str:
        raise TypeError("turn_id and model must be str")
    if type(seq) is not int or type(prompt_tokens) is not int or type(completion_tokens) is not int:
        raise TypeError("seq and token counts must be int")
    response = record["response_message"]
    if type(response) is not dict:
        raise TypeError("response_message must be an object")
    return Turn(
        turn_id=turn_id,
        seq=seq,
        created_at=float(record.get("created_at", 0.0)),
        model=model,
        finish_reason=record.get("finish_reason"),
        usage=Usage(prompt_tokens, completion_tokens, bool(usage.get("estimated", False))),
        system_messages=_messages(record.get("system_messages", []), "system_messages"),
        request_messages=_messages(record["request_messages"], "request_messages"),
        response_message=response,
    )


def _typed(value: object, kind: type[_T], name: str) -> _T:
    # bool is an int subclass; a bool where an int belongs means the record is wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {kind.__name__}")
    return value


def _message(value: object, name: str) -> Message:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be an object")
    return value


def _messages(value: object, name: str) -> tuple[Message, ...]:
    if type(value) is not list:
        raise TypeError(f"{name} must be a list")
    for item in value:
        if type(item) is not dict:
            raise TypeError(f"{name} must hold objects")
    return tuple(value)


# The codec the backends use unless given another (e.g. an encrypting wrapper).
DEFAULT_CODEC = TurnCodec()


def encode_turn(turn: Turn) -> bytes:
    return DEFAULT_CODEC.encode(turn)


def decode_turn(data: bytes) -> Turn:
    return DEFAULT_CODEC.decode(data)
