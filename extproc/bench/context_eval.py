"""`sessiongate bench context-eval`: recall, tokens sent and prompt-cache hits per strategy.

Synthetic long conversations (`context_synth.planted_conversation`, deterministic per seed):
distractor turns with mixed lengths and tool exchanges, eight facts planted in the first 80%
(a name, a decision, a preference, a budget, a date, a favourite, a quantity, a reminder), the
same kinds of fact-like statements about other people and projects as distractors, and at the
end one recall question per planted fact. Every conversation is replayed request by request, as
an `append`-mode client sends it (its system prompt and the new messages), under each strategy:

- `send everything`: what a naive proxy does: the whole history, no window.
- `last N messages`: the newest N history messages, N the largest that keeps every request of
  the evaluation within the window (chosen with hindsight on this very set: the best fixed N).
- sessiongate, with the settings `extproc.context.ContextSettings` has when the script runs:
  the sliding window alone (key facts off), the window with key facts (the defaults), and, when
  the settings have them, every value of a strategy field (e.g. `strategy`: auto, relevance)
  and every share that is off by default (e.g. `summary_share`, enabled at 0.1). Discovered at
  run time, so the table shows what exists. Requests go through `parse_request`,
  `ContextManager.plan` and `build_body`, exactly as rewrite assembles them; background work
  (rolling summaries) is awaited between requests, as the time between a user's turns allows.

Measured per strategy and model window:

- **recall**: share of the recall questions whose planted fact (its needle, e.g. the name or
  the amount) appears in the prompt sent: in a history message, or in what sessiongate injects
  (key facts, summary). `recall in window` counts it only when the request is also valid (not
  over the window, no orphan tool result).
- **tokens/req**: mean prompt tokens per request (OpenAI cookbook count, cl100k).
- **over window**: requests whose prompt leaves less than the reserved output (a quarter of the
  window, as sessiongate reserves when a request sets no max_tokens): the provider rejects them.
- **orphans**: requests whose history starts with `tool` results whose call was cut (the
  provider rejects those too).
- **cache**: the prompt-cache hit rate a provider would see: for each request, the longest
  common prefix, in tokens, with the previous request of the same conversation, over all
  prompt tokens sent (every request, the first of each conversation included). `lcp` counts
  every token of it; `OpenAI` counts it as OpenAI's cache does: nothing below 1,024 tokens,
  then whole 128-token blocks. Tokens are per message as the chat template lays them out (3 of
  framing, then each string value), so the prefix ends inside the first message that differs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from extproc.bench import context_bench, tables
from extproc.bench import context_synth as synth
from extproc.context import ContextManager, ContextSettings
from extproc.protocols import openai_chat as chat
from extproc.tokens import encoding
from store.model import Message, Turn

__all__ = ["Result", "add_arguments", "discover_variants", "run"]

WINDOWS = (4096, 16_384)
FULL_CONVERSATIONS = 12
FULL_TURNS = 200
QUICK_CONVERSATIONS = 2
QUICK_TURNS = 40
OPENAI_CACHE_MIN = 1024
OPENAI_CACHE_BLOCK = 128
ENABLE_SHARE = 0.1  # a share that is off by default is evaluated at this value
BODY_LIMIT = context_bench.BODY_LIMIT
EVERYTHING = "send everything"
LAST_N = "last N messages"


def model_name(window: int) -> str:
    return f"eval-{window}"


def reserved_output(window: int) -> int:
    """What sessiongate reserves for the reply when the request sets no limit (a quarter of
    the window, the model having no max_output of its own); baselines get the same room."""
    return min(ContextSettings().output_tokens, window // 4)


# --- sessiongate variants, from the settings that exist -----------------------------------


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    overrides: dict[str, Any]


def _plural(name: str) -> str:
    return (name[:-1] + "ies" if name.endswith("y") else name + "s").upper()


def _field_values(name: str, annotation: Any) -> tuple[str, ...]:
    """The values a string setting accepts: its Literal, else a `<NAME>S` tuple in a loaded
    extproc.context module (e.g. STRATEGIES), else nothing (not evaluated)."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(v) for v in typing.get_args(annotation))
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("extproc.context") or module is None:
            continue
        values = getattr(module, _plural(name), None)
        if isinstance(values, tuple) and values and all(isinstance(v, str) for v in values):
            return values
    return ()


