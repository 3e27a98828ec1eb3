"""`sessiongate bench context-eval --quick`: every strategy is replayed and scored, the
baselines behave as their definitions say, and the prompt-cache arithmetic is right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.bench import context_eval, context_synth
from extproc.cli import build_parser


def test_quick_run_scores_every_strategy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    args = build_parser().parse_args(["bench", "context-eval", "--quick", "--json", str(out)])
    assert args.func is context_eval.run
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "window 4,096 tokens" in printed and "window 16,384 tokens" in printed
    result = json.loads(out.read_text())
    assert result["benchmark"] == "context-eval" and result["quick"] is True
    names = [v["name"] for v in result["variants"]]
    assert "sessiongate: window" in names and any("facts" in n for n in names)
    by = {(r["window"], r["strategy"]): r for r in result["results"]}
    assert len(by) == 2 * (2 + len(names))
    for r in by.values():
        assert not r["error"] and r["requests"] > 0 and r["questions"] > 0
        assert 0 <= r["recall_valid"] <= r["recall"] <= 1
        assert 0 <= r["cache_rate_openai"] <= r["cache_rate"] <= 1
    everything = by[(4096, context_eval.EVERYTHING)]
    assert everything["recall"] == 1 and everything["over_window"] > 0  # all sent, too much
    last_n = by[(4096, context_eval.LAST_N)]
    assert last_n["over_window"] == 0 and last_n["last_n"] > 0
    for (window, name), r in by.items():
        if name.startswith("sessiongate"):
            assert r["over_window"] == 0 and r["orphans"] == 0, (window, name)
    facts = by[(4096, "sessiongate: window + facts")]
    assert facts["recall"] >= by[(4096, "sessiongate: window")]["recall"]


def test_planted_needles_are_unique() -> None:
    """A needle appears in its statement and nowhere else in the conversation."""
    conv = context_synth.planted_conversation(3, 120, "u")
    assert len(conv.facts) == len(conv.questions) == 8
    for fact, at in zip(conv.facts, conv.planted_at, strict=True):
        pattern = context_eval._needle(fact.needle)
        hits = [
            i
            for i, turn in enumerate(conv.turns)
            if pattern.search(context_eval._texts(turn.messages()))
        ]
        assert hits == [at], fact
        assert fact.statement in conv.turns[at].request_messages[-1]["content"]


def test_common_prefix_and_openai_blocks() -> None:
    tok = context_eval.Tokenizer()
    replay = context_eval.Replay(context_eval.Result(4096, "x"), tok)
    a = replay.prompt([{"role": "user", "content": "one two three"}])
    b = replay.prompt(
        [{"role": "user", "content": "one two four"}, {"role": "user", "content": "x"}]
    )
    assert context_eval.common_prefix(None, a) == 0
    assert context_eval.common_prefix(a, a) == a.total - 3
    assert 3 < context_eval.common_prefix(a, b) < len(a.tokens[0])
    assert context_eval.openai_cached(1023) == 0
    assert context_eval.openai_cached(1024) == 1024
    assert context_eval.openai_cached(1151) == 1024
    assert context_eval.openai_cached(1152) == 1152
