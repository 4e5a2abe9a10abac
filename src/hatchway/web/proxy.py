"""One browser connection to a device's web UI, proxied over one tunnel channel.

The connection is pinned to one channel (one TCP connection from the agent to the
device's web server) for its whole life, so requests and responses keep their order
without a connection pool, and a WebSocket upgrade is just the point from which both
directions are spliced raw.

Requests are parsed (httptools, strict llhttp) and rebuilt: hop-by-hop headers and
client-supplied forwarding headers dropped, ``X-Forwarded-*`` and ``Forwarded`` set, the
relay's cookies removed, chunked bodies re-chunked by us so the device only ever sees
one unambiguous framing. Anything ambiguous (smuggling attempts) is answered 400 and
the connection closed before a byte of it reaches the device. Responses are framed
(``web.framing``) but their bodies pass through untouched; only heads with
``Set-Cookie`` are rewritten (a device cannot set the relay's cookies or cookies for
the parent domain).

Each request needs a valid device session for this device (cookie
``__Host-hatchway-device``); without one, a GET is sent to the relay's login, anything
else gets 401. Answers from the relay itself (errors, redirects) always close the
connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

import httptools

from hatchway.mux.frames import OpenFailure, ResetReason
from hatchway.relay.api import ApiError
from hatchway.relay.streams import channel_record, describe_failure
from hatchway.store.base import WebSessionRecord
from hatchway.tunnel.endpoint import ChannelBinding
from hatchway.tunnel.local import pause_reading, resume_reading
from hatchway.tunnel.websocket import set_nodelay
from hatchway.web.access import (
    AUTH_PATH,
    DEVICE_COOKIE,
    DEVICE_SESSION_TTL,
    RELAY_COOKIE_PREFIXES,
    RESERVED_PREFIX,
    cookie_values,
    host_port_suffix,
    path_cookie_name,
    safe_next,
    split_host,
    strip_relay_cookies,
    valid_host,
)
from hatchway.web.cache import ResponseCache, request_may_use_cache
from hatchway.web.framing import ResponseError, ResponseFramer, ResponseHead
from hatchway.web.pages import error_page, http_response

if TYPE_CHECKING:
    from hatchway.web.access import WebAccess

log = logging.getLogger("hatchway.relay.web")

MAX_URL = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
#: A request head must arrive within this many seconds of its first byte.
HEAD_TIMEOUT = 10.0
#: A request body may pause this long between reads.
BODY_TIMEOUT = 30.0
#: An idle keep-alive connection is closed after this long.
KEEPALIVE_TIMEOUT = 75.0
#: A device may take this long between bytes of a response.
RESPONSE_TIMEOUT = 300.0
OPEN_TIMEOUT = 15.0
#: Parsed request data waiting (while a session is checked or the channel opens)
#: beyond which the connection stops reading.
MAX_QUEUED = 256 * 1024
#: What a queued request head is counted as beyond its bytes (the objects that hold it).
HEAD_OVERHEAD = 1024

#: Never forwarded: hop-by-hop (RFC 9110 §7.6.1), proxy credentials, and forwarding
#: headers the relay sets itself. Cookie and Host are rebuilt.
_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-real-ip",
        b"cookie",
    }
)

# How on_headers_complete treats a request field (by its lower-case name): absent, pass
# it on; _KEEP, read it and pass it on; _DROPPED, read it (or not) and drop it.
_KEEP, _DROPPED = "keep", "drop"
_REQUEST_FIELDS = {
    **{name: _DROPPED for name in _DROP},
    b"host": _KEEP,
    b"content-length": _KEEP,
    b"authorization": _KEEP,
}

#: Fields a Connection header may not name (RFC 9110 §7.6.1: they are for every hop).
_FRAMING_NAMES = frozenset({b"content-length", b"host"})

#: A response head the relay may have to change (in its lowered form): its cookies, its
#: redirects, what would clear the relay's cookies, hop-by-hop fields, a Connection
#: header that names more than keep-alive or close.
_REWRITTEN_FIELDS = re.compile(
    rb"\n(?:set-cookie|location|content-location|clear-site-data|keep-alive|proxy-connection"
    rb"|te|upgrade):|\nconnection:[ \t]*+(?!(?:keep-alive|close)[ \t]*\r?\n)"
)
#: The same names, for the framer to look for in the pass it makes anyway (a Connection
#: it lets through on that path is only keep-alive or close).
_WATCHED_FIELDS = frozenset(
    {
        b"set-cookie",
        b"location",
        b"content-location",
        b"clear-site-data",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
    }
)

#: The request line of a repeated request (``WebProxy._repeated``): a subset of what
#: llhttp accepts (a method without a body, an origin-form target of RFC 3986
#: characters, HTTP/1.1, CRLF). Anything else takes llhttp's path.
_SIMPLE_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.1\r\n")

_HEAD, _BODY, _END, _RAW, _EOF = range(5)
_RESERVED = RESERVED_PREFIX.encode()
#: ``Authorization: Bearer hwt_...`` and the other secrets the relay hands out.
_RELAY_TOKEN = re.compile(rb"\s*bearer\s+hw[tsdg]_", re.IGNORECASE)
#: What a closed connection's proxy keeps as its parser: one with no callbacks, which
#: is never fed (no data arrives after ``connection_lost``).
_DETACHED_PARSER = httptools.HttpRequestParser(object())


class _Ignored(Exception):
    """Stops the parser: what follows is not read."""


class _Request:
    __slots__ = (
        "body_bytes",
        "chunked",
        "close",
        "cookies",
        "error",
        "has_length",
        "headers",
        "host",
        "method",
        "origin",
        "sent",
        "size",
        "unprefixed",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.host: bytes | None = None
        self.cookies: list[bytes] = []
        self.chunked = False
        self.close = False
        self.upgrade = False
        self.error: tuple[int, str] | None = None
        self.body_bytes = 0
        self.has_length = False
        self.unprefixed = False
        self.size = 0  # what it holds while queued (counted in WebProxy.queued)
        self.sent = False  # its head went to the device
        # The request parsed by llhttp whose fields this one repeats (_Repeat), if any.
        self.origin: _Repeat | None = None


class _Repeat:
    """A request llhttp parsed and the proxy accepted, whose fields a later request on
    the connection may repeat byte for byte (``WebProxy._repeated``)."""

    __slots__ = ("block", "cookies", "headers", "host", "suffix")

    def __init__(self, block: bytes, req: _Request) -> None:
        self.block = block  # the header lines and the empty line that ends them
        self.host = req.host
        self.headers = req.headers  # never changed once parsed
        self.cookies = req.cookies
        # What ``WebProxy._head`` builds after the request line: (upstream Host, bytes).
        self.suffix: tuple[str | None, bytes] | None = None


class _Capture:
    """A cacheable response being copied as it passes."""

    __slots__ = ("body", "decision", "head", "marker", "remaining", "started", "url")

    def __init__(
        self,
        url: bytes,
        head: ResponseHead,
        decision: tuple[float, float, tuple[tuple[bytes, bytes], ...]],
        marker: bytes,
        length: int,
    ) -> None:
        self.url = url
        self.head = head
        self.decision = decision
        self.marker = marker
        self.remaining = length
        self.started = False
        self.body = bytearray()


class WebProxy(asyncio.Protocol, ChannelBinding):
    def __init__(
        self,
        access: WebAccess,
        device: str,
        host: str,
        source: str,
        first_byte_at: float,
        prefix: str | None = None,
    ) -> None:
        ChannelBinding.__init__(self)
        self.access = access
        # Path routing: the device lives under https://RELAY/d/DEVICE/ (see access.py).
        self.prefix = prefix.encode() if prefix else b""
        self.cookie_name = path_cookie_name(device) if prefix else DEVICE_COOKIE
        self.server = access.server
        self.device = device
        self.host = host  # the Host header of the first request, as sent
        self.host_name = split_host(host)
        self._host_checked: bytes | None = None  # the last Host header that matched
        # (Cookie headers, their session secrets, what is left for the device): a
        # keep-alive connection sends the same Cookie headers again and again.
        self._cookie_memo: tuple[tuple[bytes, ...], list[str], bytes] | None = None
        self._forwarded_memo: tuple[bytes, bytes] | None = None  # (Host, fields)
        self.source = source
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.framer = ResponseFramer(self._rewrite_response, watch=_WATCHED_FIELDS)
        self.events: deque[tuple[int, object]] = deque()
        self.queued = 0
        self.blocked: str | None = None
        self.session: WebSessionRecord | None = None
        self.session_secret: str | None = None
        self.service = "http"
        self.upstream_host: str | None = None  # Host sent to the device, if not the browser's
        self.channel_state = "none"  # none, opening, open, gone
        self.raw = False
        self._upgrading = False
        self.stopped = False  # no more requests are read or forwarded
        self._pending_local: bytes | None = None
        self._close_when_idle = False
        self._last_request = False
        self._upgrade_req: _Request | None = None
        self._last_head: _Request | None = None
        self._req: _Request | None = None
        self._repeat: _Repeat | None = None
        self._begun = 0  # requests llhttp has started
        self._header_bytes = 0
        self._head_started: float | None = first_byte_at
        self._in_body = False
        self.last_read = first_byte_at
        self.last_response = first_byte_at
        self._partial_response = False
        self._open_timer: asyncio.TimerHandle | None = None
        self.outcome = "no-request"
        self.started_at = datetime.now(UTC)
        self.requests = 0
        self.active = False  # traffic since the last sweep (keeps the session alive)
        self.cache_hits = 0
        self._expected: deque[_Request | None] = deque()
        self._capture: _Capture | None = None

    # --- asyncio.Protocol: the browser's side ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(self.transport)
        self.access.proxies.add(self)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_read = now
        self.active = True
        if self.raw:
            self.forward(data)
            return
        if self._upgrading:
            self._queue(_RAW, data, len(data))
            if self.queued > MAX_QUEUED and self.transport is not None:
                self.transport.pause_reading()
            self._pump()
            return
        if self.stopped:
            return
        between = self._req is None and not self._last_request
        if between and self._repeat is not None and self._repeated(data, self._repeat):
            return
        begun = self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = int(exc.args[0]) if exc.args else len(data)
            self._upgrade(data[offset:])
        except httptools.HttpParserError as exc:
            if self._last_request:
                self.stopped = True
                return
            req = self._req
            status, message = (
                req.error
                if req is not None and req.error is not None
                else (400, f"malformed HTTP request: {exc}")
            )
            if req is not None and req.sent:
                # Its head and part of its body are with the device, which waits for
                # the rest: that request cannot be finished, so its channel goes.
                self._cut_off(status, message, f"refused: {status} in the body")
            else:
                self._fail(status, message)
            return
        if between and self._begun == begun + 1 and self._req is None:
            self._remember(data)  # this read held exactly one request
        if self.queued > MAX_QUEUED and self.transport is not None:
            self.transport.pause_reading()
        self._pump()

    def _remember(self, data: bytes) -> None:
        """Keep the header lines of a request llhttp accepted, if a later request may
        repeat them: one with a simple request line (no body, no upgrade, HTTP/1.1)."""
        req = self._last_head
        match = _SIMPLE_REQUEST_LINE.match(data)
        if (
            req is None
            or match is None
            or req.error is not None
            or req.chunked
            or req.upgrade
            or req.close
            or req.version != "1.1"
            or req.method != match[1]
            or any(name.lower() == b"content-length" for name, _ in req.headers)
        ):
            return
        block = data[match.end() :]
        if block.find(b"\r\n\r\n") == len(block) - 4:  # nothing after the empty line
            self._repeat = _Repeat(block, req)

    def _repeated(self, data: bytes, repeat: _Repeat) -> bool:
        """A request whose header lines are byte for byte those of one llhttp parsed on
        this connection, after a simple request line, is taken without parsing it again:
        it is what llhttp would make of it (the same fields; the method, target and
        version it would read from a line of that form; no body), and it leaves llhttp
        where it was, between two requests. False if ``data`` is anything else."""
        block = repeat.block
        match = _SIMPLE_REQUEST_LINE.match(data)
        if match is None or len(data) != match.end() + len(block) or not data.endswith(block):
            return False
        req = _Request()
        req.method, req.url = match[1], match[2]
        if len(req.url) > MAX_URL:
            return False
        req.host, req.headers, req.cookies = repeat.host, repeat.headers, repeat.cookies
        req.origin = repeat
        req.size = HEAD_OVERHEAD + len(data)
        self._last_head = req
        if not self.events and self.blocked is None and self._pending_local is None:
            # Nothing waits before it: what _pump would do with the two events at once.
            # (The END of a request without a body sends nothing, and reading was not
            # paused: this read came in.)
            if self._start(req) or not self._waiting():
                return True  # sent, or answered by the relay (which ends the connection)
            self.queued += req.size  # it waits, in order, as _pump leaves a blocked head
            self.events.append((_HEAD, req))
            self.events.append((_END, req))
            return True
        self._queue(_HEAD, req, req.size)
        self._queue(_END, req)
        if self.queued > MAX_QUEUED and self.transport is not None:
            self.transport.pause_reading()
        self._pump()
        return True

    def eof_received(self) -> bool:
        if self.transport is not None and self.transport.get_extra_info("ssl_object"):
            # TLS has no half-close: the transport closes now and connection_lost cleans up.
            return False
        if self.raw:
            self._queue(_EOF, None)
            self._pump()
            return True
        if self._req is not None:
            # Gone in the middle of a request: nothing complete to forward.
            self._abort_channel("client closed mid-request")
            return False
        self._queue(_EOF, None)
        self._pump()
        return True  # keep writing the answers still on their way

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.access.proxies.discard(self)
        if self.active and self.session is not None:
            self.access.used(self.session.session_id)  # the next sweep writes it down
        if self._open_timer is not None:
            self._open_timer.cancel()
        if self.outcome in ("open", "upgraded"):
            self.outcome = "closed"
        self.local_closed()
        self._record()
        # The parser's callbacks and the framer's rewrite hook are this proxy's bound
        # methods. Dropping them breaks those reference cycles, so the connection's
        # memory goes now rather than at the next full garbage collection, which is
        # long on a busy relay and would stall every other connection meanwhile.
        self.parser = _DETACHED_PARSER
        self.framer.detach()

    def pause_writing(self) -> None:
        self.sink_paused()

    def resume_writing(self) -> None:
        self.sink_resumed()

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._last_request:
            raise _Ignored  # anything after a request that asked to close
        self._req = _Request()
        self._begun += 1
        self._header_bytes = 0
        self._head_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        req = cast(_Request, self._req)
        req.url += url
        if len(req.url) > MAX_URL:
            req.error = (414, "the request URI is too long")
            raise ValueError("URI too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        assert req is not None  # on_message_begin made it
        size = self._header_bytes + len(name) + len(value) + 4
        self._header_bytes = size
        if size > MAX_HEADER_BYTES or len(req.headers) >= MAX_HEADERS:
            req.error = (431, "the request headers are too large")
            raise ValueError("headers too large")
        req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = cast(_Request, self._req)
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        self._head_started = None
        keep: list[tuple[bytes, bytes]] = []
        connection_tokens: set[bytes] = set()
        content_length: bytes | None = None
        hosts = 0
        for name, value in req.headers:
            lname = name.lower()
            kind = _REQUEST_FIELDS.get(lname)
            if kind is None:
                keep.append((name, value))
            elif kind is _KEEP:  # a field the relay reads and passes on
                if lname == b"host":
                    hosts += 1
                    req.host = value
                elif lname == b"content-length":
                    content_length = value
                    req.has_length = value.strip() != b"0"
                elif _RELAY_TOKEN.match(value):  # authorization
                    continue  # the relay's own bearer tokens never reach a device
                keep.append((name, value))
            elif lname == b"cookie":
                req.cookies.append(value)
            elif lname == b"connection":
                connection_tokens.update(t.strip().lower() for t in value.split(b","))
            elif lname == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    req.error = (501, "transfer codings other than chunked are not supported")
                req.chunked = True
            elif lname == b"upgrade":
                req.upgrade = value.strip().lower() == b"websocket"
        if connection_tokens - _DROP:  # "keep-alive" names a field dropped anyway
            keep = [(n, v) for n, v in keep if n.lower() not in connection_tokens]
        req.headers = keep
        if req.version not in ("1.0", "1.1"):
            req.error = (400, f"HTTP/{req.version} is not supported")
        elif hosts != 1 and (hosts or req.version == "1.1"):
            req.error = (400, "a request needs exactly one Host header")
        elif req.method == b"CONNECT":
            req.error = (405, "CONNECT is not supported")
        elif not req.url.startswith(b"/"):
            req.error = (400, "only origin-form request targets are accepted")
        elif req.chunked and req.version == "1.0":
            req.error = (400, "chunked transfer coding is not allowed in HTTP/1.0")
        elif connection_tokens and connection_tokens & _FRAMING_NAMES:
            # Dropping them as hop-by-hop would leave a body without its length (or a
            # request without its Host) for the device: a request smuggled in the body.
            req.error = (400, "Connection may not name Content-Length or Host")
        req.close = b"close" in connection_tokens or (
            req.version == "1.0" and b"keep-alive" not in connection_tokens
        )
        if req.upgrade and (b"upgrade" not in connection_tokens or req.method != b"GET"):
            req.upgrade = False
        elif b"upgrade" in connection_tokens and not req.upgrade and req.error is None:
            # llhttp stops at any upgrade; only WebSocket is passed on (h2c is not).
            req.error = (400, "only WebSocket upgrades are supported")
        max_body = self.server.config.web_max_body
        if (
            max_body
            and req.error is None
            and content_length is not None
            and content_length.isdigit()
            and int(content_length) > max_body
        ):
            req.error = (413, "the request body is too large")
        self._in_body = True
        self._last_head = req
        # Heads waiting (for a session check, the channel) count towards what stops
        # reading: a client pipelining heads must not grow the relay's memory.
        req.size = HEAD_OVERHEAD + self._header_bytes + len(req.url)
        self._queue(_HEAD, req, req.size)

    def on_body(self, body: bytes) -> None:
        req = cast(_Request, self._req)
        req.body_bytes += len(body)
        max_body = self.server.config.web_max_body
        if max_body and req.body_bytes > max_body:
            req.error = (413, "the request body is too large")
            raise ValueError("body too large")
        self._queue(_BODY, body, len(body))

    def on_message_complete(self) -> None:
        req = self._req
        self._req = None
        self._in_body = False
        if req is not None:
            if req.upgrade:
                self._upgrade_req = req  # llhttp completes the message, then stops
            else:
                self._queue(_END, req)

    def _upgrade(self, rest: bytes) -> None:
        req = self._req or self._upgrade_req or self._last_head
        self._req = None
        self._in_body = False
        if req is None or not req.upgrade:
            if req is not None and req.error is not None:
                self._fail(*req.error)
            else:
                self._fail(400, "unsupported upgrade")
            return
        self._upgrading = True  # the parser is done: the rest is passed on raw
        if rest:
            self._queue(_RAW, rest, len(rest))

    def _queue(self, kind: int, item: object, size: int = 0) -> None:
        """``size``: what the item holds, counted in ``queued`` until it is sent."""
        self.queued += size
        self.events.append((kind, item))

    # --- forwarding --------------------------------------------------------------------------

    def _pump(self) -> None:
        events = self.events
        while events and self.blocked is None and self._pending_local is None:
            if events[0][0] == _RAW and not self.raw:
                # What follows an upgrade request waits for the device's 101: a device
                # that refuses the upgrade must not read it as more requests.
                break
            kind, item = events.popleft()
            if kind == _HEAD:
                req = cast(_Request, item)
                if not self._start(req):
                    if self._waiting():
                        events.appendleft((kind, item))
                    return
                self.queued -= req.size
            elif kind == _BODY:
                data = cast(bytes, item)
                self.queued -= len(data)
                if self._send_chunked:
                    self.forward(b"%x\r\n%b\r\n" % (len(data), data))
                else:
                    self.forward(data)
            elif kind == _END:
                if self._send_chunked:
                    self.forward(b"0\r\n\r\n")
            elif kind == _RAW:
                data = cast(bytes, item)
                self.queued -= len(data)
                self.forward(data)
            elif kind == _EOF:
                if self.channel_state == "open":
                    self.forward_eof()
                elif self.transport is not None:
                    self.transport.close()
        transport = self.transport
        if (
            transport is not None
            and self.queued <= MAX_QUEUED
            and self.may_read()
            and (not self.stopped or self.raw or self._upgrading)
            and not transport.is_closing()
            and not transport.is_reading()
        ):
            transport.resume_reading()

    def _waiting(self) -> bool:
        """Whether requests are held back (``blocked``), asked after ``_start``, which may
        have set it: read through a call, as mypy keeps the narrowing of a
        ``self.blocked is None`` made before it (and the compiled module trusts mypy)."""
        return self.blocked is not None

    _send_chunked = False

    def _start(self, req: _Request) -> bool:
        """Check and send one request head; False if it was not sent (blocked or failed)."""
        if req.error is not None:
            self._fail(*req.error)
            return False
        assert req.host is not None or req.version == "1.0"
        if req.host is not None and req.host != self._host_checked:
            host = req.host.decode("latin-1")
            if not valid_host(host):
                self._fail(400, "the Host header is not a host name")
                return False
            if split_host(host) != self.host_name:
                self._fail(421, "this connection serves another host")
                return False
            self._host_checked = req.host
        if self.prefix and not req.unprefixed:  # _start may run again after a wait
            if not req.url.startswith(self.prefix + b"/"):
                self._elsewhere(req)
                return False
            req.url = req.url[len(self.prefix) :]
            req.unprefixed = True
        if req.url.startswith(_RESERVED):
            self._relay_path(req)
            return False
        if not self._authorized(req):
            return False
        cache = self.access.cache_for(self.device)
        cacheable = (
            cache is not None
            and req.method in (b"GET", b"HEAD")
            and not req.upgrade
            and not req.chunked
            and not req.has_length
            and request_may_use_cache(req.headers)
        )
        if cacheable and cache is not None and self._serve_cached(cache, req):
            return True
        if self.channel_state != "open":
            if self.channel_state == "none":
                self._open_channel()
            if self.channel_state != "open":
                return False
        self._send_chunked = req.chunked
        self.forward(self._head(req))
        req.sent = True
        self.framer.expect(req.method, upgrade=req.upgrade)
        self._expected.append(req if cacheable and req.method == b"GET" else None)
        self.requests += 1
        if req.close:
            # The device closes after this one; so do we. Its body still follows.
            self._last_request = True
            self._close_when_idle = True
        return True

    def _head(self, req: _Request) -> bytes:
        line = b"%b %b HTTP/%b" % (req.method, req.url, req.version.encode())
        origin = req.origin
        if origin is not None:
            suffix = origin.suffix
            if suffix is not None and suffix[0] == self.upstream_host:
                return line + suffix[1]
            head = self._build_head(req, line)
            origin.suffix = (self.upstream_host, head[len(line) :])
            return head
        return self._build_head(req, line)

    def _build_head(self, req: _Request, line: bytes) -> bytes:
        host = req.host if req.host is not None else self.host.encode("latin-1")
        lines = [line]
        upstream = self.upstream_host
        if upstream is None:
            lines += map(b": ".join, req.headers)
            if req.host is None:
                lines.append(b"Host: " + host)
        else:
            lines += [b": ".join(pair) for pair in req.headers if pair[0].lower() != b"host"]
            lines.append(b"Host: " + upstream.encode("latin-1"))
        cookies = self._cookies(req)[2]
        if cookies:
            lines.append(b"Cookie: " + cookies)
        lines.append(self._forwarded(host))
        if req.upgrade:
            lines.append(b"Connection: Upgrade\r\nUpgrade: websocket")
        elif req.chunked:
            lines.append(b"Transfer-Encoding: chunked")
        if req.close and not req.upgrade:
            lines.append(b"Connection: close")
        elif req.version == "1.0" and not req.upgrade:
            lines.append(b"Connection: keep-alive")  # else HTTP/1.0 means one request
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    def _forwarded(self, host: bytes) -> bytes:
        """The X-Forwarded-* and Forwarded fields (one string; the same for every request
        with this Host on the connection)."""
        memo = self._forwarded_memo
        if memo is None or memo[0] != host:
            ip = self.source
            forwarded_for = f'"[{ip}]"' if ":" in ip else ip
            fields = b"\r\n".join(
                (
                    b"X-Forwarded-For: " + ip.encode(),
                    b"X-Forwarded-Proto: https",
                    b"X-Forwarded-Host: " + host,
                    b'Forwarded: for=%b;proto=https;host="%b"' % (forwarded_for.encode(), host),
                )
            )
            memo = self._forwarded_memo = (host, fields)
        return memo[1]

    # --- the cache ---------------------------------------------------------------------------

    def _serve_cached(self, cache: ResponseCache, req: _Request) -> bool:
        """Answer from the device's cache if nothing from the device is on its way."""
        if self.framer.pending or self.framer.in_message or self.transport is None:
            return False
        entry = cache.lookup(self.service, req.url, self._cache_fields(req))
        if entry is None:
            return False
        self.transport.write(entry.render(time.monotonic(), head_only=req.method == b"HEAD"))
        self.requests += 1
        self.cache_hits += 1
        if req.close:
            self._last_request = True
            self._close_when_idle = True
            self._close()
        return True

    def _cache_fields(self, req: _Request) -> list[tuple[bytes, bytes]]:
        """The request's fields as the device sees them, for ``Vary``: with the Cookie
        header it is sent (the relay's cookies taken out)."""
        cookies = self._cookies(req)[2]
        return [*req.headers, (b"Cookie", cookies)] if cookies else req.headers

    def _start_capture(self, req: _Request, head: ResponseHead, out: bytes | None) -> bytes | None:
        cache = self.access.cache_for(self.device)
        decision = cache.storable(self._cache_fields(req), head) if cache is not None else None
        if decision is None:
            return out
        marker = out if out is not None else head.serialize()
        length = int(head.get(b"content-length") or b"0")
        self._capture = _Capture(req.url, head, decision, marker, length)
        return marker

    def _collect(self, pieces: list[bytes | memoryview]) -> None:
        capture = self._capture
        assert capture is not None
        for piece in pieces:
            if not capture.started:
                capture.started = piece is capture.marker
                continue
            take = min(len(piece), capture.remaining)
            capture.body += piece[:take]
            capture.remaining -= take
            if capture.remaining == 0:
                break
        if capture.started and capture.remaining == 0:
            self._capture = None
            cache = self.access.cache_for(self.device)
            if cache is not None:
                lifetime, age, vary = capture.decision
                cache.store(
                    self.service,
                    capture.url,
                    capture.head,
                    bytes(capture.body),
                    lifetime,
                    age,
                    vary,
                )

    # --- sessions ----------------------------------------------------------------------------

    def _cookies(self, req: _Request) -> tuple[tuple[bytes, ...], list[str], bytes]:
        """(the request's Cookie headers, the session secrets among them, the Cookie
        header for the device: the relay's cookies taken out, empty if none is left)."""
        key = tuple(req.cookies)
        memo = self._cookie_memo
        if memo is None or memo[0] != key:
            secrets = [
                value
                for header in key
                for value in cookie_values(header.decode("latin-1"), self.cookie_name)
            ]
            kept = [c for c in (strip_relay_cookies(v) for v in key) if c]
            memo = self._cookie_memo = (key, secrets, b"; ".join(kept))
        return memo

    def _authorized(self, req: _Request) -> bool:
        secrets = self._cookies(req)[1]
        if self.session_secret is not None and self.session_secret in secrets:
            known, record = self.access.cached(self.session_secret, "device")
            if known and record is not None:
                return True
            if known:  # revoked
                self._login_needed(req)
                return False
            self._block(self._check_sessions([self.session_secret], req))
            return False
        if self.session_secret is not None:
            # The browser now sends another session (a new login): finish what is on the
            # way and close; the browser retries the request on a new connection.
            self._close_when_idle = True
            self.stopped = True
            self._maybe_close_idle()
            self.blocked = "closing"
            return False
        for secret in secrets:
            known, record = self.access.cached(secret, "device")
            if known and record is not None and self._accept_session(secret, record):
                return True
        if any(not self.access.cached(s, "device")[0] for s in secrets[:4]):
            self._block(self._check_sessions(secrets[:4], req))
            return False
        self._login_needed(req)
        return False

    def _accept_session(self, secret: str, record: WebSessionRecord) -> bool:
        if record.kind != "device" or record.device != self.device:
            return False
        if not self.server.permits(record.user, self.device, record.service or "http"):
            return False
        self.session_secret, self.session = secret, record
        self.service = record.service or "http"
        return True

    async def _check_sessions(self, secrets: list[str], req: _Request) -> None:
        for secret in secrets:
            record = await self.access.load(secret, "device")
            if record is not None and (
                secret == self.session_secret or self._accept_session(secret, record)
            ):
                self.session = record
                return
        if self.session_secret is not None and self.session_secret in secrets:
            self.revoked()
            return
        self._login_needed(req)

    def _block(self, coro: object) -> None:
        self.blocked = "session"
        task = asyncio.get_running_loop().create_task(self._run_blocked(coro))
        self.server.track(task)

    async def _run_blocked(self, coro: object) -> None:
        try:
            await cast("asyncio.Future[None]", coro)
        except Exception:
            log.exception("checking a web session failed")
            self._fail(500, "internal error")
            return
        if self.blocked == "session":
            self.blocked = None
            self._pump()

    def _elsewhere(self, req: _Request) -> None:
        """Path routing: a request for another part of the relay's origin on this
        connection. Sent again (307 keeps method and body) on a new connection, which
        the front door routes."""
        if req.url == self.prefix:
            location = (self.prefix + b"/").decode("latin-1")
        elif self._referred_here(req):
            # An absolute path in one of this device's pages (``/style.css``).
            location = (self.prefix + req.url).decode("latin-1")
        else:
            location = req.url.decode("latin-1")
        if location.startswith(("//", "/\\")):
            # A path here, never another origin (a Location of //evil.example/x would be).
            location = f"https://{self.host}{location}"
        self._local(http_response(307, b"", headers=[("Location", location)]))

    def _referred_here(self, req: _Request) -> bool:
        for name, value in req.headers:
            if name.lower() == b"referer":
                referer = urllib.parse.urlsplit(value.decode("latin-1"))
                return referer.netloc == self.host and referer.path.startswith(
                    self.prefix.decode() + "/"
                )
        return False

    def _login_needed(self, req: _Request) -> None:
        if req.method in (b"GET", b"HEAD"):
            relay = f"https://{self.access.domain}{host_port_suffix(self.host)}"
            query = urllib.parse.urlencode({"next": req.url.decode("latin-1")})
            location = f"{relay}/open/{self.device}?{query}"
            self._local(
                http_response(
                    303,
                    b"",
                    headers=[("Location", location)],
                    head_only=req.method == b"HEAD",
                )
            )
        else:
            self._fail(401, "log in to the relay first")

    def _relay_path(self, req: _Request) -> None:
        url = urllib.parse.urlsplit(req.url.decode("latin-1"))
        if url.path != AUTH_PATH or req.method != b"GET":
            self._fail(404, "no such page")
            return
        params = urllib.parse.parse_qs(url.query)
        grant = (params.get("grant") or [""])[0]
        next_path = safe_next((params.get("next") or ["/"])[0])
        self._block(self._exchange(grant, next_path))

    async def _exchange(self, grant: str, next_path: str) -> None:
        store = self.server.store
        result = None
        if grant and len(grant) <= 128:
            result = await asyncio.to_thread(store.consume_grant, grant)
        if result is None or result[0].device != self.device:
            self._fail(403, "this link has expired or was already used: open the device again")
            return
        record, parent = result
        if parent is None or not self.server.permits(
            record.user, self.device, record.service or "http"
        ):
            self._fail(403, "this link has expired or was already used: open the device again")
            return
        secret = await asyncio.to_thread(
            store.create_child_session,
            record.user.name,
            "device",
            DEVICE_SESSION_TTL,
            device=self.device,
            service=record.service or "http",
            parent_id=parent,
        )
        log.info(
            "web session: user=%s device=%s service=%s from=%s",
            record.user.name,
            self.device,
            record.service,
            self.source,
        )
        self.server.audit(
            "web_session",
            record.user.name,
            device=self.device,
            source=self.source,
            details={"service": record.service},
        )
        max_age = int(DEVICE_SESSION_TTL.total_seconds())
        prefix = self.prefix.decode()
        self._local(
            http_response(
                303,
                b"",
                headers=[
                    ("Location", prefix + next_path),
                    (
                        "Set-Cookie",
                        f"{self.cookie_name}={secret}; Path={prefix or ''}/; Secure; HttpOnly; "
                        f"SameSite=Lax; Max-Age={max_age}",
                    ),
                ],
            )
        )

    def revoked(self) -> None:
        """The session ended or the user lost the device: close now."""
        log.info(
            "web: closing connection of user=%s device=%s: access revoked",
            self.session.user.name if self.session else "?",
            self.device,
        )
        self.outcome = "revoked"
        self.abort("access revoked")

    # --- the channel -----------------------------------------------------------------------

    def _open_channel(self) -> None:
        assert self.session is not None
        try:
            tunnel = self.server.authorize_stream(self.session.user, self.device, self.service)
        except ApiError as exc:
            self._open_error(exc.status, exc.code, exc.message)
            return
        entry = self.server.registry.get(self.device)
        if entry is not None:
            options = entry.properties.get("service_options", {}).get(self.service, {})
            self.upstream_host = options.get("host")
        self.channel_state = "opening"
        self.blocked = "open"
        tunnel.open_binding(self.service, self)
        self._open_timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT, self._open_expired)

    def _open_expired(self) -> None:
        self._open_timer = None
        if self.channel_state == "opening":
            self.reset_channel(ResetReason.CANCEL, "open timed out")
            self.on_open_failed(OpenFailure.TIMEOUT, "timed out")

    def on_open_ok(self) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        self.channel_state = "open"
        self.outcome = "open"
        self.blocked = None
        log.info(
            "web channel %s user=%s device=%s service=%s from=%s: open",
            self.channel,
            self.session.user.name if self.session else "?",
            self.device,
            self.service,
            self.source,
        )
        self._pump()

    def on_open_failed(self, reason: int, message: str) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        self.channel_state = "gone"
        status, code, text = describe_failure(reason, message, self.device, self.service)
        self._open_error(504 if status == 504 else 502 if status >= 500 else status, code, text)

    def _open_error(self, status: int, code: str, message: str) -> None:
        self.channel_state = "gone"
        self.outcome = f"open-failed: {code}"
        self.blocked = None
        if code == "offline":
            since = self.server.offline_since(self.device)
            title = f"{self.device} is offline"
            message = f"The device {self.device} is not connected to the relay"
            if since is not None:
                message += f" (offline since {since.isoformat(timespec='seconds')})"
            message += "."
            self._local(http_response(502, error_page(502, title, message)))
            return
        if status == 404 and code == "unknown_service":
            status = 502
        self._local(http_response(status, error_page(status, _title(status), message)))

    # device -> browser

    def deliver(self, data: bytes) -> None:
        self.last_response = time.monotonic()
        self.active = True
        try:
            pieces = self.framer.feed(data)
        except ResponseError as exc:
            if exc.pieces and self.transport is not None:
                # What came before the fault (say, a complete response followed by junk).
                self.transport.writelines(exc.pieces)
                self._partial_response = True
            self._bad_response(str(exc))
            return
        except Exception as exc:  # a fault of the relay's own (the head rewriting, the cache)
            log.exception("web: %s/%s: failed on a response", self.device, self.service)
            self._bad_response(f"the relay could not pass it on ({type(exc).__name__})")
            return
        framer, transport = self.framer, self.transport
        in_message = framer.in_message
        if pieces and transport is not None and not transport.is_closing():
            transport.writelines(pieces)
            self._partial_response = in_message
            if self._capture is not None:
                self._collect(pieces)
        if framer.upgraded:
            if self.outcome == "open":
                self.outcome = "upgraded"
            if not self.raw:
                self.raw = True
                self._pump()
            return
        if not in_message and not framer.pending:
            self._partial_response = False
            self._idle()

    def deliver_eof(self) -> None:
        if self.raw:
            if self.transport is not None and self.transport.can_write_eof():
                self.transport.write_eof()
            return
        try:
            pieces = self.framer.feed_eof()
        except ResponseError as exc:
            self._bad_response(f"the device closed the connection early ({exc})")
            return
        if pieces and self.transport is not None:
            self.transport.writelines(pieces)
        if self.framer.pending and not self._partial_response:
            self._bad_response("the device closed the connection without answering")
            return
        self.stopped = True
        self._close()

    def _idle(self) -> None:
        """Every response sent so far is complete."""
        if self.framer.must_close:
            self.stopped = True
            self._close()
        elif self._pending_local is not None:
            self._send_local()
        elif self._close_when_idle:
            self._close()

    def _bad_response(self, message: str) -> None:
        log.warning("web: bad response from %s/%s: %s", self.device, self.service, message)
        self.outcome = "bad-response"
        self._abort_channel(message)
        if self._partial_response or self.transport is None:
            self.abort(message)
            return
        self.stopped = True
        self.events.clear()
        self._pending_local = http_response(
            502,
            error_page(502, _title(502), f"{self.device} sent an invalid response: {message}"),
        )
        self._send_local()

    def on_reset(self, reason: int, message: str) -> None:
        if self.channel_state == "opening":
            self.on_open_failed(OpenFailure.SHUTTING_DOWN, message)
            return
        self.channel_state = "gone"
        if self.outcome in ("open", "upgraded"):
            self.outcome = f"reset: {message}"
        if self.framer.pending and not self._partial_response and not self.raw:
            self.stopped = True
            self.events.clear()
            self._pending_local = http_response(
                502,
                error_page(502, _title(502), f"The connection to {self.device} was lost."),
            )
            self._send_local()
        else:
            self.abort(message)

    def on_closed(self) -> None:
        self._close()

    def pause_source(self) -> None:
        pause_reading(self.transport)

    def resume_source(self) -> None:
        resume_reading(self.transport)

    def _abort_channel(self, message: str) -> None:
        self.channel_state = "gone"
        self.reset_channel(ResetReason.CANCEL, message)

    # --- answers from the relay -------------------------------------------------------------

    def _fail(self, status: int, message: str) -> None:
        self.stopped = True
        self.events.clear()
        if self.outcome in ("no-request",):
            self.outcome = f"refused: {status}"
        self._local(http_response(status, error_page(status, _title(status), message)))

    def _local(self, response: bytes) -> None:
        """Answer from the relay once the device's answers on the way are out, then close."""
        self.stopped = True
        self.events.clear()
        self.blocked = "local"
        self._pending_local = response
        if not self.framer.pending and not self.framer.in_message:
            self._send_local()

    def _send_local(self) -> None:
        response, self._pending_local = self._pending_local, None
        if self.transport is not None and response is not None:
            self.transport.write(response)
        self._close()

    def _body_stalled(self) -> None:
        """The client stopped sending a request body: the device will never answer it
        in full."""
        self._cut_off(408, "The request body stalled.", "body timeout")

    def _cut_off(self, status: int, message: str, outcome: str) -> None:
        """A request whose head is with the device cannot be finished: the channel goes,
        and the client gets ``status`` unless a response of the device is already half
        way out."""
        self.outcome = outcome
        self._abort_channel(message)
        self.stopped = True
        self.events.clear()
        if self._partial_response or self.transport is None:
            self.abort(message)
            return
        self._pending_local = http_response(status, error_page(status, _title(status), message))
        self._send_local()

    def _maybe_close_idle(self) -> None:
        if not self.framer.pending and not self.framer.in_message:
            self._close()

    def _close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self, message: str) -> None:
        self._abort_channel(message)
        if self.transport is not None:
            self.transport.abort()

    def check_timeouts(self, now: float) -> None:
        """Called every couple of seconds by ``WebAccess``."""
        if self.transport is None or self.raw:
            return
        transport = self.transport
        if not transport.is_closing() and not transport.is_reading() and not self.stopped:
            # Paused by the relay (the device is slow to take the body, or a session check
            # or channel open is under way): the client is not the one stalling.
            self.last_read = now
        if self._head_started is not None and now - self._head_started > HEAD_TIMEOUT:
            self._head_started = None
            self._fail(408, "the request head took too long")
        elif self._in_body and now - self.last_read > BODY_TIMEOUT:
            self._in_body = False
            self._body_stalled()
        elif self.framer.pending or self.framer.in_message:
            if now - max(self.last_response, self.last_read) > RESPONSE_TIMEOUT:
                self._bad_response("the device stopped answering")
        elif self.channel_state != "opening" and now - self.last_read > KEEPALIVE_TIMEOUT:
            self._close()

    # --- response heads ----------------------------------------------------------------------

    def _rewrite_response(self, head: ResponseHead) -> bytes | None:
        out = self._rewrite_head(head)
        if head.status >= 200 or head.status == 101:
            req = self._expected.popleft() if self._expected else None
            if req is not None:
                return self._start_capture(req, head, out)
        return out

    def _rewrite_head(self, head: ResponseHead) -> bytes | None:
        """Drop the relay's cookies and ``Domain`` attributes from a device's Set-Cookie,
        its Clear-Site-Data and its hop-by-hop fields (RFC 9110 §7.6.1: those named in
        Connection, Keep-Alive, Proxy-Connection, TE, and Upgrade but in a 101); point
        redirects to the device's own name (or to plain http) back at the relay.

        ``Connection: keep-alive`` or ``close`` pass: they say what the relay does with
        the browser's connection too."""
        plain = head.plain
        if plain or (plain is None and _REWRITTEN_FIELDS.search(head.lower) is None):
            return None
        hop = {b"keep-alive", b"proxy-connection", b"te"}
        if head.status != 101:
            hop.add(b"upgrade")
        options: list[bytes] = []
        for name, value in head.headers:
            if name.lower() == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip(b" \t")
                    if token in (b"keep-alive", b"close", b"upgrade") and token not in options:
                        options.append(token)
                    elif token:
                        hop.add(token)
        if b"close" in options:
            options = [b"close"]  # what the relay does with the browser's connection then
        changed = False
        headers: list[tuple[bytes, bytes]] = []
        connection_done = False
        for name, value in head.headers:
            lname = name.lower()
            if lname in hop or lname == b"clear-site-data":
                # Clear-Site-Data would clear the relay's cookies too (the same site).
                changed = True
                continue
            if lname == b"connection":
                kept = b", ".join(t for t in options if t != b"upgrade" or head.status == 101)
                if connection_done or not kept:
                    changed = True
                    continue
                connection_done = True
                if kept != b", ".join(t.strip(b" \t") for t in value.lower().split(b",")):
                    changed = True
                    value = kept
            elif lname == b"set-cookie":
                cleaned = clean_set_cookie(value, self.prefix)
                changed = changed or cleaned != value
                if cleaned is None:
                    continue
                value = cleaned
            elif lname in (b"location", b"content-location"):
                fixed = self._rewrite_location(value)
                changed = changed or fixed != value
                value = fixed
            headers.append((name, value))
        if not changed:
            return None
        head.headers = headers
        return head.serialize()

    def _rewrite_location(self, value: bytes) -> bytes:
        """``http(s)://NAME[:PORT]/path`` for the device's own name, or for the browser's
        host over plain http, becomes ``https://BROWSER_HOST/path``."""
        if value.startswith(b"/") and not value.startswith(b"//"):
            return self.prefix + value  # an absolute path on the device
        scheme, sep, rest = value.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            return value
        authority, slash, path = rest.partition(b"/")
        name = split_host(authority.decode("latin-1"))
        own = self.upstream_host is not None and name == split_host(self.upstream_host)
        if own or name == self.host_name:
            return b"https://" + self.host.encode("latin-1") + self.prefix + slash + path
        return value

    # --- audit -------------------------------------------------------------------------------

    def _record(self) -> None:
        if self.session is None:
            return
        record = channel_record(
            self, self.session.user.name, self.device, self.service, self.source,
            self.started_at, self.outcome,
        )  # fmt: skip
        duration = (record.ended_at - record.started_at).total_seconds()
        log.info(
            "web channel %s user=%s device=%s service=%s from=%s: %s, %d requests, "
            "%d bytes up, %d bytes down, %.3f s",
            self.channel,
            record.user,
            self.device,
            self.service,
            self.source,
            self.outcome,
            self.requests,
            record.bytes_up,
            record.bytes_down,
            duration,
        )
        if self.channel_state != "none":
            self.server.record_channel(record)


