"""The dynamic-metadata encoder (`turn_metadata_bytes`) writes exactly the Struct that
protobuf's own setters build, for any figures."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from extproc import mutations
from extproc.mutations import AFFINITY_KEY, METADATA_NAMESPACE


def built_by_protobuf(turn_id: str, affinity: str, context: dict[str, Any]) -> Any:
    metadata = struct_pb2.Struct()
    namespace = metadata.get_or_create_struct(METADATA_NAMESPACE)
    namespace["turn_id"] = turn_id
    if affinity:
        namespace[AFFINITY_KEY] = affinity
    for key, value in context.items():
        namespace[key] = value
    return metadata


figures = st.dictionaries(
    st.text(min_size=1, max_size=30),
    st.one_of(
        st.integers(min_value=0, max_value=2**53),
        st.text(max_size=300),
        st.booleans(),  # True/False must not be confused with 1/0 by the memo
        st.sampled_from([0, 1]),
    ),
    max_size=25,
)


@given(st.text(min_size=1, max_size=40), st.text(max_size=200), figures)
def test_encoded_metadata_equals_protobufs_own(
    turn_id: str, affinity: str, context: dict[str, Any]
) -> None:
    expected = built_by_protobuf(turn_id, affinity, context)
    encoded = mutations.turn_metadata_bytes(turn_id, affinity, context)
    assert struct_pb2.Struct.FromString(encoded) == expected
    response = mutations.request_body_replaced(b"{}", turn_id, affinity, context)
    assert response.dynamic_metadata == expected
