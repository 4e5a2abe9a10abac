"""TLS contexts for the relay, the agent and the client (standard library only).

The client side always verifies: there is deliberately no switch to turn
verification off. A relay with its own CA hands that CA file to its users.
The server side follows Mozilla's "intermediate" profile.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from hatchway.errors import ConfigError

# Mozilla intermediate, TLS 1.2 part: forward secrecy and AEAD only.
# TLS 1.3 suites are fixed by OpenSSL and all acceptable.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
    ]
)
ALPN_PROTOCOLS = ["http/1.1"]


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context: system CAs, or only ``ca_file`` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca_file is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA certificates from {ca_file}: {exc}") from exc
    return ctx


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The relay's server context (Mozilla intermediate) with its certificate loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Intermediate lets the client pick: every offered suite is strong, and
    # clients without AES hardware prefer ChaCha20.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    reload_server_context(ctx, cert_file, key_file)
    return ctx


def reload_server_context(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Load a new certificate into ``ctx``: new handshakes use it, open connections stay.

    The pair is first tried on a scratch context: OpenSSL replaces the
    certificate before it checks the key, so a bad pair loaded straight into
    ``ctx`` would leave it with no usable key.
    """
    _load_cert_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_file, key_file)
    _load_cert_chain(ctx, cert_file, key_file)


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and block the relay.
    raise ConfigError("encrypted private keys are not supported")


def _load_cert_chain(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        ctx.load_cert_chain(certfile=cert_file, keyfile=key_file, password=_no_passphrase)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {cert_file} with key {key_file}: {exc}"
        ) from exc