def discover_variants() -> list[Variant]:
    """sessiongate's strategies as `ContextSettings` offers them when this runs."""
    fields = {f.name: f for f in dataclasses.fields(ContextSettings)}
    hints = typing.get_type_hints(ContextSettings)
    defaults = ContextSettings()
    choice_fields = [
        name for name in fields if "strateg" in name and isinstance(getattr(defaults, name), str)
    ]
    off_shares = [
        name
        for name in fields
        if name.endswith("_share") and name != "facts_share" and getattr(defaults, name) == 0
    ]
    # The window alone and the window with key facts: pin every choice field to its window-like
    # value when there is one, so these rows stay what their names say.
    pinned: dict[str, Any] = {}
    for name in choice_fields:
        values = _field_values(name, hints.get(name))
        if "window" in values:
            pinned[name] = "window"

    def label(overrides: dict[str, Any]) -> str:
        parts = [str(overrides.get(name, getattr(defaults, name))) for name in choice_fields]
        if overrides.get("facts_share", defaults.facts_share) > 0:
            parts.append("facts")
        parts += [
            f"{n.removesuffix('_share')} {overrides[n]}" for n in off_shares if n in overrides
        ]
        default = all(getattr(defaults, k) == v for k, v in overrides.items())
        return "sessiongate: " + " + ".join(parts) + (" (default)" if default else "")

    variants = [Variant(label(o), o) for o in ({**pinned, "facts_share": 0.0}, dict(pinned))]
    for name in choice_fields:
        for value in _field_values(name, hints.get(name)):
            if value != pinned.get(name):
                variants.append(Variant(label({name: value}), {name: value}))
    for share in off_shares:
        combos: list[dict[str, Any]] = [{share: ENABLE_SHARE}]
        for name in choice_fields:
            combos = [
                {**combo, name: value}
                for combo in combos
                for value in _field_values(name, hints.get(name))
            ] or combos
        variants.extend(Variant(label(o), o) for o in combos)
    return variants


# --- prompts as tokens ------------------------------------------------------------------


class Tokenizer:
    """Per-message token sequences (cached by the message's bytes), as the chat template lays a
    message out: 3 framing tokens, then the tokens of each string value (+1 per name)."""

    FRAME = (-1, -1, -1)

    def __init__(self) -> None:
        self._cache: dict[bytes, tuple[int, ...]] = {}
        self._encode = encoding().encode_ordinary

    def _strings(self, value: Any, out: list[int]) -> None:
        if isinstance(value, str):
            out.extend(self._encode(value))
        elif isinstance(value, dict):
            for item in value.values():
                self._strings(item, out)
        elif isinstance(value, list):
            for item in value:
                self._strings(item, out)

    def message(self, message: Message) -> tuple[bytes, tuple[int, ...]]:
        key = orjson.dumps(message)
        found = self._cache.get(key)
        if found is None:
            out = list(self.FRAME)
            for name, value in message.items():
                self._strings(value, out)
                if name == "name":
                    out.append(-2)
            found = self._cache[key] = tuple(out)
        return key, found


@dataclass(slots=True)
class Prompt:
    keys: list[bytes]
    tokens: list[tuple[int, ...]]

    @property
    def total(self) -> int:
        return sum(len(t) for t in self.tokens) + 3  # + the reply priming


def common_prefix(previous: Prompt | None, current: Prompt) -> int:
    """Tokens of `current` equal to a prefix of `previous`."""
    if previous is None:
        return 0
    n = 0
    for i, key in enumerate(current.keys):
        if i >= len(previous.keys):
            return n
        if previous.keys[i] == key:
            n += len(current.tokens[i])
            continue
        a, b = previous.tokens[i], current.tokens[i]
        k = 0
        limit = min(len(a), len(b))
        while k < limit and a[k] == b[k]:
            k += 1
        return n + k
    return n


def openai_cached(prefix: int) -> int:
    if prefix < OPENAI_CACHE_MIN:
        return 0
    return OPENAI_CACHE_MIN + (prefix - OPENAI_CACHE_MIN) // OPENAI_CACHE_BLOCK * OPENAI_CACHE_BLOCK


