"""Anthropic prompt-cache breakpoints (`cache_control: {"type": "ephemeral"}`).

Anthropic caches a request's prefix (tools, then system, then messages) up to a block marked
with `cache_control`, and a later request that starts with the same bytes up to a marked block
reads it from the cache. sessiongate's injected prefix (system prompt, user context, summary,
facts, then history) is the same from one turn to the next (append-only history cut in coarse
steps), so it marks it:

1. the last injected history block: the whole prefix, read back on the next turn, whose
   breakpoint moves one turn further (Anthropic also finds the earlier prefix by itself: it
   looks back over the preceding block boundaries);
2. the last system block: still read when the history is cut by a step.

Anthropic accepts at most `MAX_BREAKPOINTS` marked blocks per request. The client's own count
first: sessiongate adds only what is left, the history breakpoint first (it covers more).
Thinking blocks cannot be marked; the last other block of the message is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from extproc.protocols.anthropic_convert import CACHE_CONTROL, UNCACHEABLE
from store.model import Message

MAX_BREAKPOINTS = 4
EPHEMERAL: dict[str, str] = {"type": "ephemeral"}


def _marked(blocks: Iterable[Any]) -> int:
    n = 0
    for block in blocks:
        if isinstance(block, dict):
            if CACHE_CONTROL in block:
                n += 1
            inner = block.get("content")  # tool_result blocks hold blocks of their own
            if isinstance(inner, list):
                n += _marked(inner)
    return n


def count_breakpoints(body: dict[str, Any]) -> int:
    """Blocks the client marked itself: tools, system blocks, message blocks."""
    n = 0
    tools = body.get("tools")
    if isinstance(tools, list):
        n += _marked(tools)
    system = body.get("system")
    if isinstance(system, list):
        n += _marked(system)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            n += _marked(content)
    return n


def ends_marked(blocks: list[Message]) -> bool:
    """The last block already carries a breakpoint (the client's own)."""
    return bool(blocks) and isinstance(blocks[-1], dict) and CACHE_CONTROL in blocks[-1]


def mark_blocks(blocks: list[Message]) -> list[Message] | None:
    """A copy of `blocks` with the last cacheable block marked; None when none is."""
    for i in range(len(blocks) - 1, -1, -1):
        block = blocks[i]
        if isinstance(block, dict) and block.get("type") not in UNCACHEABLE:
            marked = list(blocks)
            marked[i] = {**block, CACHE_CONTROL: EPHEMERAL}
            return marked
    return None


def mark_message(message: Message) -> Message | None:
    """A copy of an Anthropic message with its last cacheable block marked (string content
    becomes one text block); None when it has no block that can be marked."""
    content = message.get("content")
    if isinstance(content, str):
        if not content:
            return None
        return {**message, "content": [{"type": "text", "text": content, CACHE_CONTROL: EPHEMERAL}]}
    if not isinstance(content, list):
        return None
    marked = mark_blocks(content)
    return None if marked is None else {**message, "content": marked}
