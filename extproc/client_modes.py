"""Client modes: what a request's messages mean against the session's stored history.

- `append`: the client sends only the turn's new messages (sessiongate holds the history).
- `manage`: the client sends its whole conversation every time, as an unmodified app does.
  The longest prefix of the request's messages equal to the stored history's messages is
  recognised as already stored; the rest are the turn's new messages.
- `auto`: `manage` when the request's messages start with the session's whole first stored
  turn (its request messages and reply), else `append`.

Messages are compared by the hash of a canonical form (`canonical`): JSON with sorted keys;
`content` a string when it is one text part (`[{"type": "text", "text": s}]` equals `s`),
`None`/absent as `""`, strings stripped of surrounding whitespace; keys whose value is `None`
left out (an SDK's `model_dump()` adds `"refusal": None`, `"tool_calls": None`...); tool calls as
`{id, type, function: {name, arguments}}` (`type` defaults to `function`, a streamed `index`
dropped). Stored turns' hashes are cached per turn.

Rules (the request is authoritative; the store follows it):
- manage: with `p` the common prefix in messages and `k` the stored turns wholly inside it,
  turns after `k` are dropped (`SessionStore.rewind`) and the request's messages from turn `k`'s
  end on are the new turn. When the request extends the whole stored history nothing is
  dropped. A **regenerated last turn** (the history up to and including the last turn's own
  request messages, asked again) drops the last turn, which the new reply replaces; an edit of
  an earlier message forks the session at the last whole turn before the edit. A request with
  no common prefix at all starts the session over.
- append, only with `append_regenerate` (off by default: an append client may well send the
  same message twice in a row, e.g. "continue", and mean two turns): a **regenerated last turn**
  is a request whose new messages are exactly (canonically) the stored last turn's request
  messages, with no turn in between: the last turn is dropped and replaced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.protocols.wire import TurnCache
from store.model import Message, Turn

APPEND = "append"
MANAGE = "manage"
AUTO = "auto"
MODES = (APPEND, MANAGE, AUTO)

# Outcomes of `reconcile`, as counted in metrics (`rewrite.client_mode.<kind>`).
APPENDED = "appended"  # append mode: the request's messages are all new
EXTENDED = "extended"  # manage: the request extends the whole stored history
REGENERATED = "regenerated"  # the last turn asked again: it is replaced
DIVERGED = "diverged"  # manage: an earlier message differs: the session forks there
NOTHING_NEW = "nothing_new"  # manage: the request repeats stored history and adds nothing


def _canonical_content(content: Any) -> Any:
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if (
        isinstance(content, list)
        and len(content) == 1
        and isinstance(content[0], dict)
        and content[0].get("type") == "text"
        and isinstance(content[0].get("text"), str)
        and set(content[0]) <= {"type", "text"}
    ):
        return content[0]["text"].strip()
    return content


def _canonical_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    out = {k: v for k, v in call.items() if v is not None and k != "index"}
    out.setdefault("type", "function")
    function = out.get("function")
    if isinstance(function, dict):
        out["function"] = {
            "name": function.get("name") or "",
            "arguments": function.get("arguments") or "",
        }
    return out


def canonical(message: Message) -> dict[str, Any]:
    """The message's canonical form (see the module docstring)."""
    out: dict[str, Any] = {}
    for key, value in message.items():
        if value is None and key != "content":
            continue
        if key == "content":
            out[key] = _canonical_content(value)
        elif key == "tool_calls":
            if value:  # an empty list is as good as none
                out[key] = [_canonical_call(c) for c in value] if isinstance(value, list) else value
        else:
            out[key] = value
    out.setdefault("content", "")
    return out


def message_hash(message: Message) -> bytes:
    """16 bytes of BLAKE2b over the canonical JSON (sorted keys)."""
    try:
        data = orjson.dumps(canonical(message), option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer beyond 64 bits somewhere: the exact path
        data = json.dumps(canonical(message), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(data, digest_size=16).digest()


def _turn_hashes(turn: Turn) -> tuple[bytes, ...]:
    return tuple(message_hash(m) for m in turn.messages())


# Stored turns are immutable: their hashes are computed once (per Turn object, as wire.py).
TURN_HASHES: TurnCache[tuple[bytes, ...]] = TurnCache(_turn_hashes, max_size=500_000)


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What a request adds to its session, and which stored turns it replaces."""

    mode: str  # APPEND or MANAGE, as applied
    kind: str  # APPENDED, EXTENDED, REGENERATED, DIVERGED, NOTHING_NEW
    new_messages: tuple[Message, ...]
    keep_turns: int  # stored turns that stay; the ones after are dropped (rewind)
    matched_messages: int = 0  # request messages recognised as already stored

    def rewinds(self, stored_turns: int) -> bool:
        return self.keep_turns < stored_turns


def starts_with_first_turn(history: Sequence[Turn], messages: Sequence[Message]) -> bool:
    """The `auto` rule: the request's messages start with the whole first stored turn."""
    if not history:
        return False
    first = TURN_HASHES.get(history[0])
    if len(messages) < len(first):
        return False
    return all(message_hash(m) == h for m, h in zip(messages, first, strict=False))


def resolve_mode(mode: str, history: Sequence[Turn], messages: Sequence[Message]) -> str:
    if mode == AUTO:
        return MANAGE if starts_with_first_turn(history, messages) else APPEND
    return mode


def reconcile(
    mode: str,
    history: Sequence[Turn],
    messages: Sequence[Message],
    *,
    append_regenerate: bool = False,
) -> Reconciled:
    """Apply the mode's rules to the request's non-system messages (see the module docstring)."""
    mode = resolve_mode(mode, history, messages)
    if mode == MANAGE:
        return _manage(history, tuple(messages))
    return _append(history, tuple(messages), append_regenerate)


def _append(history: Sequence[Turn], messages: tuple[Message, ...], regenerate: bool) -> Reconciled:
    n = len(history)
    if regenerate and n and messages:
        last = history[-1]
        stored = TURN_HASHES.get(last)[: len(last.request_messages)]
        if len(stored) == len(messages) and all(
            message_hash(m) == h for m, h in zip(messages, stored, strict=True)
        ):
            return Reconciled(APPEND, REGENERATED, messages, n - 1)
    return Reconciled(APPEND, APPENDED, messages, n)


def _manage(history: Sequence[Turn], messages: tuple[Message, ...]) -> Reconciled:
    # Walk the stored turns while the request repeats them whole; stop at the first that it
    # does not (it differs there, or the request ends inside it).
    request = [message_hash(m) for m in messages]
    position = 0  # start of the current stored turn in the request
    for i, turn in enumerate(history):
        hashes = TURN_HASHES.get(turn)
        end = position + len(hashes)
        if tuple(request[position:end]) == hashes:
            position = end
            continue
        new = messages[position:]
        if not new:  # the request ends at a turn boundary: it repeats stored history only
            return Reconciled(MANAGE, NOTHING_NEW, (), len(history), position)
        agree = 0
        for a, b in zip(request[position:end], hashes, strict=False):
            if a != b:
                break
            agree += 1
        asked_again = agree == len(turn.request_messages) and position + agree == len(request)
        last = i == len(history) - 1
        kind = REGENERATED if asked_again and last else DIVERGED
        return Reconciled(MANAGE, kind, new, i, position)
    new = messages[position:]
    return Reconciled(MANAGE, EXTENDED if new else NOTHING_NEW, new, len(history), position)
