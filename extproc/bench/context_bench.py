"""`sessiongate bench context`: what assembling a request's context costs (issue 5).

The whole rewrite-side CPU path except the store read and the network, per request: parse the
client's body (`openai_chat.parse_request`), plan what fits (`ContextManager.plan`) and build
the upstream body (`openai_chat.build_body`), on synthetic sessions of 50, 500 and 10,000
history messages (`context_synth.session`: mixed lengths, a system prompt on every turn as
rewrite records it, about one turn in ten starting a tool exchange) for `gpt-4o` (128k window,
so the 10,000-message session is cut to ~100k tokens of history).

- **warm**: a hot session's next request. Each session is primed with one untimed request, then
  every timed request is the session's next turn (a user message, or the tool results the last
  reply asked for) and its turn is appended after it, so the per-session caches (token counts,
  prefix sums, key facts, wire bytes) see the history grow, as they do in production. Sessions
  are interleaved round-robin, each growing by at most ~10% of its size (more sessions are made
  for more iterations), so a row stays about the size it is named after.
- **cold**: the first request after a restart: a new `ContextManager`, an empty wire cache and
  an empty token-count cache, so every history turn is counted, scanned for key facts and the
  injected ones encoded.

Target (issue 5): the 10,000-message session under 2 ms p50, warm. A missed target prints MISS;
nothing is retried or discarded and the garbage collector stays on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import tiktoken

from extproc.bench import context_synth as synth
from extproc.bench import tables
from extproc.context import ContextManager, ContextSettings
from extproc.protocols import openai_chat as chat
from extproc.protocols.wire import TurnWireCache
from extproc.tokens import count_message
from store.model import Turn

__all__ = ["Row", "add_arguments", "percentile", "run"]

SIZES = (50, 500, 10_000)
FULL_ITERATIONS = 1000
QUICK_ITERATIONS = 20
FULL_COLD = 20
QUICK_COLD = 1
TARGET_SIZE = 10_000
TARGET_P50_US = 2000.0
MODEL = "gpt-4o"
BODY_LIMIT = 32 * 1024 * 1024  # max_upstream_body_bytes default (4 x 8 MiB)
GROWTH = 0.1  # a warm session grows by at most this fraction of its size


class BenchError(RuntimeError):
    pass


@dataclass(slots=True)
class Row:
    id: str
    label: str
    size: int  # history messages at the start
    mode: str  # warm | cold
    samples: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float
    phases_p50_us: dict[str, float] = field(default_factory=dict)  # parse, plan, build
    target: str = ""
    status: str = ""  # PASS, MISS, or "" when there is no target
    shape: dict[str, Any] = field(default_factory=dict)  # what the requests carried


percentile = tables.percentile
duration = tables.duration


# --- options ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    sizes: tuple[int, ...]
    iterations: int
    cold: int
    model: str
    seed: int
    quick: bool
    json_path: Path | None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated message counts") from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError("comma-separated message counts, each at least 2")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the context benchmark's options to a (sub)parser."""
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=SIZES,
        help="history messages per session, comma-separated (default 50,500,10000)",
    )
    parser.add_argument(
        "--iterations",
        type=_positive,
        default=None,
        help=f"timed warm requests per size (default {FULL_ITERATIONS}, "
        f"{QUICK_ITERATIONS} with --quick)",
    )
    parser.add_argument(
        "--cold",
        type=_positive,
        default=None,
        help=f"timed cold requests per size (default {FULL_COLD}, {QUICK_COLD} with --quick)",
    )
    parser.add_argument("--model", default=MODEL, help=f"the requests' model (default {MODEL})")
    parser.add_argument("--seed", type=int, default=1, help="synthetic sessions' seed")
    parser.add_argument(
        "--quick", action="store_true", help="small counts (a smoke test, not a measurement)"
    )
    parser.add_argument(
        "--json", dest="json_path", type=Path, default=None, help="also write the results here"
    )


def _options(args: argparse.Namespace) -> Options:
    quick = bool(args.quick)
    return Options(
        sizes=tuple(args.sizes),
        iterations=args.iterations or (QUICK_ITERATIONS if quick else FULL_ITERATIONS),
        cold=args.cold or (QUICK_COLD if quick else FULL_COLD),
        model=args.model,
        seed=args.seed,
        quick=quick,
        json_path=args.json_path,
    )


# --- measurement --------------------------------------------------------------------------


@dataclass(slots=True)
class _Samples:
    total: list[int] = field(default_factory=list)
    parse: list[int] = field(default_factory=list)
    plan: list[int] = field(default_factory=list)
    build: list[int] = field(default_factory=list)
    injected_turns: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    body_bytes: list[int] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)


