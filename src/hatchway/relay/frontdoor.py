"""The relay's front door: every TLS connection starts here.

It reads one HTTP request (head bounded to ``MAX_HEAD``, body to ``MAX_BODY``, both
within ``REQUEST_TIMEOUT`` of the TCP accept) and routes it:

- ``GET /api/v1/tunnel`` with a WebSocket upgrade: a device tunnel;
- ``GET /api/v1/connect?device=D&service=S`` with a WebSocket upgrade: a client stream,
  authenticated with a bearer token before anything reaches the device;
- anything else: the small JSON API (``relay.api``), one request per connection.

For the WebSocket routes the connection's protocol is switched to the endpoint, which
is fed the bytes read so far (the websockets library parses the request again).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

import httptools
from websockets.server import ServerProtocol

from hatchway.relay import api
from hatchway.relay.api import asgi
from hatchway.relay.client_tunnels import ClientTunnel
from hatchway.relay.streams import ClientStream, error_response
from hatchway.relay.tunnels import (
    HANDSHAKE_TIMEOUT,
    PREAUTH_MAX_MESSAGE,
    SUBPROTOCOL,
    RelayTunnel,
)
from hatchway.tunnel.endpoint import TUNNEL_MAX_MESSAGE
from hatchway.web import ui
from hatchway.web.access import split_host, valid_host
from hatchway.web.pages import REASONS, error_page, http_response
from hatchway.web.proxy import WebProxy

if TYPE_CHECKING:
    from hatchway.relay.server import RelayServer

log = logging.getLogger("hatchway.relay.http")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
MAX_URL = 8 * 1024
REQUEST_TIMEOUT = 10.0
STREAM_MAX_MESSAGE = 1024 * 1024


class _RequestTooLarge(Exception):
    """Raised in a parser callback; httptools wraps it, so the request keeps the status."""

    def __init__(self, request: HttpRequest, status: int) -> None:
        request.too_large = status
        self.status = status


class _HandOff(Exception):
    """Raised in the head callback: the request is for a device's web UI."""


