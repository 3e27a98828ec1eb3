"""Shared builders for the store tests."""

from __future__ import annotations

from store import Message, PendingTurn, Turn, Usage


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def user(content: str) -> Message:
    return {"role": "user", "content": content}


def assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def make_turn(turn_id: str, seq: int, content: str = "hello", reply: str = "hi") -> Turn:
    return Turn(
        turn_id=turn_id,
        request_messages=(user(content),),
        response_message=assistant(reply),
        system_messages=({"role": "system", "content": "be brief"},),
        model="gpt-test",
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=1),
        created_at=1_700_000_000.0 + seq,
        seq=seq,
    )


def make_pending(turn_id: str, session_key: str, content: str = "hello") -> PendingTurn:
    return PendingTurn(
        turn_id=turn_id,
        session_key=session_key,
        request_messages=(user(content),),
        model="gpt-test",
    )