# --- replay ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    window: int
    strategy: str
    requests: int = 0
    questions: int = 0
    recalled: int = 0
    recalled_valid: int = 0
    recalled_injected: int = 0  # found only in what sessiongate injected (facts, summary)
    tokens: int = 0
    over_window: int = 0
    orphans: int = 0
    cache_lcp: int = 0
    cache_openai: int = 0
    seconds: float = 0.0
    last_n: int = 0  # the N of `last N messages`
    settings: dict[str, Any] = field(default_factory=dict)
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind: [recalled, asked]
    error: str = ""

    @property
    def recall(self) -> float:
        return self.recalled / self.questions if self.questions else 0.0

    @property
    def recall_valid(self) -> float:
        return self.recalled_valid / self.questions if self.questions else 0.0

    @property
    def tokens_mean(self) -> float:
        return self.tokens / self.requests if self.requests else 0.0

    @property
    def cache_rate(self) -> float:
        return self.cache_lcp / self.tokens if self.tokens else 0.0

    @property
    def cache_rate_openai(self) -> float:
        return self.cache_openai / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            recall=round(self.recall, 4),
            recall_valid=round(self.recall_valid, 4),
            tokens_mean=round(self.tokens_mean, 1),
            cache_rate=round(self.cache_rate, 4),
            cache_rate_openai=round(self.cache_rate_openai, 4),
        )
        return out


def _texts(messages: Sequence[Message]) -> str:
    return "\n".join(orjson.dumps(m).decode() for m in messages)


def _needle(text: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w]){re.escape(text)}(?![\w])")


def _orphaned(history_part: Sequence[Message]) -> bool:
    """The injected history starts with tool results (their call was cut)."""
    return bool(history_part) and history_part[0].get("role") == "tool"


class Replay:
    """Replays conversations under one strategy, scoring every request into a `Result`."""

    def __init__(self, result: Result, tokenizer: Tokenizer) -> None:
        self.result = result
        self.tok = tokenizer

    def prompt(self, messages: Sequence[Message]) -> Prompt:
        keys, tokens = [], []
        for m in messages:
            key, seq = self.tok.message(m)
            keys.append(key)
            tokens.append(seq)
        return Prompt(keys, tokens)

    def score(
        self,
        conversation: synth.PlantedConversation,
        i: int,
        messages: list[Message],
        own: int,
        previous: Prompt | None,
        orphan: bool,
    ) -> Prompt:
        """`messages` as sent for turn `i`; the last `own` are the request's own new ones."""
        r = self.result
        prompt = self.prompt(messages)
        total = prompt.total
        over = total > r.window - reserved_output(r.window)
        r.requests += 1
        r.tokens += total
        r.over_window += over
        r.orphans += orphan
        prefix = common_prefix(previous, prompt)
        r.cache_lcp += prefix
        r.cache_openai += openai_cached(prefix)
        if i in conversation.questions:
            fact = conversation.facts[conversation.questions.index(i)]
            pattern = _needle(fact.needle)
            context = messages[: len(messages) - own]
            history = [m for m in context if m.get("role") != "system"]
            injected = [m for m in context[1:] if m.get("role") == "system"]
            in_history = bool(pattern.search(_texts(history)))
            found = in_history or bool(pattern.search(_texts(injected)))
            r.questions += 1
            r.recalled += found
            r.recalled_valid += found and not over and not orphan
            r.recalled_injected += found and not in_history
            kind = r.by_kind.setdefault(fact.kind, [0, 0])
            kind[0] += found
            kind[1] += 1
        return prompt


def _history_messages(turns: Sequence[Turn]) -> list[Message]:
    return [m for t in turns for m in t.messages()]


def replay_baseline(
    result: Result,
    tokenizer: Tokenizer,
    conversations: Sequence[synth.PlantedConversation],
    last_n: int | None,
) -> None:
    """`send everything` (last_n None) or `last N messages`."""
    replay = Replay(result, tokenizer)
    for conversation in conversations:
        previous: Prompt | None = None
        flat: list[Message] = []
        for i, turn in enumerate(conversation.turns):
            kept = flat if last_n is None else flat[max(0, len(flat) - last_n) :] if last_n else []
            own = [*turn.request_messages]
            messages = [*turn.system_messages, *kept, *own]
            previous = replay.score(conversation, i, messages, len(own), previous, _orphaned(kept))
            flat.extend(turn.messages())


