"""The records the store keeps. Versioned so neighbouring releases can read each other."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# A chat message exactly as the wire format carries it (OpenAI chat: role, content, tool_calls...).
Message = dict[str, Any]

RECORD_VERSION = 1


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one turn. `estimated` is True when the provider sent none and we counted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Turn:
    """One completed exchange: the messages the client sent and the reply it received.

    `turn_id` is minted by the rewrite filter and makes appends idempotent. `seq` is the
    per-session position, assigned by the store at commit (0 = not yet assigned).
    """

    turn_id: str
    request_messages: tuple[Message, ...]
    response_message: Message
    system_messages: tuple[Message, ...] = ()
    model: str = ""
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    created_at: float = field(default_factory=time.time)
    seq: int = 0

    def messages(self) -> list[Message]:
        """The turn as history: what the user sent, then what the assistant answered."""
        return [*self.request_messages, self.response_message]


@dataclass(frozen=True, slots=True)
class PendingTurn:
    """What rewrite knows of a turn before its reply arrives; capture completes it."""

    turn_id: str
    session_key: str
    request_messages: tuple[Message, ...]
    system_messages: tuple[Message, ...] = ()
    model: str = ""
    prompt_tokens_estimate: int = 0
    # Who asked, for the session's security context and metadata (never a raw credential).
    tenant: str = ""
    principal: str = ""
    scopes: tuple[str, ...] = ()
    user_agent: str = ""
    created_at: float = field(default_factory=time.time)
