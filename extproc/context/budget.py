"""Token budget arithmetic: what is left for injected history once the request is counted.

    usable  = floor((window - reserved_output) / (1 + margin))
    history = usable - the request's own parts - the injected system prompt

`reserved_output` is the request's `max_completion_tokens`, `max_tokens` or
`max_output_tokens` (the Responses API's name, which some OpenAI-compatible chat servers accept
too; reasoning tokens are part of all three), else a configured default capped at the model's
`max_output` and at a quarter of the window. It is in the provider's own tokens, so it comes
off the window before the margin scales our (cl100k) counts. The request's own parts are its
system/developer messages, its new messages (images and audio at fixed estimates), its `tools`
(and legacy `functions`) and `response_format` schemas as compact JSON, the Responses API's
`instructions`, and the 3 tokens priming the reply.

Anthropic Messages requests are planned in the same terms: their `system` and messages are
converted to the store's message shape first (extproc.protocols.anthropic_convert), `tools`
(Anthropic's `input_schema` included) are counted as they are, and `max_tokens`, which
Anthropic requires, is the reserved output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.context.models import ModelLimits
from extproc.tokens import REPLY_PRIMING, count_json, count_message
from store.model import Message

SCHEMA_FIELDS = ("tools", "functions", "response_format")
# The client's own output limit, by the names the wire formats give it (first set one wins).
OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _positive_int(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


def reserved_output(
    body: Mapping[str, Any], limits: ModelLimits, default: int, reasoning_default: int
) -> int:
    """Tokens kept free for the reply: the client's own limit when it sets one."""
    for name in OUTPUT_LIMIT_FIELDS:
        asked = _positive_int(body.get(name))
        if asked is not None:
            return asked
    reserve = reasoning_default if limits.reasoning else default
    if limits.max_output:
        reserve = min(reserve, limits.max_output)
    return min(reserve, limits.window // 4)


def usable_tokens(window: int, reserved: int, margin: float) -> int:
    """Prompt tokens we may count (in our encoding) for a request to fit the window."""
    return int((window - reserved) // (1 + margin))


def schema_tokens(body: Mapping[str, Any]) -> int:
    """Tool definitions and the response_format schema, as the body carries them."""
    n = 0
    for name in SCHEMA_FIELDS:
        value = body.get(name)
        if value:
            n += count_json(value)
    return n


def instructions_tokens(body: Mapping[str, Any]) -> int:
    """The Responses API's top-level `instructions` (a system message in all but name)."""
    text = body.get("instructions")
    if not isinstance(text, str) or not text:
        return 0
    return count_message({"role": "system", "content": text}, 0)


def messages_tokens(messages: Iterable[Message], image_tokens: int) -> int:
    return sum(count_message(m, image_tokens) for m in messages)


@dataclass(frozen=True, slots=True)
class Budget:
    window: int
    reserved_output: int
    margin: float
    usable: int  # counted prompt tokens that fit
    request: int  # the request's own parts (priming included)
    system: int  # the system prompt sessiongate injects (0 when the request has its own)

    @property
    def history(self) -> int:
        """Tokens left for injected history (negative: not even the request fits)."""
        return self.usable - self.request - self.system

    @property
    def request_fits(self) -> bool:
        return self.request <= self.usable


def compute(
    body: Mapping[str, Any],
    limits: ModelLimits,
    *,
    own_messages: Iterable[Message],
    injected_system: Iterable[Message],
    default_output: int,
    reasoning_output: int,
    image_tokens: int,
) -> Budget:
    reserved = reserved_output(body, limits, default_output, reasoning_output)
    margin = limits.safety_margin
    request = (
        REPLY_PRIMING
        + messages_tokens(own_messages, image_tokens)
        + schema_tokens(body)
        + instructions_tokens(body)
    )
    return Budget(
        window=limits.window,
        reserved_output=reserved,
        margin=margin,
        usable=usable_tokens(limits.window, reserved, margin),
        request=request,
        system=messages_tokens(injected_system, image_tokens),
    )
