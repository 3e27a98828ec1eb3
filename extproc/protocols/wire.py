"""Serialized turns, cached: a turn is immutable once stored, so its wire form is too.

Rewrite used to re-encode the whole history on every request (and once more just to size it):
~45 µs of a 50-message request's CPU, and O(history) JSON work for a 10,000-message session.
Each protocol keeps one `TurnWireCache`; `build_body` splices the cached pieces into the
request's own JSON without re-encoding them.

Keyed by turn id, and valid only for a Turn equal to the one it was made from: the hot tier
hands out the same objects request after request (an `is` check), and a turn reloaded from
Redis or the cold tier decodes to an equal one (a C-level comparison of a few small dicts, far
cheaper than tokenizing it and scanning it for key facts again: a 50-message session read from
Redis spent ~30% of sessiongate's CPU there). Another turn under the same id (a fork's copy at
another seq, an import that reuses ids) is not equal, so it is derived again, never served a
value of someone else's turn. Bounded by bytes, least recently used first.

`TurnCache` is the same cache for any value derived from a turn: extproc.context keeps each
turn's token count in one, keyed by encoding.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import orjson

from store.model import Turn

T = TypeVar("T")


def dumps_exact(value: Any) -> bytes:
    """orjson, or the stdlib for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def joined(messages: Sequence[Any]) -> bytes:
    """Messages as JSON array items without the brackets: `{...},{...}`."""
    return dumps_exact(list(messages))[1:-1]


class TurnCache(Generic[T]):
    """A value derived from a turn (its wire bytes, its token count...), cached.

    Keyed by turn id and valid only for the very Turn object it was made from. Bounded by the
    sum of `size(value)` (1 per entry by default), least recently used first.
    """

    def __init__(
        self,
        derive: Callable[[Turn], T],
        max_size: int,
        size: Callable[[T], int] | None = None,
    ) -> None:
        self._derive = derive
        self._size = size
        self._max_size = max_size
        self._total = 0
        self._items: OrderedDict[str, tuple[Turn, T]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, turn: Turn) -> T:
        items = self._items
        entry = items.get(turn.turn_id)
        if entry is not None and (entry[0] is turn or entry[0] == turn):
            if entry[0] is not turn:  # a reloaded copy: the next lookup finds it by `is`
                items[turn.turn_id] = (turn, entry[1])
            items.move_to_end(turn.turn_id)
            self.hits += 1
            return entry[1]
        self.misses += 1
        value = self._derive(turn)
        size = 1 if self._size is None else self._size(value)
        if entry is not None:
            self._total -= 1 if self._size is None else self._size(entry[1])
        if size <= self._max_size:
            items[turn.turn_id] = (turn, value)
            items.move_to_end(turn.turn_id)
            self._total += size
            while self._total > self._max_size:
                _, (_, evicted) = items.popitem(last=False)
                self._total -= 1 if self._size is None else self._size(evicted)
        elif entry is not None:
            del items[turn.turn_id]
        return value

    def __len__(self) -> int:
        return len(self._items)


class TurnWireCache(TurnCache[bytes]):
    """A turn's messages as spliced into a request body; bounded by bytes."""

    def __init__(self, encode: Callable[[Turn], bytes], max_bytes: int = 32 * 1024 * 1024) -> None:
        super().__init__(encode, max_bytes, len)