def clean_set_cookie(value: bytes, prefix: bytes = b"") -> bytes | None:
    """A device's Set-Cookie made host-only (and, under path routing, confined to the
    device's path), or None if it names a relay cookie."""
    name = value.split(b"=", 1)[0].strip().lower()
    if name.startswith(RELAY_COOKIE_PREFIXES):
        return None
    lower = value.lower()
    if b"domain" not in lower and not (prefix and b"path" in lower):
        return value
    parts = value.split(b";")
    kept = [parts[0]]
    for part in parts[1:]:
        key, _, arg = part.partition(b"=")
        key = key.strip().lower()
        if key == b"domain":
            continue
        if key == b"path" and prefix:
            arg = arg.strip()
            part = b" Path=" + prefix + (arg if arg.startswith(b"/") else b"/")
        kept.append(part)
    return b";".join(kept)


def _title(status: int) -> str:
    return {
        400: "Bad request",
        401: "Log in first",
        403: "Not permitted",
        404: "Not found",
        405: "Method not allowed",
        408: "Request timed out",
        413: "Request too large",
        414: "Address too long",
        421: "Wrong host",
        431: "Request headers too large",
        500: "Relay error",
        501: "Not supported",
        502: "Device not reachable",
        503: "Device busy",
        504: "Device timed out",
    }.get(status, "Error")