def _request(
    cm: ContextManager, key: str, raw: bytes, history: Sequence[Turn], into: _Samples | None
) -> None:
    """One request as rewrite assembles it, timed phase by phase into `into`."""
    t0 = time.perf_counter_ns()
    parsed = chat.parse_request(raw)
    t1 = time.perf_counter_ns()
    plan = cm.plan(
        key, parsed.body, parsed.model, parsed.system_messages, parsed.new_messages, history
    )
    t2 = time.perf_counter_ns()
    body = b""
    if not plan.unchanged:
        body, _ = chat.build_body(parsed, plan.turns, BODY_LIMIT, plan.system)
    t3 = time.perf_counter_ns()
    if into is None:
        return
    into.total.append(t3 - t0)
    into.parse.append(t1 - t0)
    into.plan.append(t2 - t1)
    into.build.append(t3 - t2)
    into.injected_turns.append(len(plan.turns))
    into.prompt_tokens.append(plan.prompt_tokens)
    into.body_bytes.append(len(body))
    into.outcomes[plan.outcome] = into.outcomes.get(plan.outcome, 0) + 1


@contextlib.contextmanager
def fresh_process_caches() -> Iterator[None]:
    """As after a restart: empty wire-bytes and token-count caches (restored afterwards)."""
    saved = chat.WIRE_CACHE
    chat.WIRE_CACHE = TurnWireCache(chat._turn_wire)
    _count_cache_clear()
    try:
        yield
    finally:
        chat.WIRE_CACHE = saved


def _count_cache_clear() -> None:
    from extproc import tokens

    tokens._count_cached.cache_clear()


def _settings() -> ContextSettings:
    return ContextSettings()  # the defaults rewrite runs with


@dataclass(slots=True)
class _Session:
    key: str
    history: list[Turn]
    more: list[Turn]  # the turns that follow, in order
    bodies: list[bytes]  # the request of each turn of `more`


def _sessions(options: Options, size: int, count: int, per_session: int) -> list[_Session]:
    out = []
    for s in range(count):
        history, more = synth.session(
            options.seed * 1_000_003 + size * 1009 + s, size, per_session + 1, f"b{size}-{s}"
        )
        bodies = [synth.request_body(turn, options.model) for turn in more]
        out.append(_Session(f"bench:{size}:{s}", history, more, bodies))
    return out


def _shape(sessions: Sequence[_Session]) -> dict[str, Any]:
    first = sessions[0].history
    tool_turns = sum(1 for t in first if t.response_message.get("tool_calls"))
    return {
        "sessions": len(sessions),
        "history_messages": synth.messages_of(first),
        "history_turns": len(first),
        "tool_call_turns": tool_turns,
        "history_tokens": sum(count_message(m) for t in first for m in t.messages()),
    }


def _summary(samples: _Samples) -> dict[str, Any]:
    def mean(values: list[int]) -> float:
        return sum(values) / len(values) if values else 0.0

    return {
        "injected_turns_mean": round(mean(samples.injected_turns), 1),
        "prompt_tokens_mean": round(mean(samples.prompt_tokens)),
        "body_bytes_mean": round(mean(samples.body_bytes)),
        "outcomes": dict(samples.outcomes),
    }


def _row(
    row_id: str, label: str, size: int, mode: str, samples: _Samples, shape: dict[str, Any]
) -> Row:
    if not samples.total:
        raise BenchError(f"{row_id}: no samples")
    ordered = sorted(samples.total)
    row = Row(
        id=row_id,
        label=label,
        size=size,
        mode=mode,
        samples=len(ordered),
        p50_us=percentile(ordered, 0.5) / 1000,
        p99_us=percentile(ordered, 0.99) / 1000,
        mean_us=sum(ordered) / len(ordered) / 1000,
        max_us=ordered[-1] / 1000,
        phases_p50_us={
            name: percentile(sorted(values), 0.5) / 1000
            for name, values in (
                ("parse", samples.parse),
                ("plan", samples.plan),
                ("build", samples.build),
            )
        },
        shape={**shape, **_summary(samples)},
    )
    if mode == "warm" and size == TARGET_SIZE:
        row.target = f"p50 < {duration(TARGET_P50_US)}"
        row.status = "PASS" if row.p50_us < TARGET_P50_US else "MISS"
    return row