class HttpRequest:
    """What the front door keeps of a request (httptools parser callbacks)."""

    def __init__(self, on_head: Callable[[HttpRequest], None] | None = None) -> None:
        self._on_head = on_head
        self.device: str | None = None
        self.prefix: str | None = None
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_complete = False
        self.complete = False
        self.too_large = 0
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            raise _RequestTooLarge(self, 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEAD or len(self.headers) >= 100:
            raise _RequestTooLarge(self, 431)
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_complete = True
        if self._on_head is not None:
            self._on_head(self)

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BODY:
            raise _RequestTooLarge(self, 413)

    def on_message_complete(self) -> None:
        self.complete = True

    def detach(self) -> None:
        """No more head callbacks: the one who asked for them is done."""
        self._on_head = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class FrontDoor(asyncio.Protocol):
    """One accepted connection until its first request is routed.

    ``source`` was admitted by the server's accept loop (a bounded number of pending
    connections per address); ``release()`` gives the slot back exactly once: when the
    request was read, or for the WebSocket routes once the caller authenticated (a
    device tunnel's handshake, a client's bearer token) or the connection closed.
    """

    def __init__(self, server: RelayServer, source: str, accepted: float | None = None) -> None:
        self.server = server
        self.source = source
        # When the TCP connection was accepted (the loop's clock): the limits on reading
        # the request head and on a device tunnel's handshake count from then, so an
        # unauthenticated connection lasts at most that long, TLS handshake included.
        self.accepted = asyncio.get_running_loop().time() if accepted is None else accepted
        self.transport: asyncio.Transport | None = None
        self.request = HttpRequest(self._head_complete)
        self.first_byte_at: float | None = None
        self.parser = httptools.HttpRequestParser(self.request)
        self.buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._handed_over = False
        self._admitted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self.accepted + REQUEST_TIMEOUT, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self._detach()

    def _detach(self) -> None:
        """Break the cycle this door, its parser and its request make (the request's head
        callback is the door's bound method): what it holds, the TLS transport among
        it, is then freed as soon as nothing else uses it, not at the next full
        garbage collection."""
        self.request.detach()

    def release(self) -> None:
        self._stop_timer()
        if self._admitted:
            self._admitted = False
            self.server.release(self.source)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        # The slot goes with the connection (connection_lost), not before: a client that
        # times out holds its descriptor until the TLS close is over.
        self._respond(408, {"error": "timeout", "message": "request timed out"})

    def _was_handed_over(self) -> bool:
        # Asked again after the parser ran, whose callbacks may hand the connection over:
        # through a call, as mypy keeps the narrowing of the check at the top.
        return self._handed_over

    def data_received(self, data: bytes) -> None:
        if self._handed_over:
            return
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        self.buffer += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the head is complete; the endpoint takes the rest
        except (httptools.HttpParserError, _RequestTooLarge):
            if self.request.device is not None:
                self._web()
                return
            if self._was_handed_over():
                return
            status = self.request.too_large
            if status:
                self._respond(status, {"error": "too_large", "message": REASONS[status]})
            else:
                self._respond(400, {"error": "bad_request", "message": "malformed HTTP request"})
            return
        if len(self.buffer) > MAX_HEAD + MAX_BODY:
            self._respond(431, {"error": "too_large", "message": "request too large"})
            return
        if self.request.head_complete and (self.request.complete or self._is_upgrade()):
            self._route()

    # --- device web UIs (virtual hosts) ------------------------------------------------------

    def sni(self) -> str | None:
        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        name = getattr(ssl_object, "hatchway_sni", None)
        if name is None:
            return None
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return str(name)
        return None  # RFC 6066 allows no address literals; some clients send them anyway

    def _head_complete(self, request: HttpRequest) -> None:
        """Route by Host (and SNI, which must agree): a device's subdomain is proxied."""
        host = request.header("host") or ""
        if host and not valid_host(host):
            self._respond_page(400, "Bad request", "The Host header is not a host name.")
            raise _HandOff
        sni = self.sni()
        web = self.server.web
        try:
            device = web.device_for_host(host)
            sni_device = web.device_for_host(sni) if sni else None
        except LookupError:
            self._respond_page(404, "Not found", "There is no such device.")
            raise _HandOff from None
        if sni_device and not host:
            self._respond_page(400, "Bad request", "A request needs exactly one Host header.")
            raise _HandOff
        if sni and host and split_host(sni) != split_host(host):
            # For the relay's own pages too. A client that sends no server name (one
            # that connects by address) is routed by Host alone.
            self._respond_page(
                421, "Wrong host", "The TLS server name and the Host header do not agree."
            )
            raise _HandOff
        if device is not None:
            if not web.host_routing:
                self._respond_page(404, "Not found", "Device subdomains are not served here.")
                raise _HandOff
            request.device = device
            raise _HandOff
        try:
            routed = web.device_for_path(request.url.decode("latin-1").split("?", 1)[0])
        except LookupError:
            self._respond_page(404, "Not found", "There is no such device.")
            raise _HandOff from None
        if routed is not None:
            request.device, request.prefix = routed
            raise _HandOff

    def _web(self) -> None:
        """Hand the connection to a ``WebProxy``, which parses the request again."""
        assert self.transport is not None and self.request.device is not None
        self.release()
        proxy = WebProxy(
            self.server.web,
            self.request.device,
            self.request.header("host") or "",
            self.source,
            self.first_byte_at or time.monotonic(),
            self.request.prefix,
        )
        self._hand_over(proxy)

    def _referred_device_path(self, url: urllib.parse.SplitResult) -> str | None:
        """Path routing: a device page asked for an absolute path (``/style.css``) that
        is not the relay's; its Referer says which device: send it there."""
        web = self.server.web
        if not web.path_routing or url.path.startswith("/api/") or ui.is_ui_path(url.path):
            return None
        referer = urllib.parse.urlsplit(self.request.header("referer") or "")
        if referer.netloc != (self.request.header("host") or "") or not referer.netloc:
            return None
        try:
            routed = web.device_for_path(referer.path)
        except LookupError:
            return None
        if routed is None:
            return None
        return routed[1] + url.path + (f"?{url.query}" if url.query else "")

    def _respond_raw(self, response: bytes) -> None:
        transport = self.transport
        self._handed_over = True
        if transport is None or transport.is_closing():
            return
        transport.write(response)
        transport.close()

    def _respond_page(self, status: int, title: str, message: str) -> None:
        transport = self.transport
        self._handed_over = True
        if transport is None or transport.is_closing():
            return
        transport.write(http_response(status, error_page(status, title, message)))
        transport.close()

    def _is_upgrade(self) -> bool:
        return (self.request.header("upgrade") or "").lower() == "websocket"

    def _route(self) -> None:
        assert self.transport is not None
        self._stop_timer()
        req = self.request
        url = urllib.parse.urlsplit(req.url.decode("latin-1"))
        method = self.parser.get_method().decode("latin-1")
        if self._is_upgrade() and method == "GET":
            # Unauthenticated until the handshake or the token check is done: the
            # source's slot goes with the connection until then.
            if url.path == "/api/v1/tunnel":
                ws = ServerProtocol(
                    subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                    extensions=None,
                    max_size=PREAUTH_MAX_MESSAGE,  # raised once the device proved itself
                )
                deadline = self.accepted + HANDSHAKE_TIMEOUT
                self._hand_over(RelayTunnel(ws, self.server, self.release, deadline))
                return
            if url.path in ("/api/v1/connect", "/api/v1/client"):
                self.transport.pause_reading()
                self._handed_over = True
                if url.path == "/api/v1/connect":
                    coro = self._connect(url.query)
                else:
                    coro = self._client_tunnel()
                task = asyncio.get_running_loop().create_task(self._guarded(url.path, coro))
                task.add_done_callback(lambda _: self.release())
                self.server.track(task)
                return
        self.release()
        if self._is_upgrade():
            if method != "GET":
                self._respond(405, {"error": "bad_method", "message": "use GET to upgrade"})
            else:
                self._respond(404, {"error": "not_found", "message": "no such endpoint"})
            return
        referred = self._referred_device_path(url)
        if referred is not None:
            self._respond_raw(http_response(307, b"", headers=[("Location", referred)]))
            return
        self.transport.pause_reading()
        self._handed_over = True
        if ui.is_ui_path(url.path):
            task = asyncio.get_running_loop().create_task(self._ui(method, url))
        else:
            task = asyncio.get_running_loop().create_task(self._api(method, url))
        self.server.track(task)

    async def _ui(self, method: str, url: urllib.parse.SplitResult) -> None:
        try:
            response = await ui.handle(
                self.server, method, url.path, url.query, self.request, self.source
            )
        except Exception:
            log.exception("internal error serving %s %s", method, url.path)
            response = http_response(500, error_page(500, "Relay error", "Internal error."))
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
            transport.close()

    def _hand_over(self, endpoint: asyncio.Protocol) -> None:
        assert self.transport is not None
        self._handed_over = True
        self._detach()
        self.transport.set_protocol(endpoint)
        endpoint.connection_made(self.transport)
        endpoint.data_received(bytes(self.buffer))
        self.buffer.clear()

    async def _guarded(self, path: str, coro: Coroutine[Any, Any, None]) -> None:
        """An upgrade that asks the store first: if that fails (a database error), the
        client gets a 500 and the connection ends, rather than waiting for ever."""
        try:
            await coro
        except Exception:
            log.exception("internal error serving %s", path)
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if transport.get_protocol() is self:
                self._respond(500, {"error": "internal", "message": "internal error"})
            else:  # an endpoint has it, half set up: end it
                transport.abort()

    async def _connect(self, query: str) -> None:
        assert self.transport is not None
        params = urllib.parse.parse_qs(query)
        device = (params.get("device") or [""])[0]
        service = (params.get("service") or [""])[0]
        ws = ServerProtocol(extensions=None, max_size=STREAM_MAX_MESSAGE)
        try:
            user = await self.server.authenticate_bearer(
                self.request.header("authorization"), "connect"
            )
        except api.ApiError as exc:
            stream = ClientStream(ws, self.server, "-", device, service)
            stream.audited = False
            self._hand_over(stream)
            stream.reject(exc.status, exc.code, exc.message)
            return
        if self.transport.is_closing():
            return
        try:
            tunnel = self.server.authorize_stream(user, device, service)
        except api.ApiError as exc:
            stream = ClientStream(ws, self.server, user.name, device, service)
            self._hand_over(stream)
            stream.reject(exc.status, exc.code, exc.message)
            return
        stream = ClientStream(ws, self.server, user.name, device, service)
        stream.token = _bearer(self.request.header("authorization"))
        self._hand_over(stream)
        if not stream.prepare():
            stream.reject(400, "bad_request", "invalid WebSocket upgrade request")
            return
        stream.open(tunnel)

    async def _client_tunnel(self) -> None:
        """A user's multiplexed tunnel (``hatchway forward``), authenticated up front."""
        assert self.transport is not None
        try:
            user = await self.server.authenticate_bearer(
                self.request.header("authorization"), "connect"
            )
        except api.ApiError as exc:
            self._respond(exc.status, {"error": exc.code, "message": exc.message})
            return
        if self.transport.is_closing():
            return
        ws = ServerProtocol(
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            extensions=None,
            max_size=TUNNEL_MAX_MESSAGE,
        )
        client_tunnel = ClientTunnel(ws, self.server, user)
        client_tunnel.token = _bearer(self.request.header("authorization"))
        self._hand_over(client_tunnel)
        self.transport.resume_reading()

    async def _api(self, method: str, url: urllib.parse.SplitResult) -> None:
        try:
            status, headers, payload = await asgi.call(
                self.server.api_app, method, url.path, url.query, self.request, self.source,
                self.server.port,
            )  # fmt: skip
        except Exception:
            log.exception("internal error serving %s %s", method, url.path)
            self._respond(500, {"error": "internal", "message": "internal error"})
            return
        transport = self.transport
        self._handed_over = True
        if transport is None or transport.is_closing():
            return
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
        for name, value in headers:
            key = name.decode("latin-1").lower()
            if key not in ("content-length", "connection", "cache-control"):
                lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
        lines += [
            f"Content-Length: {len(payload)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Connection: close",
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        transport.write(head if method == "HEAD" else head + payload)
        transport.close()

    def _respond(self, status: int, body: object) -> None:
        transport = self.transport
        self._handed_over = True
        if transport is None or transport.is_closing():
            return
        payload = json.dumps(body).encode() + b"\n"
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        transport.write(head + payload)
        transport.close()


def _bearer(header: str | None) -> str:
    return (header or "")[7:].strip()


__all__ = ["FrontDoor", "HttpRequest", "error_response"]
