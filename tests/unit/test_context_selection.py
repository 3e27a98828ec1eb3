"""Dynamic selection, relevance (BM25 + recency) and rolling summaries, on the plans and the
bodies build_body makes from them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.context import ContextManager, ContextSettings
from extproc.context import relevance as rel
from extproc.context import strategy as strategies
from extproc.context.summary import HEADER as SUMMARY_HEADER
from extproc.context.summary import Summaries, turn_lines
from extproc.protocols.openai_chat import build_body, parse_request
from store.model import Message, Turn
from tests.tool_pairing import tool_errors
from tests.unit.test_context_manager import provider_tokens, user

MODELS: dict[str, dict[str, Any]] = {"small": {"window": 4096, "margin": 0.0}}
TOPICS = ["apples", "trains", "violins", "glaciers", "tulips", "compilers", "volcanoes", "chess"]


def manager(**kw: Any) -> ContextManager:
    return ContextManager(ContextSettings(models=MODELS, **kw))


def turn(n: int, text: str, words: int = 30) -> Turn:
    return Turn(
        f"t{n}",
        (user(f"turn {n}. {text} " + "lorem " * words),),
        {"role": "assistant", "content": f"Noted for turn {n}. " + "ipsum " * words},
    )


def chatter(n: int) -> list[Turn]:
    return [turn(i, f"Let us talk about {TOPICS[i % len(TOPICS)]} today.") for i in range(n)]


def plan_and_send(
    cm: ContextManager, history: list[Turn], messages: list[Message], strategy: str = ""
) -> tuple[Any, list[Message]]:
    req = parse_request(orjson.dumps({"model": "small", "messages": messages}))
    plan = cm.plan(
        "s", req.body, req.model, req.system_messages, req.new_messages, history, strategy
    )
    raw, _ = build_body(req, plan.turns, 10**9, plan.system)
    return plan, orjson.loads(raw)["messages"]


# --- the classifier ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("What did I tell you about the vault code?", strategies.RECALL),
        ("do you remember my cat's name", strategies.RECALL),
        ("What was the budget we agreed on", strategies.RECALL),
        ("Earlier you mentioned a deadline, which one?", strategies.RECALL),
        ("and then?", strategies.FOLLOW_UP),
        ("What about the second one?", strategies.FOLLOW_UP),
        ("why is it slow", strategies.FOLLOW_UP),
        ("Write a haiku about autumn leaves falling on a quiet pond", strategies.OTHER),
        ("turn 12 the quick brown fox", strategies.OTHER),
    ],
)
def test_classify_by_query(text: str, kind: str) -> None:
    assert strategies.classify([user(text)], None) == kind


def test_classify_tool_loop_from_the_request_or_the_last_turn() -> None:
    result: Message = {"role": "tool", "tool_call_id": "c1", "content": "42"}
    assert strategies.classify([result], None) == strategies.TOOL_LOOP
    calling = Turn(
        "t",
        (user("look it up"),),
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
    )
    assert strategies.classify([user("what did I say earlier")], calling) == strategies.TOOL_LOOP


@pytest.mark.parametrize(
    ("requested", "kind", "applied"),
    [
        ("auto", "recall", "relevance"),
        ("auto", "follow_up", "window"),
        ("auto", "other", "window"),
        ("auto", "tool_loop", "tool_loop"),
        ("window", "recall", "window"),
        ("window", "tool_loop", "window"),
        ("relevance", "other", "relevance"),
        ("relevance", "tool_loop", "tool_loop"),
    ],
)
def test_choose(requested: str, kind: str, applied: str) -> None:
    assert strategies.choose(requested, kind) == applied


# --- relevance --------------------------------------------------------------------------


def test_terms_drop_stop_words_and_plurals() -> None:
    assert rel.terms("What did I tell you about the Glaciers, in 2024?") == ["glacier", "2024"]


def test_bm25_prefers_the_rare_matching_turn() -> None:
    index = rel.RelevanceIndex()
    history = chatter(40)
    history[3] = turn(3, "The vault code is PELICAN-42, keep it safe.")
    index.extend(history[:20])
    index.extend(history[20:])  # incremental: the same as one pass
    scores = index.scores(rel.terms("what is the vault code"), 40)
    assert max(scores, key=lambda k: scores[k]) == 3
    assert index.scores(rel.terms("vault"), 3) == {}  # only turns before the cut


def test_a_recall_question_brings_back_the_planted_turn_in_order() -> None:
    history = chatter(200)
    history[5] = turn(5, "The vault code is PELICAN-42, keep it safe.")
    cm = manager()
    plan, sent = plan_and_send(cm, history, [user("What did I tell you about the vault code?")])
    assert plan.strategy == "relevance" and plan.query == "recall"
    assert history[5] in plan.turns and plan.relevant_turns > 0
    positions = [history.index(t) for t in plan.turns]
    assert positions == sorted(positions)  # chronological
    assert plan.turns[-1] is history[-1]  # and the newest turns are still there
    assert any("PELICAN-42" in str(m.get("content")) for m in sent)
    assert provider_tokens(sent) + plan.reserved_output <= 4096
    assert plan.prompt_tokens == provider_tokens(sent)
    assert plan.dropped == {"relevance": 200 - len(plan.turns)}
    # The same question under the window strategy: the planted turn is long gone.
    plan, _ = plan_and_send(
        cm, history, [user("What did I tell you about the vault code?")], "window"
    )
    assert plan.strategy == "window" and history[5] not in plan.turns


def test_the_window_cut_survives_a_relevance_request() -> None:
    """A recall question between two ordinary requests does not move the window's cut."""
    history = chatter(200)
    cm = manager()
    first, _ = plan_and_send(cm, history, [user("tell me something new")])
    plan_and_send(cm, history, [user("what did I say about tulips?")])
    again, _ = plan_and_send(cm, history, [user("tell me something new")])
    assert [t.turn_id for t in again.turns] == [t.turn_id for t in first.turns]


