"""A small shared cache of a device's static resources, for devices on slow links.

RFC 9111, conservatively: only what the device marks fresh for a shared cache is
stored (``s-maxage``, ``max-age`` or ``Expires``; no heuristic freshness), only
complete ``200`` answers to ``GET`` with a ``Content-Length`` body, never a response
with ``Set-Cookie``, ``private``, ``no-store``, ``no-cache`` or ``Vary: *``, never
for a request with ``Authorization``. ``Vary`` is honoured by keeping the varying
request headers with the entry. Nothing is revalidated: a stale entry is dropped and
the request goes to the device. A request that asks for a fresh answer
(``Cache-Control: no-cache``/``max-age=0``, ``Pragma: no-cache``) bypasses the cache.

Entries are per device (one cache per device, dropped with its last user's access
check in front of it: the proxy only looks here after the session check passed) and
bounded in bytes, least recently used first out. Sans-I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from hatchway.web.framing import ResponseHead

#: Response headers not stored with an entry (hop-by-hop, or recomputed).
_NOT_STORED = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"age", b"proxy-connection", b"te"}
)


@dataclass
class Entry:
    head: bytes  # status line and stored headers, without the final empty line
    body: bytes
    stored_at: float
    lifetime: float
    initial_age: float
    vary: tuple[tuple[bytes, bytes], ...]

    @property
    def size(self) -> int:
        return len(self.head) + len(self.body) + 256

    def age(self, now: float) -> float:
        return self.initial_age + (now - self.stored_at)

    def fresh(self, now: float) -> bool:
        return self.age(now) < self.lifetime

    def render(self, now: float, head_only: bool = False) -> bytes:
        head = self.head + b"\r\nAge: %d\r\n\r\n" % int(self.age(now))
        return head if head_only else head + self.body


def _directives(values: list[bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for value in values:
        for item in value.split(b","):
            key, _, arg = item.strip().partition(b"=")
            if key:
                out[key.lower()] = arg.strip().strip(b'"')
    return out


def _seconds(value: bytes) -> float | None:
    return float(value) if value.isdigit() else None


def _header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def request_may_use_cache(headers: list[tuple[bytes, bytes]]) -> bool:
    """False if the client asks for a fresh answer or sends credentials."""
    for key, value in headers:
        lname = key.lower()
        if lname == b"authorization":
            return False
        if lname == b"pragma" and b"no-cache" in value.lower():
            return False
        if lname == b"cache-control":
            cc = _directives([value])
            if b"no-cache" in cc or b"no-store" in cc or cc.get(b"max-age") == b"0":
                return False
    return True


class ResponseCache:
    def __init__(self, max_bytes: int, max_object: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_object = max_object or max(1, max_bytes // 8)
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, bytes], list[Entry]] = OrderedDict()

    def lookup(
        self, service: str, url: bytes, headers: list[tuple[bytes, bytes]], now: float | None = None
    ) -> Entry | None:
        now = time.monotonic() if now is None else now
        key = (service, url)
        entries = self._entries.get(key)
        if entries:
            for entry in list(entries):
                if not entry.fresh(now):
                    self._remove(key, entry)
                elif all(
                    b", ".join(_header_values(headers, name)) == value for name, value in entry.vary
                ):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry
        self.misses += 1
        return None

    def storable(
        self, request_headers: list[tuple[bytes, bytes]], head: ResponseHead
    ) -> tuple[float, float, tuple[tuple[bytes, bytes], ...]] | None:
        """(lifetime, age already, vary) if this answer to a GET may be stored."""
        if head.status != 200 or head.get(b"set-cookie") is not None:
            return None
        length = head.get(b"content-length")
        if length is None or not length.isdigit() or int(length) > self.max_object:
            return None
        if head.get(b"transfer-encoding") is not None:
            return None
        if _header_values(request_headers, b"authorization"):
            return None
        cc = _directives(head.get_all(b"cache-control"))
        if b"no-store" in cc or b"private" in cc or b"no-cache" in cc:
            return None
        lifetime = _seconds(cc.get(b"s-maxage", b"")) if b"s-maxage" in cc else None
        if lifetime is None and b"max-age" in cc:
            lifetime = _seconds(cc[b"max-age"])
        if lifetime is None:
            lifetime = _expires_lifetime(head)
        if not lifetime or lifetime <= 0:
            return None
        age = _seconds(head.get(b"age") or b"") or 0.0
        vary_names = [
            name.strip().lower()
            for value in head.get_all(b"vary")
            for name in value.split(b",")
            if name.strip()
        ]
        if b"*" in vary_names:
            return None
        vary = tuple(
            (name, b", ".join(_header_values(request_headers, name))) for name in vary_names
        )
        return lifetime, age, vary

    def store(
        self,
        service: str,
        url: bytes,
        head: ResponseHead,
        body: bytes,
        lifetime: float,
        age: float,
        vary: tuple[tuple[bytes, bytes], ...],
        now: float | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now
        lines = [b"%b %d %b" % (head.version, head.status, head.reason)]
        lines.extend(
            b"%b: %b" % (name, value)
            for name, value in head.headers
            if name.lower() not in _NOT_STORED
        )
        entry = Entry(b"\r\n".join(lines), body, now, lifetime, age, vary)
        if entry.size > self.max_object + 4096:
            return
        key = (service, url)
        entries = self._entries.setdefault(key, [])
        for old in [e for e in entries if e.vary == vary]:
            self._remove(key, old)
        entries = self._entries.setdefault(key, [])
        entries.append(entry)
        self._entries.move_to_end(key)
        self.size += entry.size
        while self.size > self.max_bytes and self._entries:
            oldest_key, oldest = next(iter(self._entries.items()))
            self._remove(oldest_key, oldest[0])

    def _remove(self, key: tuple[str, bytes], entry: Entry) -> None:
        entries = self._entries.get(key)
        if entries is None or entry not in entries:
            return
        entries.remove(entry)
        self.size -= entry.size
        if not entries:
            del self._entries[key]

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())


def _expires_lifetime(head: ResponseHead) -> float | None:
    expires, date = head.get(b"expires"), head.get(b"date")
    if expires is None:
        return None
    if date is None:
        return None
    try:
        end = parsedate_to_datetime(expires.decode("latin-1"))
        start = parsedate_to_datetime(date.decode("latin-1"))
        return (end - start).total_seconds()
    except (TypeError, ValueError):
        # Not an HTTP-date (say "-0000", a date without a zone: it cannot be compared
        # with one in GMT): an invalid Expires means "already expired".
        return 0.0
