"""Unit tests for the request side of extproc.protocols.openai_chat: parse and rebuild bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from extproc.protocols.openai_chat import (
    ChatRequest,
    RequestError,
    build_body,
    parse_request,
    pinned_system,
)
from store.model import Message, Turn

BIG = 10**9


def body_bytes(messages: list[Message], **fields: Any) -> bytes:
    return orjson.dumps({"model": "gpt-4o", **fields, "messages": messages})


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def system(text: str, role: str = "system") -> Message:
    return {"role": role, "content": text}


def turn(n: int | str, *, sys: tuple[Message, ...] = (), reply: str | None = None) -> Turn:
    return Turn(
        turn_id=f"t{n}",
        request_messages=(user(f"question {n}"),),
        response_message=assistant(reply if reply is not None else f"answer {n}"),
        system_messages=sys,
    )


def messages_of(raw: bytes) -> list[Message]:
    out = orjson.loads(raw)["messages"]
    assert isinstance(out, list)
    return out


# --- parse_request ---------------------------------------------------------------------------


def test_leading_system_and_developer_split_off() -> None:
    msgs = [system("s"), system("d", "developer"), system("s2"), user("hi")]
    req = parse_request(body_bytes(msgs))
    assert req.system_messages == tuple(msgs[:3])
    assert req.new_messages == (user("hi"),)
    assert req.model == "gpt-4o"
    assert req.stream is False


def test_later_system_message_stays_in_new_messages() -> None:
    msgs = [system("s"), user("a"), system("mid"), system("dev", "developer"), user("b")]
    req = parse_request(body_bytes(msgs))
    assert req.system_messages == (system("s"),)
    assert req.new_messages == tuple(msgs[1:])


def test_no_system_messages() -> None:
    msgs = [user("a"), assistant("b"), user("c")]
    req = parse_request(body_bytes(msgs))
    assert req.system_messages == ()
    assert req.new_messages == tuple(msgs)


def test_only_system_messages() -> None:
    req = parse_request(body_bytes([system("s")]))
    assert req.system_messages == (system("s"),)
    assert req.new_messages == ()


def test_role_match_is_exact() -> None:
    msgs = [{"role": "System", "content": "x"}, user("a")]
    req = parse_request(body_bytes(msgs))
    assert req.system_messages == ()
    assert len(req.new_messages) == 2


@pytest.mark.parametrize(
    ("fields", "model", "stream"),
    [
        ({"stream": True}, "gpt-4o", True),
        ({"stream": False}, "gpt-4o", False),
        ({"stream": "true"}, "gpt-4o", False),
        ({"stream": 1}, "gpt-4o", False),
        ({"model": 5}, "", False),
        ({"model": None, "stream": True}, "", True),
    ],
)
def test_model_and_stream(fields: dict[str, Any], model: str, stream: bool) -> None:
    req = parse_request(body_bytes([user("a")], **fields))
    assert req.model == model
    assert req.stream is stream


def test_missing_model() -> None:
    req = parse_request(orjson.dumps({"messages": [user("a")]}))
    assert req.model == ""


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"not json",
        b'{"messages": [}',
        b"\xff\xfe{}",
        b'{"messages": [{"role": "user", "content": "\xff"}]}',
        b"[]",
        b'[{"role": "user"}]',
        b'"messages"',
        b"null",
        b"42",
        b"{}",
        b'{"model": "m"}',
        b'{"messages": null}',
        b'{"messages": []}',
        b'{"messages": {}}',
        b'{"messages": {"role": "user"}}',
        b'{"messages": "hi"}',
        b'{"messages": [1]}',
        b'{"messages": ["user"]}',
        b'{"messages": [null]}',
        b'{"messages": [{"content": "x"}]}',
        b'{"messages": [{"role": 1, "content": "x"}]}',
        b'{"messages": [{"role": null}]}',
        b'{"messages": [{"role": ["user"]}]}',
        b'{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}',
        b'{"messages": [{"role": "system"}, {"role": {"x": 1}}]}',
        b'{"messages": [{"role": "user", "content": NaN}]}',
    ],
)
def test_request_errors(raw: bytes) -> None:
    with pytest.raises(RequestError):
        parse_request(raw)


def test_request_error_is_value_error() -> None:
    assert issubclass(RequestError, ValueError)


_roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])
_text = st.text(max_size=30)
_message = st.builds(lambda role, text: {"role": role, "content": text}, _roles, _text)


@settings(max_examples=100, deadline=None)
@given(st.lists(_message, min_size=1, max_size=12))
def test_split_property(msgs: list[Message]) -> None:
    req = parse_request(body_bytes(msgs))
    assert [*req.system_messages, *req.new_messages] == msgs
    assert all(m["role"] in {"system", "developer"} for m in req.system_messages)
    if req.new_messages:
        assert req.new_messages[0]["role"] not in {"system", "developer"}


# --- pinned_system ---------------------------------------------------------------------------


def test_pinned_system_latest_turn_with_one() -> None:
    old, new = (system("old"),), (system("new"), system("dev", "developer"))
    history = [turn(1, sys=old), turn(2, sys=new), turn(3), turn(4)]
    assert pinned_system(history) == new


def test_pinned_system_none() -> None:
    assert pinned_system([]) == ()
    assert pinned_system([turn(1), turn(2)]) == ()


# --- build_body: order and preservation ------------------------------------------------------


def test_build_order_with_request_system() -> None:
    history = [turn(1, sys=(system("pinned"),)), turn(2)]
    req = parse_request(body_bytes([system("mine"), user("now")]))
    raw, dropped = build_body(req, history, BIG)
    assert dropped == 0
    assert messages_of(raw) == [
        system("mine"),
        user("question 1"),
        assistant("answer 1"),
        user("question 2"),
        assistant("answer 2"),
        user("now"),
    ]


def test_build_order_with_pinned_system() -> None:
    history = [turn(1, sys=(system("first"),)), turn(2, sys=(system("second"),)), turn(3)]
    req = parse_request(body_bytes([user("now"), assistant("x"), user("again")]))
    raw, dropped = build_body(req, history, BIG)
    assert dropped == 0
    got = messages_of(raw)
    assert got[0] == system("second")
    assert got[1:7] == [m for t in history for m in t.messages()]
    assert got[7:] == [user("now"), assistant("x"), user("again")]
    assert system("first") not in got


def test_build_without_any_system() -> None:
    history = [turn(1)]
    req = parse_request(body_bytes([user("now")]))
    raw, _ = build_body(req, history, BIG)
    assert messages_of(raw) == [user("question 1"), assistant("answer 1"), user("now")]


def test_build_without_history_is_request() -> None:
    msgs = [system("s"), user("a"), system("late"), user("b")]
    req = parse_request(body_bytes(msgs, temperature=0.2))
    raw, dropped = build_body(req, [], BIG)
    assert dropped == 0
    assert orjson.loads(raw) == orjson.loads(body_bytes(msgs, temperature=0.2))


def test_build_multi_message_turns_and_tool_calls() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    t = Turn(
        turn_id="t",
        request_messages=(user("q"), {"role": "tool", "tool_call_id": "c0", "content": "r"}),
        response_message={"role": "assistant", "content": None, "tool_calls": [call]},
    )
    req = parse_request(body_bytes([user("now")]))
    raw, _ = build_body(req, [t], BIG)
    assert messages_of(raw) == [*t.messages(), user("now")]


def test_other_fields_preserved() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Wetter für Köln",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    fields: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": False},
        "tools": tools,
        "tool_choice": "auto",
        "temperature": 0.7,
        "top_p": 1,
        "max_tokens": 123,
        "seed": -9007199254740993,
        "logit_bias": {"50256": -100},
        "response_format": {"type": "json_object"},
        "x_unknown_vendor_field": [1, 2.5, None, True, {"nested": "é"}],
        "metadata": {},
        "stop": None,
    }
    original = orjson.dumps({**fields, "messages": [system("s"), user("now")]})
    req = parse_request(original)
    raw, _ = build_body(req, [turn(1)], BIG)
    out = orjson.loads(raw)
    orig = orjson.loads(original)
    assert list(out) == list(orig)  # same keys, same order
    for key, value in orig.items():
        if key != "messages":
            assert out[key] == value, key
            assert type(out[key]) is type(value), key
            assert orjson.dumps(out[key]) == orjson.dumps(value), key
    assert req.body["messages"] == orig["messages"]  # the parsed request is not mutated


def test_float_values_round_trip_exactly() -> None:
    for value in (0.1, 1e-7, 0.30000000000000004, 1.7976931348623157e308, -0.0, 2.5e-324):
        req = parse_request(body_bytes([user("a")], temperature=value))
        raw, _ = build_body(req, [turn(1)], BIG)
        assert repr(orjson.loads(raw)["temperature"]) == repr(value)


def test_huge_integer_field_not_changed() -> None:
    raw = b'{"model":"m","seed":1180591620717411303424,"messages":[{"role":"user","content":"a"}]}'
    try:
        req = parse_request(raw)
    except RequestError:
        return  # refusing to rewrite (pass-through) would also keep the value intact
    out, _ = build_body(req, [turn(1)], BIG)
    assert b'"seed":1180591620717411303424' in out


def test_non_ascii_round_trip() -> None:
    text = 'héllo wörld 😀 日本語 \u2028 \x00 \\ " end'
    history = [turn(1, reply="réponse ✓")]
    req = parse_request(body_bytes([system("système"), user(text)]))
    raw, dropped = build_body(req, history, BIG)
    assert isinstance(raw, bytes)
    assert dropped == 0
    decoded = raw.decode("utf-8")  # valid UTF-8
    assert "😀".encode() in raw  # raw UTF-8, not \u escapes
    assert len(raw) == len(decoded.encode("utf-8"))
    assert len(raw) > len(decoded)  # bytes, not characters
    got = messages_of(raw)
    assert got[0] == system("système")
    assert got[2] == assistant("réponse ✓")
    assert got[-1] == user(text)


def test_result_is_not_shared_with_request() -> None:
    req = parse_request(body_bytes([user("now")]))
    build_body(req, [turn(1)], BIG)
    assert req.body["messages"] == [user("now")]
    assert req.new_messages == (user("now"),)


# --- build_body: size limit ------------------------------------------------------------------


def sized_history(n: int, size: int = 100) -> list[Turn]:
    return [turn(i, reply="x" * size) for i in range(n)]


def test_no_drop_when_everything_fits_with_room() -> None:
    req = parse_request(body_bytes([user("now")]))
    history = sized_history(5)
    full, dropped = build_body(req, history, BIG)
    assert dropped == 0
    again, dropped = build_body(req, history, len(full) + 100)
    assert (again, dropped) == (full, 0)


def test_drops_oldest_turns_first() -> None:
    req = parse_request(body_bytes([system("s"), user("now")]))
    history = sized_history(6)
    full, _ = build_body(req, history, BIG)
    limit = len(full) - 250  # about two turns too many
    raw, dropped = build_body(req, history, limit)
    assert 2 <= dropped < 6
    assert len(raw) <= limit
    kept = history[dropped:]
    assert messages_of(raw) == [
        system("s"),
        *[m for t in kept for m in t.messages()],
        user("now"),
    ]


def test_everything_dropped_when_only_request_fits() -> None:
    req = parse_request(body_bytes([user("now")]))
    alone, _ = build_body(req, [], BIG)
    raw, dropped = build_body(req, sized_history(4), len(alone))
    assert dropped == 4
    assert raw == alone


def test_request_alone_too_big_drops_all_but_keeps_request() -> None:
    req = parse_request(body_bytes([user("y" * 500)]))
    raw, dropped = build_body(req, sized_history(3), 100)
    assert dropped == 3
    assert messages_of(raw) == [user("y" * 500)]


def test_size_limit_never_leaves_tool_results_without_their_calls() -> None:
    """The byte-size safety net cuts like the context window: a tool call's results go with
    it, even when that means dropping one more turn than the size needs."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "x" * 300}}
    history = [
        turn(0, reply="x" * 10),
        Turn("t1", (user("use it"),), {"role": "assistant", "content": None, "tool_calls": [call]}),
        Turn(
            "t2",
            ({"role": "tool", "tool_call_id": "c1", "content": "42"}, user("thanks")),
            assistant("done"),
        ),
        turn(3, reply="y" * 10),
    ]
    req = parse_request(body_bytes([user("now")]))
    full, _ = build_body(req, history, BIG)
    raw, dropped = build_body(req, history, len(full) - 320)  # t0 and t1 must go for size
    assert dropped == 3  # t2 starts with t1's results: it goes too
    assert messages_of(raw) == [*history[3].messages(), user("now")]


