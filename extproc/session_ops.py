"""Session operations a client asks for with a request header (default `x-session-op`).

  clear        forget the session's history, then answer this request as its first turn
  rewind:N     keep turns 1..N, drop the rest, then continue from there (N >= 0)
  fork:ID      copy session ID (of the same principal) into this session, which must be empty,
               then continue here; the source is left as it is

The operation runs inside the rewrite of the request that carries it, after the session's
pending turn is committed, so it applies to a settled history.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.identity import valid_session_id


class SessionOpError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SessionOp:
    kind: str  # clear | rewind | fork
    keep_turns: int = 0
    source_session_id: str = ""


def parse_session_op(value: str) -> SessionOp:
    name, _, argument = value.strip().partition(":")
    if name == "clear" and not argument:
        return SessionOp("clear")
    if name == "rewind" and argument.isdigit() and len(argument) <= 9:
        return SessionOp("rewind", keep_turns=int(argument))
    if name == "fork" and valid_session_id(argument):
        return SessionOp("fork", source_session_id=argument)
    raise SessionOpError("expected `clear`, `rewind:N` or `fork:SESSION_ID`")
