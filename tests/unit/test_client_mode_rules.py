"""Client modes: canonical hashing, prefix deduplication, regenerate and divergence rules."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import client_modes as cm
from extproc.client_modes import canonical, message_hash, reconcile
from store.model import Message, Turn

_ids = itertools.count()


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def turn(question: str, answer: str, *extra: Message) -> Turn:
    return Turn(
        turn_id=f"t{next(_ids)}",
        request_messages=(*extra, user(question)),
        response_message=assistant(answer),
    )


def flat(history: list[Turn]) -> list[Message]:
    return [m for t in history for m in t.messages()]


HISTORY = [turn("q1", "a1"), turn("q2", "a2"), turn("q3", "a3")]


# --- canonical hashing -----------------------------------------------------------------------


def test_string_content_equals_a_single_text_part() -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": "hello"}]}
    assert message_hash(parts) == message_hash(user("hello"))


def test_two_text_parts_are_not_a_string() -> None:
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}],
    }
    assert message_hash(parts) != message_hash(user("hello"))


def test_key_order_does_not_matter() -> None:
    a = {"role": "user", "content": "x", "name": "bob"}
    b = {"name": "bob", "content": "x", "role": "user"}
    assert message_hash(a) == message_hash(b)


def test_none_fields_and_empty_tool_calls_are_absent() -> None:
    dumped: Message = {
        "role": "assistant",
        "content": "x",
        "refusal": None,
        "tool_calls": [],
        "audio": None,
    }
    assert message_hash(dumped) == message_hash(assistant("x"))


def test_surrounding_whitespace_ignored_but_not_inner() -> None:
    assert message_hash(user("  hi\n")) == message_hash(user("hi"))
    assert message_hash(user("h i")) != message_hash(user("hi"))


def test_tool_calls_canonical() -> None:
    stored = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    streamed = {
        "role": "assistant",
        "tool_calls": [{"index": 0, "id": "c1", "function": {"arguments": "{}", "name": "f"}}],
    }
    assert message_hash(stored) == message_hash(streamed)
    other_args = {
        "role": "assistant",
        "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a":1}'}}],
    }
    assert message_hash(stored) != message_hash(other_args)


def test_role_and_tool_call_id_matter() -> None:
    assert message_hash(user("x")) != message_hash(assistant("x"))
    r1 = {"role": "tool", "tool_call_id": "a", "content": "1"}
    r2 = {"role": "tool", "tool_call_id": "b", "content": "1"}
    assert message_hash(r1) != message_hash(r2)


def test_huge_integers_hash() -> None:
    assert message_hash({"role": "user", "content": "x", "n": 10**30}) != message_hash(user("x"))


_text = st.text(alphabet="ab \n", max_size=6)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "tool"]), "content": _text},
    optional={"name": st.sampled_from(["n1", "n2"]), "tool_call_id": st.sampled_from(["c1", "c2"])},
)


@settings(max_examples=200, deadline=None)
@given(_message)
def test_equivalent_spellings_hash_alike(message: dict[str, Any]) -> None:
    reordered = dict(reversed(list(message.items())))
    as_part = {**message, "content": [{"type": "text", "text": message["content"]}]}
    with_nones = {**message, "refusal": None, "tool_calls": None}
    h = message_hash(message)
    assert message_hash(reordered) == h
    assert message_hash(as_part) == h
    assert message_hash(with_nones) == h
    assert canonical(canonical(message)) == canonical(message)


# --- manage: prefix deduplication -----------------------------------------------------------


def test_manage_extends_stored_history() -> None:
    request = [*flat(HISTORY), user("q4")]
    seen = reconcile(cm.MANAGE, HISTORY, request)
    assert (seen.kind, seen.new_messages, seen.keep_turns) == (cm.EXTENDED, (user("q4"),), 3)
    assert seen.matched_messages == 6
    assert not seen.rewinds(3)


def test_manage_with_text_parts_and_dumped_fields_still_matches() -> None:
    request: list[Message] = []
    for m in flat(HISTORY):
        request.append({**m, "content": [{"type": "text", "text": m["content"]}], "refusal": None})
    request.append(user("q4"))
    seen = reconcile(cm.MANAGE, HISTORY, request)
    assert seen.kind == cm.EXTENDED and seen.new_messages == (user("q4"),)


def test_manage_empty_store_everything_new() -> None:
    request = [user("q1"), assistant("a1"), user("q2")]
    seen = reconcile(cm.MANAGE, [], request)
    assert (seen.kind, seen.new_messages, seen.keep_turns) == (cm.EXTENDED, tuple(request), 0)


def test_manage_regenerate_last_turn() -> None:
    request = [*flat(HISTORY[:2]), user("q3")]
    seen = reconcile(cm.MANAGE, HISTORY, request)
    assert (seen.kind, seen.new_messages, seen.keep_turns) == (cm.REGENERATED, (user("q3"),), 2)
    assert seen.rewinds(3)


def test_manage_edited_last_question_replaces_it() -> None:
    request = [*flat(HISTORY[:2]), user("q3 edited")]
    seen = reconcile(cm.MANAGE, HISTORY, request)
    assert (seen.kind, seen.new_messages, seen.keep_turns) == (cm.DIVERGED, (user("q3 edited"),), 2)


def test_manage_edit_of_an_earlier_message_forks_there() -> None:
    request = [user("q1"), assistant("a1"), user("q2 edited"), assistant("a2"), user("q5")]
    seen = reconcile(cm.MANAGE, HISTORY, request)
    assert seen.kind == cm.DIVERGED
    assert seen.keep_turns == 1
    assert seen.new_messages == tuple(request[2:])


def test_manage_asking_an_earlier_turn_again_forks() -> None:
    seen = reconcile(cm.MANAGE, HISTORY, [user("q1")])
    assert (seen.kind, seen.keep_turns, seen.new_messages) == (cm.DIVERGED, 0, (user("q1"),))


def test_manage_unrelated_conversation_starts_over() -> None:
    seen = reconcile(cm.MANAGE, HISTORY, [user("other")])
    assert (seen.kind, seen.keep_turns) == (cm.DIVERGED, 0)


def test_manage_different_reply_forks_at_that_turn() -> None:
    request = [user("q1"), assistant("a1"), user("q2"), assistant("not a2"), user("q3")]
    seen = reconcile(cm.MANAGE, HISTORY, request)
    assert (seen.kind, seen.keep_turns, seen.new_messages) == (cm.DIVERGED, 1, tuple(request[2:]))


def test_manage_repeat_of_stored_history_adds_nothing() -> None:
    assert reconcile(cm.MANAGE, HISTORY, flat(HISTORY)).kind == cm.NOTHING_NEW
    assert reconcile(cm.MANAGE, HISTORY, flat(HISTORY[:1])).kind == cm.NOTHING_NEW


def test_manage_tool_exchange_turns() -> None:
    call: Message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    result = {"role": "tool", "tool_call_id": "c1", "content": "42"}
    history = [
        Turn(turn_id="x1", request_messages=(user("q"),), response_message=call),
        Turn(turn_id="x2", request_messages=(result,), response_message=assistant("it is 42")),
    ]
    sdk_call = {**call, "refusal": None, "tool_calls": [{**call["tool_calls"][0], "index": 0}]}
    request = [user("q"), sdk_call, result, assistant("it is 42"), user("thanks")]
    seen = reconcile(cm.MANAGE, history, request)
    assert (seen.kind, seen.new_messages) == (cm.EXTENDED, (user("thanks"),))
    # the tool result sent again after the call: the last turn regenerated
    again = reconcile(cm.MANAGE, history, [user("q"), call, result])
    assert (again.kind, again.keep_turns, again.new_messages) == (cm.REGENERATED, 1, (result,))


@st.composite
def _conversation(draw: st.DrawFn) -> tuple[list[Turn], list[Message]]:
    n = draw(st.integers(0, 6))
    words = st.sampled_from(["a", "b", "c"])
    history = [turn(draw(words), draw(words)) for _ in range(n)]
    keep = draw(st.integers(0, n))
    tail = [
        draw(st.sampled_from([user("x"), user("a"), assistant("b")]))
        for _ in range(draw(st.integers(0, 3)))
    ]
    return history, [*flat(history[:keep]), *tail]


@settings(max_examples=300, deadline=None)
@given(_conversation())
def test_manage_properties(case: tuple[list[Turn], list[Message]]) -> None:
    history, request = case
    seen = reconcile(cm.MANAGE, history, request)
    kept = flat(history[: seen.keep_turns])
    if seen.kind == cm.NOTHING_NEW:
        assert not seen.rewinds(len(history))
        return
    # What stays stored plus the new messages is exactly the request: nothing duplicated,
    # nothing lost.
    assert [message_hash(m) for m in [*kept, *seen.new_messages]] == [
        message_hash(m) for m in request
    ]
    assert seen.new_messages
    assert 0 <= seen.keep_turns <= len(history)
    # The longest whole-turn prefix is kept.
    if seen.keep_turns < len(history):
        nxt = history[seen.keep_turns].messages()
        rest = request[len(kept) :]
        assert [message_hash(m) for m in rest[: len(nxt)]] != [message_hash(m) for m in nxt]


# --- append ---------------------------------------------------------------------------------


def test_append_new_messages_all_new() -> None:
    seen = reconcile(cm.APPEND, HISTORY, [user("q4")])
    assert (seen.kind, seen.new_messages, seen.keep_turns) == (cm.APPENDED, (user("q4"),), 3)


def test_append_same_message_again_is_a_new_turn_by_default() -> None:
    seen = reconcile(cm.APPEND, HISTORY, [user("q3")])
    assert (seen.kind, seen.keep_turns) == (cm.APPENDED, 3)


def test_append_same_message_again_regenerates_when_enabled() -> None:
    seen = reconcile(
        cm.APPEND,
        HISTORY,
        [{"role": "user", "content": [{"type": "text", "text": "q3"}]}],
        append_regenerate=True,
    )
    assert (seen.kind, seen.keep_turns) == (cm.REGENERATED, 2)


def test_append_earlier_message_again_is_a_new_turn() -> None:
    seen = reconcile(cm.APPEND, HISTORY, [user("q2")], append_regenerate=True)
    assert (seen.kind, seen.keep_turns) == (cm.APPENDED, 3)


def test_append_empty_history() -> None:
    assert reconcile(cm.APPEND, [], [user("q")]).kind == cm.APPENDED


# --- auto -----------------------------------------------------------------------------------


def test_auto_manage_when_request_starts_with_first_turn() -> None:
    assert reconcile(cm.AUTO, HISTORY, [*flat(HISTORY), user("q4")]).mode == cm.MANAGE
    assert reconcile(cm.AUTO, HISTORY, [*flat(HISTORY[:1]), user("q")]).mode == cm.MANAGE


def test_auto_append_otherwise() -> None:
    assert reconcile(cm.AUTO, HISTORY, [user("q4")]).mode == cm.APPEND
    assert reconcile(cm.AUTO, HISTORY, [user("q1")]).mode == cm.APPEND  # too short: append
    assert reconcile(cm.AUTO, [], [user("q1"), assistant("a"), user("q2")]).mode == cm.APPEND
