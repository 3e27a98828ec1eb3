"""Every ProcessingResponse sessiongate sends is built here, and nowhere else.

The protobuf modules come from xds-protos (upb-backed: ~1 µs to parse a request, against
hundreds of µs for pydantic-backed bindings). They are untyped, so this module is the typed seam.
"""

from __future__ import annotations

import functools
import struct as _binary
from collections.abc import Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

ProcessingRequest = ep.ProcessingRequest
ProcessingResponse = ep.ProcessingResponse

METADATA_NAMESPACE = "sessiongate"
AFFINITY_KEY = "affinity"
_Mode = processing_mode_pb2.ProcessingMode
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# The mode override that ends a rewrite stream after the headers. Envoy replaces the whole
# mode (DEFAULT header modes mean SEND), so every field is spelt out; the Envoy config lists this
# exact mode in `allowed_override_modes` (which compares all fields but request_header_mode).
PASS_THROUGH_MODE = {
    "request_header_mode": "SEND",
    "response_header_mode": "SKIP",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}


def _header_mutation(
    set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()
) -> Any:
    mutation = ep.HeaderMutation(remove_headers=list(remove))
    for key, value in (set_headers or {}).items():
        mutation.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                append_action=_OVERWRITE,
            )
        )
    return mutation


# The headers responses depend only on which headers go (a handful of combinations): built once
# and shared. Callers must not modify a returned message (none does; they only send it).


@functools.cache
def request_headers_continue(remove: tuple[str, ...] = ()) -> Any:
    """Let the request headers through, minus `remove` (e.g. the session header)."""
    common = ep.CommonResponse(header_mutation=_header_mutation(remove=remove))
    return ProcessingResponse(request_headers=ep.HeadersResponse(response=common))


@functools.cache
def request_headers_pass_through(remove: tuple[str, ...] = ()) -> Any:
    """No memory for this request: skip its body, so Envoy sends us nothing more."""
    common = ep.CommonResponse(header_mutation=_header_mutation(remove=remove))
    response = ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
    response.mode_override.CopyFrom(_PASS_THROUGH)
    return response


@functools.cache
def request_body_unchanged() -> Any:
    return ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse()))


def request_body_replaced(
    body: bytes,
    turn_id: str,
    affinity: str = "",
    context: Mapping[str, str | int] | None = None,
) -> Any:
    """The rewritten body, its byte length, and the turn id for the capture filter.

    With a BUFFERED body and SEND headers, content-length must be set here: a mismatch is a
    local 500 from Envoy.
    """
    common = ep.CommonResponse(
        header_mutation=_header_mutation({"content-length": str(len(body))}),
        body_mutation=ep.BodyMutation(body=body),
    )
    response = ProcessingResponse(request_body=ep.BodyResponse(response=common))
    response.dynamic_metadata.MergeFromString(turn_metadata_bytes(turn_id, affinity, context))
    return response


def request_body_kept(
    turn_id: str, affinity: str = "", context: Mapping[str, str | int] | None = None
) -> Any:
    """The client's body goes on exactly as it came (nothing injected), yet the turn is still
    recorded: the turn id and context figures go to dynamic metadata as for a rewrite."""
    response = ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse()))
    response.dynamic_metadata.MergeFromString(turn_metadata_bytes(turn_id, affinity, context))
    return response


def turn_metadata_bytes(
    turn_id: str, affinity: str = "", context: Mapping[str, str | int] | None = None
) -> bytes:
    """For the capture filter: the turn id, and the affinity key its gRPC stream hashes; for the
    route (response headers, access logs): the request's context figures (`context_*` keys;
    numbers stay numbers, which `%DYNAMIC_METADATA(sessiongate:...)%` prints as integers), as
    an encoded Struct. Built from memoised encoded entries: filling a Struct through
    its Python setters cost ~1.5 µs a field, ~10% of a rewrite's CPU with 17 figures, and most
    figures repeat request after request (strategy, window, outcome...)."""
    entries = [_struct_entry("turn_id", turn_id)]
    if affinity:
        entries.append(_struct_entry(AFFINITY_KEY, affinity))
    if context:
        entries.extend(_memo_entry(key, value) for key, value in context.items())
    inner = b"".join(entries)  # a Struct: its `fields` map entries
    return _struct_entry_raw(METADATA_NAMESPACE, _len_field(_STRUCT_VALUE, inner))


