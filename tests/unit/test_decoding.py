"""Unit tests for extproc.decoding: incremental Content-Encoding decoders."""

from __future__ import annotations

import gzip
import itertools
import os
import random
import tracemalloc
import zlib
from collections.abc import Callable

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.decoding import (
    DEFAULT_MAX_OUTPUT_BYTES,
    BodyDecoder,
    DecodingError,
    UnsupportedEncoding,
    make_decoder,
)

Compressor = Callable[[bytes], bytes]


def raw_deflate(data: bytes) -> bytes:
    obj = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return obj.compress(data) + obj.flush()


def zstd_streaming(data: bytes) -> bytes:
    """A frame as a streaming compressor writes it: no content size in the header."""
    obj = zstandard.ZstdCompressor().compressobj()
    out = b"".join(obj.compress(data[i : i + 1000]) for i in range(0, len(data), 1000))
    return out + obj.flush()


def zstd_flushed_blocks(data: bytes) -> bytes:
    """Streaming with a block flush after every piece, as a server flushing SSE would."""
    obj = zstandard.ZstdCompressor().compressobj()
    out = b"".join(
        obj.compress(data[i : i + 100]) + obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        for i in range(0, len(data), 100)
    )
    return out + obj.flush()


CODECS: dict[str, tuple[str, Compressor]] = {
    "identity": ("identity", lambda d: d),
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", lambda d: gzip.compress(d, 1)),
    "deflate-zlib": ("deflate", zlib.compress),
    "deflate-raw": ("deflate", raw_deflate),
    "br": ("br", brotli.compress),
    "zstd": ("zstd", zstandard.ZstdCompressor().compress),
    "zstd-streaming": ("zstd", zstd_streaming),
    "zstd-flushed": ("zstd", zstd_flushed_blocks),
}
COMPRESSED = [k for k in CODECS if k != "identity"]

SAMPLE = (
    b'data: {"choices":[{"delta":{"content":"caf\xc3\xa9 \xf0\x9f\x98\x80"}}]}\n\n' * 40
    + random.Random(0).randbytes(300)
    + b"data: [DONE]\n\n"
)


def split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def decode_chunks(decoder: BodyDecoder, chunks: list[bytes]) -> bytes:
    return b"".join(decoder.decompress(c) for c in chunks) + decoder.flush()


def decode(encoding: str | None, chunks: list[bytes], **kwargs: int) -> bytes:
    return decode_chunks(make_decoder(encoding, **kwargs), chunks)


# --- round trips -------------------------------------------------------------------------


def test_zstd_streaming_frames_have_no_content_size() -> None:
    # Guards the premise of the "zstd-streaming" cases below.
    for frame in (zstd_streaming(SAMPLE), zstd_flushed_blocks(SAMPLE)):
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN


@pytest.mark.parametrize("codec", list(CODECS))
def test_round_trip_whole(codec: str) -> None:
    encoding, compress = CODECS[codec]
    assert decode(encoding, [compress(SAMPLE)]) == SAMPLE


@pytest.mark.parametrize("codec", list(CODECS))
def test_round_trip_byte_by_byte(codec: str) -> None:
    encoding, compress = CODECS[codec]
    blob = compress(SAMPLE)
    assert decode(encoding, [blob[i : i + 1] for i in range(len(blob))]) == SAMPLE


@pytest.mark.parametrize("codec", list(CODECS))
def test_round_trip_every_two_way_split(codec: str) -> None:
    encoding, compress = CODECS[codec]
    blob = compress(SAMPLE[:300])
    for i in range(len(blob) + 1):
        assert decode(encoding, [blob[:i], blob[i:]]) == SAMPLE[:300], i


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(list(CODECS)),
    data=st.binary(max_size=3000) | st.text(max_size=1500).map(str.encode),
    cut_seed=st.lists(st.floats(0, 1), max_size=15),
    empty_chunks=st.booleans(),
)
def test_round_trip_random_splits(
    codec: str, data: bytes, cut_seed: list[float], empty_chunks: bool
) -> None:
    encoding, compress = CODECS[codec]
    blob = compress(data)
    chunks = split_at(blob, [int(f * len(blob)) for f in cut_seed])
    if empty_chunks:
        chunks = [piece for c in chunks for piece in (b"", c)]
    assert decode(encoding, chunks) == data


