"""The sliding window: which history turns fit, cut in coarse steps, tool exchanges whole.

History is cut only at turn boundaries, and only at *clean* ones: a turn whose request starts
with tool results (answering the previous turn's `tool_calls`) cannot be the first injected
turn, or its results would be orphans. The assistant message with `tool_calls` and its results
are therefore always kept or dropped together, however long the tool loop.

Prompt-cache friendliness: the cut is not "as many of the newest turns as fit" (that moves
the first injected turn on every request, so a provider's prompt cache never sees the same
prefix twice). Instead the cut point is quantized in the session's cumulative token count:
with `S` = step x budget, the first kept turn is the first whose cumulative start is at least
`ceil((T - B) / S) * S` (`T` = tokens of the whole history, `B` = the budget). It stays put
while the history grows by up to `S` tokens, then jumps by about `S`: the injected prefix is
byte-identical for many consecutive requests, the history uses between `B - S` and `B` tokens
(less a turn), and the choice depends on the history alone (replicas agree, nothing stored).
The same quantization applies to the optional message cap.

`HistoryIndexCache` keeps a session's prefix sums between requests (identity-checked against
the first and last turn objects, extended by the new turns only), so a 10,000-message session
costs a bisect, not a pass over its turns, per request.
"""

from __future__ import annotations

import bisect
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from extproc.context.facts import Fact
from extproc.context.relevance import RelevanceIndex
from store.model import Message, Turn

# Strategy names as they appear in metrics and dynamic metadata.
RELEVANCE = "relevance"  # older turns relevance selection did not pick
WINDOW_TOKENS = "window_tokens"
WINDOW_MESSAGES = "window_messages"
TOOL_PAIRING = "tool_pairing"
SIZE_LIMIT = "size_limit"


def starts_clean(messages: Sequence[Message]) -> bool:
    """False when a `tool` result comes before any assistant message: it answers tool calls
    made before these messages, so they cannot start a conversation."""
    for message in messages:
        role = message.get("role")
        if role == "tool":
            return False
        if role == "assistant":
            return True
    return True


def turn_starts_clean(turn: Turn) -> bool:
    return starts_clean(turn.request_messages)


@dataclass(frozen=True, slots=True)
class TurnInfo:
    tokens: int  # prompt tokens of the turn's messages as history (framing included)
    messages: int
    clean_start: bool  # may be the first injected turn
    has_system: bool  # carried a system prompt (the pinned one is the newest such)
    facts: tuple[Fact, ...] = ()  # key information the user stated in it


@dataclass(slots=True)
class HistoryIndex:
    """Prefix sums over one session's history: `tokens[i]` = tokens of turns [0, i)."""

    first: Turn | None = None
    last: Turn | None = None
    tokens: array[int] = field(default_factory=lambda: array("q", [0]))
    messages: array[int] = field(default_factory=lambda: array("q", [0]))
    clean: bytearray = field(default_factory=bytearray)
    last_system: int = -1  # index of the newest turn with a system prompt
    last_start: int = -1  # the previous request's first injected turn (-1: none yet)
    last_dropped: dict[str, int] = field(default_factory=dict)  # and why the rest went
    facts: list[tuple[int, Fact]] = field(default_factory=list)  # (turn index, fact), in order
    facts_memo: dict[tuple[int, ...], tuple[Message | None, int]] = field(default_factory=dict)
    relevance: RelevanceIndex | None = None  # built the first time relevance is used

    @property
    def n(self) -> int:
        return len(self.clean)

    def extend(self, turns: Sequence[Turn], info: Callable[[Turn], TurnInfo]) -> None:
        tokens, messages, clean = self.tokens, self.messages, self.clean
        for turn in turns:
            item = info(turn)
            if item.has_system:
                self.last_system = len(clean)
            for fact in item.facts:
                self.facts.append((len(clean), fact))
            tokens.append(tokens[-1] + item.tokens)
            messages.append(messages[-1] + item.messages)
            clean.append(1 if item.clean_start else 0)
        if turns:
            if self.first is None:
                self.first = turns[0]
            self.last = turns[-1]

    def matches(self, history: Sequence[Turn]) -> bool:
        """The index still describes a prefix of `history` (same first and n-th turn objects)."""
        n = self.n
        return 0 < n <= len(history) and history[0] is self.first and history[n - 1] is self.last


