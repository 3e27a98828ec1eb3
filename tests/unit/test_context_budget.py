"""Budget arithmetic: reserved output, margins, what the request's own parts cost."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import tokens
from extproc.context import budget
from extproc.context.models import ModelLimits

GPT4O = ModelLimits(128_000, 16_384, "o200k")
O3 = ModelLimits(200_000, 100_000, "o200k", reasoning=True)
SMALL = ModelLimits(4096)


@pytest.mark.parametrize(
    ("body", "limits", "expected"),
    [
        ({"max_completion_tokens": 500}, GPT4O, 500),
        ({"max_tokens": 700}, GPT4O, 700),
        ({"max_completion_tokens": 500, "max_tokens": 700}, GPT4O, 500),
        ({}, GPT4O, 4096),  # the configured default
        ({}, O3, 25_000),  # reasoning models reserve more
        ({}, ModelLimits(128_000, 2048, "cl100k"), 2048),  # capped at the model's max output
        ({}, SMALL, 1024),  # capped at a quarter of the window
        ({"max_tokens": 0}, GPT4O, 4096),  # not a usable limit: the default
        ({"max_tokens": True}, GPT4O, 4096),
        ({"max_tokens": "9"}, GPT4O, 4096),
        ({"max_tokens": 10_000}, SMALL, 10_000),  # the client's word, even past the window
    ],
)
def test_reserved_output(body: dict[str, Any], limits: ModelLimits, expected: int) -> None:
    assert budget.reserved_output(body, limits, 4096, 25_000) == expected


def test_usable_tokens_takes_the_margin_off_our_counts() -> None:
    assert budget.usable_tokens(4096, 1024, 0.0) == 3072
    assert budget.usable_tokens(4096, 1024, 0.25) == int(3072 / 1.25)
    assert budget.usable_tokens(100, 200, 0.1) < 0


def test_tools_and_response_format_are_charged() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert budget.schema_tokens({}) == 0
    with_tools = budget.schema_tokens({"tools": tools})
    assert with_tools == tokens.count_json(tools) > 20
    both = budget.schema_tokens({"tools": tools, "response_format": schema})
    assert both == with_tools + tokens.count_json(schema)
    assert budget.schema_tokens({"functions": [tools[0]["function"]]}) > 0


def test_images_count_a_fixed_estimate_never_their_payload() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    low = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    message = {"role": "user", "content": [image, low]}
    assert budget.messages_tokens([message], 765) == 3 + 1 + 765 + tokens.IMAGE_TOKENS


def test_compute_counts_each_part_once() -> None:
    system = ({"role": "system", "content": "be brief"},)
    new = ({"role": "user", "content": "hello there"},)
    pinned = ({"role": "system", "content": "pinned prompt"},)
    b = budget.compute(
        {"max_tokens": 100},
        SMALL,
        own_messages=(*system, *new),
        injected_system=pinned,
        default_output=4096,
        reasoning_output=25_000,
        image_tokens=765,
    )
    assert b.reserved_output == 100
    assert b.usable == budget.usable_tokens(4096, 100, 0.10)
    assert b.request == tokens.count_messages([*system, *new])  # priming included once
    assert b.system == tokens.count_messages(pinned) - tokens.REPLY_PRIMING
    assert b.history == b.usable - b.request - b.system
    assert b.request_fits


@given(
    window=st.integers(256, 2_000_000),
    max_output=st.integers(0, 200_000),
    asked=st.one_of(st.none(), st.integers(1, 300_000)),
    margin=st.floats(0, 1),
    request_words=st.integers(0, 400),
)
@settings(max_examples=200, deadline=None)
def test_budget_arithmetic_never_exceeds_the_window(
    window: int, max_output: int, asked: int | None, margin: float, request_words: int
) -> None:
    """Whatever the model and request: request + history budget, scaled by the margin, plus
    the reserved output never exceeds the window."""
    limits = ModelLimits(window, max_output, margin=margin)
    body = {} if asked is None else {"max_tokens": asked}
    new = ({"role": "user", "content": "word " * request_words},)
    b = budget.compute(
        body,
        limits,
        own_messages=new,
        injected_system=(),
        default_output=4096,
        reasoning_output=25_000,
        image_tokens=765,
    )
    assert b.reserved_output == (asked if asked is not None else b.reserved_output)
    assert b.reserved_output <= (asked or window // 4)
    if b.history >= 0:
        assert (b.request + b.history) * (1 + margin) + b.reserved_output <= window
    else:
        assert b.request > b.usable or b.usable < 0