@pytest.mark.parametrize("value", [None, "", "identity", "IDENTITY", " identity , "])
def test_identity_passes_through(value: str | None) -> None:
    dec = make_decoder(value)
    assert dec.decompress(b"abc") == b"abc"
    assert dec.decompress(b"\x1f\x8b") == b"\x1f\x8b"
    assert dec.flush() == b""


@pytest.mark.parametrize("value", ["GZIP", "Gzip", " gzip ", "gzip, identity"])
def test_coding_names_are_case_insensitive_and_trimmed(value: str) -> None:
    assert decode(value, [gzip.compress(SAMPLE)]) == SAMPLE


def test_empty_body_with_encoding_is_fine() -> None:
    for encoding in ("gzip", "deflate", "br", "zstd", "gzip, br"):
        assert decode(encoding, []) == b""
        assert decode(encoding, [b""]) == b""


def test_gzip_multiple_members() -> None:
    blob = gzip.compress(b"first ") + gzip.compress(b"second ") + gzip.compress(b"third")
    assert decode("gzip", [blob]) == b"first second third"
    assert decode("gzip", [blob[i : i + 3] for i in range(0, len(blob), 3)]) == (
        b"first second third"
    )


def test_zstd_multiple_frames_split_anywhere() -> None:
    blob = zstandard.ZstdCompressor().compress(b"one ") + zstd_streaming(b"two")
    for i in range(len(blob) + 1):
        assert decode("zstd", [blob[:i], blob[i:]]) == b"one two", i


def test_deflate_detection_with_one_byte_first_chunk() -> None:
    for blob in (zlib.compress(SAMPLE), raw_deflate(SAMPLE)):
        assert decode("deflate", [blob[:1], blob[1:2], blob[2:]]) == SAMPLE


