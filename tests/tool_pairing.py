"""What a request must never carry: tool results whose call is not just before them, or tool
calls left without their results (the checks of the context tests, unit and through Envoy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def tool_errors(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Orphan tool results, and tool calls left without their results."""
    errors: list[str] = []
    open_ids: set[str] = set()
    answerable: set[str] = set()
    for message in messages:
        if message.get("role") == "tool":
            if message["tool_call_id"] not in answerable:
                errors.append(f"orphan result {message['tool_call_id']}")
            open_ids.discard(message["tool_call_id"])
            continue
        if open_ids:
            errors.append(f"unanswered calls {sorted(open_ids)}")
        open_ids = {c["id"] for c in message.get("tool_calls") or ()}
        answerable = set(open_ids)
    return errors