def test_selected_history_and_system_given_by_the_caller() -> None:
    """Rewrite passes the turns extproc.context selected and the system prompt it chose (the
    pinned prompt can come from a turn that is no longer injected)."""
    history = [turn(0, sys=(system("pinned"),)), turn(1), turn(2)]
    req = parse_request(body_bytes([user("now")]))
    raw, dropped = build_body(req, history[2:], BIG, (system("pinned"),))
    assert dropped == 0
    assert messages_of(raw) == [system("pinned"), *history[2].messages(), user("now")]


def test_pinned_system_kept_when_its_turn_dropped() -> None:
    history = [turn(0, sys=(system("pinned"),), reply="x" * 200), turn(1, reply="x" * 10)]
    req = parse_request(body_bytes([user("now")]))
    full, _ = build_body(req, history, BIG)
    raw, dropped = build_body(req, history, len(full) - 150)
    assert dropped == 1
    assert messages_of(raw)[0] == system("pinned")


_history_text = st.text(max_size=40)


@st.composite
def _turns(draw: st.DrawFn) -> list[Turn]:
    count = draw(st.integers(0, 8))
    out: list[Turn] = []
    for i in range(count):
        n_req = draw(st.integers(1, 3))
        req_msgs = tuple(user(draw(_history_text)) for _ in range(n_req))
        sys = draw(st.sampled_from([(), (), (system(draw(_history_text)),)]))
        out.append(
            Turn(
                turn_id=f"t{i}",
                request_messages=req_msgs,
                response_message=assistant(draw(_history_text)),
                system_messages=sys,
            )
        )
    return out