def test_decompress_output_is_incremental() -> None:
    # Output must come out as input arrives, not only at flush().
    data = os.urandom(50_000)
    for encoding, compress in CODECS.values():
        blob = compress(data)
        dec = make_decoder(encoding)
        first = dec.decompress(blob[: len(blob) // 2])
        assert len(first) > 10_000, encoding
        assert first + dec.decompress(blob[len(blob) // 2 :]) + dec.flush() == data


# --- stacked encodings -------------------------------------------------------------------


def test_stacked_gzip_then_br_decodes_right_to_left() -> None:
    blob = brotli.compress(gzip.compress(SAMPLE))  # "gzip, br": gzip applied first
    assert decode("gzip, br", [blob]) == SAMPLE
    assert decode("gzip, br", [blob[i : i + 7] for i in range(0, len(blob), 7)]) == SAMPLE


def test_stacked_wrong_order_fails() -> None:
    blob = brotli.compress(gzip.compress(SAMPLE))
    with pytest.raises(DecodingError):
        decode("br, gzip", [blob])


@settings(max_examples=50, deadline=None)
@given(
    names=st.lists(st.sampled_from(COMPRESSED), min_size=2, max_size=3),
    cut_seed=st.lists(st.floats(0, 1), max_size=10),
)
def test_stacked_random(names: list[str], cut_seed: list[float]) -> None:
    blob = SAMPLE
    for name in names:  # applied in header order, left to right
        blob = CODECS[name][1](blob)
    header = ", ".join(CODECS[name][0] for name in names)
    chunks = split_at(blob, [int(f * len(blob)) for f in cut_seed])
    assert decode(header, chunks) == SAMPLE


def test_stack_flush_reaches_inner_stages() -> None:
    # The outer zstd frame is complete; the gzip stream inside it is cut short.
    blob = zstandard.ZstdCompressor().compress(gzip.compress(SAMPLE)[:-4])
    dec = make_decoder("gzip, zstd")
    dec.decompress(blob)
    with pytest.raises(DecodingError, match="gzip: truncated"):
        dec.flush()


# --- corrupt and truncated input ---------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, br"])
def test_garbage_raises_decoding_error(encoding: str) -> None:
    with pytest.raises(DecodingError):
        decode(encoding, [b"this is definitely not compressed data at all......"])


@pytest.mark.parametrize("codec", COMPRESSED)
def test_truncated_stream_raises_at_flush(codec: str) -> None:
    encoding, compress = CODECS[codec]
    blob = compress(SAMPLE)
    dec = make_decoder(encoding)
    dec.decompress(blob[:-5])
    with pytest.raises(DecodingError, match="truncated"):
        dec.flush()


CHECKSUMMED: dict[str, tuple[str, Compressor]] = {
    "gzip": CODECS["gzip"],  # CRC-32
    "deflate-zlib": CODECS["deflate-zlib"],  # Adler-32
    "zstd-checksum": ("zstd", zstandard.ZstdCompressor(write_checksum=True).compress),
}


@pytest.mark.parametrize("codec", list(CHECKSUMMED))
@pytest.mark.parametrize("where", [0.5, 0.9])
def test_corrupted_byte_in_checksummed_stream_raises(codec: str, where: float) -> None:
    # Raw deflate, brotli and zstd without checksum cannot always notice a flipped literal;
    # test_bit_flips_never_raise_other_exceptions covers them.
    encoding, compress = CHECKSUMMED[codec]
    blob = bytearray(compress(SAMPLE))
    blob[int(len(blob) * where)] ^= 0x01
    with pytest.raises(DecodingError):
        decode(encoding, [bytes(blob)])


@pytest.mark.parametrize(
    ("encoding", "blob"),
    [
        ("deflate", zlib.compress(b"x") + b"junk"),
        ("deflate", raw_deflate(b"x") + b"junk"),
        ("br", brotli.compress(b"x") + b"junk"),
        ("zstd", zstandard.ZstdCompressor().compress(b"x") + b"junk"),
        ("gzip", gzip.compress(b"x") + b"junk"),
    ],
)
def test_trailing_garbage_raises(encoding: str, blob: bytes) -> None:
    with pytest.raises(DecodingError):
        decode(encoding, [blob])


@pytest.mark.parametrize(
    ("encoding", "blob"), [("br", brotli.compress(b"x")), ("deflate", zlib.compress(b"x"))]
)
def test_data_after_end_of_stream_in_later_chunk(encoding: str, blob: bytes) -> None:
    dec = make_decoder(encoding)
    assert dec.decompress(blob) == b"x"
    with pytest.raises(DecodingError, match="after end of stream"):
        dec.decompress(b"\x00")


def test_decoder_refuses_use_after_failure_and_after_flush() -> None:
    dec = make_decoder("gzip")
    with pytest.raises(DecodingError):
        dec.decompress(b"not gzip at all")
    with pytest.raises(DecodingError):
        dec.decompress(gzip.compress(b"x"))
    # gzip would accept another member, but not after flush()
    dec = make_decoder("gzip")
    assert decode_chunks(dec, [gzip.compress(b"ok")]) == b"ok"
    assert dec.flush() == b""
    with pytest.raises(DecodingError, match="closed"):
        dec.decompress(gzip.compress(b"more"))


@settings(max_examples=200, deadline=None)
@given(encoding=st.sampled_from(["gzip", "deflate", "br", "zstd", "zstd, gzip"]), data=st.binary())
def test_arbitrary_input_raises_only_decoding_error(encoding: str, data: bytes) -> None:
    dec = make_decoder(encoding, max_output_bytes=1 << 20)
    try:
        dec.decompress(data)
        dec.flush()
    except DecodingError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    codec=st.sampled_from(COMPRESSED),
    position=st.floats(0, 1),
    flip=st.integers(1, 255),
)
def test_bit_flips_never_raise_other_exceptions(codec: str, position: float, flip: int) -> None:
    encoding, compress = CODECS[codec]
    blob = bytearray(compress(SAMPLE))
    blob[min(int(position * len(blob)), len(blob) - 1)] ^= flip
    try:
        out = decode(encoding, [bytes(blob)])
    except DecodingError:
        return
    assert isinstance(out, bytes)  # some flips (e.g. in gzip header fields) are harmless


# --- decompression-bomb guard ------------------------------------------------------------

BOMB_SIZE = 32 * 1024 * 1024
BOMB_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    zeros = bytes(BOMB_SIZE)
    return {
        "gzip": gzip.compress(zeros, 9),
        "deflate": raw_deflate(zeros),
        "br": brotli.compress(zeros, quality=4),
        "zstd": zstandard.ZstdCompressor(level=19).compress(zeros),
        "zstd-streaming": zstd_streaming(zeros),
    }


@pytest.mark.parametrize("kind", ["gzip", "deflate", "br", "zstd", "zstd-streaming"])
def test_bomb_in_one_chunk_raises_with_bounded_memory(bombs: dict[str, bytes], kind: str) -> None:
    encoding = kind.split("-")[0]
    dec = make_decoder(encoding, max_output_bytes=BOMB_LIMIT)
    tracemalloc.start()
    try:
        with pytest.raises(DecodingError, match="max_output_bytes"):
            dec.decompress(bombs[kind])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Without the guard the decoder would hold 32 MiB of zeros at once.
    assert peak < 8 * 1024 * 1024, peak


@pytest.mark.parametrize("kind", ["gzip", "br", "zstd-streaming"])
def test_bomb_in_small_chunks_raises(bombs: dict[str, bytes], kind: str) -> None:
    encoding = kind.split("-")[0]
    blob = bombs[kind]
    dec = make_decoder(encoding, max_output_bytes=BOMB_LIMIT)
    total = 0
    with pytest.raises(DecodingError, match="max_output_bytes"):
        for i in range(0, len(blob), 16):
            total += len(dec.decompress(blob[i : i + 16]))
    assert total <= BOMB_LIMIT


def test_stacked_bomb_is_caught_in_the_inner_stage(bombs: dict[str, bytes]) -> None:
    blob = zstandard.ZstdCompressor().compress(bombs["gzip"])  # small outer, huge inner
    with pytest.raises(DecodingError, match="gzip: decoded body exceeds"):
        decode("gzip, zstd", [blob], max_output_bytes=BOMB_LIMIT)


@pytest.mark.parametrize("codec", list(CODECS))
def test_output_limit_is_exact(codec: str) -> None:
    encoding, compress = CODECS[codec]
    data = os.urandom(5000)
    blob = compress(data)
    chunks = [blob[i : i + 333] for i in range(0, len(blob), 333)]
    assert decode(encoding, chunks, max_output_bytes=len(data)) == data
    with pytest.raises(DecodingError, match="max_output_bytes"):
        decode(encoding, chunks, max_output_bytes=len(data) - 1)


def test_default_output_limit() -> None:
    assert DEFAULT_MAX_OUTPUT_BYTES == 64 * 1024 * 1024
    dec = make_decoder("identity")
    dec.decompress(bytes(DEFAULT_MAX_OUTPUT_BYTES))
    with pytest.raises(DecodingError):
        dec.decompress(b"x")


def test_max_output_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make_decoder("gzip", max_output_bytes=0)


# --- unsupported -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["compress", "x-compress", "gzip, foo", "foo, gzip", "lzma"])
def test_unknown_encoding_raises(value: str) -> None:
    with pytest.raises(UnsupportedEncoding):
        make_decoder(value)


def test_error_types_are_value_errors() -> None:
    assert issubclass(UnsupportedEncoding, ValueError)
    assert issubclass(DecodingError, ValueError)
