"""Incremental HTTP content-decoding (RFC 9110 section 8.4) of response bodies.

:func:`make_decoder` turns a ``Content-Encoding`` header value into a :class:`BodyDecoder`
that is fed the body chunk by chunk as Envoy streams it. Supported codings: ``identity``,
``gzip``/``x-gzip`` (several members allowed), ``deflate`` (zlib-wrapped as RFC 9110 says, or
raw deflate as some servers send, told apart by the first two bytes), ``br`` and ``zstd``
(frames with or without a content size, several frames allowed, window at most 8 MiB as
RFC 9659 sets for HTTP). Stacked codings (``"gzip, br"``) are undone right to left.

Every failure is a :class:`DecodingError`: corrupt input, data after the end of a stream, a
stream truncated before :meth:`BodyDecoder.flush`, and output beyond ``max_output_bytes``.
The output guard bounds memory too, not just the total: zlib and brotli are asked for at most
the remaining budget, and zstd input is fed in slices small enough that even a maximally
compressed slice cannot overshoot the budget by more than about 2 MiB. In a stack every stage
has the same budget.
"""

from __future__ import annotations

import zlib
from typing import Any, Final, Protocol

import brotli
import zstandard

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "BodyDecoder",
    "DecodingError",
    "UnsupportedEncoding",
    "make_decoder",
]

DEFAULT_MAX_OUTPUT_BYTES: Final = 64 * 1024 * 1024
ZSTD_MAX_WINDOW_BYTES: Final = 8 * 1024 * 1024  # RFC 9659 section 3

# A zstd block decodes to at most 128 KiB and an RLE block takes 4 input bytes, so one input
# byte yields at most 32 KiB of output (plus one block completed by the slice's first byte).
_ZSTD_MAX_RATIO_SHIFT: Final = 15
_ZSTD_MIN_SLICE: Final = 64
# brotli >= 1.2 can cap the output of one process() call.
_BROTLI_CAN_LIMIT: Final = hasattr(brotli.Decompressor, "can_accept_more_data")


class DecodingError(ValueError):
    """The body cannot be decoded: corrupt, truncated, or larger than allowed when decoded."""


class UnsupportedEncoding(ValueError):
    """The ``Content-Encoding`` names a coding this module does not implement."""


class BodyDecoder(Protocol):
    """Incremental decoder of one response body."""

    def decompress(self, chunk: bytes) -> bytes:
        """Decode the next chunk of the body; may return ``b""`` while input is buffered."""
        ...

    def flush(self) -> bytes:
        """End of body: return what is left, or raise :class:`DecodingError` if truncated."""
        ...


class _Stage:
    """One coding. Subclasses implement ``_feed`` and ``_finish``; this class keeps the
    output budget, turns library errors into DecodingError and refuses use after flush() or
    after a failure."""

    __slots__ = ("_closed", "_limit", "_total", "name")

    _errors: tuple[type[Exception], ...] = ()

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self._limit = limit
        self._total = 0
        self._closed: str | None = None

    def decompress(self, chunk: bytes) -> bytes:
        if self._closed is not None:
            raise DecodingError(f"{self.name}: decoder is closed ({self._closed})")
        if not chunk:
            return b""
        return self._guard(chunk)

    def flush(self) -> bytes:
        if self._closed == "flushed":
            return b""
        if self._closed is not None:
            raise DecodingError(f"{self.name}: decoder is closed ({self._closed})")
        out = self._guard(None)
        self._closed = "flushed"
        return out

    def _guard(self, chunk: bytes | None) -> bytes:
        """``_feed(chunk)``, or ``_finish()`` for None, with every failure a DecodingError."""
        try:
            return self._finish() if chunk is None else self._feed(chunk)
        except DecodingError:
            self._closed = "failed"
            raise
        except self._errors as exc:
            self._closed = "failed"
            raise DecodingError(f"corrupt {self.name} data: {exc}") from exc

    def _remaining(self) -> int:
        return self._limit - self._total

    def _count(self, out: bytes) -> bytes:
        self._total += len(out)
        if self._total > self._limit:
            raise DecodingError(f"{self.name}: decoded body exceeds max_output_bytes={self._limit}")
        return out

    def _feed(self, chunk: bytes) -> bytes:
        return self._count(chunk)

    def _finish(self) -> bytes:
        return b""


class _Identity(_Stage):
    __slots__ = ()


