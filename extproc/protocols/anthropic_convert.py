"""Anthropic Messages content <-> the store's canonical (OpenAI chat shaped) messages.

The store keeps one message shape whatever the wire format (store/model.py), so a session can
be continued from either SDK. Anthropic messages are converted on the way in and back on the
way out:

| Anthropic                                  | stored (OpenAI chat shape)                      |
|--------------------------------------------|-------------------------------------------------|
| `system`: string / text blocks             | one `system` message: string / text parts       |
| user text / image blocks                   | `user`: string (one text block) or parts;       |
|                                            | images as `image_url` (data: URL or the URL)    |
| user `tool_result` blocks                  | one `tool` message each, before the user's text |
| assistant text blocks                      | `assistant` `content`: string or text parts     |
| assistant `tool_use`                       | `tool_calls` (arguments: compact JSON of input) |

Whatever that table cannot carry (thinking and redacted_thinking blocks with their signatures,
`is_error`, citations, documents, server tools, images inside tool results, block order)
would be lost, so a message whose conversion does not convert back to the same blocks keeps
its original blocks too, under `ANTHROPIC_CONTENT` on the first of the messages it became
(the others get `[]`). Anthropic requests are rebuilt from those blocks exactly (extended
thinking sessions continue with their signatures); the OpenAI format strips the key and
uses the converted fields. `cache_control` is never stored: breakpoints belong to a request,
and sessiongate places its own (extproc/protocols/anthropic_cache.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from store.model import Message

# The original Anthropic blocks of a message the OpenAI shape cannot carry (see above).
ANTHROPIC_CONTENT = "anthropic_content"
CACHE_CONTROL = "cache_control"
# Block types that never carry cache_control (Anthropic rejects it on them).
UNCACHEABLE = frozenset({"thinking", "redacted_thinking"})


def strip_cache_control(value: Any) -> Any:
    """`value` without any `cache_control` key, at any depth (copies only what changes)."""
    if isinstance(value, dict):
        if CACHE_CONTROL in value or any(isinstance(v, dict | list) for v in value.values()):
            return {k: strip_cache_control(v) for k, v in value.items() if k != CACHE_CONTROL}
        return value
    if isinstance(value, list):
        return [strip_cache_control(v) for v in value]
    return value


# --- Anthropic -> stored --------------------------------------------------------------------


def _image_part(block: dict[str, Any]) -> Message | None:
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', '')};base64,{source.get('data', '')}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _text_of(value: Any) -> str | None:
    """A text block's text when the block is plain (nothing but type and text)."""
    if (
        isinstance(value, dict)
        and value.get("type") == "text"
        and isinstance(value.get("text"), str)
        and all(k in ("type", "text") or value[k] is None for k in value)
    ):
        text: str = value["text"]
        return text
    return None


def _user_parts(blocks: Iterable[Any]) -> list[Message]:
    parts: list[Message] = []
    for block in blocks:
        text = _text_of(block)
        if text is not None:
            parts.append({"type": "text", "text": text})
        elif isinstance(block, dict) and block.get("type") == "image":
            image = _image_part(block)
            if image is not None:
                parts.append(image)
    return parts


def _collapse(parts: list[Message]) -> str | list[Message]:
    """One text part is a plain string (how both APIs usually carry it)."""
    if len(parts) == 1 and parts[0].get("type") == "text":
        text: str = parts[0]["text"]
        return text
    return parts


