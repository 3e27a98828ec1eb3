from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import certifi
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from extproc.tls import LocalTLS, ensure_local_tls

FILES = ("ca.pem", "ca-key.pem", "cert.pem", "key.pem", "ca-bundle.pem")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(tls: LocalTLS) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in (tls.ca_cert, tls.ca_key, tls.cert, tls.key, tls.bundle)
    }


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[set[str], set[object]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), set(san.get_values_for_type(x509.IPAddress))


def _pem_ders(data: bytes) -> list[bytes]:
    """DER of every CERTIFICATE block (some certifi roots have serials cryptography dislikes)."""
    return [
        ssl.PEM_cert_to_DER_cert(
            "-----BEGIN CERTIFICATE-----"
            + block.split("-----END CERTIFICATE-----")[0]
            + "-----END CERTIFICATE-----\n"
        )
        for block in data.decode("ascii").split("-----BEGIN CERTIFICATE-----")[1:]
    ]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _verify(tls: LocalTLS, subject: x509.verification.Subject) -> None:
    ca = _cert(tls.ca_cert)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    verifier.verify(_cert(tls.cert), [])


def _write_leaf(tls: LocalTLS, not_before: dt.datetime, not_after: dt.datetime) -> None:
    """Replace the leaf with one signed by the real CA but with the given validity."""
    ca = _cert(tls.ca_cert)
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old leaf")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --------------------------------------------------------------------------- files


