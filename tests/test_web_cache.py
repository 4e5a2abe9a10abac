"""The device cache's storage rules (RFC 9111, shared cache, explicit freshness only)."""

from __future__ import annotations

import pytest

from hatchway.web.cache import ResponseCache, request_may_use_cache
from hatchway.web.framing import ResponseFramer, ResponseHead


def head(*headers: str, status: int = 200, length: int = 5) -> ResponseHead:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {length}", *headers]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    seen: list[ResponseHead] = []

    def grab(h: ResponseHead) -> None:
        seen.append(h)

    framer = ResponseFramer(grab)
    framer.expect(b"GET")
    framer.feed(raw + b"x" * length)
    return seen[0]


@pytest.mark.parametrize(
    ("headers", "lifetime"),
    [
        (["Cache-Control: max-age=60"], 60),
        (["Cache-Control: public, s-maxage=30, max-age=60"], 30),
        (["Date: Sun, 22 Nov 2026 00:00:00 GMT", "Expires: Sun, 22 Nov 2026 00:10:00 GMT"], 600),
        (["Cache-Control: max-age=60, private"], None),
        (["Cache-Control: no-store, max-age=60"], None),
        (["Cache-Control: no-cache, max-age=60"], None),
        (["Cache-Control: max-age=60", "Set-Cookie: a=1"], None),
        (["Cache-Control: max-age=60", "Vary: *"], None),
        (["Cache-Control: max-age=0"], None),
        (["Last-Modified: Sun, 22 Nov 2026 00:00:00 GMT"], None),  # no heuristics
        (["Expires: garbage", "Date: Sun, 22 Nov 2026 00:00:00 GMT"], None),
    ],
)
def test_storable(headers: list[str], lifetime: float | None) -> None:
    decision = ResponseCache(1 << 20).storable([], head(*headers))
    assert (decision[0] if decision else None) == lifetime


def test_not_stored_for_credentials_statuses_or_big_bodies() -> None:
    cache = ResponseCache(1000, max_object=100)
    assert (
        cache.storable([(b"Authorization", b"Basic x")], head("Cache-Control: max-age=9")) is None
    )
    assert cache.storable([], head("Cache-Control: max-age=9", status=404)) is None
    assert cache.storable([], head("Cache-Control: max-age=9", length=101)) is None


def test_lookup_freshness_vary_and_eviction() -> None:
    cache = ResponseCache(2000, max_object=1000)
    h = head("Cache-Control: max-age=10", "Vary: Accept-Language")
    req = [(b"Accept-Language", b"en")]
    decision = cache.storable(req, h)
    assert decision is not None
    cache.store("http", b"/a", h, b"hello", *decision, now=100.0)
    assert cache.lookup("http", b"/a", req, now=105.0) is not None
    assert cache.lookup("http", b"/a", [(b"Accept-Language", b"de")], now=105.0) is None
    entry = cache.lookup("http", b"/a", req, now=109.0)
    assert entry is not None and entry.render(109.0).endswith(b"\r\nAge: 9\r\n\r\nhello")
    assert cache.lookup("http", b"/a", req, now=110.5) is None  # stale: dropped
    assert len(cache) == 0 and cache.size == 0
    for n in range(20):  # bounded in bytes, oldest out
        cache.store("http", b"/%d" % n, h, b"x" * 200, 10, 0, (), now=0.0)
        assert cache.size <= 2000
    assert cache.lookup("http", b"/19", [], now=1.0) is not None
    assert cache.lookup("http", b"/0", [], now=1.0) is None


def test_requests_that_bypass_the_cache() -> None:
    assert request_may_use_cache([(b"Accept", b"*/*")])
    for header in [
        (b"Cache-Control", b"no-cache"),
        (b"Cache-Control", b"max-age=0"),
        (b"Pragma", b"no-cache"),
        (b"Authorization", b"Bearer x"),
    ]:
        assert not request_may_use_cache([header])
