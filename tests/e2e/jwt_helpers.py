"""A test issuer: an EC P-256 key, its JWKS file, and ES256-signed JWTs (RFC 7515/7518).

PyJWT is not a dependency of the project; signing a compact JWS is a few lines with
`cryptography`, which is.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

_P256_BYTES = 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Issuer:
    issuer: str
    audience: str
    kid: str = "test-key-1"
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "alg": "ES256",
                    "use": "sig",
                    "kid": self.kid,
                    "x": b64url(numbers.x.to_bytes(_P256_BYTES, "big")),
                    "y": b64url(numbers.y.to_bytes(_P256_BYTES, "big")),
                }
            ]
        }

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()), encoding="utf-8")
        return path

    def token(self, sub: str, *, ttl_s: float = 600, **claims: Any) -> str:
        """A token for `sub` from this issuer and audience, valid for `ttl_s` (negative:
        already expired). `claims` add to or override the standard ones."""
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": now,
            "exp": now + int(ttl_s),
            **claims,
        }
        return sign(self.key, payload, self.kid)


def sign(key: ec.EllipticCurvePrivateKey, payload: dict[str, Any], kid: str) -> str:
    """Compact ES256 JWS: the signature is r || s, each 32 bytes big-endian (not DER)."""
    header = {"alg": "ES256", "typ": "JWT", "kid": kid}
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload)
    )
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
    return f"{signing_input}.{b64url(signature)}"
