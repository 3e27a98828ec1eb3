"""Who is asking: (tenant, principal, session id) -> an opaque session key.

Principal, by configured precedence: the JWT subject that Envoy's jwt_authn filter verified, the
mTLS peer identity, then an HMAC of the API credential. Raw credentials never leave this module:
only their HMAC does. Store keys are HMACs of the whole triple, never raw client input.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DEFAULT_TENANT = "default"
# The principal of every request without a trusted identity (allow_anonymous): shared by all of
# them, so nothing that belongs to one principal (its user context) is kept for it.
ANONYMOUS = "anonymous"
_WS = re.compile(r"\s+")


class IdentityError(ValueError):
    """The client sent something we must refuse (e.g. a malformed session id)."""


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    principal: str
    scopes: tuple[str, ...] = ()


def valid_session_id(value: str) -> bool:
    return SESSION_ID.fullmatch(value) is not None


def load_hmac_key(path: Path, *, create: bool) -> bytes:
    """Read the HMAC key; `up` creates it (0600) on first start, `serve` requires it.

    Changing the key orphans every stored session: their keys can no longer be derived.
    """
    try:
        key = path.read_bytes().strip()
    except FileNotFoundError:
        if not create:
            raise IdentityError(f"HMAC key file {path} does not exist (hmac_key_file)") from None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
        return key
    if len(key) < 32:
        raise IdentityError(f"HMAC key file {path} holds fewer than 32 bytes")
    return key


# Memoised digests kept (credentials, session ids and principals of active clients).
_DIGEST_MEMO = 65_536


class IdentityResolver:
    def __init__(
        self,
        hmac_key: bytes,
        sources: Sequence[str] = ("jwt", "api-key"),
        *,
        jwt_namespace: str = "envoy.filters.http.jwt_authn",
        tenant_claim: str = "tenant",
        allow_anonymous: bool = False,
    ) -> None:
        self._key = hmac_key
        self._sources = tuple(sources)
        self._jwt_namespace = jwt_namespace
        self._tenant_claim = tenant_claim
        self._allow_anonymous = allow_anonymous
        self._digests: dict[tuple[str, ...], str] = {}

    def _digest(self, *parts: str) -> str:
        """HMAC-SHA256 of the parts, memoised: a request takes three (principal, session,
        principal key), ~4 us each, and the same clients send the same credentials."""
        found = self._digests.get(parts)
        if found is None:
            msg = "\0".join(parts).encode("utf-8", "surrogatepass")
            found = hmac.new(self._key, msg, hashlib.sha256).hexdigest()
            if len(self._digests) >= _DIGEST_MEMO:
                self._digests.clear()  # bounded; refilled by the active clients at once
            self._digests[parts] = found
        return found

    def resolve(
        self,
        headers: Mapping[str, str],
        metadata: Mapping[str, Mapping[str, Any]],
        attributes: Mapping[str, Any],
    ) -> Identity | None:
        """The caller's identity, or None when no trusted one exists (then: no memory)."""
        claims = self._jwt_claims(metadata)
        tenant = self._tenant(claims, metadata)
        for source in self._sources:
            principal = None
            if source == "jwt" and claims is not None:
                sub, iss = claims.get("sub"), claims.get("iss", "")
                if isinstance(sub, str) and sub:
                    principal = self.jwt_principal(str(iss), sub)
            elif source == "mtls":
                peer = attributes.get("connection.uri_san_peer_certificate") or attributes.get(
                    "connection.subject_peer_certificate"
                )
                if isinstance(peer, str) and peer:
                    principal = "mtls:" + self._digest("mtls", peer)
            elif source == "api-key":
                credential = api_credential(headers)
                if credential:
                    principal = self.api_key_principal(credential)
            if principal:
                return Identity(tenant, principal, _scopes(claims) if source == "jwt" else ())
        if self._allow_anonymous:
            return Identity(tenant, ANONYMOUS)
        return None

    def jwt_principal(self, issuer: str, subject: str) -> str:
        return "jwt:" + self._digest("jwt", issuer, subject)

    def api_key_principal(self, credential: str) -> str:
        """`credential` as `api_credential` normalises it."""
        return "key:" + self._digest("api-key", credential)

    def session_key(self, identity: Identity, session_id: str) -> str:
        return self._digest("session", identity.tenant, identity.principal, session_id)

    def principal_key(self, identity: Identity) -> str:
        """Key of the principal's own documents (user context), shared by all its sessions."""
        return self._digest("principal", identity.tenant, identity.principal)

    def _jwt_claims(self, metadata: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
        """jwt_authn stores the verified payload under its `payload_in_metadata` key."""
        ns = metadata.get(self._jwt_namespace)
        if not ns:
            return None
        for value in ns.values():
            if isinstance(value, Mapping) and "sub" in value:
                return value
        return None

    def _tenant(
        self, claims: Mapping[str, Any] | None, metadata: Mapping[str, Mapping[str, Any]]
    ) -> str:
        """Tenant from trusted sources only: a verified JWT claim or Envoy-set metadata."""
        if claims is not None:
            value = claims.get(self._tenant_claim)
            if isinstance(value, str) and value:
                return value
        value = metadata.get("sessiongate.identity", {}).get("tenant")
        return value if isinstance(value, str) and value else DEFAULT_TENANT


def _scopes(claims: Mapping[str, Any] | None) -> tuple[str, ...]:
    """OAuth scopes from a verified JWT: `scope` (space separated) or `scp` (a list)."""
    if claims is None:
        return ()
    scope = claims.get("scope")
    if isinstance(scope, str):
        return tuple(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return tuple(str(s) for s in scp)
    return ()


def api_credential(headers: Mapping[str, str]) -> str | None:
    """The API credential, normalised: `x-api-key` first, then `Authorization: Bearer`."""
    key = headers.get("x-api-key", "").strip()
    if key:
        return key
    auth = _WS.sub(" ", headers.get("authorization", "").strip())
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None
