"""Text that came from a peer, made safe to log and to show to a person."""

from __future__ import annotations

import re

#: C0 and C1 controls (line breaks, terminal escape sequences), DEL, Unicode line and
#: paragraph separators, and the bidirectional overrides that reorder what is shown.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str, limit: int = 256) -> str:
    """``text`` cut at ``limit`` characters, with every unsafe character written as an
    escape (``\\n``, ``\\x1b``): a value from a device, a client or a log can then not
    forge a log line or drive a terminal."""
    text = text[:limit]
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