def test_creates_files_with_private_modes(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "tls"
    tls = ensure_local_tls(directory)

    assert tls == LocalTLS(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca-key.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        bundle=directory / "ca-bundle.pem",
    )
    for name in FILES:
        assert (directory / name).is_file(), name
    assert _mode(directory) == 0o700
    assert _mode(tls.ca_key) == 0o600
    assert _mode(tls.key) == 0o600
    for public in (tls.ca_cert, tls.cert, tls.bundle):
        assert _mode(public) & 0o022 == 0  # not group/world writable
    # atomic writes leave no temp files behind
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_second_call_reuses_everything(tmp_path: Path) -> None:
    first = ensure_local_tls(tmp_path)
    before = _snapshot(first)
    second = ensure_local_tls(tmp_path)
    assert second == first
    assert _snapshot(second) == before
    # a subset of the names is still covered by the existing leaf
    ensure_local_tls(tmp_path, ["localhost"])
    assert _snapshot(first) == before


def test_rejects_empty_hostnames(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ensure_local_tls(tmp_path, [])
    with pytest.raises(ValueError):
        ensure_local_tls(tmp_path, ["localhost", " "])


# --------------------------------------------------------------------------- contents


def test_ca_properties(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    ca = _cert(tls.ca_cert)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "sessiongate local CA"
    )
    assert ca.issuer == ca.subject
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert isinstance(pub.curve, ec.SECP256R1)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=3640) <= lifetime <= dt.timedelta(days=3660)
    ca.verify_directly_issued_by(ca)


def test_leaf_properties(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    leaf = _cert(tls.cert)
    pub = leaf.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert isinstance(pub.curve, ec.SECP256R1)
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    assert key.public_key() == pub
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    dns, ips = _sans(leaf)
    assert dns == {"localhost"}
    assert ips == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=397)
    now = dt.datetime.now(dt.UTC)
    assert leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc
    leaf.verify_directly_issued_by(_cert(tls.ca_cert))


def test_leaf_verifies_against_ca(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    _verify(tls, x509.DNSName("localhost"))
    _verify(tls, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    _verify(tls, x509.IPAddress(ipaddress.ip_address("::1")))
    with pytest.raises(VerificationError):
        _verify(tls, x509.DNSName("example.com"))
    with pytest.raises(VerificationError):
        _verify(tls, x509.IPAddress(ipaddress.ip_address("127.0.0.2")))


def test_leaf_does_not_verify_against_other_ca(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path / "one")
    other = ensure_local_tls(tmp_path / "two")
    verifier = (
        PolicyBuilder()
        .store(Store([_cert(other.ca_cert)]))
        .build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(_cert(tls.cert), [])


def test_bundle_has_certifi_roots_and_our_ca(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    roots = _pem_ders(Path(certifi.where()).read_bytes())
    bundle = _pem_ders(tls.bundle.read_bytes())
    assert len(roots) > 100
    assert _der(_cert(tls.ca_cert)) in bundle
    assert set(roots) <= set(bundle)
    assert len(bundle) == len(roots) + 1
    # and OpenSSL loads every certificate of it
    ctx = ssl.create_default_context(cafile=str(tls.bundle))
    assert ctx.cert_store_stats()["x509_ca"] == len(bundle)


# --------------------------------------------------------------------------- real TLS


class _Server:
    """A one-connection-at-a-time TLS echo-ish server on a loopback address."""

    def __init__(self, tls: LocalTLS, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tls.cert, tls.key)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen()
        self.sock.settimeout(0.1)  # so the accept loop notices close() promptly
        self.port: int = self.sock.getsockname()[1]
        self.host = host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tconn:
                    tconn.sendall(b"hello from sessiongate")
            except (OSError, ssl.SSLError):
                pass  # client rejected our certificate

    def fetch(self, ctx: ssl.SSLContext, server_hostname: str) -> bytes:
        with (
            socket.create_connection((self.host, self.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=server_hostname) as conn,
        ):
            return conn.recv(100)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=10)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_real_tls_handshake_with_bundle(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    server = _Server(tls, "127.0.0.1")
    try:
        ctx = ssl.create_default_context(cafile=str(tls.bundle))
        assert server.fetch(ctx, "localhost") == b"hello from sessiongate"
        assert server.fetch(ctx, "127.0.0.1") == b"hello from sessiongate"
        # the CA alone works too (what DefaultHttpxClient(verify=<ca>) does)
        ca_only = ssl.create_default_context(cafile=str(tls.ca_cert))
        assert server.fetch(ca_only, "localhost") == b"hello from sessiongate"
        # a name not in the certificate is rejected
        with pytest.raises(ssl.SSLCertVerificationError):
            server.fetch(ctx, "example.com")
        # public roots alone do not trust the local CA
        public = ssl.create_default_context(cafile=certifi.where())
        with pytest.raises(ssl.SSLCertVerificationError):
            server.fetch(public, "localhost")
    finally:
        server.close()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_real_tls_handshake_ipv6(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    server = _Server(tls, "::1")
    try:
        ctx = ssl.create_default_context(cafile=str(tls.bundle))
        assert server.fetch(ctx, "::1") == b"hello from sessiongate"
    finally:
        server.close()


# --------------------------------------------------------------------------- regeneration


@pytest.mark.parametrize(
    ("start_days", "end_days"),
    [(-400, -3), (-300, 10)],
    ids=["expired", "expires-within-30-days"],
)
def test_stale_leaf_is_regenerated_and_ca_kept(
    tmp_path: Path, start_days: int, end_days: int
) -> None:
    tls = ensure_local_tls(tmp_path)
    ca_before = tls.ca_cert.read_bytes()
    ca_key_before = tls.ca_key.read_bytes()
    bundle_before = tls.bundle.read_bytes()
    now = dt.datetime.now(dt.UTC)
    _write_leaf(tls, now + dt.timedelta(days=start_days), now + dt.timedelta(days=end_days))
    stale = tls.cert.read_bytes()
    stale_key = tls.key.read_bytes()

    ensure_local_tls(tmp_path)

    assert tls.cert.read_bytes() != stale
    assert tls.key.read_bytes() != stale_key
    assert _mode(tls.key) == 0o600
    assert tls.ca_cert.read_bytes() == ca_before
    assert tls.ca_key.read_bytes() == ca_key_before
    assert tls.bundle.read_bytes() == bundle_before
    leaf = _cert(tls.cert)
    assert leaf.not_valid_after_utc - now > dt.timedelta(days=300)
    _verify(tls, x509.DNSName("localhost"))


def test_leaf_valid_beyond_30_days_is_kept(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    now = dt.datetime.now(dt.UTC)
    _write_leaf(tls, now - dt.timedelta(days=300), now + dt.timedelta(days=60))
    before = _snapshot(tls)
    ensure_local_tls(tmp_path)
    assert _snapshot(tls) == before


def test_missing_leaf_is_regenerated(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    ca_before = tls.ca_cert.read_bytes()
    tls.cert.unlink()
    ensure_local_tls(tmp_path)
    assert tls.ca_cert.read_bytes() == ca_before
    _verify(tls, x509.DNSName("localhost"))

    tls.key.unlink()
    old_cert = tls.cert.read_bytes()
    ensure_local_tls(tmp_path)
    assert tls.cert.read_bytes() != old_cert  # cert without its key is useless
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    assert key.public_key() == _cert(tls.cert).public_key()


def test_extra_hostname_regenerates_leaf(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    ca_before = tls.ca_cert.read_bytes()
    leaf_before = tls.cert.read_bytes()

    ensure_local_tls(tmp_path, ["localhost", "127.0.0.1", "::1", "gate.test", "[::2]", "10.1.2.3"])

    assert tls.ca_cert.read_bytes() == ca_before
    assert tls.cert.read_bytes() != leaf_before
    dns, ips = _sans(_cert(tls.cert))
    assert dns == {"localhost", "gate.test"}
    assert ips == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "::2", "10.1.2.3")}
    _verify(tls, x509.DNSName("gate.test"))
    _verify(tls, x509.IPAddress(ipaddress.ip_address("10.1.2.3")))
    _verify(tls, x509.IPAddress(ipaddress.ip_address("::2")))
    # an IP literal is not mistaken for a DNS name (and vice versa)
    assert "10.1.2.3" not in dns


def test_new_ca_regenerates_leaf_and_bundle(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    before = _snapshot(tls)
    tls.ca_key.unlink()  # CA unusable without its key

    ensure_local_tls(tmp_path)

    after = _snapshot(tls)
    for name in FILES:
        assert after[name] != before[name], name
    bundle = _pem_ders(tls.bundle.read_bytes())
    assert _der(_cert(tls.ca_cert)) in bundle
    assert _der(x509.load_pem_x509_certificate(before["ca.pem"])) not in bundle
    _verify(tls, x509.DNSName("localhost"))


def test_leaf_from_foreign_ca_is_replaced(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path / "mine")
    other = ensure_local_tls(tmp_path / "other")
    tls.cert.write_bytes(other.cert.read_bytes())
    tls.key.write_bytes(other.key.read_bytes())
    ensure_local_tls(tmp_path / "mine")
    assert tls.cert.read_bytes() != other.cert.read_bytes()
    _verify(tls, x509.DNSName("localhost"))


def test_missing_or_edited_bundle_is_regenerated(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    bundle = tls.bundle.read_bytes()
    tls.bundle.unlink()
    ensure_local_tls(tmp_path)
    assert tls.bundle.read_bytes() == bundle
    tls.bundle.write_bytes(Path(certifi.where()).read_bytes())  # our CA dropped
    ensure_local_tls(tmp_path)
    assert tls.bundle.read_bytes() == bundle


def test_corrupt_ca_is_replaced(tmp_path: Path) -> None:
    tls = ensure_local_tls(tmp_path)
    tls.ca_cert.write_bytes(b"not a certificate")
    ensure_local_tls(tmp_path)
    _verify(tls, x509.DNSName("localhost"))
    key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=None)
    assert key.public_key() == _cert(tls.ca_cert).public_key()


def test_existing_directory_is_used(tmp_path: Path) -> None:
    directory = tmp_path / "existing"
    directory.mkdir()
    tls = ensure_local_tls(directory)
    assert tls.cert.parent == directory
    assert _mode(tls.key) == 0o600


def test_concurrent_first_calls_agree(tmp_path: Path) -> None:
    directory = tmp_path / "race"
    results: list[LocalTLS] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(ensure_local_tls(directory))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(results) == 8
    tls = results[0]
    ca_key = serialization.load_pem_private_key(tls.ca_key.read_bytes(), password=None)
    assert ca_key.public_key() == _cert(tls.ca_cert).public_key()
    _verify(tls, x509.DNSName("localhost"))
    assert _der(_cert(tls.ca_cert)) in _pem_ders(tls.bundle.read_bytes())
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert os.listdir(directory)
