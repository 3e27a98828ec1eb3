"""Serialized turns, cached: a turn is immutable once stored, so its wire form is too.

Rewrite used to re-encode the whole history on every request (and once more just to size it):
~45 µs of a 50-message request's CPU, and O(history) JSON work for a 10,000-message session.
Each protocol keeps one `TurnWireCache`; `build_body` splices the cached pieces into the
request's own JSON without re-encoding them.

Keyed by turn id, and valid only for the very Turn object it was made from (`is`): the hot
tier hands out the same objects request after request, so hits are the rule, and a turn
reloaded from Redis or the cold tier, or another turn under the same id (store-level callers
can make one), is simply encoded again. Bounded by bytes, least recently used first.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from store.model import Turn


def dumps_exact(value: Any) -> bytes:
    """orjson, or the stdlib for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def joined(messages: Sequence[Any]) -> bytes:
    """Messages as JSON array items without the brackets: `{...},{...}`."""
    return dumps_exact(list(messages))[1:-1]


class TurnWireCache:
    def __init__(self, encode: Callable[[Turn], bytes], max_bytes: int = 32 * 1024 * 1024) -> None:
        self._encode = encode
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, tuple[Turn, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, turn: Turn) -> bytes:
        items = self._items
        entry = items.get(turn.turn_id)
        if entry is not None and entry[0] is turn:
            items.move_to_end(turn.turn_id)
            self.hits += 1
            return entry[1]
        self.misses += 1
        wire = self._encode(turn)
        if entry is not None:
            self._bytes -= len(entry[1])
        if len(wire) <= self._max_bytes:
            items[turn.turn_id] = (turn, wire)
            items.move_to_end(turn.turn_id)
            self._bytes += len(wire)
            while self._bytes > self._max_bytes:
                _, (_, evicted) = items.popitem(last=False)
                self._bytes -= len(evicted)
        elif entry is not None:
            del items[turn.turn_id]
        return wire

    def __len__(self) -> int:
        return len(self._items)
