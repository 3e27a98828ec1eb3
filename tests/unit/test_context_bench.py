"""`sessiongate bench context --quick`: every row is measured with positive figures, the
10,000-message row carries the issue's target, and the JSON says what was run. Figures are
never asserted against targets here (DESIGN: performance is measured by the benchmark, not by
timed tests)."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest

from extproc.bench import context_bench, context_synth
from extproc.cli import build_parser
from extproc.context.window import starts_clean


def test_quick_run_reports_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "context.json"
    args = build_parser().parse_args(["bench", "context", "--quick", "--json", str(out)])
    assert args.func is context_bench.run
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "warm: 10,000-message session" in printed and "targets:" in printed
    result = json.loads(out.read_text())
    assert result["benchmark"] == "context" and result["quick"] is True and not result["error"]
    rows = {row["id"]: row for row in result["rows"]}
    assert set(rows) == {
        f"{mode}.{size}" for mode in ("warm", "cold") for size in (50, 500, 10_000)
    }
    for row in rows.values():
        assert row["samples"] >= 1 and 0 < row["p50_us"] <= row["p99_us"] <= row["max_us"]
        assert set(row["phases_p50_us"]) == {"parse", "plan", "build"}
        assert row["shape"]["history_messages"] >= row["size"]
        assert row["shape"]["prompt_tokens_mean"] > 0
    target = rows["warm.10000"]
    assert target["target"] and target["status"] in ("PASS", "MISS")
    assert rows["warm.10000"]["shape"]["outcomes"].get("trimmed")  # gpt-4o cannot take it all
    assert rows["warm.10000"]["shape"]["tool_call_turns"] > 0


def test_sizes_option() -> None:
    parser = argparse.ArgumentParser()
    context_bench.add_arguments(parser)
    assert parser.parse_args(["--sizes", "10,20"]).sizes == (10, 20)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sizes", "x"])


def test_synthetic_session_is_coherent() -> None:
    """Deterministic per seed; every tool result answers the calls of the turn before it."""
    history, more = context_synth.session(7, 400, 10, "t")
    again, _ = context_synth.session(7, 400, 10, "t")
    assert [t.turn_id for t in history] == [t.turn_id for t in again]
    assert history[3].messages() == again[3].messages()
    assert context_synth.messages_of(history) >= 400
    turns = history + more
    for before, turn in itertools.pairwise(turns):
        calls = {c["id"] for c in before.response_message.get("tool_calls") or ()}
        results = {m["tool_call_id"] for m in turn.request_messages if m["role"] == "tool"}
        assert results == calls
        assert starts_clean(turn.request_messages) == (not calls)