# google.protobuf wire tags: Struct.fields = 1 (map entries: key = 1, value = 2); Value:
# number_value = 2 (double), string_value = 3, bool_value = 4, struct_value = 5.
_MAP_ENTRY, _MAP_KEY, _MAP_VALUE = 0x0A, 0x0A, 0x12
_NUMBER_VALUE, _STRING_VALUE, _BOOL_VALUE, _STRUCT_VALUE = 0x11, 0x1A, 0x20, 0x2A
_DOUBLE = _binary.Struct("<d")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def _value(value: str | int | float | bool) -> bytes:
    if isinstance(value, bool):
        return bytes((_BOOL_VALUE, 1 if value else 0))
    if isinstance(value, int | float):
        return bytes((_NUMBER_VALUE,)) + _DOUBLE.pack(float(value))
    return _len_field(_STRING_VALUE, value.encode())


def _struct_entry_raw(key: str, value: bytes) -> bytes:
    entry = _len_field(_MAP_KEY, key.encode()) + _len_field(_MAP_VALUE, value)
    return _len_field(_MAP_ENTRY, entry)


def _struct_entry(key: str, value: str | int | float | bool) -> bytes:
    return _struct_entry_raw(key, _value(value))


@functools.lru_cache(maxsize=8192, typed=True)  # typed: True and 1 are different values
def _memo_entry(key: str, value: str | int | float | bool) -> bytes:
    return _struct_entry(key, value)


def immediate_error(status: int, body: bytes, details: str) -> Any:
    """A gateway-made error, already in the provider's JSON error shape.

    The metadata flag tells Envoy's local-reply mappers to leave this body as it is (they wrap
    Envoy's own plain-text errors in the same shape).
    """
    response = ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_header_mutation({"content-type": "application/json"}),
            body=body,
            details=details,
        )
    )
    response.dynamic_metadata.get_or_create_struct(METADATA_NAMESPACE)["gateway_error"] = True
    return response


_PASS_THROUGH = _Mode(
    **{k: getattr(_Mode, v) for k, v in PASS_THROUGH_MODE.items()}  # enum names -> values
)


# --- reading requests: typed accessors over the untyped messages ---


def headers_dict(http_headers: Any) -> dict[str, str]:
    """Header map of an HttpHeaders message. Envoy sends `raw_value` (bytes) in recent releases."""
    out: dict[str, str] = {}
    for h in http_headers.headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        out[h.key] = value if h.key not in out else out[h.key] + "," + value
    return out


def metadata_dict(request: Any, namespaces: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The listed dynamic metadata namespaces of a ProcessingRequest as plain dicts."""
    filter_metadata = request.metadata_context.filter_metadata
    out: dict[str, dict[str, Any]] = {}
    for ns in namespaces:
        if ns in filter_metadata:
            out[ns] = _struct_to_dict(filter_metadata[ns])
    return out


def turn_id_of(request: Any) -> str | None:
    filter_metadata = request.metadata_context.filter_metadata
    if METADATA_NAMESPACE not in filter_metadata:
        return None
    fields = filter_metadata[METADATA_NAMESPACE].fields
    if "turn_id" not in fields:
        return None
    value = fields["turn_id"].string_value
    return str(value) or None


def attributes_dict(request: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for struct in request.attributes.values():
        out.update(_struct_to_dict(struct))
    return out


def _struct_to_dict(struct: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    result: dict[str, Any] = MessageToDict(struct)
    return result
