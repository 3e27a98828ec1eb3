"""Local TLS material for ``sessiongate up``.

``sessiongate up`` runs Envoy with a TLS listener on 127.0.0.1 so that unmodified
OpenAI / Anthropic SDKs, which verify server certificates, can talk to it.  This
module creates (once) and then reuses a small private PKI in a directory:

* ``ca.pem`` / ``ca-key.pem`` -- a local CA ("sessiongate local CA", EC P-256, 10 years);
* ``cert.pem`` / ``key.pem``  -- the listener's leaf certificate, signed by that CA, with
  the requested host names / IP addresses as subjectAltNames (re-issued when missing,
  expiring within 30 days, or not covering the requested names);
* ``ca-bundle.pem``           -- certifi's public roots plus the local CA.

How a user trusts it:

* Whole shell (also still reaches public hosts, since the bundle includes certifi's roots)::

      export SSL_CERT_FILE=<dir>/ca-bundle.pem
      export REQUESTS_CA_BUNDLE=<dir>/ca-bundle.pem

* Only one client, e.g. the OpenAI SDK::

      from openai import OpenAI, DefaultHttpxClient
      client = OpenAI(base_url="https://localhost:<port>/v1",
                      http_client=DefaultHttpxClient(verify="<dir>/ca.pem"))

  (the Anthropic SDK takes ``http_client=DefaultHttpxClient(verify=...)`` the same way).

Private keys are written with mode 0600, atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

try:  # POSIX only; without it, concurrent first runs are merely not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CA_COMMON_NAME", "DEFAULT_HOSTNAMES", "LocalTLS", "ensure_local_tls"]

CA_COMMON_NAME = "sessiongate local CA"
LEAF_COMMON_NAME = "sessiongate local listener"
DEFAULT_HOSTNAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
BUNDLE_NAME = "ca-bundle.pem"
_LOCK_NAME = ".lock"

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=397)  # CA/Browser Forum / Apple maximum for TLS leaves
RENEW_BEFORE = dt.timedelta(days=30)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock differences

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class LocalTLS:
    """Paths of the local TLS material (all PEM)."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    bundle: Path


def ensure_local_tls(directory: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES) -> LocalTLS:
    """Create or reuse the local CA, leaf certificate and CA bundle in ``directory``.

    ``hostnames`` may mix DNS names and IP addresses (``"::1"``, ``"[::1]"``); each becomes
    a DNS or IP subjectAltName of the leaf.  Idempotent: files that are still valid are
    left byte-for-byte unchanged.
    """
    dns_names, ip_addresses = _parse_hostnames(hostnames)
    directory = Path(directory)
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is subject to the umask
    tls = LocalTLS(
        ca_cert=directory / CA_CERT_NAME,
        ca_key=directory / CA_KEY_NAME,
        cert=directory / CERT_NAME,
        key=directory / KEY_NAME,
        bundle=directory / BUNDLE_NAME,
    )
    with _locked(directory / _LOCK_NAME):
        now = dt.datetime.now(dt.UTC)

        ca = _load_ca(tls, now)
        if ca is None:
            ca = _create_ca(tls, now)
        ca_cert, ca_key = ca

        if not _leaf_ok(tls, ca_cert, dns_names, ip_addresses, now):
            _create_leaf(tls, ca_cert, ca_key, dns_names, ip_addresses, now)

        bundle = _bundle_bytes(ca_cert)
        if _read_bytes(tls.bundle) != bundle:
            _write_atomic(tls.bundle, bundle, 0o644)
    return tls


# --------------------------------------------------------------------------- helpers


def _parse_hostnames(hostnames: Sequence[str]) -> tuple[frozenset[str], frozenset[_IPAddress]]:
    if isinstance(hostnames, str):
        raise TypeError("hostnames must be a sequence of strings, not a single string")
    dns: set[str] = set()
    ips: set[_IPAddress] = set()
    for raw in hostnames:
        name = raw.strip()
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if not name:
            raise ValueError(f"empty hostname in {list(hostnames)!r}")
        try:
            ips.add(ipaddress.ip_address(name))
        except ValueError:
            dns.add(name.rstrip(".").lower())
    if not dns and not ips:
        raise ValueError("at least one hostname is required")
    return frozenset(dns), frozenset(ips)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise concurrent ``ensure_local_tls`` calls on the same directory."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

    The temp file is created 0600 (mkstemp) and only then given ``mode``, so a private
    key is never readable by others, not even transiently.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    data = _read_bytes(path)
    if data is None:
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key


def _load_cert(path: Path) -> x509.Certificate | None:
    data = _read_bytes(path)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        return None


def _pair_matches(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return cert.public_key() == key.public_key()


def _valid_for_a_while(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - now > RENEW_BEFORE


def _load_ca(
    tls: LocalTLS, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert = _load_cert(tls.ca_cert)
    key = _load_key(tls.ca_key)
    if cert is None or key is None or not _pair_matches(cert, key):
        return None
    if not _valid_for_a_while(cert, now):
        return None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    if not bc.ca:
        return None
    return cert, key


def _create_ca(
    tls: LocalTLS, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    not_before = now - _BACKDATE
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between leaves a mismatched pair, which the next run detects.
    _write_atomic(tls.ca_key, _key_pem(key), 0o600)
    _write_atomic(tls.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _leaf_ok(
    tls: LocalTLS,
    ca_cert: x509.Certificate,
    dns_names: frozenset[str],
    ip_addresses: frozenset[_IPAddress],
    now: dt.datetime,
) -> bool:
    cert = _load_cert(tls.cert)
    key = _load_key(tls.key)
    if cert is None or key is None or not _pair_matches(cert, key):
        return False
    if not _valid_for_a_while(cert, now):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):  # not issued by this CA
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have_dns = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    return dns_names <= have_dns and ip_addresses <= have_ips


def _create_leaf(
    tls: LocalTLS,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns_names: frozenset[str],
    ip_addresses: frozenset[_IPAddress],
    now: dt.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(dns_names)]
    sans += [x509.IPAddress(ip) for ip in sorted(ip_addresses, key=lambda a: (a.version, a))]
    not_before = now - _BACKDATE
    not_after = min(not_before + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LEAF_COMMON_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_atomic(tls.key, _key_pem(key), 0o600)
    _write_atomic(tls.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _bundle_bytes(ca_cert: x509.Certificate) -> bytes:
    roots = Path(certifi.where()).read_bytes()
    if not roots.endswith(b"\n"):
        roots += b"\n"
    return (
        roots
        + b"\n# "
        + CA_COMMON_NAME.encode()
        + b" (sessiongate)\n"
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
