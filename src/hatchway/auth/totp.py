"""Time-based one-time passwords (RFC 6238) for two-factor login, with pyotp.

Six digits, 30-second steps, one step of clock drift either way; a code is accepted
once (the last step used is kept, so a code seen by someone else is already spent).
"""

from __future__ import annotations

import hmac
import time

import pyotp

ISSUER = "Hatchway"
DRIFT_STEPS = 1


def new_secret() -> str:
    return pyotp.random_base32()


def provisioning_uri(secret: str, user: str, relay: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads (as a QR code or typed in)."""
    return pyotp.TOTP(secret).provisioning_uri(name=f"{user}@{relay}", issuer_name=ISSUER)


def matching_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step ``code`` is valid for (allowing drift), or None."""
    code = code.strip().replace(" ", "")
    if len(code) != 6 or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret)
    now = time.time() if now is None else now
    step = totp.timecode(int(now))
    found = None
    for candidate in range(step - DRIFT_STEPS, step + DRIFT_STEPS + 1):
        expected = totp.generate_otp(candidate)
        if hmac.compare_digest(expected, code):
            found = candidate
    return found
