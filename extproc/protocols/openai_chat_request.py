# --- requests ---
"""Request side of OpenAI Chat Completions: parse the client's body, splice in the history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from store.model import Message, Turn

SYSTEM_ROLES = frozenset({"system", "developer"})


class RequestError(ValueError):
    """The body is not a chat request we can add memory to; the request passes through."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    system_messages: tuple[Message, ...]  # the request's leading system/developer messages
    new_messages: tuple[Message, ...]  # everything after them: what this turn adds
    model: str
    stream: bool


def parse_request(raw: bytes) -> ChatRequest:
    if not raw:
        raise RequestError("empty body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("body is not a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` is missing or empty")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise RequestError("every message needs a string `role`")
    split = 0
    while split < len(messages) and messages[split]["role"] in SYSTEM_ROLES:
        split += 1
    model = body.get("model")
    return ChatRequest(
        body=body,
        system_messages=tuple(messages[:split]),
        new_messages=tuple(messages[split:]),
        model=model if isinstance(model, str) else "",
        stream=body.get("stream") is True,
    )


def pinned_system(history: list[Turn]) -> tuple[Message, ...]:
    """The most recent system prompt the session was given."""
    for turn in reversed(history):
        if turn.system_messages:
            return turn.system_messages
    return ()


def build_body(request: ChatRequest, history: list[Turn]) -> bytes:
    """System prompt (the request's own, else the pinned one), then history, then new messages."""
    system = request.system_messages or pinned_system(history)
    messages: list[Message] = list(system)
    for turn in history:
        messages.extend(turn.messages())
    messages.extend(request.new_messages)
    body = dict(request.body)
    body["messages"] = messages
    return orjson.dumps(body)