def test_relevance_index_is_extended_not_rebuilt() -> None:
    history = chatter(100)
    cm = manager()
    plan_and_send(cm, history, [user("what did I say about tulips?")])
    index = next(iter(cm.indexes._items.values())).relevance
    assert index is not None and index.n == 100
    history.append(turn(100, "More about tulips."))
    plan_and_send(cm, history, [user("what did I say about tulips?")])
    assert next(iter(cm.indexes._items.values())).relevance is index and index.n == 101


def tool_history(spec: list[int], words: int) -> list[Turn]:
    """Turns from a spec: 0 a plain turn, k > 0 a tool loop of k calls (k + 1 turns)."""
    history: list[Turn] = []
    for i, kind in enumerate(spec):
        topic = TOPICS[i % len(TOPICS)]
        if kind == 0:
            history.append(turn(len(history), f"About {topic}.", words))
            continue
        request: tuple[Message, ...] = (user(f"look up {topic} " + "lorem " * words),)
        for k in range(kind):
            call_id = f"c{len(history)}"
            history.append(
                Turn(
                    f"t{len(history)}",
                    request,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": call_id,
                                "type": "function",
                                "function": {"name": "lookup", "arguments": topic},
                            }
                        ],
                    },
                )
            )
            request = ({"role": "tool", "tool_call_id": call_id, "content": f"{topic} {k}"},)
        history.append(
            Turn(f"t{len(history)}", request, {"role": "assistant", "content": f"{topic} done"})
        )
    return history


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(st.sampled_from([0, 0, 0, 1, 2, 3]), min_size=1, max_size=80),
    words=st.integers(1, 60),
    topic=st.sampled_from(TOPICS),
    share=st.sampled_from([0.3, 0.7, 0.95]),
)
def test_relevance_selection_properties(
    spec: list[int], words: int, topic: str, share: float
) -> None:
    """Whatever the history: chronological order, within the budget, no orphan tool result,
    no unanswered call, the newest turn kept."""
    history = tool_history(spec, words)
    cm = manager(relevance_share=share)
    plan, sent = plan_and_send(cm, history, [user(f"what did I say about {topic}?")], "relevance")
    positions = [history.index(t) for t in plan.turns]
    assert positions == sorted(set(positions))
    assert provider_tokens(sent) + plan.reserved_output <= 4096
    assert plan.injected <= plan.available
    assert tool_errors(sent) == []
    assert (plan.turns and plan.turns[-1] is history[-1]) or not plan.turns
    assert len(plan.turns) + plan.dropped_turns == len(history)


def test_pick_keeps_tool_units_whole() -> None:
    clean = bytearray([1, 0, 0, 1, 1, 0, 1])
    sums = [0, 10, 20, 30, 40, 50, 60, 70]
    # Turn 2 (inside the unit 0-2) scores best: the unit comes whole; 5 brings 4-5.
    assert rel.pick({2: 5.0, 5: 4.0}, 6, clean, sums, 50) == [0, 1, 2, 4, 5]
    assert rel.pick({2: 5.0, 5: 4.0}, 6, clean, sums, 25) == [4, 5]  # 0-2 costs 30


# --- summaries --------------------------------------------------------------------------


def test_turn_lines_are_first_sentences() -> None:
    said = "My dog is called Rex, he is a border terrier. He is old. He sleeps a lot."
    t = Turn("t", (user(said),), {"role": "assistant", "content": "Nice! Tell me more."})
    # Short sentences are joined up to a useful length.
    assert turn_lines(t) == [
        "User: My dog is called Rex, he is a border terrier.",
        "Assistant: Nice! Tell me more.",
    ]


async def test_extractive_summary_is_made_in_the_background_and_then_injected() -> None:
    history = chatter(200)
    history[1] = turn(1, "My project is called Bluebird.")
    cm = manager(summary_share=0.1, facts_share=0)
    plan, sent = plan_and_send(cm, history, [user("tell me something new")])
    assert plan.summary_tokens == 0 and sent[0]["role"] == "user"  # none yet: nobody waits
    await cm.summaries.drain()
    plan, sent = plan_and_send(cm, history, [user("tell me something new")])
    assert plan.summary_tokens > 0
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith(SUMMARY_HEADER)
    assert provider_tokens(sent) + plan.reserved_output <= 4096
    assert plan.prompt_tokens == provider_tokens(sent)
    assert plan.summary_tokens <= int((4096 - 1024) * 0.1)
    # Rolling: the summary follows the cut once it has moved, and lines are not repeated.
    await cm.summaries.drain()
    summary = cm.summaries.ready("s", history)
    assert summary is not None and summary.covered == history.index(plan.turns[0])
    assert len(summary.lines) == len(set(summary.lines))
    assert "User: turn 0. Let us talk about apples today." in summary.lines


