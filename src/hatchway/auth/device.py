"""Device identity and challenge-response proof (standard library only).

The agent keeps the secret it was given at enrolment; the relay stores only
``derive_device_key(secret)``, so a leaked relay database does not reveal
secrets. On connect the relay sends a fresh nonce and the agent answers with
``device_proof``; the nonce makes every proof single-use.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from hatchway.errors import ConfigError

# A DNS label in lower case: the id later becomes a subdomain of the relay.
DEVICE_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

_KEY_CONTEXT = b"hatchway device key v1"
_PROOF_CONTEXT = b"hatchway-device-auth-v1\x00"
NONCE_SIZE = 32


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged, or raise ConfigError if it is not a DNS label."""
    # fullmatch: "$" alone would accept a trailing newline.
    if not isinstance(device_id, str) or DEVICE_ID_RE.fullmatch(device_id) is None:
        raise ConfigError(
            f"invalid device id {device_id!r}: use 1-63 lower-case letters, digits "
            "and hyphens, not starting or ending with a hyphen (it becomes a subdomain)"
        )
    return device_id


def new_device_secret() -> str:
    """A fresh enrolment secret, shown once to the administrator."""
    return secrets.token_urlsafe(32)


def derive_device_key(secret: str) -> bytes:
    """The key the relay stores instead of the secret."""
    return hmac.new(secret.encode(), _KEY_CONTEXT, hashlib.sha256).digest()


def new_nonce() -> bytes:
    """A random challenge; never reuse one."""
    return secrets.token_bytes(NONCE_SIZE)


def device_proof(key: bytes, device_id: str, nonce: bytes) -> bytes:
    """Prove possession of ``key`` for this device and this challenge."""
    message = _PROOF_CONTEXT + device_id.encode() + b"\x00" + nonce
    return hmac.new(key, message, hashlib.sha256).digest()


def verify_device_proof(key: bytes, device_id: str, nonce: bytes, proof: bytes) -> bool:
    """Check a proof in constant time."""
    return hmac.compare_digest(device_proof(key, device_id, nonce), proof)
