"""The sliding window: coarse quantized cuts, tool exchanges kept whole, the per-session index."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.context.window import (
    TOOL_PAIRING,
    WINDOW_MESSAGES,
    WINDOW_TOKENS,
    HistoryIndex,
    HistoryIndexCache,
    TurnInfo,
    quantized_start,
    select,
    starts_clean,
)
from store.model import Message, Turn
from tests.tool_pairing import tool_errors

# --- conversations -----------------------------------------------------------------------------


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def calls(ids: list[str]) -> Message:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}} for i in ids
        ],
    }


def result(call_id: str) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "content": "ok"}


def text_turn(n: int, words: int = 3) -> Turn:
    return Turn(f"t{n}", (user(" ".join(["w"] * words)),), {"role": "assistant", "content": "a"})


def weight(turn: Turn) -> int:
    """A turn's size for these tests: its number of words (tokens in the real planner)."""
    total = 1
    for message in turn.messages():
        content = message.get("content")
        total += len(content.split()) if isinstance(content, str) else 1
    return total


def info(turn: Turn) -> TurnInfo:
    return TurnInfo(weight(turn), len(turn.messages()), starts_clean(turn.request_messages), False)


def index_of(turns: list[Turn]) -> HistoryIndex:
    index = HistoryIndex()
    index.extend(turns, info)
    return index


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[Turn], tuple[Message, ...]]:
    """Well-formed histories with tool loops, and the next request's new messages (which answer
    the last turn's calls when it made some)."""
    n = draw(st.integers(0, 25))
    turns: list[Turn] = []
    open_calls: list[str] = []
    for i in range(n + 1):
        request: list[Message] = [result(c) for c in open_calls]
        if not open_calls or draw(st.booleans()):
            request.append(user(" ".join(["w"] * draw(st.integers(1, 20)))))
        if i == n:
            return turns, tuple(request)
        if draw(st.integers(0, 2)) == 0:
            open_calls = [f"c{i}_{k}" for k in range(draw(st.integers(1, 3)))]
            reply = calls(open_calls)
        else:
            open_calls = []
            reply = {"role": "assistant", "content": " ".join(["r"] * draw(st.integers(1, 20)))}
        turns.append(Turn(f"t{i}", tuple(request), reply))
    raise AssertionError("unreachable")


# --- quantized_start ---------------------------------------------------------------------------


def sums_of(sizes: list[int]) -> list[int]:
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return out


def test_everything_fits_nothing_cut() -> None:
    assert quantized_start(sums_of([5, 5, 5]), 15, 3) == 0
    assert quantized_start([0], 0, 1) == 0


def test_cut_lands_on_a_step() -> None:
    sums = sums_of([10] * 10)  # 100 tokens, budget 45, step 20: cut at >= 60
    assert quantized_start(sums, 45, 20) == 6


def test_zero_budget_cuts_everything() -> None:
    assert quantized_start(sums_of([1, 2, 3]), 0, 5) == 3


@given(
    sizes=st.lists(st.integers(1, 60), max_size=60),
    limit=st.integers(0, 800),
    fraction=st.floats(0.01, 1.0),
)
@settings(max_examples=300, deadline=None)
def test_kept_within_limit_and_within_a_step_of_it(
    sizes: list[int], limit: int, fraction: float
) -> None:
    sums = sums_of(sizes)
    step = max(1, int(limit * fraction))
    start = quantized_start(sums, limit, step)
    kept = sums[-1] - sums[start]
    assert 0 <= start <= len(sizes)
    assert kept <= limit
    if start:
        # Never more than one step (plus the turn straddling the cut) below the limit.
        assert kept > limit - step - max(sizes)


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=120),
    limit=st.integers(50, 400),
    fraction=st.floats(0.05, 0.5),
)
@settings(max_examples=200, deadline=None)
def test_growing_history_moves_the_cut_rarely_and_only_forward(
    sizes: list[int], limit: int, fraction: float
) -> None:
    """As a conversation grows the first kept turn never moves back, and it moves about once
    per `step` tokens of growth: the prefix stays identical in between."""
    step = max(1, int(limit * fraction))
    starts = [quantized_start(sums_of(sizes[:n]), limit, step) for n in range(len(sizes) + 1)]
    assert starts == sorted(starts)
    moves = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    assert moves <= sum(sizes) // step + 1