async def test_summary_and_facts_order() -> None:
    history = chatter(200)
    history[1] = turn(1, "My name is Zoltan.")
    pinned = {"role": "system", "content": "Be brief."}
    cm = manager(summary_share=0.1)
    plan_and_send(cm, history, [pinned, user("hello there friend")])
    await cm.summaries.drain()
    _, sent = plan_and_send(cm, history, [pinned, user("hello there friend")])
    assert sent[0] == pinned
    assert sent[1]["content"].startswith(SUMMARY_HEADER)
    assert sent[2]["content"].startswith("Key facts")


def test_no_summary_without_a_running_loop_or_when_off() -> None:
    history = chatter(200)
    cm = manager()  # summary_share 0: off
    plan, _ = plan_and_send(cm, history, [user("hi")])
    assert plan.summary_tokens == 0 and len(cm.summaries) == 0
    cm = manager(summary_share=0.1)
    plan_and_send(cm, history, [user("hi")])  # no event loop: nothing scheduled, no error
    assert len(cm.summaries) == 0


async def test_a_stale_summary_is_not_used_after_a_rewind() -> None:
    history = chatter(200)
    cm = manager(summary_share=0.1)
    plan_and_send(cm, history, [user("hi")])
    await cm.summaries.drain()
    assert cm.summaries.ready("s", history) is not None
    replaced = [turn(i, "another conversation entirely") for i in range(200)]
    replaced = [
        Turn(f"r{i}", t.request_messages, t.response_message) for i, t in enumerate(replaced)
    ]
    assert cm.summaries.ready("s", replaced) is None


class SlowSummarizer:
    """An OpenAI-compatible endpoint that answers only when released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append({"headers": dict(request.headers), "body": await request.json()})
        await self.release.wait()
        return web.json_response(
            {"choices": [{"message": {"role": "assistant", "content": "- The user likes apples"}}]}
        )


@pytest.fixture
async def slow_summarizer() -> AsyncIterator[tuple[SlowSummarizer, str]]:
    slow = SlowSummarizer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield slow, f"http://127.0.0.1:{port}/v1"
    slow.release.set()
    await runner.cleanup()


async def test_a_slow_summarizer_never_delays_requests(
    slow_summarizer: tuple[SlowSummarizer, str], tmp_path: Any
) -> None:
    slow, url = slow_summarizer
    key = tmp_path / "key"
    key.write_text("sk-summarizer\n")
    cm = manager(summary_share=0.1, summarizer_url=url, summarizer_api_key_file=str(key))
    history = chatter(200)
    plan_and_send(cm, history, [user("hi")])
    for _ in range(100):  # the call is in flight
        await asyncio.sleep(0.01)
        if slow.received:
            break
    assert slow.received
    # While it hangs, requests are planned as usual (plan is synchronous: it cannot wait).
    for _ in range(3):
        plan, _ = plan_and_send(cm, history, [user("hi")])
        assert plan.summary_tokens == 0
    assert len(slow.received) == 1  # one summary in production per session
    call = slow.received[0]
    assert call["headers"]["Authorization"] == "Bearer sk-summarizer"
    assert call["body"]["model"] == "gpt-4o-mini"
    assert "Let us talk about" in call["body"]["messages"][-1]["content"]
    slow.release.set()
    await cm.summaries.drain()
    plan, sent = plan_and_send(cm, history, [user("hi")])
    assert plan.summary_tokens > 0
    assert sent[0]["content"] == f"{SUMMARY_HEADER}\n- The user likes apples"


async def test_a_failing_summarizer_falls_back_to_extractive() -> None:
    counts: dict[str, int] = {}

    def inc(name: str, value: int) -> None:
        counts[name] = counts.get(name, 0) + value

    cm = ContextManager(
        ContextSettings(
            models=MODELS,
            summary_share=0.1,
            summarizer_url="http://127.0.0.1:9/v1",
            summarizer_timeout_s=2,
        ),
        inc,
    )
    history = chatter(200)
    plan_and_send(cm, history, [user("hi")])
    await cm.summaries.drain()
    summary = cm.summaries.ready("s", history)
    assert summary is not None and summary.source == "extractive"
    assert counts == {"context.summary.failed": 1, "context.summary.produced.extractive": 1}


async def test_summaries_are_bounded_per_process() -> None:
    summaries = Summaries(max_sessions=2)
    history = chatter(10)
    for name in ("a", "b", "c"):
        assert summaries.want(name, history, 5, 200)
        await summaries.drain()
    assert len(summaries) == 2 and summaries.ready("a", history) is None
    assert not summaries.want("c", history, 5, 200)  # already covered