async def replay_sessiongate(
    result: Result,
    tokenizer: Tokenizer,
    conversations: Sequence[synth.PlantedConversation],
    settings: ContextSettings,
) -> None:
    replay = Replay(result, tokenizer)
    cm = ContextManager(settings)
    summaries = getattr(cm, "summaries", None)
    drain = getattr(summaries, "drain", None)
    model = model_name(result.window)
    for c, conversation in enumerate(conversations):
        previous: Prompt | None = None
        key = f"eval:{result.window}:{c}"
        for i, turn in enumerate(conversation.turns):
            raw = synth.request_body(turn, model)
            parsed = chat.parse_request(raw)
            history = conversation.turns[:i]
            plan = cm.plan(
                key, parsed.body, parsed.model, parsed.system_messages, parsed.new_messages, history
            )
            if plan.unchanged:
                messages: list[Message] = orjson.loads(raw)["messages"]
                start = len(messages)
            else:
                body, _ = chat.build_body(parsed, plan.turns, BODY_LIMIT, plan.system)
                messages = orjson.loads(body)["messages"]
                start = len(plan.system)
            own = len(parsed.new_messages)
            orphan = _orphaned(messages[start : len(messages) - own])
            previous = replay.score(conversation, i, messages, own, previous, orphan)
            if drain is not None:  # background summaries finish between the user's turns
                await drain()


def choose_last_n(
    conversations: Sequence[synth.PlantedConversation], window: int, tokenizer: Tokenizer
) -> int:
    """The largest N for which no request of `conversations` is over the window."""
    limit = window - reserved_output(window)
    requests: list[tuple[int, list[int]]] = []  # (fixed tokens, history message sizes)
    longest = 0
    for conversation in conversations:
        sizes: list[int] = []
        for turn in conversation.turns:
            own = [*turn.system_messages, *turn.request_messages]
            fixed = sum(len(tokenizer.message(m)[1]) for m in own) + 3
            requests.append((fixed, list(sizes)))
            sizes.extend(len(tokenizer.message(m)[1]) for m in turn.messages())
            longest = max(longest, len(sizes))

    def fits(n: int) -> bool:
        return all(
            fixed + sum(sizes[len(sizes) - n :] if n else ()) <= limit for fixed, sizes in requests
        )

    lo, hi = 0, longest
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- options, output --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    windows: tuple[int, ...]
    conversations: int
    turns: int
    seed: int
    quick: bool
    json_path: Path | None


