"""The relay's own certificate authority, for relays without a public certificate.

On first start the relay makes a CA and a server certificate for its domain
and every device subdomain (``*.domain``). Users and agents trust ``ca.pem``
(compare its fingerprint out of band). The server certificate is re-issued by
the same CA when the domain changes or expiry nears, so clients keep trusting it.

OpenSSL ignores a wildcard directly under a single label: ``*.localhost`` does
not match ``dev1.localhost``. Local setups with device subdomains should use a
domain such as ``relay.localhost``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hatchway.errors import ConfigError

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"

CA_LIFETIME = timedelta(days=3650)
SERVER_LIFETIME = timedelta(days=397)  # the CA/Browser Forum maximum
RENEW_BEFORE = timedelta(days=30)
_BACKDATE = timedelta(minutes=5)  # tolerate clients whose clock is a little behind

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path  # leaf then CA
    server_key: Path


def ensure_tls_files(tls_dir: Path, domain: str) -> TlsFiles:
    """Make the CA and server certificate if missing, re-issue the server one if stale."""
    domain = _normalise_domain(domain)
    if not tls_dir.exists():
        tls_dir.mkdir(mode=0o700, parents=True)
        tls_dir.chmod(0o700)  # mkdir's mode is filtered by the umask
    files = TlsFiles(tls_dir / CA_CERT, tls_dir / SERVER_CERT, tls_dir / SERVER_KEY)
    ca_cert, ca_key = _ensure_ca(tls_dir, domain)
    if not _server_cert_is_current(files, ca_cert, domain):
        _issue_server_cert(files, ca_cert, ca_key, domain)
    return files


def certificate_fingerprint(pem_path: Path) -> str:
    """SHA-256 of the first certificate's DER, as ``AB:CD:...`` for reading aloud."""
    cert = _load_certs(pem_path)[0]
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()


def _normalise_domain(domain: str) -> str:
    name = domain.strip().rstrip(".").lower()
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ConfigError(f"invalid relay domain {domain!r}: expected a DNS name")
    return name


def _expected_names(domain: str) -> set[x509.GeneralName]:
    names: set[x509.GeneralName] = {x509.DNSName(domain), x509.DNSName(f"*.{domain}")}
    # RFC 6761: localhost and its subdomains are loopback, so IP clients match too.
    if domain == "localhost" or domain.endswith(".localhost"):
        names.update(x509.IPAddress(ip) for ip in _LOOPBACK)
    return names


def _ensure_ca(tls_dir: Path, domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = tls_dir / CA_CERT, tls_dir / CA_KEY
    if cert_path.exists() and key_path.exists():
        return _load_certs(cert_path)[0], _load_key(key_path)
    if cert_path.exists() or key_path.exists():
        # Making a new CA here would silently break every client that trusts the old one.
        raise ConfigError(
            f"{tls_dir} holds only one of {CA_CERT} and {CA_KEY}; restore the other "
            "or remove both to create a new CA (clients must then trust the new one)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Hatchway relay CA {domain}")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _server_cert_is_current(files: TlsFiles, ca_cert: x509.Certificate, domain: str) -> bool:
    if not (files.server_cert.exists() and files.server_key.exists()):
        return False
    try:
        cert = _load_certs(files.server_cert)[0]
        key = _load_key(files.server_key)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ConfigError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False  # unreadable, or from another CA: issue a fresh one
    return (
        set(sans) == _expected_names(domain)
        and cert.public_key() == key.public_key()
        and cert.not_valid_after_utc - datetime.now(UTC) > RENEW_BEFORE
    )


def _issue_server_cert(
    files: TlsFiles,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    domain: str,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + SERVER_LIFETIME, ca_cert.not_valid_after_utc))
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
        .add_extension(
            x509.SubjectAlternativeName(sorted(_expected_names(domain), key=str)), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
        serialization.Encoding.PEM
    )
    # Key first: a reload that catches the pair half-written fails and keeps the old one.
    _write_private(files.server_key, _key_pem(key))
    _write_public(files.server_cert, chain)


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc}") from exc
    return certs


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an ECDSA private key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write beside the target and rename, so readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask, and ignored if it existed
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd != -1:
            os.close(fd)
    os.replace(tmp, path)
