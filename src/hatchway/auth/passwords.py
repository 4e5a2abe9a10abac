"""Password hashing with argon2id (argon2-cffi defaults, RFC 9106 low-memory profile)."""

from __future__ import annotations

import secrets
import string

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()

# Verified against when the user does not exist, so that a lookup of an unknown
# name costs as much as a wrong password and does not reveal which names exist.
DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

_SYMBOLS = "!#%+-.:=?@^_~"
_ALPHABET = string.ascii_letters + string.digits + _SYMBOLS
_PASSWORD_LENGTH = 20


def hash_password(password: str) -> str:
    """An encoded argon2id hash, salt and parameters included."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True if ``password`` matches; False for a mismatch or a malformed hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with older parameters than the current ones."""
    try:
        return _hasher.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True


def new_password() -> str:
    """A random 20-character password with upper, lower, digit and symbol."""
    while True:
        password = "".join(secrets.choice(_ALPHABET) for _ in range(_PASSWORD_LENGTH))
        if (
            any(c.isupper() for c in password)
            and any(c.islower() for c in password)
            and any(c.isdigit() for c in password)
            and any(c in _SYMBOLS for c in password)
        ):
            return password
