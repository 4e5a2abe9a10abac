"""API tokens: random bearer strings, stored only as a SHA-256 hash.

Tokens carry 256 bits of entropy, so a fast unsalted hash is enough: there is
nothing to brute-force, and the lookup by hash stays an indexed equality.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "hwt_"  # recognisable in logs and by secret scanners


def new_api_token(prefix: str = TOKEN_PREFIX) -> str:
    """A fresh token (or session secret), shown to its owner once."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The form a token is stored and looked up in."""
    return hashlib.sha256(token.encode()).hexdigest()