_requests = st.lists(_message, min_size=1, max_size=4)


def _expected(req: ChatRequest, history: list[Turn], dropped: int) -> bytes:
    """The body that keeps history[dropped:], with the system prompt chosen from all of it."""
    system_msgs = req.system_messages or pinned_system(history)
    kept = [m for t in history[dropped:] for m in t.messages()]
    return orjson.dumps({**req.body, "messages": [*system_msgs, *kept, *req.new_messages]})


def _lengths(req: ChatRequest, history: list[Turn]) -> list[int]:
    """Byte length of the body that keeps history[k:], for k = 0..len(history)."""
    return [len(_expected(req, history, k)) for k in range(len(history) + 1)]


@settings(max_examples=100, deadline=None)
@given(msgs=_requests, history=_turns(), slack=st.integers(-300, 300))
def test_size_limit_property(msgs: list[Message], history: list[Turn], slack: int) -> None:
    req = parse_request(body_bytes(msgs, temperature=0.5))
    lengths = _lengths(req, history)
    limit = max(1, lengths[0] + slack)
    raw, dropped = build_body(req, history, limit)
    assert 0 <= dropped <= len(history)
    # whole turns, oldest first: the result is exactly the body built from the kept suffix
    assert raw == _expected(req, history, dropped)
    assert len(raw) == lengths[dropped]
    if lengths[-1] <= limit:  # the request alone fits: so does the result
        assert len(raw) <= limit
    else:
        assert dropped == len(history)
    # system: the request's own, else the pinned one of the whole history (even if dropped)
    expected_system = req.system_messages or pinned_system(history)
    got = messages_of(raw)
    assert got[: len(expected_system)] == list(expected_system)
    assert got[len(expected_system) :] == [
        *[m for t in history[dropped:] for m in t.messages()],
        *req.new_messages,
    ]


