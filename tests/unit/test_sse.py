"""Unit tests for extproc.sse: WHATWG event-stream parsing, fed in arbitrary chunks."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.sse import DEFAULT_MAX_LINE_BYTES, SSEDecoder, SSEError, SSEEvent

BOM = b"\xef\xbb\xbf"
OPENAI_CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"hello"},"finish_reason":null}]}\n\n'
)


def feed_all(chunks: list[bytes], decoder: SSEDecoder | None = None) -> list[SSEEvent]:
    dec = decoder or SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(dec.feed(chunk))
    events.extend(dec.finish())
    return events


def split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def reference_parse(raw: bytes) -> list[SSEEvent]:
    """Straightforward whole-stream reading of the WHATWG algorithm, used as an oracle."""
    text = raw.decode("utf-8", "replace")
    text = text.removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)[:-1]  # the last piece has no line ending: dropped
    events: list[SSEEvent] = []
    data = ""
    event_type = ""
    last_id: str | None = None
    for line in lines:
        if line == "":
            if data != "":
                events.append(SSEEvent(data[:-1], event_type or "message", last_id))
            data = ""
            event_type = ""
        elif line.startswith(":"):
            pass
        else:
            if ":" in line:
                name, value = line.split(":", 1)
                if value.startswith(" "):
                    value = value[1:]
            else:
                name, value = line, ""
            if name == "data":
                data += value + "\n"
            elif name == "event":
                event_type = value
            elif name == "id" and "\0" not in value:
                last_id = value
    return events


# --- strategies ----------------------------------------------------------------------------

_endings = st.sampled_from([b"\n", b"\r", b"\r\n"])
_value_chars = st.one_of(
    st.sampled_from(list("ab :é😀\0 7")),
    st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
)
_values = st.text(alphabet=_value_chars, max_size=10)
_names = st.sampled_from(["data"] * 4 + ["event", "id", "retry", "", "Data", "dat", "x"])


@st.composite
def _lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field"] * 4 + ["bare", "comment", "blank", "junk"]))
    if kind == "field":
        sep = draw(st.sampled_from([":", ": ", ":  "]))
        text = draw(_names) + sep + draw(_values)
    elif kind == "bare":
        text = draw(_names)
    elif kind == "comment":
        text = ":" + draw(_values)
    elif kind == "blank":
        text = ""
    else:  # arbitrary bytes, including invalid UTF-8 and stray line breaks
        return draw(st.binary(max_size=8)) + draw(_endings)
    return text.encode() + draw(_endings)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    # blocks of a few lines, most of them closed by a blank line
    blocks = draw(
        st.lists(
            st.tuples(st.lists(_lines(), min_size=1, max_size=4), st.sampled_from([b"", b"\n"])),
            min_size=1,
            max_size=8,
        )
    )
    body = b"".join(b"".join(lines) + (end and draw(_endings)) for lines, end in blocks)
    if draw(st.booleans()):
        body += draw(_values).encode()  # unterminated last line
    return (BOM if draw(st.booleans()) else b"") + body


@st.composite
def stream_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    raw = draw(streams())
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=12))
    return raw, cuts


# --- property tests ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(stream_and_cuts())
def test_matches_reference_whole_split_and_byte_by_byte(case: tuple[bytes, list[int]]) -> None:
    raw, cuts = case
    expected = reference_parse(raw)
    assert feed_all([raw]) == expected
    assert feed_all(split_at(raw, cuts)) == expected
    assert feed_all([raw[i : i + 1] for i in range(len(raw))]) == expected


# --- a fixed stream with every feature, split everywhere -----------------------------------

RICH = (
    BOM
    + b": keep-alive comment\r\n"
    + b"event: message_start\r\n"
    + b"id: 7\r\n"
    + b'data: {"t":"caf\xc3\xa9 \xf0\x9f\x98\x80"}\r\n'
    + b"\r\n"
    + b"data: line one\r"
    + b"data:line two\r"
    + b"data:  indented\r"
    + b"\r"
    + b"retry: 1500\n"
    + b"data\n"
    + b"\n"
    + b"event: ping\n"
    + b"\n"
    + b"data: [DONE]\n"
    + b"\n"
    + b"data: never dispatched\n"
)
RICH_EVENTS = [
    SSEEvent('{"t":"café 😀"}', "message_start", "7"),
    SSEEvent("line one\nline two\n indented", "message", "7"),
    SSEEvent("", "message", "7"),
    SSEEvent("[DONE]", "message", "7"),
]


def test_rich_stream_whole() -> None:
    dec = SSEDecoder()
    assert dec.feed(RICH) == RICH_EVENTS
    assert dec.retry == 1500
    assert dec.finish() == []


def test_rich_stream_every_two_way_split() -> None:
    for i in range(len(RICH) + 1):
        assert feed_all([RICH[:i], RICH[i:]]) == RICH_EVENTS, f"split at {i}"


def test_rich_stream_every_three_way_split() -> None:
    n = len(RICH)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert feed_all([RICH[:i], RICH[i:j], RICH[j:]]) == RICH_EVENTS, (i, j)


def test_reference_agrees_with_hand_written_expectation() -> None:
    assert reference_parse(RICH) == RICH_EVENTS


# --- line endings ------------------------------------------------------------------------


def test_crlf_split_between_cr_and_lf_is_one_line_break() -> None:
    # Were "\r" + "\n" two breaks, the "\n" would be a blank line and dispatch "a" alone.
    assert feed_all([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [SSEEvent("a\nb")]


def test_cr_then_empty_chunk_then_lf() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"") == []
    assert dec.feed(b"\n") == []  # still the same CRLF, not a blank line
    assert dec.feed(b"data: b\r\n\r\n") == [SSEEvent("a\nb")]


def test_lone_cr_at_chunk_end_then_cr_is_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\r") == [SSEEvent("a")]


def test_lf_after_skipped_lf_is_a_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\n\n") == [SSEEvent("a")]


def test_cr_only_line_endings() -> None:
    assert feed_all([b"event: e\rdata: x\rdata: y\r\rdata: z\r\r"]) == [
        SSEEvent("x\ny", "e"),
        SSEEvent("z"),
    ]


def test_mixed_line_endings() -> None:
    assert feed_all([b"data: a\r\ndata: b\rdata: c\n\r\n"]) == [SSEEvent("a\nb\nc")]


# --- UTF-8 -------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["é", "😀", "€"])
def test_multibyte_char_split_at_every_byte(char: str) -> None:
    raw = f"data: <{char}>\n\n".encode()
    start = raw.index(char.encode())
    encoded_len = len(char.encode())
    for cut in range(start + 1, start + encoded_len):
        assert feed_all([raw[:cut], raw[cut:]]) == [SSEEvent(f"<{char}>")], cut
    # one byte per chunk as well
    assert feed_all([raw[i : i + 1] for i in range(len(raw))]) == [SSEEvent(f"<{char}>")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert feed_all([b"data: a\xffb\n\n"]) == [SSEEvent("a\ufffdb")]


def test_truncated_multibyte_at_end_of_line_is_replaced() -> None:
    # The line is complete, so the dangling lead bytes are invalid, not "pending".
    expected = b"\xf0\x9f".decode("utf-8", "replace")
    assert feed_all([b"data: \xf0", b"\x9f\n\n"]) == [SSEEvent(expected)]


# --- BOM ---------------------------------------------------------------------------------


def test_bom_at_start_is_skipped() -> None:
    assert feed_all([BOM + b"data: x\n\n"]) == [SSEEvent("x")]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_bom_split_across_chunks(cut: int) -> None:
    raw = BOM + b"data: x\n\n"
    assert feed_all([raw[:cut], raw[cut:]]) == [SSEEvent("x")]


def test_bom_byte_by_byte() -> None:
    assert feed_all([b"\xef", b"\xbb", b"\xbf", b"data: x\n\n"]) == [SSEEvent("x")]


def test_only_one_bom_is_skipped() -> None:
    # The second BOM becomes part of the field name "\ufeffdata", which is ignored.
    assert feed_all([BOM + BOM + b"data: x\n\n"]) == []


def test_bom_later_in_stream_is_not_skipped() -> None:
    assert feed_all([b"data: a\n\n" + BOM + b"data: b\n\n"]) == [SSEEvent("a")]


def test_partial_bom_prefix_that_is_not_a_bom() -> None:
    assert feed_all([b"\xef", b"data: x\n\n"]) == []  # "\ufffddata" is not "data"
    assert feed_all([b"\xef\xbb", b"\n", b"data: x\n\n"]) == [SSEEvent("x")]


# --- fields ------------------------------------------------------------------------------


def test_comments_are_ignored() -> None:
    assert feed_all([b": ping\n\n"]) == []
    assert feed_all([b":comment\ndata: x\n: another\n\n"]) == [SSEEvent("x")]


def test_multi_line_data_is_joined_with_newline() -> None:
    assert feed_all([b"data: a\ndata: b\ndata:\ndata: c\n\n"]) == [SSEEvent("a\nb\n\nc")]


def test_only_one_leading_space_is_stripped() -> None:
    assert feed_all([b"data:x\n\ndata:  y\n\ndata: z \n\n"]) == [
        SSEEvent("x"),
        SSEEvent(" y"),
        SSEEvent("z "),
    ]


def test_value_may_contain_colons() -> None:
    assert feed_all([b"data: a: b:c\n\n"]) == [SSEEvent("a: b:c")]


def test_field_without_colon_has_empty_value() -> None:
    assert feed_all([b"data\n\n"]) == [SSEEvent("")]
    assert feed_all([b"data\ndata\n\n"]) == [SSEEvent("\n")]


def test_event_without_data_is_not_dispatched() -> None:
    assert feed_all([b"event: ping\n\n", b"id: 3\n\n"]) == []


def test_event_type_resets_after_each_blank_line() -> None:
    raw = b"event: foo\ndata: 1\n\ndata: 2\n\nevent: bar\n\ndata: 3\n\n"
    assert feed_all([raw]) == [SSEEvent("1", "foo"), SSEEvent("2"), SSEEvent("3")]


def test_empty_event_field_means_message() -> None:
    assert feed_all([b"event\ndata: x\n\nevent:\ndata: y\n\n"]) == [
        SSEEvent("x", "message"),
        SSEEvent("y", "message"),
    ]


def test_field_names_are_case_sensitive_and_unknown_fields_ignored() -> None:
    assert feed_all([b"Data: x\nfoo: bar\ndata : y\n\n"]) == []


def test_last_event_id_persists_and_can_be_cleared() -> None:
    raw = b"data: a\n\nid: 1\ndata: b\n\ndata: c\n\nid\ndata: d\n\nid: x\0y\ndata: e\n\n"
    assert [e.id for e in feed_all([raw])] == [None, "1", "1", "", ""]


def test_retry_requires_ascii_digits() -> None:
    dec = SSEDecoder()
    assert dec.retry is None
    dec.feed(b"retry: 300\n")
    assert dec.retry == 300
    dec.feed(b"retry: 12a\nretry: -1\nretry: \xd9\xa3\nretry:\n")
    assert dec.retry == 300


def test_openai_chunks_in_sequence() -> None:
    events = feed_all([OPENAI_CHUNK] * 3 + [b"data: [DONE]\n\n"])
    assert len(events) == 4
    assert events[0].data.startswith('{"id":"chatcmpl-1"')
    assert events[0].data.endswith("}")
    assert events[-1] == SSEEvent("[DONE]")


def test_anthropic_style_named_events() -> None:
    raw = (
        b"event: message_start\ndata: {}\n\n"
        b"event: ping\ndata: {}\n\n"
        b"event: message_stop\ndata: {}\n\n"
    )
    assert [e.event for e in feed_all([raw])] == ["message_start", "ping", "message_stop"]


def test_event_is_frozen() -> None:
    event = SSEEvent("x")
    with pytest.raises(AttributeError):
        event.data = "y"  # type: ignore[misc]


# --- end of stream -----------------------------------------------------------------------


def test_finish_discards_event_without_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: complete\n\ndata: pending\n") == [SSEEvent("complete")]
    assert dec.finish() == []


def test_finish_discards_unterminated_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\n\ndata: y") == [SSEEvent("x")]
    assert dec.finish() == []


def test_trailing_cr_is_a_complete_line_break() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\r\r") == [SSEEvent("x")]
    assert dec.finish() == []


def test_finish_resets_for_a_new_stream() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"event: e\nid: 5\nretry: 10\ndata: old\n") == []
    assert dec.finish() == []
    assert dec.retry is None
    # nothing from the old stream leaks in, and a BOM is skipped again
    assert dec.feed(BOM + b"data: new\n\n") == [SSEEvent("new", "message", None)]


# --- max_line_bytes ----------------------------------------------------------------------


def test_default_max_line_bytes() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 1024 * 1024
    dec = SSEDecoder()
    big = b"data: " + b"x" * (DEFAULT_MAX_LINE_BYTES - 6)
    assert dec.feed(big) == []
    assert dec.feed(b"\n\n") == [SSEEvent("x" * (DEFAULT_MAX_LINE_BYTES - 6))]
    with pytest.raises(SSEError):
        SSEDecoder().feed(big + b"y")


def test_line_of_exactly_max_bytes_is_accepted() -> None:
    dec = SSEDecoder(max_line_bytes=10)
    assert dec.feed(b"data:1234") == []
    assert dec.feed(b"5") == []
    assert dec.feed(b"\r\n\r\n") == [SSEEvent("12345")]


def test_long_unterminated_line_across_chunks_raises() -> None:
    dec = SSEDecoder(max_line_bytes=10)
    assert dec.feed(b"data: 0123") == []
    with pytest.raises(SSEError, match="max_line_bytes=10"):
        dec.feed(b"4")


def test_long_tail_after_complete_lines_raises() -> None:
    dec = SSEDecoder(max_line_bytes=10)
    with pytest.raises(SSEError):
        dec.feed(b"data: a\n\ndata: 0123456789")


def test_long_complete_line_in_one_chunk_raises() -> None:
    with pytest.raises(SSEError):
        SSEDecoder(max_line_bytes=10).feed(b"data: 0123456789\n\n")


def test_many_short_lines_in_a_big_chunk_are_fine() -> None:
    dec = SSEDecoder(max_line_bytes=16)
    assert dec.feed(b"data: abc\n" * 100 + b"\n") == [SSEEvent("\n".join(["abc"] * 100))]


def test_decoder_stays_failed_until_finish() -> None:
    dec = SSEDecoder(max_line_bytes=4)
    with pytest.raises(SSEError):
        dec.feed(b"data: x")
    with pytest.raises(SSEError):
        dec.feed(b"\n\n")
    dec.finish()
    assert dec.feed(b"data\n\n") == [SSEEvent("")]


def test_sse_error_is_value_error() -> None:
    assert issubclass(SSEError, ValueError)


def test_max_line_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SSEDecoder(max_line_bytes=0)
