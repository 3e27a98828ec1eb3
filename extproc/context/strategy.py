"""Dynamic selection: which history strategy a request gets, from its query and the phase.

`classify` looks at the request's newest user text and at where the conversation is:

- `tool_loop`: the request answers tool calls (its messages start with `tool` results), carries
  tool results, or the session's last turn is part of a tool exchange (its reply made tool calls
  or its request carried results). The whole recent exchange is kept (from its clean start).
- `recall`: the user asks about something said before ("what did I say / tell you about",
  "remember", "earlier", "what was", "remind me", "you said", "we discussed", "at the start").
  Relevance (BM25 over the session, blended with recency) gets most of the history budget.
- `follow_up`: a short message (at most `FOLLOW_UP_WORDS` words) that leans on what was just
  said: it opens with "and", "and then", "what about", "how about", "then", "so", "why", or
  refers back with a pronoun ("it", "that", "this", "those", "them"...). Recency.
- `other`: anything else. Recency too: it keeps the injected prefix stable, so provider prompt
  caches keep hitting; relevance (which reorders what precedes the newest turns) is only worth a
  cache miss when the user asks about the past.

The strategy (`context_strategy`, or the request's `x-sessiongate-strategy` header) is `auto`
(the mapping above), `window` (always recency) or `relevance` (always relevance, except that a
request answering tool calls still gets its exchange whole).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from store.model import Message, Turn

STRATEGY_HEADER = "x-sessiongate-strategy"

AUTO = "auto"
WINDOW = "window"
RELEVANCE = "relevance"
TOOL_LOOP = "tool_loop"
STRATEGIES = (AUTO, WINDOW, RELEVANCE)  # what config and the header may ask for

# Query kinds.
RECALL = "recall"
FOLLOW_UP = "follow_up"
OTHER = "other"

FOLLOW_UP_WORDS = 12
MAX_QUERY_CHARS = 2000

_RECALL = re.compile(
    r"\bwhat (?:did|have|had) (?:i|we|you) (?:just )?(?:say|said|tell|told|mention(?:ed)?|"
    r"decide[d]?|agree[d]?|discuss(?:ed)?|ask(?:ed)?|choose|chose|pick(?:ed)?)\b|"
    r"\b(?:remember|recall|remind me|earlier|previously|before now|what was|what were|"
    r"you said|you told me|i said|i told you|i mentioned|we discussed|we talked about|"
    r"at the (?:start|beginning))\b",
    re.I,
)
_FOLLOW_UP_OPENING = re.compile(
    r"^\s*(?:and(?: then)?|what about|how about|then|so|why|also|ok(?:ay)?,? and|but)\b", re.I
)
_PRONOUN = re.compile(r"\b(?:it|its|that|this|those|these|they|them|he|she|him|her)\b", re.I)


def query_text(messages: Sequence[Message]) -> str:
    """The newest user message's text (text parts joined), clipped."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content[:MAX_QUERY_CHARS]
        if isinstance(content, list):
            parts = [
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            ]
            return "\n".join(parts)[:MAX_QUERY_CHARS]
        return ""
    return ""


def in_tool_loop(new_messages: Sequence[Message], last_turn: Turn | None) -> bool:
    if any(m.get("role") == "tool" for m in new_messages):
        return True
    if last_turn is None:
        return False
    if last_turn.response_message.get("tool_calls"):
        return True
    return any(m.get("role") == "tool" for m in last_turn.request_messages)


def classify(new_messages: Sequence[Message], last_turn: Turn | None) -> str:
    """`tool_loop`, `recall`, `follow_up` or `other` (first match wins)."""
    if in_tool_loop(new_messages, last_turn):
        return TOOL_LOOP
    text = query_text(new_messages)
    if _RECALL.search(text):
        return RECALL
    if len(text.split()) <= FOLLOW_UP_WORDS and (
        _FOLLOW_UP_OPENING.search(text) or _PRONOUN.search(text)
    ):
        return FOLLOW_UP
    return OTHER


def choose(requested: str, kind: str) -> str:
    """The strategy applied: `window`, `relevance` or `tool_loop`."""
    if kind == TOOL_LOOP and requested != WINDOW:
        return TOOL_LOOP
    if requested == RELEVANCE:
        return RELEVANCE
    if requested == AUTO and kind == RECALL:
        return RELEVANCE
    return WINDOW