class HistoryIndexCache:
    """Per-session `HistoryIndex`, least recently used first out, bounded by indexed turns."""

    def __init__(self, info: Callable[[Turn], TurnInfo], max_turns: int = 1_000_000) -> None:
        self._info = info
        self._max_turns = max_turns
        self._turns = 0
        self._items: OrderedDict[str, HistoryIndex] = OrderedDict()
        self.rebuilds = 0

    def index(self, session_key: str, history: Sequence[Turn]) -> HistoryIndex:
        items = self._items
        found = items.get(session_key)
        if found is not None and found.matches(history):
            items.move_to_end(session_key)
            before = found.n
            found.extend(history[before:], self._info)
            self._turns += found.n - before
        else:
            if found is not None:
                self._turns -= found.n
                del items[session_key]
            self.rebuilds += 1
            found = HistoryIndex()
            found.extend(history, self._info)
            if not history:
                return found  # nothing worth remembering
            items[session_key] = found
            self._turns += found.n
        while self._turns > self._max_turns and len(items) > 1:
            _, evicted = items.popitem(last=False)
            self._turns -= evicted.n
        return found

    def forget(self, session_key: str) -> None:
        found = self._items.pop(session_key, None)
        if found is not None:
            self._turns -= found.n

    def __len__(self) -> int:
        return len(self._items)


def quantized_start(sums: Sequence[int], limit: int, step: int) -> int:
    """The first kept index so that `sums[-1] - sums[start] <= limit`, the cut placed on a
    multiple of `step` in `sums` (non-decreasing, `sums[0] == 0`). 0 when everything fits."""
    total = sums[-1]
    if total <= limit:
        return 0
    step = max(1, min(step, limit)) if limit > 0 else 1
    excess = total - max(limit, 0)
    threshold = -(-excess // step) * step  # ceil(excess / step) * step
    return bisect.bisect_left(sums, threshold)


@dataclass(frozen=True, slots=True)
class Selection:
    start: int  # the first injected turn; == n when none is
    fits: bool  # False: the exchange the request answers does not fit (nothing to inject)
    tokens: int  # tokens of the selected turns
    dropped: dict[str, int]  # turns dropped, by strategy


def select(
    index: HistoryIndex,
    budget: int,
    *,
    step_fraction: float,
    max_messages: int = 0,
    must_keep_last: bool = False,
) -> Selection:
    """Which turns of the indexed history to inject within `budget` tokens.

    `must_keep_last`: the request's own messages start with tool results answering the last
    turn's calls, so that turn (with the whole tool exchange it belongs to) must be kept; if it
    cannot be, the selection does not fit.
    """
    n = index.n
    sums = index.tokens
    total = sums[n]
    if budget < 0:
        return Selection(n, not must_keep_last, 0, {WINDOW_TOKENS: n} if n else {})
    step_tokens = int(budget * step_fraction)
    kept = _keep_previous(index, budget, step_tokens, max_messages, must_keep_last)
    if kept is not None:
        return kept
    by_tokens = quantized_start(sums, budget, step_tokens)
    start = by_tokens
    by_messages = 0
    if max_messages > 0:
        step = max(1, int(max_messages * step_fraction))
        by_messages = quantized_start(index.messages, max_messages, step)
        start = max(start, by_messages)
    cut = start
    if start < n and not index.clean[start]:
        clean = index.clean.find(1, start)
        start = n if clean < 0 else clean
    dropped: dict[str, int] = {}
    if must_keep_last and n:
        keep_from = index.clean.rfind(1, 0, n)
        keep_from = max(keep_from, 0)
        if start > keep_from:
            if total - sums[keep_from] > budget:
                return Selection(n, False, 0, {WINDOW_TOKENS: n})
            # Not on a step: the tool exchange in progress outranks prefix stability.
            start = cut = keep_from
            by_tokens = min(by_tokens, keep_from)
            by_messages = min(by_messages, keep_from)
    if by_tokens:
        dropped[WINDOW_TOKENS] = by_tokens
    if by_messages > by_tokens:
        dropped[WINDOW_MESSAGES] = by_messages - by_tokens
    if start > cut:
        dropped[TOOL_PAIRING] = start - cut
    index.last_start, index.last_dropped = start, dropped
    return Selection(start, True, total - sums[start], dropped)


def _keep_previous(
    index: HistoryIndex, budget: int, step: int, max_messages: int, must_keep_last: bool
) -> Selection | None:
    """The previous request's cut, while it still fits and wastes under two steps.

    The quantized cut depends on the budget, which moves with the size of each request's own
    messages: near a step boundary, a short request after a long one would move the cut back and
    forth. Keeping the previous cut while it stays valid removes that jitter (the cut only ever
    moves forward, a block at a time); the waste bound lets it follow a budget that grew for
    good (a bigger model, a smaller max_tokens). State is per process and per session index,
    and only an optimisation: without it the cut is the quantized one.
    """
    start, n = index.last_start, index.n
    if start < 0 or start > n:
        return None
    kept = index.tokens[n] - index.tokens[start]
    if kept > budget or (start > 0 and kept <= budget - 2 * max(step, 1)):
        return None
    if max_messages > 0 and index.messages[n] - index.messages[start] > max_messages:
        return None
    if must_keep_last and n and start > max(index.clean.rfind(1, 0, n), 0):
        return None
    return Selection(start, True, kept, dict(index.last_dropped))
