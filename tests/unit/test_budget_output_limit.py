"""`max_output_tokens` (the Responses API's name for the output limit) is reserved like the
Chat Completions names; the first set one of the three wins."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.context import budget
from extproc.context.models import ModelLimits

GPT4O = ModelLimits(128_000, 16_384, "o200k")
SMALL = ModelLimits(4096)


@pytest.mark.parametrize(
    ("body", "limits", "expected"),
    [
        ({"max_output_tokens": 900}, GPT4O, 900),
        ({"max_output_tokens": 900}, SMALL, 900),  # the client's word, not the default cap
        ({"max_completion_tokens": 500, "max_output_tokens": 900}, GPT4O, 500),
        ({"max_tokens": 700, "max_output_tokens": 900}, GPT4O, 700),
        ({"max_tokens": 0, "max_output_tokens": 900}, GPT4O, 900),  # 0 is no limit: next name
        ({"max_output_tokens": 0}, GPT4O, 4096),
        ({"max_output_tokens": False}, GPT4O, 4096),
        ({"max_output_tokens": 12.5}, GPT4O, 4096),
    ],
)
def test_max_output_tokens_is_reserved(
    body: dict[str, Any], limits: ModelLimits, expected: int
) -> None:
    assert budget.reserved_output(body, limits, 4096, 25_000) == expected


def test_max_output_tokens_shrinks_the_history_budget() -> None:
    message = {"role": "user", "content": "hello"}
    common: dict[str, Any] = {
        "own_messages": [message],
        "injected_system": [],
        "default_output": 1024,
        "reasoning_output": 25_000,
        "image_tokens": 765,
    }
    default = budget.compute({}, SMALL, **common)
    asked = budget.compute({"max_output_tokens": 2000}, SMALL, **common)
    assert asked.reserved_output == 2000
    assert default.history - asked.history == pytest.approx(
        (2000 - 1024) / (1 + SMALL.safety_margin), abs=1
    )


def test_instructions_are_part_of_the_request() -> None:
    """The Responses API's `instructions` are a system prompt by another name: counted."""
    message = {"role": "user", "content": "hello"}
    common: dict[str, Any] = {
        "own_messages": [message],
        "injected_system": [],
        "default_output": 256,
        "reasoning_output": 256,
        "image_tokens": 765,
    }
    text = "Answer in French, in one short paragraph. " * 20
    plain = budget.compute({}, SMALL, **common)
    instructed = budget.compute({"instructions": text}, SMALL, **common)
    system = budget.messages_tokens([{"role": "system", "content": text}], 0)
    assert instructed.request - plain.request == system > 100
    assert instructed.history == plain.history - system
    assert budget.compute({"instructions": 42}, SMALL, **common).request == plain.request