def _windows(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated token counts") from None
    if not values or min(values) < 1024:
        raise argparse.ArgumentTypeError("comma-separated token counts, each at least 1024")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the evaluation's options to a (sub)parser."""
    parser.add_argument(
        "--windows",
        type=_windows,
        default=WINDOWS,
        help="model context windows, one table section each (default 4096,16384)",
    )
    parser.add_argument(
        "--conversations",
        type=context_bench._positive,
        default=None,
        help=f"conversations (default {FULL_CONVERSATIONS}, {QUICK_CONVERSATIONS} with --quick)",
    )
    parser.add_argument(
        "--turns",
        type=context_bench._positive,
        default=None,
        help=f"turns per conversation before its recall questions (default {FULL_TURNS}, "
        f"{QUICK_TURNS} with --quick)",
    )
    parser.add_argument("--seed", type=int, default=5, help="the conversations' seed")
    parser.add_argument("--quick", action="store_true", help="a small run (a smoke test)")
    parser.add_argument(
        "--json", dest="json_path", type=Path, default=None, help="also write the results here"
    )


def _options(args: argparse.Namespace) -> Options:
    quick = bool(args.quick)
    return Options(
        windows=tuple(args.windows),
        conversations=args.conversations or (QUICK_CONVERSATIONS if quick else FULL_CONVERSATIONS),
        turns=args.turns or (QUICK_TURNS if quick else FULL_TURNS),
        seed=args.seed,
        quick=quick,
        json_path=args.json_path,
    )


_COLUMNS = (
    ("strategy", 44, "<"),
    ("recall", 7, ">"),
    ("in window", 9, ">"),
    ("tokens/req", 10, ">"),
    ("over window", 11, ">"),
    ("orphans", 7, ">"),
    ("cache lcp", 9, ">"),
    ("cache OpenAI", 12, ">"),
)


def _line(cells: Sequence[str]) -> str:
    return tables.line(cells, _COLUMNS)


def _format(result: Result) -> str:
    name = result.strategy
    if result.strategy == LAST_N:
        name = f"last N messages (N={result.last_n})"
    if result.error:
        return _line((name, "error", "", "", "", "", "", "")) + f"  {result.error}"
    return _line(
        (
            name,
            f"{result.recall:.0%}",
            f"{result.recall_valid:.0%}",
            f"{result.tokens_mean:,.0f}",
            f"{result.over_window}/{result.requests}",
            str(result.orphans),
            f"{result.cache_rate:.0%}",
            f"{result.cache_rate_openai:.0%}",
        )
    )


def _settings_for(variant: Variant, window: int) -> ContextSettings:
    models = {model_name(window): {"window": window, "family": "cl100k"}}
    return dataclasses.replace(ContextSettings(), models=models, **variant.overrides)


async def evaluate(options: Options) -> tuple[list[Result], list[Variant]]:
    conversations = [
        synth.planted_conversation(options.seed * 7919 + c, options.turns, f"e{c}")
        for c in range(options.conversations)
    ]
    tokenizer = Tokenizer()
    variants = discover_variants()
    results: list[Result] = []
    facts_total = sum(len(c.facts) for c in conversations)
    requests = sum(len(c.turns) for c in conversations)
    history_tokens = sum(
        len(tokenizer.message(m)[1]) for c in conversations for m in _history_messages(c.turns)
    )
    print(
        f"{len(conversations)} conversations x {options.turns} turns + "
        f"{len(conversations[0].facts)} recall questions: {requests} requests, "
        f"{facts_total} questions, "
        f"{history_tokens / len(conversations):,.0f} tokens of history per conversation at the "
        f"end (seed {options.seed})",
        flush=True,
    )
    for window in options.windows:
        print(
            f"\nwindow {window:,} tokens ({reserved_output(window):,} reserved for the reply; "
            f"sessiongate counts with the cl100k family's 2% margin)",
            flush=True,
        )
        print(_line([name for name, _, _ in _COLUMNS]), flush=True)
        for strategy in (EVERYTHING, LAST_N):
            started = time.perf_counter()
            result = Result(window, strategy)
            last_n = None
            if strategy == LAST_N:
                last_n = result.last_n = choose_last_n(conversations, window, tokenizer)
            replay_baseline(result, tokenizer, conversations, last_n)
            result.seconds = time.perf_counter() - started
            results.append(result)
            print(_format(result), flush=True)
        for variant in variants:
            started = time.perf_counter()
            result = Result(window, variant.name, settings=dict(variant.overrides))
            try:
                settings = _settings_for(variant, window)
                await replay_sessiongate(result, tokenizer, conversations, settings)
            except Exception as exc:  # a strategy that cannot run here is shown, not hidden
                result.error = f"{type(exc).__name__}: {exc}"
            result.seconds = time.perf_counter() - started
            results.append(result)
            print(_format(result), flush=True)
    return results, variants


def run(args: argparse.Namespace) -> int:
    """Replay, print the tables (and write `--json`). 0 when every strategy ran."""
    options = _options(args)
    info = context_bench.machine()
    print(
        "sessiongate bench context-eval: recall of planted facts, tokens sent and prompt-cache "
        f"hits per strategy{' (QUICK: a smoke test)' if options.quick else ''}",
        flush=True,
    )
    results, variants = asyncio.run(evaluate(options))
    print(
        "\nrecall: questions whose fact is in the prompt (in window: and the request is valid); "
        "tokens/req: mean prompt tokens; over window: prompt + reserved reply > window; "
        "orphans: history starting with tool results; cache: prompt tokens equal to a prefix "
        f"of the previous request (lcp: every token; OpenAI: >= {OPENAI_CACHE_MIN} tokens, "
        f"in {OPENAI_CACHE_BLOCK}-token blocks)"
    )
    for result in results:
        if result.recalled_injected:
            print(
                f"  {result.window:,} {result.strategy}: {result.recalled_injected} of "
                f"{result.recalled} recalled facts only in what sessiongate injected"
            )
    errors = [r for r in results if r.error]
    if options.json_path is not None:
        out = {
            "benchmark": "context-eval",
            "quick": options.quick,
            "machine": info,
            "options": {
                "windows": list(options.windows),
                "conversations": options.conversations,
                "turns": options.turns,
                "seed": options.seed,
            },
            "variants": [dataclasses.asdict(v) for v in variants],
            "cache": {"openai_min": OPENAI_CACHE_MIN, "openai_block": OPENAI_CACHE_BLOCK},
            "results": [r.as_dict() for r in results],
        }
        options.json_path.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {options.json_path}")
    return 1 if errors else 0