# --- select: tool pairing ----------------------------------------------------------------------


@given(
    conversation=conversations(),
    budget=st.integers(0, 300),
    fraction=st.floats(0.05, 1.0),
    max_messages=st.integers(0, 30),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_selection_never_leaves_an_orphan_and_stays_in_budget(
    conversation: tuple[list[Turn], tuple[Message, ...]],
    budget: int,
    fraction: float,
    max_messages: int,
) -> None:
    history, new = conversation
    index = index_of(history)
    chosen = select(
        index,
        budget,
        step_fraction=fraction,
        max_messages=max_messages,
        must_keep_last=not starts_clean(new),
    )
    if not chosen.fits:
        # Only when the request answers tool calls whose exchange cannot fit.
        assert not starts_clean(new)
        return
    kept = history[chosen.start :]
    messages = [m for t in kept for m in t.messages()] + list(new)
    assert tool_errors(messages) == []
    assert chosen.tokens == sum(weight(t) for t in kept) <= budget
    assert sum(chosen.dropped.values()) == chosen.start
    assert all(v > 0 for v in chosen.dropped.values())


def test_a_tool_loop_is_dropped_whole() -> None:
    history = [
        text_turn(0),
        Turn("t1", (user("go"),), calls(["a"])),
        Turn("t2", (result("a"),), calls(["b"])),
        Turn("t3", (result("b"), user("and?")), {"role": "assistant", "content": "done"}),
        text_turn(4),
    ]
    index = index_of(history)
    sizes = [weight(t) for t in history]
    # A budget that fits the last two turns only: t3 starts with t2's results, so t3 goes too.
    chosen = select(index, sizes[3] + sizes[4], step_fraction=0.01)
    assert chosen.start == 4
    assert chosen.dropped == {WINDOW_TOKENS: 3, TOOL_PAIRING: 1}


def test_the_exchange_a_request_answers_is_kept_even_off_step() -> None:
    history = [text_turn(i, words=10) for i in range(5)]
    history.append(Turn("t5", (user("call"),), calls(["x"])))
    index = index_of(history)
    last = weight(history[-1])
    # Steps of the whole budget would cut everything; the tool exchange must stay.
    chosen = select(index, last + 2, step_fraction=1.0, must_keep_last=True)
    assert chosen.fits and chosen.start == 5


def test_an_answered_exchange_that_cannot_fit_is_reported() -> None:
    history = [Turn("t0", (user("call " * 50),), calls(["x"]))]
    chosen = select(index_of(history), 10, step_fraction=0.2, must_keep_last=True)
    assert not chosen.fits


def test_message_cap_in_whole_turns_with_its_own_strategy_name() -> None:
    history = [text_turn(i) for i in range(10)]  # 2 messages each
    chosen = select(index_of(history), 10_000, step_fraction=0.25, max_messages=8)
    kept = len(history) - chosen.start
    assert kept * 2 <= 8
    assert chosen.dropped == {WINDOW_MESSAGES: chosen.start}


def test_negative_budget_keeps_nothing() -> None:
    history = [text_turn(i) for i in range(3)]
    chosen = select(index_of(history), -1, step_fraction=0.2)
    assert chosen.start == 3 and chosen.fits and chosen.tokens == 0


# --- the per-session index ---------------------------------------------------------------------


def counting(fn: Callable[[Turn], TurnInfo]) -> tuple[Callable[[Turn], TurnInfo], list[Turn]]:
    seen: list[Turn] = []

    def wrapped(turn: Turn) -> TurnInfo:
        seen.append(turn)
        return fn(turn)

    return wrapped, seen


def test_index_extends_with_new_turns_only() -> None:
    fn, seen = counting(info)
    cache = HistoryIndexCache(fn)
    history = [text_turn(i) for i in range(100)]
    cache.index("s", history)
    assert len(seen) == 100
    history.append(text_turn(100))
    index = cache.index("s", history)
    assert len(seen) == 101 and seen[-1] is history[-1]
    assert index.tokens[-1] == sum(weight(t) for t in history)
    assert cache.rebuilds == 1


def test_index_rebuilt_when_turn_objects_change() -> None:
    """A history reloaded from another tier, rewound or cleared is counted afresh."""
    fn, seen = counting(info)
    cache = HistoryIndexCache(fn)
    history = [text_turn(i) for i in range(5)]
    cache.index("s", history)
    reloaded = [text_turn(i) for i in range(5)]
    cache.index("s", reloaded)
    assert cache.rebuilds == 2 and len(seen) == 10
    rewound = reloaded[:3]
    index = cache.index("s", rewound)
    assert cache.rebuilds == 3 and index.n == 3
    assert cache.index("s", []).n == 0


def test_index_remembers_the_pinned_system_turn() -> None:
    def with_system(turn: Turn) -> TurnInfo:
        return TurnInfo(1, 2, True, turn.turn_id in {"t1", "t3"})

    cache = HistoryIndexCache(with_system)
    history = [text_turn(i) for i in range(5)]
    assert cache.index("s", history).last_system == 3
    assert cache.index("s", history[:2]).last_system == 1


def test_index_cache_bounded_by_turns() -> None:
    cache = HistoryIndexCache(info, max_turns=25)
    for s in range(5):
        cache.index(f"s{s}", [text_turn(i) for i in range(10)])
    assert len(cache) == 2


@pytest.mark.parametrize(
    ("messages", "clean"),
    [
        ([user("x")], True),
        ([result("a"), user("x")], False),
        ([calls(["a"]), result("a"), user("x")], True),
        ([], True),
    ],
)
def test_starts_clean(messages: list[dict[str, Any]], clean: bool) -> None:
    assert starts_clean(messages) is clean


def test_cut_does_not_jitter_with_the_request_size() -> None:
    """The budget moves with each request's own size; the cut stays where it was while it
    still fits, so it only ever moves forward, a block at a time."""
    history = [text_turn(i, words=8) for i in range(60)]  # 10 tokens a turn here
    index = index_of(history)
    starts = []
    for n, wobble in enumerate([0, 30, -30, 25, -25, 0, 40, -10] * 4):
        index.extend([text_turn(100 + n, words=8)], info)
        starts.append(select(index, 300 + wobble, step_fraction=0.2).start)
    assert starts == sorted(starts)
    # 320 tokens of growth in steps of about 55 tokens: 6 moves, 7 distinct cuts at most.
    assert len(set(starts)) <= 7


def test_previous_cut_given_up_when_the_budget_grows_for_good() -> None:
    history = [text_turn(i, words=8) for i in range(60)]
    index = index_of(history)
    small = select(index, 200, step_fraction=0.2)
    large = select(index, 600, step_fraction=0.2)
    assert large.start < small.start
    assert large.tokens > 600 - 2 * 120
    again = select(index, 150, step_fraction=0.2)  # shrinks: moves forward at once
    assert again.tokens <= 150 and again.start > large.start


@given(
    conversation=conversations(),
    budgets=st.lists(st.integers(0, 300), min_size=2, max_size=6),
    fraction=st.floats(0.05, 1.0),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_repeated_selections_stay_valid(
    conversation: tuple[list[Turn], tuple[Message, ...]], budgets: list[int], fraction: float
) -> None:
    """Whatever the previous cut was, each selection is within its own budget, orphan-free."""
    history, new = conversation
    index = index_of(history)
    for budget in budgets:
        chosen = select(index, budget, step_fraction=fraction, must_keep_last=not starts_clean(new))
        if not chosen.fits:
            continue
        kept = history[chosen.start :]
        assert chosen.tokens == sum(weight(t) for t in kept) <= budget
        assert tool_errors([m for t in kept for m in t.messages()] + list(new)) == []