def _is_zlib_header(head: bytes) -> bool:
    """RFC 1950 header: CM=8 (deflate), CINFO<=7, and CMF*256+FLG divisible by 31."""
    cmf, flg = head[0], head[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0


class _Zlib(_Stage):
    """gzip (several members), zlib-wrapped deflate, raw deflate, or deflate auto-detected."""

    __slots__ = ("_head", "_obj", "_streams", "_wbits")

    _errors = (zlib.error,)

    def __init__(self, name: str, limit: int, wbits: int | None) -> None:
        super().__init__(name, limit)
        self._wbits = wbits  # None: "deflate", decide from the first two bytes
        self._head = b""
        self._obj: zlib._Decompress | None = (
            None  # current stream; None before it and after its end
        )
        self._streams = 0  # streams (gzip members) decoded to their end

    def _feed(self, chunk: bytes) -> bytes:
        if self._wbits is None:
            chunk = self._head + chunk
            if len(chunk) < 2:
                self._head = chunk
                return b""
            self._head = b""
            self._wbits = zlib.MAX_WBITS if _is_zlib_header(chunk) else -zlib.MAX_WBITS
        parts: list[bytes] = []
        while chunk:
            if self._obj is None:
                if self._streams and self._wbits != 16 + zlib.MAX_WBITS:
                    raise DecodingError(f"{self.name}: data after end of stream")
                self._obj = zlib.decompressobj(self._wbits)
            obj = self._obj
            # Asking for one byte more than the budget detects overflow without inflating
            # the rest; below that limit zlib consumes all input, so unconsumed_tail is empty.
            parts.append(self._count(obj.decompress(chunk, self._remaining() + 1)))
            if obj.eof:
                chunk = obj.unused_data
                self._obj = None
                self._streams += 1
            else:
                chunk = b""
        return b"".join(parts)

    def _finish(self) -> bytes:
        if self._head or self._obj is not None:
            raise DecodingError(f"{self.name}: truncated stream")
        return b""


class _Brotli(_Stage):
    __slots__ = ("_obj", "_started")

    _errors = (brotli.error,)

    def __init__(self, limit: int) -> None:
        super().__init__("br", limit)
        self._obj: Any = brotli.Decompressor()
        self._started = False

    def _feed(self, chunk: bytes) -> bytes:
        if self._obj.is_finished():
            raise DecodingError("br: data after end of stream")
        self._started = True
        if _BROTLI_CAN_LIMIT:
            out = self._obj.process(chunk, output_buffer_limit=self._remaining() + 1)
        else:  # pragma: no cover - brotli < 1.2 cannot bound one call's output
            out = self._obj.process(chunk)
        return self._count(out)

    def _finish(self) -> bytes:
        if self._started and not self._obj.is_finished():
            raise DecodingError("br: truncated stream")
        return b""


class _Zstd(_Stage):
    __slots__ = ("_dctx", "_obj")

    _errors = (zstandard.ZstdError,)

    def __init__(self, limit: int) -> None:
        super().__init__("zstd", limit)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES)
        self._obj: zstandard.ZstdDecompressionObj | None = None  # current frame

    def _feed(self, chunk: bytes) -> bytes:
        parts: list[bytes] = []
        pos, size = 0, len(chunk)
        view = memoryview(chunk)
        while pos < size:
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            step = max(_ZSTD_MIN_SLICE, self._remaining() >> _ZSTD_MAX_RATIO_SHIFT)
            piece = view[pos : pos + step]
            parts.append(self._count(self._obj.decompress(piece)))
            pos += len(piece)
            if self._obj.eof:  # frame complete: what it did not use starts the next one
                pos -= len(self._obj.unused_data)
                self._obj = None
        return b"".join(parts)

    def _finish(self) -> bytes:
        if self._obj is not None:
            raise DecodingError("zstd: truncated stream")
        return b""


class _Stack:
    """Several codings; ``stages`` in decoding order (the header's last coding first)."""

    __slots__ = ("_stages",)

    def __init__(self, stages: list[_Stage]) -> None:
        self._stages = stages

    def decompress(self, chunk: bytes) -> bytes:
        for stage in self._stages:
            if not chunk:
                break
            chunk = stage.decompress(chunk)
        return chunk

    def flush(self) -> bytes:
        out = b""
        for stage in self._stages:
            out = stage.decompress(out) + stage.flush()
        return out


def _make_stage(coding: str, limit: int) -> _Stage | None:
    if coding in ("gzip", "x-gzip"):
        return _Zlib(coding, limit, 16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return _Zlib(coding, limit, None)
    if coding == "br":
        return _Brotli(limit)
    if coding == "zstd":
        return _Zstd(limit)
    if coding == "identity":
        return None
    raise UnsupportedEncoding(f"unsupported content-encoding: {coding!r}")


def make_decoder(
    content_encoding: str | None, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
) -> BodyDecoder:
    """Return a fresh decoder for a body sent with this ``Content-Encoding`` header value.

    Codings are case-insensitive and comma-separated; empty entries and ``identity`` are
    ignored. Raises :class:`UnsupportedEncoding` for any other unknown coding.
    """
    if max_output_bytes <= 0:
        raise ValueError("max_output_bytes must be positive")
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    stages = [
        stage
        for coding in reversed(codings)
        if coding and (stage := _make_stage(coding, max_output_bytes)) is not None
    ]
    if not stages:
        return _Identity("identity", max_output_bytes)
    if len(stages) == 1:
        return stages[0]
    return _Stack(stages)