def _tool_message(block: dict[str, Any]) -> Message:
    content = block.get("content")
    if isinstance(content, list):
        parts = [{"type": "text", "text": t} for b in content if (t := _text_of(b)) is not None]
        content = _collapse(parts) if parts else ""
    elif not isinstance(content, str):
        content = ""
    return {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": content}


def _tool_call(block: dict[str, Any]) -> Message:
    arguments = orjson.dumps(block.get("input", {})).decode()
    return {
        "id": str(block.get("id", "")),
        "type": "function",
        "function": {"name": str(block.get("name", "")), "arguments": arguments},
    }


def _convert(role: str, content: Any) -> list[Message]:
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    if role == "assistant":
        texts = [{"type": "text", "text": t} for b in blocks if (t := _text_of(b)) is not None]
        calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
        message: Message = {"role": "assistant", "content": _collapse(texts) if texts else None}
        if calls:
            message["tool_calls"] = calls
        elif not texts:
            message["content"] = ""
        return [message]
    out = [_tool_message(b) for b in blocks if b.get("type") == "tool_result"]
    rest = [b for b in blocks if b.get("type") != "tool_result"]
    if rest or not out:
        out.append({"role": role, "content": _collapse(_user_parts(rest))})
    return out


def _normal_blocks(content: Any) -> list[Any]:
    """Content as blocks, for comparing: a string is one text block, citations: null and
    cache_control are nothing, tool_result content likewise."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        return []
    out: list[Any] = []
    for block in strip_cache_control(content):
        if isinstance(block, dict):
            block = {k: v for k, v in block.items() if v is not None}
            if block.get("type") == "tool_result" and "content" in block:
                inner = _normal_blocks(block["content"])
                block["content"] = inner
                if not inner:
                    del block["content"]
        out.append(block)
    return out


def message_to_stored(message: dict[str, Any]) -> list[Message]:
    """One Anthropic message as stored messages (a user message with tool results becomes
    several); the original blocks ride along when the conversion cannot give them back."""
    role = "assistant" if message.get("role") == "assistant" else "user"
    content = strip_cache_control(message.get("content"))
    converted = _convert(role, content)
    original = _normal_blocks(content)
    if _normal_blocks(_blocks_of(converted)) != original:
        converted[0] = {**converted[0], ANTHROPIC_CONTENT: original}
        for i in range(1, len(converted)):
            converted[i] = {**converted[i], ANTHROPIC_CONTENT: []}
    return converted


def messages_to_stored(messages: Iterable[dict[str, Any]]) -> tuple[Message, ...]:
    return tuple(m for message in messages for m in message_to_stored(message))


def system_to_stored(system: Any) -> tuple[Message, ...]:
    """The request's `system` as one stored system message (text blocks become text parts)."""
    if isinstance(system, str):
        return ({"role": "system", "content": system},) if system else ()
    if isinstance(system, list):
        parts = [{"type": "text", "text": b["text"]} for b in system if _is_text_block(b)]
        if parts:
            return ({"role": "system", "content": _collapse(parts)},)
    return ()


def _is_text_block(block: Any) -> bool:
    return (
        isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
    )


# --- stored -> Anthropic --------------------------------------------------------------------


def _image_block(part: dict[str, Any]) -> Message | None:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        return None
    if url.startswith("data:"):
        header, _, data = url[5:].partition(",")
        media_type = header.removesuffix(";base64")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_blocks(content: Any) -> list[Message]:
    """OpenAI content (string or parts) as Anthropic blocks; empty text is left out
    (Anthropic rejects empty text blocks), audio and files become a note."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[Message] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = _image_block(part)
            if image is not None:
                blocks.append(image)
        elif kind in ("input_audio", "file"):
            blocks.append({"type": "text", "text": f"[{kind} omitted]"})
    return blocks


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            value = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return {"arguments": raw}  # not JSON: kept as text rather than lost
        return value if isinstance(value, dict) else {"value": value}
    return raw if isinstance(raw, dict) else {}


def _stored_blocks(message: Message) -> tuple[str, list[Message]]:
    """(Anthropic role, blocks) of one stored message."""
    role = message.get("role")
    if ANTHROPIC_CONTENT in message and isinstance(message[ANTHROPIC_CONTENT], list):
        blocks: list[Message] = message[ANTHROPIC_CONTENT]
        return ("assistant" if role == "assistant" else "user"), blocks
    if role == "assistant":
        blocks = _content_blocks(message.get("content"))
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            blocks.append({"type": "text", "text": refusal})
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": str(call.get("id", "")),
                        "name": str(function.get("name", "")),
                        "input": _arguments(function.get("arguments")),
                    }
                )
        return "assistant", blocks
    if role == "tool":
        result: Message = {
            "type": "tool_result",
            "tool_use_id": str(message.get("tool_call_id", "")),
        }
        content = _content_blocks(message.get("content"))
        if content:
            result["content"] = content
        return "user", [result]
    if role in ("system", "developer"):  # a system message inside the history
        return "user", _content_blocks(message.get("content"))
    return "user", _content_blocks(message.get("content"))


def _blocks_of(messages: Sequence[Message]) -> list[Message]:
    """The blocks of stored messages that form one Anthropic message (for comparing)."""
    out: list[Message] = []
    for message in messages:
        out.extend(_stored_blocks(message)[1])
    return out


def stored_to_messages(messages: Iterable[Message]) -> list[Message]:
    """Stored messages as Anthropic messages: consecutive messages of one role become one
    (tool results and the user's text share a user message, tool results first); a message
    with no blocks is left out. The blocks are the stored objects themselves (read-only)."""
    out: list[Message] = []
    for message in messages:
        role, blocks = _stored_blocks(message)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"] = [*out[-1]["content"], *blocks]
        else:
            out.append({"role": role, "content": list(blocks)})
    return out


def stored_to_system(messages: Iterable[Message]) -> list[Message]:
    """Stored system messages as Anthropic system text blocks."""
    blocks: list[Message] = []
    for message in messages:
        blocks.extend(b for b in _content_blocks(message.get("content")) if b["type"] == "text")
    return blocks


def strip_for_openai(message: Message) -> Message:
    """A stored message without the Anthropic-only key (the OpenAI API rejects unknown keys)."""
    if ANTHROPIC_CONTENT not in message:
        return message
    return {k: v for k, v in message.items() if k != ANTHROPIC_CONTENT}