@settings(max_examples=100, deadline=None)
@given(msgs=_requests, history=_turns(), a=st.integers(1, 3000), b=st.integers(1, 3000))
def test_size_limit_monotonic(msgs: list[Message], history: list[Turn], a: int, b: int) -> None:
    req = parse_request(body_bytes(msgs))
    low, high = sorted((a, b))
    assert build_body(req, history, high)[1] <= build_body(req, history, low)[1]


@settings(max_examples=100, deadline=None)
@given(msgs=_requests, history=_turns())
def test_never_drops_with_ample_room(msgs: list[Message], history: list[Turn]) -> None:
    req = parse_request(body_bytes(msgs))
    full = _lengths(req, history)[0]
    assert build_body(req, history, 2 * full)[1] == 0


@settings(max_examples=100, deadline=None)
@given(msgs=_requests, history=_turns(), slack=st.integers(-200, 50))
@example(msgs=[user("now")], history=[turn(1), turn(2), turn(3)], slack=0)
def test_drops_only_as_many_turns_as_needed(
    msgs: list[Message], history: list[Turn], slack: int
) -> None:
    req = parse_request(body_bytes(msgs))
    lengths = _lengths(req, history)
    limit = max(1, lengths[0] + slack)
    _, dropped = build_body(req, history, limit)
    fitting = [k for k, n in enumerate(lengths) if n <= limit]
    assert dropped == (fitting[0] if fitting else len(history))
