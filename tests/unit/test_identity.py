"""Unit tests for extproc.identity: session ids, API credentials, principals, session keys."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import identity as identity_module
from extproc.config import Settings
from extproc.envoy_config import JWT_FILTER, JWT_PAYLOAD_KEY
from extproc.identity import (
    DEFAULT_TENANT,
    Identity,
    IdentityError,
    IdentityResolver,
    api_credential,
    load_hmac_key,
    valid_session_id,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
JWT_NS = "envoy.filters.http.jwt_authn"
SAN = "connection.uri_san_peer_certificate"
HEX64 = re.compile(r"[0-9a-f]{64}")

SESSION_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"

Metadata = dict[str, dict[str, Any]]


def resolver(**kwargs: Any) -> IdentityResolver:
    return IdentityResolver(KEY, **kwargs)


def jwt_meta(claims: dict[str, Any], key: str = "payload") -> Metadata:
    return {JWT_NS: {key: claims}}


# --- valid_session_id ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "A", "0", ".", "_", ":", "-", "a" * 128, SESSION_CHARS[:128], "sess-1.2_3:4", "..."],
)
def test_valid_session_ids(value: str) -> None:
    assert valid_session_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * 129,
        "abc\n",  # `$` would accept this; fullmatch must not
        "\nabc",
        "ab c",
        " abc",
        "abc ",
        "a/b",
        "a\\b",
        "a@b",
        "a\x00b",
        "é",
        "séssion",
        "٣",  # a Unicode digit, not in 0-9
        "\uff41",  # fullwidth letter a
        "a\tb",
        "{abc}",
    ],
)
def test_invalid_session_ids(value: str) -> None:
    assert not valid_session_id(value)


def test_session_id_length_boundary() -> None:
    assert valid_session_id("x" * 128)
    assert not valid_session_id("x" * 129)
    assert not valid_session_id("x" * 128 + "\n")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=140))
def test_session_id_matches_spec(value: str) -> None:
    expected = 1 <= len(value) <= 128 and all(c in SESSION_CHARS for c in value)
    assert valid_session_id(value) is expected


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=SESSION_CHARS, min_size=1, max_size=128))
def test_session_id_every_allowed_string_accepted(value: str) -> None:
    assert valid_session_id(value)


# --- api_credential --------------------------------------------------------------------------


def test_x_api_key_preferred_over_authorization() -> None:
    headers = {"x-api-key": "key-one", "authorization": "Bearer key-two"}
    assert api_credential(headers) == "key-one"


def test_x_api_key_is_stripped() -> None:
    assert api_credential({"x-api-key": "  sk-abc \t"}) == "sk-abc"


def test_blank_x_api_key_falls_back_to_bearer() -> None:
    assert api_credential({"x-api-key": "   ", "authorization": "Bearer tok"}) == "tok"


@pytest.mark.parametrize(
    "value",
    [
        "Bearer tok",
        "bearer tok",
        "BEARER tok",
        "BeArEr tok",
        "  Bearer    tok  ",
        "Bearer\ttok",
        "Bearer \t\n tok",
        "\tbearer\ttok\t",
    ],
)
def test_bearer_normalised(value: str) -> None:
    assert api_credential({"authorization": value}) == "tok"


def test_bearer_internal_whitespace_collapsed() -> None:
    assert api_credential({"authorization": "Bearer  a \t b"}) == "a b"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer",
        "Bearer ",
        "Bearer    \t",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearertok",
        "tok",
        "Digest username=x",
    ],
)
def test_no_credential(value: str) -> None:
    assert api_credential({"authorization": value}) is None


def test_no_headers_no_credential() -> None:
    assert api_credential({}) is None
    assert api_credential({"x-api-key": ""}) is None


@settings(max_examples=100, deadline=None)
@given(
    token=st.text(alphabet=st.characters(categories=["L", "N", "P"]), min_size=1, max_size=40),
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]),
    ws1=st.sampled_from([" ", "  ", "\t", " \t "]),
    lead=st.sampled_from(["", " ", "\t"]),
    trail=st.sampled_from(["", " ", "\t "]),
)
def test_bearer_property(token: str, scheme: str, ws1: str, lead: str, trail: str) -> None:
    assert api_credential({"authorization": f"{lead}{scheme}{ws1}{token}{trail}"}) == token


# --- IdentityResolver.resolve: precedence ----------------------------------------------------


def test_no_identity_is_none() -> None:
    assert resolver().resolve({}, {}, {}) is None


def test_no_identity_anonymous_when_allowed() -> None:
    identity = resolver(allow_anonymous=True).resolve({}, {}, {})
    assert identity == Identity(DEFAULT_TENANT, "anonymous")


def test_anonymous_only_when_nothing_else() -> None:
    identity = resolver(allow_anonymous=True).resolve({"x-api-key": "sk-1"}, {}, {})
    assert identity is not None
    assert identity.principal.startswith("key:")


def test_api_key_principal() -> None:
    identity = resolver().resolve({"x-api-key": "sk-secret-123"}, {}, {})
    assert identity is not None
    assert identity.tenant == DEFAULT_TENANT
    prefix, digest = identity.principal.split(":", 1)
    assert prefix == "key"
    assert HEX64.fullmatch(digest)


def test_same_credential_same_principal_across_headers() -> None:
    r = resolver()
    a = r.resolve({"x-api-key": "sk-1"}, {}, {})
    b = r.resolve({"authorization": "bearer   sk-1 "}, {}, {})
    c = r.resolve({"x-api-key": "sk-2"}, {}, {})
    assert a is not None and b is not None and c is not None
    assert a == b
    assert a.principal != c.principal


def test_jwt_beats_api_key() -> None:
    r = resolver()
    headers = {"x-api-key": "sk-1"}
    with_jwt = r.resolve(headers, jwt_meta({"sub": "alice", "iss": "idp"}), {})
    key_only = r.resolve(headers, {}, {})
    assert with_jwt is not None and key_only is not None
    assert with_jwt.principal.startswith("jwt:")
    assert with_jwt.principal != key_only.principal


@pytest.mark.parametrize("payload_key", ["payload", "my_provider", "x"])
def test_jwt_claims_under_any_key(payload_key: str) -> None:
    r = resolver()
    a = r.resolve({}, jwt_meta({"sub": "alice"}, key=payload_key), {})
    b = r.resolve({}, jwt_meta({"sub": "alice"}, key="payload"), {})
    assert a is not None and a.principal.startswith("jwt:")
    assert a == b


def test_jwt_claims_found_among_other_values() -> None:
    meta: Metadata = {JWT_NS: {"header": {"alg": "RS256"}, "other": "x", "p": {"sub": "bob"}}}
    identity = resolver().resolve({}, meta, {})
    assert identity is not None and identity.principal.startswith("jwt:")
    assert identity == resolver().resolve({}, jwt_meta({"sub": "bob"}), {})


def test_jwt_principal_depends_on_subject_and_issuer() -> None:
    r = resolver()
    alice = r.resolve({}, jwt_meta({"sub": "alice", "iss": "a"}), {})
    bob = r.resolve({}, jwt_meta({"sub": "bob", "iss": "a"}), {})
    alice_b = r.resolve({}, jwt_meta({"sub": "alice", "iss": "b"}), {})
    assert alice is not None and bob is not None and alice_b is not None
    assert len({alice.principal, bob.principal, alice_b.principal}) == 3


def test_jwt_in_other_namespace_ignored() -> None:
    meta: Metadata = {"some.other.filter": {"payload": {"sub": "alice"}}}
    identity = resolver().resolve({"x-api-key": "sk-1"}, meta, {})
    assert identity is not None and identity.principal.startswith("key:")


def test_custom_jwt_namespace() -> None:
    r = resolver(jwt_namespace="my.jwt")
    assert r.resolve({}, jwt_meta({"sub": "alice"}), {}) is None
    identity = r.resolve({}, {"my.jwt": {"payload": {"sub": "alice"}}}, {})
    assert identity is not None and identity.principal.startswith("jwt:")


@pytest.mark.parametrize("sub", ["", None, 42, ["alice"]])
def test_unusable_jwt_subject_falls_through(sub: Any) -> None:
    identity = resolver().resolve({"x-api-key": "sk-1"}, jwt_meta({"sub": sub}), {})
    assert identity is not None and identity.principal.startswith("key:")


def test_jwt_without_sub_is_not_claims() -> None:
    identity = resolver().resolve({}, jwt_meta({"name": "alice"}), {})
    assert identity is None


def test_jwt_not_used_when_not_a_source() -> None:
    r = resolver(sources=("api-key",))
    identity = r.resolve({"x-api-key": "sk-1"}, jwt_meta({"sub": "alice"}), {})
    assert identity is not None and identity.principal.startswith("key:")
    assert r.resolve({}, jwt_meta({"sub": "alice"}), {}) is None


def test_api_key_not_used_when_not_a_source() -> None:
    assert resolver(sources=("jwt",)).resolve({"x-api-key": "sk-1"}, {}, {}) is None


def test_mtls_ignored_unless_enabled() -> None:
    attrs = {SAN: "spiffe://cluster/ns/a/sa/b"}
    assert resolver().resolve({}, {}, attrs) is None
    identity = resolver().resolve({"x-api-key": "sk-1"}, {}, attrs)
    assert identity is not None and identity.principal.startswith("key:")


def test_mtls_when_enabled() -> None:
    r = resolver(sources=("jwt", "mtls", "api-key"))
    attrs = {SAN: "spiffe://cluster/ns/a/sa/b"}
    identity = r.resolve({"x-api-key": "sk-1"}, {}, attrs)
    assert identity is not None
    assert identity.principal.startswith("mtls:")
    other = r.resolve({}, {}, {SAN: "spiffe://cluster/ns/a/sa/c"})
    assert other is not None and other.principal != identity.principal
    # JWT still comes first in this order
    jwt = r.resolve({}, jwt_meta({"sub": "alice"}), attrs)
    assert jwt is not None and jwt.principal.startswith("jwt:")


def test_mtls_attribute_not_header() -> None:
    r = resolver(sources=("mtls",))
    headers = {SAN: "spiffe://x", "x-forwarded-client-cert": "URI=spiffe://x"}
    assert r.resolve(headers, {}, {}) is None
    assert r.resolve({}, {}, {SAN: ""}) is None


def test_precedence_follows_configured_order() -> None:
    r = resolver(sources=("api-key", "jwt"))
    identity = r.resolve({"x-api-key": "sk-1"}, jwt_meta({"sub": "alice"}), {})
    assert identity is not None and identity.principal.startswith("key:")


# --- tenant ----------------------------------------------------------------------------------


def test_tenant_from_jwt_claim() -> None:
    identity = resolver().resolve({}, jwt_meta({"sub": "a", "tenant": "acme"}), {})
    assert identity is not None and identity.tenant == "acme"


def test_tenant_claim_name_configurable() -> None:
    r = resolver(tenant_claim="org")
    identity = r.resolve({}, jwt_meta({"sub": "a", "tenant": "acme", "org": "globex"}), {})
    assert identity is not None and identity.tenant == "globex"


def test_tenant_from_envoy_metadata() -> None:
    meta: Metadata = {"sessiongate.identity": {"tenant": "acme"}}
    identity = resolver().resolve({"x-api-key": "sk-1"}, meta, {})
    assert identity is not None and identity.tenant == "acme"


def test_jwt_tenant_beats_metadata_tenant() -> None:
    meta: Metadata = {
        JWT_NS: {"payload": {"sub": "a", "tenant": "from-jwt"}},
        "sessiongate.identity": {"tenant": "from-meta"},
    }
    identity = resolver().resolve({}, meta, {})
    assert identity is not None and identity.tenant == "from-jwt"


def test_the_generated_jwt_filters_metadata_resolves() -> None:
    """What `sessiongate up` configures jwt_authn to write (its namespace, the payload key,
    claims as Envoy's Struct gives them: numbers as floats, `aud` a list) is what the resolver
    built from the same settings reads."""
    settings = Settings()
    payload = {
        "iss": "https://idp",
        "sub": "alice",
        "aud": ["sessiongate"],
        "exp": 1.9e9,
        "tenant": "acme",
        "scope": "chat memory",
    }
    r = resolver(jwt_namespace=settings.jwt_metadata_namespace, tenant_claim=settings.tenant_claim)
    identity = r.resolve({}, {JWT_FILTER: {JWT_PAYLOAD_KEY: payload}}, {})
    assert identity is not None and identity.principal.startswith("jwt:")
    assert identity.tenant == "acme" and identity.scopes == ("chat", "memory")


@pytest.mark.parametrize("value", ["", 7, None, ["acme"]])
def test_unusable_tenant_values_give_default(value: Any) -> None:
    meta: Metadata = {
        JWT_NS: {"payload": {"sub": "a", "tenant": value}},
        "sessiongate.identity": {"tenant": value},
    }
    identity = resolver().resolve({}, meta, {})
    assert identity is not None and identity.tenant == DEFAULT_TENANT


@pytest.mark.parametrize(
    "header", ["x-sessiongate-tenant", "tenant", "x-tenant", "x-tenant-id", "sessiongate.identity"]
)
def test_tenant_never_from_headers(header: str) -> None:
    r = resolver(allow_anonymous=True)
    base = r.resolve({"x-api-key": "sk-1"}, {}, {})
    spoofed = r.resolve({"x-api-key": "sk-1", header: "evil"}, {}, {})
    assert base is not None and spoofed == base
    assert spoofed.tenant == DEFAULT_TENANT
    anon = r.resolve({header: "evil"}, {}, {})
    assert anon == Identity(DEFAULT_TENANT, "anonymous")


def test_tenant_header_cannot_override_trusted_tenant() -> None:
    meta: Metadata = {"sessiongate.identity": {"tenant": "acme"}}
    identity = resolver().resolve({"x-api-key": "sk-1", "x-sessiongate-tenant": "evil"}, meta, {})
    assert identity is not None and identity.tenant == "acme"


def test_tenant_from_unverified_metadata_namespace_ignored() -> None:
    meta: Metadata = {"other": {"tenant": "evil"}, "sessiongate": {"tenant": "evil"}}
    identity = resolver().resolve({"x-api-key": "sk-1"}, meta, {})
    assert identity is not None and identity.tenant == DEFAULT_TENANT


# --- session_key -----------------------------------------------------------------------------

_ids = st.text(alphabet=SESSION_CHARS, min_size=1, max_size=128)
# Principals are "kind:<hex>" or "anonymous" and session ids are validated, so neither holds NUL
# (the HMAC input joins the parts with NUL).
_names = st.text(alphabet=st.characters(exclude_characters="\x00"), min_size=1, max_size=20)


def test_session_key_stable_and_opaque() -> None:
    r = resolver()
    identity = Identity("acme", "key:abc")
    key = r.session_key(identity, "sess-1")
    assert key == r.session_key(identity, "sess-1")
    assert key == IdentityResolver(KEY).session_key(Identity("acme", "key:abc"), "sess-1")
    assert HEX64.fullmatch(key)


def test_session_key_depends_on_every_part() -> None:
    r = resolver()
    base = r.session_key(Identity("t", "p"), "s")
    assert r.session_key(Identity("t2", "p"), "s") != base
    assert r.session_key(Identity("t", "p2"), "s") != base
    assert r.session_key(Identity("t", "p"), "s2") != base
    assert IdentityResolver(OTHER_KEY).session_key(Identity("t", "p"), "s") != base


def test_session_key_parts_not_concatenated_ambiguously() -> None:
    r = resolver()
    assert r.session_key(Identity("ab", "c"), "s") != r.session_key(Identity("a", "bc"), "s")
    assert r.session_key(Identity("t", "pa"), "b") != r.session_key(Identity("t", "p"), "ab")


@settings(max_examples=100, deadline=None)
@given(t1=_names, p1=_names, s1=_ids, t2=_names, p2=_names, s2=_ids)
def test_session_key_distinct_property(
    t1: str, p1: str, s1: str, t2: str, p2: str, s2: str
) -> None:
    r = resolver()
    k1 = r.session_key(Identity(t1, p1), s1)
    k2 = r.session_key(Identity(t2, p2), s2)
    assert (k1 == k2) is ((t1, p1, s1) == (t2, p2, s2))


@settings(max_examples=100, deadline=None)
@given(
    credential=st.text(alphabet=st.characters(categories=["L", "N"]), min_size=12, max_size=60),
    session_id=st.text(alphabet=SESSION_CHARS, min_size=12, max_size=128),
)
def test_no_raw_client_input_in_principal_or_key(credential: str, session_id: str) -> None:
    r = resolver()
    for headers in ({"x-api-key": credential}, {"authorization": f"Bearer {credential}"}):
        identity = r.resolve(headers, {}, {})
        assert identity is not None
        assert credential not in identity.principal
        assert credential not in identity.tenant
        key = r.session_key(identity, session_id)
        assert credential not in key
        assert session_id not in key
        assert HEX64.fullmatch(key)


def test_session_key_depends_on_hmac_key_via_principal_too() -> None:
    a = IdentityResolver(KEY).resolve({"x-api-key": "sk-1"}, {}, {})
    b = IdentityResolver(OTHER_KEY).resolve({"x-api-key": "sk-1"}, {}, {})
    assert a is not None and b is not None
    assert a.principal != b.principal


# --- load_hmac_key ---------------------------------------------------------------------------


def test_load_hmac_key_creates_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "hmac.key"
    key = load_hmac_key(path, create=True)
    assert len(key) >= 32
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the stored file yields the same key, and creation does not happen twice
    assert load_hmac_key(path, create=True) == key
    assert load_hmac_key(path, create=False) == key


def test_load_hmac_key_created_keys_differ(tmp_path: Path) -> None:
    a = load_hmac_key(tmp_path / "a.key", create=True)
    b = load_hmac_key(tmp_path / "b.key", create=True)
    assert a != b


def test_load_hmac_key_created_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "hmac.key"
        load_hmac_key(path, create=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_hmac_key_missing_without_create(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    with pytest.raises(IdentityError, match="hmac_key_file"):
        load_hmac_key(path, create=False)
    assert not path.exists()


@pytest.mark.parametrize("create", [True, False])
def test_load_hmac_key_rejects_short_key(tmp_path: Path, create: bool) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(b"x" * 31 + b"\n")
    with pytest.raises(IdentityError, match="32 bytes"):
        load_hmac_key(path, create=create)
    assert path.read_bytes() == b"x" * 31 + b"\n"  # never overwritten


def test_load_hmac_key_whitespace_not_counted(tmp_path: Path) -> None:
    path = tmp_path / "padded.key"
    path.write_bytes(b"  " + b"x" * 31 + b"\n\n\n")
    with pytest.raises(IdentityError):
        load_hmac_key(path, create=False)


def test_load_hmac_key_exactly_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ok.key"
    path.write_bytes(b"y" * 32 + b"\n")
    assert load_hmac_key(path, create=False) == b"y" * 32


def test_memoised_digests_equal_fresh_ones_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(identity_module, "_DIGEST_MEMO", 8)
    memo = IdentityResolver(b"k" * 32)
    for n in range(20):
        fresh = IdentityResolver(b"k" * 32)  # an empty memo each time
        who = Identity("t", f"key:{n}")
        assert memo.session_key(who, "s") == fresh.session_key(who, "s")
        assert memo.session_key(who, "s") == fresh.session_key(who, "s")  # now from the memo
        assert memo.api_key_principal(f"sk-{n}") == fresh.api_key_principal(f"sk-{n}")
        assert len(memo._digests) <= 8
