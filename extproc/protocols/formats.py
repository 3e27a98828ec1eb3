"""The wire formats sessiongate adds memory to, and the one place that picks one.

Rewrite picks by the request path (`for_path`) and records the format's name with the pending
turn (`PendingTurn.wire_format`); capture picks by that name (`by_name`), so the reply is
decoded as the request was sent. Each format is a table of the same functions, so
neither filter branches on the format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.errors import openai_error
from extproc.protocols import anthropic_messages as anthropic
from extproc.protocols import openai_chat as chat
from store.model import Message, Turn

System = tuple[Message, ...] | None
OPENAI_CHAT = "openai_chat"
ANTHROPIC_MESSAGES = "anthropic_messages"


class StreamAccumulator(Protocol):
    @property
    def done(self) -> bool: ...

    def feed_event(self, data: str) -> None: ...

    def result(self, prompt_tokens_estimate: int) -> chat.CapturedReply: ...


class ErrorBody(Protocol):
    def __call__(
        self,
        message: str,
        *,
        type_: str = ...,
        code: str | None = ...,
        param: str | None = ...,
    ) -> bytes: ...


@dataclass(frozen=True, slots=True)
class WireFormat:
    name: str
    path_suffix: str
    parse_request: Callable[[bytes], Any]  # raises chat.RequestError (pass-through)
    # (request, history, max_bytes, system, cache_breakpoints) -> (body, turns left out)
    build_body: Callable[
        [Any, Sequence[Turn], int, tuple[Message, ...] | None, bool], tuple[bytes, int]
    ]
    error_body: ErrorBody
    parse_json: Callable[[bytes, int], chat.CapturedReply]
    stream_accumulator: Callable[[], StreamAccumulator]


def _chat_body(
    request: Any,
    history: Sequence[Turn],
    max_bytes: int,
    system: tuple[Message, ...] | None,
    cache_breakpoints: bool,
) -> tuple[bytes, int]:
    return chat.build_body(request, history, max_bytes, system)  # no breakpoints in this API


OPENAI = WireFormat(
    OPENAI_CHAT,
    "/chat/completions",
    chat.parse_request,
    _chat_body,
    openai_error,
    chat.parse_chat_json,
    chat.ChatStreamAccumulator,
)
ANTHROPIC = WireFormat(
    ANTHROPIC_MESSAGES,
    anthropic.PATH_SUFFIX,
    anthropic.parse_request,
    anthropic.build_body,
    anthropic.error_body,
    anthropic.parse_messages_json,
    anthropic.MessagesStreamAccumulator,
)
FORMATS = (OPENAI, ANTHROPIC)
_BY_NAME = {f.name: f for f in FORMATS}


def for_path(path: str) -> WireFormat | None:
    """The format of a request path (query removed), None for a path that is neither."""
    if path.endswith(OPENAI.path_suffix):
        return OPENAI
    if path.endswith(ANTHROPIC.path_suffix):
        return ANTHROPIC
    return None


def by_name(name: str) -> WireFormat:
    """The format a turn was recorded with (unknown or empty: OpenAI chat)."""
    return _BY_NAME.get(name, OPENAI)
