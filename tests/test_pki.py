"""The relay CA, server certificates and TLS contexts, checked with real handshakes."""

from __future__ import annotations

import re
import socket
import ssl
import stat
import threading
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hatchway.errors import ConfigError
from hatchway.relay.pki import TlsFiles, certificate_fingerprint, ensure_tls_files
from hatchway.tlsutil import client_context, reload_server_context, server_context


@dataclass
class Handshake:
    version: str | None = None
    alpn: str | None = None
    client_error: BaseException | None = None
    server_error: BaseException | None = None


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str | None
) -> Handshake:
    """Run one real TLS handshake over a loopback socket pair."""
    result = Handshake()
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)

    def serve() -> None:
        try:
            with server.wrap_socket(server_sock, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            result.server_error = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            result.version = tls.version()
            result.alpn = tls.selected_alpn_protocol()
            tls.sendall(b"x")
    except (ssl.SSLError, OSError) as exc:
        result.client_error = exc
    finally:
        client_sock.close()
        thread.join(10)
    return result


def _connect_ok(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> Handshake:
    result = _handshake(server, client, hostname)
    assert result.client_error is None, result.client_error
    assert result.server_error is None, result.server_error
    return result


@pytest.fixture
def localhost_files(tmp_path: Path) -> TlsFiles:
    return ensure_tls_files(tmp_path / "tls", "localhost")


def _leaf(files: TlsFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificates(files.server_cert.read_bytes())[0]


def _sans(files: TlsFiles) -> set[str]:
    ext = _leaf(files).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return {str(name.value) for name in ext.value}


def test_generated_files(tmp_path: Path, localhost_files: TlsFiles) -> None:
    tls_dir = tmp_path / "tls"
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    for key in (tls_dir / "ca-key.pem", localhost_files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert localhost_files.ca_cert == tls_dir / "ca.pem"

    ca = x509.load_pem_x509_certificate(localhost_files.ca_cert.read_bytes())
    assert ca.subject.rfc4514_string() == "CN=Hatchway relay CA localhost"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)

    chain = x509.load_pem_x509_certificates(localhost_files.server_cert.read_bytes())
    assert len(chain) == 2
    leaf = chain[0]
    assert chain[1] == ca
    leaf.verify_directly_issued_by(ca)
    public_key = leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert _sans(localhost_files) == {"localhost", "*.localhost", "127.0.0.1", "::1"}
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=396) < lifetime <= timedelta(days=397)


def test_second_call_reuses_everything(tmp_path: Path, localhost_files: TlsFiles) -> None:
    before = {p: p.read_bytes() for p in (tmp_path / "tls").iterdir()}
    again = ensure_tls_files(tmp_path / "tls", "localhost")
    assert again == localhost_files
    assert {p: p.read_bytes() for p in (tmp_path / "tls").iterdir()} == before


def test_handshake_with_own_ca(localhost_files: TlsFiles) -> None:
    server = server_context(localhost_files.server_cert, localhost_files.server_key)
    client = client_context(localhost_files.ca_cert)
    result = _connect_ok(server, client, "localhost")
    assert result.version in ("TLSv1.2", "TLSv1.3")
    _connect_ok(server, client, "127.0.0.1")


def test_handshake_for_device_subdomain(tmp_path: Path) -> None:
    files = ensure_tls_files(tmp_path / "tls", "relay.localhost")
    server = server_context(files.server_cert, files.server_key)
    client = client_context(files.ca_cert)
    _connect_ok(server, client, "relay.localhost")
    _connect_ok(server, client, "dev1.relay.localhost")
    result = _handshake(server, client, "a.dev1.relay.localhost")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_wildcard_under_single_label_is_ignored_by_openssl(localhost_files: TlsFiles) -> None:
    # OpenSSL refuses "*.localhost" (like "*.com"), so dev1.localhost does not verify:
    # local setups with device subdomains need a two-label domain such as relay.localhost.
    server = server_context(localhost_files.server_cert, localhost_files.server_key)
    client = client_context(localhost_files.ca_cert)
    result = _handshake(server, client, "dev1.localhost")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(result.client_error)


def test_alpn_http11(localhost_files: TlsFiles) -> None:
    server = server_context(localhost_files.server_cert, localhost_files.server_key)
    client = client_context(localhost_files.ca_cert)
    client.set_alpn_protocols(["h2", "http/1.1"])
    assert _connect_ok(server, client, "localhost").alpn == "http/1.1"


def test_wrong_hostname_and_unknown_ca_are_refused(tmp_path: Path) -> None:
    files = ensure_tls_files(tmp_path / "a", "localhost")
    other = ensure_tls_files(tmp_path / "b", "localhost")
    server = server_context(files.server_cert, files.server_key)
    result = _handshake(server, client_context(files.ca_cert), "example.com")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    result = _handshake(server, client_context(other.ca_cert), "localhost")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    result = _handshake(server, client_context(None), "localhost")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_server_refuses_tls11(localhost_files: TlsFiles) -> None:
    server = server_context(localhost_files.server_cert, localhost_files.server_key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=localhost_files.ca_cert)
    # Security level 0 lets this client really offer TLS 1.1, so the server is what refuses.
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    result = _handshake(server, client, "localhost")
    assert isinstance(result.client_error, ssl.SSLError)
    assert isinstance(result.server_error, ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(result.server_error)


def test_server_context_settings(localhost_files: TlsFiles) -> None:
    ctx = server_context(localhost_files.server_cert, localhost_files.server_key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    }
    assert all(c["aead"] for c in ctx.get_ciphers())


def test_client_context_settings(localhost_files: TlsFiles) -> None:
    for ctx in (client_context(None), client_context(localhost_files.ca_cert)):
        assert ctx.check_hostname
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(client_context(localhost_files.ca_cert).get_ca_certs()) == 1


def test_client_context_bad_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        client_context(tmp_path / "missing.pem")


def test_reissue_on_domain_change(tmp_path: Path, localhost_files: TlsFiles) -> None:
    ca_before = localhost_files.ca_cert.read_bytes()
    ca_key_before = (tmp_path / "tls" / "ca-key.pem").read_bytes()
    key_before = localhost_files.server_key.read_bytes()
    files = ensure_tls_files(tmp_path / "tls", "relay.example.org")
    assert files.ca_cert.read_bytes() == ca_before
    assert (tmp_path / "tls" / "ca-key.pem").read_bytes() == ca_key_before
    assert files.server_key.read_bytes() != key_before
    assert _sans(files) == {"relay.example.org", "*.relay.example.org"}
    # Clients that trusted the CA keep working without any change.
    server = server_context(files.server_cert, files.server_key)
    _connect_ok(server, client_context(files.ca_cert), "dev1.relay.example.org")


def test_reissue_when_expiry_is_near(tmp_path: Path, localhost_files: TlsFiles) -> None:
    ca_key = serialization.load_pem_private_key(
        (tmp_path / "tls" / "ca-key.pem").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(localhost_files.ca_cert.read_bytes())
    leaf = _leaf(localhost_files)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(ca.subject)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=380))
        .not_valid_after(now + timedelta(days=10))
    )
    for ext in leaf.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    soon_expiring = builder.sign(ca_key, hashes.SHA256())
    localhost_files.server_cert.write_bytes(
        soon_expiring.public_bytes(serialization.Encoding.PEM)
        + ca.public_bytes(serialization.Encoding.PEM)
    )
    ensure_tls_files(tmp_path / "tls", "localhost")
    assert _leaf(localhost_files).not_valid_after_utc - now > timedelta(days=390)


def test_reissue_when_server_key_missing(tmp_path: Path, localhost_files: TlsFiles) -> None:
    localhost_files.server_key.unlink()
    files = ensure_tls_files(tmp_path / "tls", "localhost")
    server = server_context(files.server_cert, files.server_key)
    _connect_ok(server, client_context(files.ca_cert), "localhost")


def test_half_a_ca_is_an_error(tmp_path: Path, localhost_files: TlsFiles) -> None:
    (tmp_path / "tls" / "ca-key.pem").unlink()
    with pytest.raises(ConfigError, match=r"ca-key\.pem"):
        ensure_tls_files(tmp_path / "tls", "localhost")


@pytest.mark.parametrize("domain", ["", "bad_domain", "-x.org", "a..b"])
def test_invalid_domain(tmp_path: Path, domain: str) -> None:
    with pytest.raises(ConfigError):
        ensure_tls_files(tmp_path / "tls", domain)


def test_fingerprint_format(localhost_files: TlsFiles) -> None:
    fingerprint = certificate_fingerprint(localhost_files.ca_cert)
    assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fingerprint)
    ca = x509.load_pem_x509_certificate(localhost_files.ca_cert.read_bytes())
    assert fingerprint.replace(":", "") == ca.fingerprint(hashes.SHA256()).hex().upper()
    # server.pem starts with the leaf, so its fingerprint is the leaf's.
    assert certificate_fingerprint(localhost_files.server_cert) != fingerprint


def test_reload_server_context(tmp_path: Path, localhost_files: TlsFiles) -> None:
    server = server_context(localhost_files.server_cert, localhost_files.server_key)
    other = ensure_tls_files(tmp_path / "other", "relay.localhost")
    reload_server_context(server, other.server_cert, other.server_key)
    _connect_ok(server, client_context(other.ca_cert), "dev1.relay.localhost")


def test_failed_reload_keeps_old_certificate(tmp_path: Path, localhost_files: TlsFiles) -> None:
    server = server_context(localhost_files.server_cert, localhost_files.server_key)
    other = ensure_tls_files(tmp_path / "other", "localhost")
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        reload_server_context(server, other.server_cert, localhost_files.server_key)
    with pytest.raises(ConfigError):
        reload_server_context(server, tmp_path / "missing.pem", localhost_files.server_key)
    _connect_ok(server, client_context(localhost_files.ca_cert), "localhost")