def measure_warm(options: Options, size: int) -> Row:
    per_session = max(1, int(size * GROWTH) // 2)  # turns of ~2 messages
    per_session = min(per_session, options.iterations)
    count = max(1, -(-options.iterations // per_session))
    sessions = _sessions(options, size, count, per_session)
    shape = {**_shape(sessions), "growth_turns_per_session": per_session}
    cm = ContextManager(_settings())
    for session in sessions:  # prime: the request before the first timed one
        _request(cm, session.key, session.bodies[0], session.history, None)
        session.history.append(session.more[0])
    samples = _Samples()
    done = 0
    for k in range(1, per_session + 1):
        for session in sessions:
            if done == options.iterations:
                break
            _request(cm, session.key, session.bodies[k], session.history, samples)
            session.history.append(session.more[k])  # the reply was captured
            done += 1
    return _row(
        f"warm.{size}",
        f"warm: {size:,}-message session",
        size,
        "warm",
        samples,
        shape,
    )


def measure_cold(options: Options, size: int) -> Row:
    sessions = _sessions(options, size, 1, 1)
    session = sessions[0]
    samples = _Samples()
    for _ in range(options.cold):
        with fresh_process_caches():
            cm = ContextManager(_settings())
            _request(cm, session.key, session.bodies[0], session.history, samples)
    return _row(
        f"cold.{size}",
        f"cold: {size:,}-message session",
        size,
        "cold",
        samples,
        _shape(sessions),
    )


# --- output -------------------------------------------------------------------------------

_COLUMNS = (
    ("name", 34, "<"),
    ("n", 5, ">"),
    ("p50", 9, ">"),
    ("p99", 9, ">"),
    ("mean", 9, ">"),
    ("parse/plan/build p50", 26, ">"),
    ("injected", 15, ">"),
    ("target", 12, ">"),
    ("result", 6, ">"),
)


def _line(cells: Sequence[str]) -> str:
    return tables.line(cells, _COLUMNS)


def _format_row(row: Row) -> str:
    phases = row.phases_p50_us
    split = " / ".join(duration(phases[name]) for name in ("parse", "plan", "build"))
    shape = row.shape
    injected = f"{shape['injected_turns_mean']:.0f} t {shape['prompt_tokens_mean'] / 1000:.1f}k"
    return _line(
        (
            row.label,
            str(row.samples),
            duration(row.p50_us),
            duration(row.p99_us),
            duration(row.mean_us),
            split,
            injected,
            row.target or "-",
            row.status or "-",
        )
    )


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "orjson": orjson.__version__,
        "tiktoken": getattr(tiktoken, "__version__", ""),
        "loadavg_start": list(os.getloadavg()),
    }


def run(args: argparse.Namespace) -> int:
    """Measure, print the table (and write `--json`). 0 when every measurement ran (a missed
    target is reported as MISS, not as a failure), 1 when one could not run."""
    options = _options(args)
    info = machine()
    print(
        f"sessiongate bench context: parse + ContextManager.plan + build_body per request, "
        f"model {options.model}, {options.iterations} warm and {options.cold} cold requests "
        f"per size{' (QUICK: a smoke test, not a measurement)' if options.quick else ''}\n"
        f"{info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"load average {info['loadavg_start'][0]:.2f}; GC on",
        flush=True,
    )
    print(flush=True)
    print(_line([name for name, _, _ in _COLUMNS]), flush=True)
    rows: list[Row] = []
    error = ""
    try:
        for size in options.sizes:
            for measure in (measure_warm, measure_cold):
                row = measure(options, size)
                rows.append(row)
                print(_format_row(row), flush=True)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"bench context: error: {error}", file=sys.stderr, flush=True)
    info["loadavg_end"] = list(os.getloadavg())
    print()
    print(
        "p50/p99/mean: one request (parse + plan + build); injected: history turns and the "
        "prompt's tokens as planned (means)"
    )
    for row in rows:
        if row.mode != "warm":
            continue
        s = row.shape
        print(
            f"  {s['history_messages']:,} messages = {s['history_turns']:,} turns "
            f"({s['tool_call_turns']} with tool calls), {s['history_tokens']:,} tokens; "
            f"{s['sessions']} session(s) growing by {s['growth_turns_per_session']} turn(s); "
            f"body {s['body_bytes_mean'] / 1024:.0f} KiB; outcomes {s['outcomes']}"
        )
    for row in rows:
        if row.mode == "warm":
            cold = next((r for r in rows if r.mode == "cold" and r.size == row.size), None)
            if cold is not None and row.p50_us > 0:
                print(f"  {row.size:,} messages: cold / warm p50 = x{cold.p50_us / row.p50_us:.0f}")
    missed = [row.label for row in rows if row.status == "MISS"]
    print(
        f"targets: {sum(row.status == 'PASS' for row in rows)} PASS, {len(missed)} MISS"
        + (f" ({'; '.join(missed)})" if missed else "")
    )
    if options.json_path is not None:
        result = {
            "benchmark": "context",
            "quick": options.quick,
            "machine": info,
            "options": {
                "sizes": list(options.sizes),
                "iterations": options.iterations,
                "cold": options.cold,
                "model": options.model,
                "seed": options.seed,
            },
            "settings": asdict(_settings()),
            "rows": [asdict(row) for row in rows],
            "error": error,
        }
        options.json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {options.json_path}")
    return 1 if error else 0
