"""The skeleton both wire formats' SSE stream accumulators share: one JSON object per `data:`
payload, applied in order; a payload that does not parse, or whose shape the format's `_apply`
does not expect, is recorded as the stream's error instead of raising (a provider's odd
event must never break capture)."""

from __future__ import annotations

from typing import Any

import orjson


def preview(data: str | bytes) -> str:
    """The start of a payload, for an error message."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return text if len(text) <= 80 else text[:77] + "..."


class EventAccumulator:
    """Subclasses apply one parsed payload (`_apply`), may end the stream on a payload that is
    not JSON (`_terminal`: OpenAI's `[DONE]`), and build their reply from what they kept."""

    __slots__ = ("_done", "_error")
    SHAPE = "event"  # what the error calls a payload `_apply` could not take

    def __init__(self) -> None:
        self._done = False
        self._error: str | None = None

    @property
    def done(self) -> bool:
        """True once the stream's terminal event was fed."""
        return self._done

    def feed_event(self, data: str) -> None:
        """Apply one SSE `data:` payload. Never raises; problems are recorded as the error."""
        if self._done:
            return
        if self._terminal(data):
            self._done = True
            return
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._fail(f"malformed event: {preview(data)}")
            return
        if type(payload) is not dict:
            self._fail(f"malformed event: {preview(data)}")
            return
        try:
            self._apply(payload)
        except Exception as exc:  # an odd shape must never break capture
            self._fail(f"unexpected {self.SHAPE} shape: {exc!r}")

    def _terminal(self, data: str) -> bool:
        return False

    def _apply(self, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    def _fail(self, error: str) -> None:
        if self._error is None:
            self._error = error
