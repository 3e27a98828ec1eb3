"""Incremental Server-Sent Events decoder (WHATWG HTML, "Server-sent events", parsing rules).

Streaming LLM replies reach the capture filter as arbitrary byte chunks: a chunk may end
mid-line, between the ``\\r`` and ``\\n`` of a CRLF, or inside a multi-byte UTF-8 character.
:class:`SSEDecoder` keeps only the incomplete last line buffered (as bytes), splits complete
lines with ``bytes`` methods (no per-byte Python loop) and decodes UTF-8 only over complete
lines, so a character split across chunks is never replaced by U+FFFD.

Parsing follows https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation:

* line endings CRLF, LF and CR are all accepted; one leading UTF-8 BOM is skipped;
* a line starting with ``:`` is a comment; a line without ``:`` is a field name with an empty
  value; one space after the colon is stripped;
* ``data`` lines are joined with ``\\n``; ``event`` sets the type of the next event (empty means
  ``"message"``); ``id`` sets the *last event id*, which persists across events (an id
  containing U+0000 is ignored); ``retry`` (ASCII digits only) sets :attr:`SSEDecoder.retry`;
  other fields are ignored;
* a blank line dispatches the event, unless no ``data`` line was seen;
* at end of stream an event without its terminating blank line is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_MAX_LINE_BYTES", "SSEDecoder", "SSEError", "SSEEvent"]

DEFAULT_MAX_LINE_BYTES: Final = 1024 * 1024
_BOM: Final = b"\xef\xbb\xbf"
_CR: Final = 0x0D
_LF: Final = 0x0A


class SSEError(ValueError):
    """The event stream cannot be decoded (a line exceeds ``max_line_bytes``)."""


@dataclass(slots=True, frozen=True)
class SSEEvent:
    """One dispatched event.

    ``id`` is the stream's *last event id* when the event was dispatched (WHATWG
    ``lastEventId``): it carries over from earlier events until another ``id`` field changes
    it, and is ``None`` if the stream has not sent an ``id`` field yet.
    """

    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Feed byte chunks, get the events they complete.

    One decoder per response stream. Not thread-safe. After an :class:`SSEError` the decoder
    is unusable: every later :meth:`feed` raises again (call :meth:`finish` to reset it).
    """

    __slots__ = (
        "_at_start",
        "_data",
        "_error",
        "_event",
        "_last_id",
        "_max_line",
        "_skip_lf",
        "_tail",
        "_tail_len",
        "retry",
    )

    retry: int | None
    """Reconnection time in milliseconds from the last valid ``retry`` field, if any."""
    _at_start: bool  # a BOM at stream start is not yet ruled out
    _skip_lf: bool  # the previous chunk ended in CR: a leading LF belongs to that line break
    _tail: list[bytes]  # pieces of the incomplete last line
    _tail_len: int
    _data: list[str]  # data buffer, one entry per data line
    _event: str  # event type buffer
    _last_id: str | None
    _error: str | None

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        if max_line_bytes <= 0:
            raise ValueError("max_line_bytes must be positive")
        self._max_line = max_line_bytes
        self._reset()

    def _reset(self) -> None:
        self._at_start = True
        self._skip_lf = False
        self._tail = []
        self._tail_len = 0
        self._data = []
        self._event = ""
        self._last_id: str | None = None
        self._error: str | None = None
        self.retry = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk`` and return the events it completes, in stream order.

        Raises :class:`SSEError` if a line grows beyond ``max_line_bytes``.
        """
        if self._error is not None:
            raise SSEError(self._error)
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if self._at_start:
            chunk = self._strip_bom(chunk)
            if not chunk:
                return []

        has_cr = b"\r" in chunk
        if not has_cr and b"\n" not in chunk:
            # No line ends here: keep buffering the current line.
            self._tail.append(chunk)
            self._tail_len += len(chunk)
            if self._tail_len > self._max_line:
                self._fail(self._tail_len)
            return []
        if self._tail:
            self._tail.append(chunk)
            chunk = b"".join(self._tail)
            self._tail = []
            self._tail_len = 0
        if has_cr:
            if chunk[-1] == _CR:
                self._skip_lf = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

        end = chunk.rfind(b"\n")
        if end + 1 < len(chunk):
            tail = chunk[end + 1 :]
            if len(tail) > self._max_line:
                self._fail(len(tail))
            self._tail.append(tail)
            self._tail_len = len(tail)
        complete = chunk[:end]
        if end > self._max_line:
            longest = max(map(len, complete.split(b"\n")))
            if longest > self._max_line:
                self._fail(longest)

        events: list[SSEEvent] = []
        data = self._data
        for line in complete.decode("utf-8", "replace").split("\n"):
            if not line:
                if data:
                    events.append(
                        SSEEvent("\n".join(data), self._event or "message", self._last_id)
                    )
                    data.clear()
                self._event = ""
                continue
            if line[0] == ":":
                continue
            name, _, value = line.partition(":")
            if value and value[0] == " ":
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                if "\0" not in value:
                    self._last_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry = int(value)
        return events

    def finish(self) -> list[SSEEvent]:
        """Signal end of stream and reset the decoder for reuse.

        Per the WHATWG spec, pending data is discarded at end of stream: an event whose
        terminating blank line never arrived (including a last line without a line break) is
        *not* dispatched. Every event the stream completed has already been returned by
        :meth:`feed` (a chunk ending in a lone CR is processed at once), so this always
        returns an empty list; it exists so callers need not know that.
        """
        self._reset()
        return []

    def _strip_bom(self, chunk: bytes) -> bytes:
        """Drop one UTF-8 BOM at stream start, even if it arrives split across chunks."""
        if self._tail:  # a BOM prefix held back by an earlier call
            chunk = b"".join(self._tail) + chunk
            self._tail = []
            self._tail_len = 0
        if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
            self._tail.append(chunk)
            self._tail_len = len(chunk)
            return b""
        self._at_start = False
        return chunk[len(_BOM) :] if chunk.startswith(_BOM) else chunk

    def _fail(self, size: int) -> None:
        self._error = (
            f"SSE line exceeds max_line_bytes={self._max_line} ({size} bytes without a line break)"
        )
        self._tail = []
        self._tail_len = 0
        raise SSEError(self._error)
