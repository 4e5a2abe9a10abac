"""The relay's JSON API, from the CLI (blocking calls: the CLI does one at a time)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from hatchway.errors import RelayError, network_error_text
from hatchway.text import printable
from hatchway.tlsutil import client_context
from hatchway.tunnel.connect import ProxyConfig, proxy_from_environment, validate_relay_url

#: Each read or connect may take this long (seconds)...
TIMEOUT = 15.0
#: ... and a whole call, from the connect to the last byte of the answer, this long: a
#: relay (or proxy) that sends a byte now and then cannot hold the CLI for ever.
DEADLINE = 60.0
#: How http.client words a proxy's refusal of the CONNECT.
_TUNNEL_FAILED = "Tunnel connection failed:"
#: The largest answer read (a page of the device list is far smaller).
MAX_ANSWER = 16 * 1024 * 1024


class _Watchdog:
    """Shuts down the sockets of one call once its deadline passes: whatever urllib
    is waiting for then fails at once."""

    def __init__(self, seconds: float) -> None:
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class _RelayHandler(urllib.request.HTTPSHandler):
    """The opener's only way out: HTTPS to the relay, through a CONNECT tunnel of
    ``proxy`` when there is one (whatever NO_PROXY says: the caller has decided), with
    the proxy's credentials on the CONNECT and nowhere else. Its connections hand their
    socket to a watchdog (the socket to the proxy, when there is one: the tunnel runs
    over it)."""

    def __init__(
        self, context: ssl.SSLContext, watchdog: _Watchdog, proxy: ProxyConfig | None
    ) -> None:
        super().__init__(context=context)
        self._watchdog = watchdog
        self._proxy = proxy

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        watchdog = self._watchdog
        proxy = self._proxy

        class Connection(http.client.HTTPSConnection):
            def __init__(self, host: str, **kwargs: Any) -> None:
                if proxy is None:
                    super().__init__(host, **kwargs)
                    return
                # Dial the proxy and tunnel to the relay (``host``, the request's).
                super().__init__(proxy.host, proxy.port, **kwargs)
                auth = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else {}
                self.set_tunnel(host, headers=auth)

            def connect(self) -> None:
                # http.client's own steps, with each socket watched as soon as it exists:
                # the plain one (to the relay, or to the proxy for a CONNECT), then the
                # TLS one, before its handshake.
                sock = self._create_connection(  # type: ignore[attr-defined]
                    (self.host, self.port),
                    self.timeout,
                    self.source_address,  # type: ignore[attr-defined]
                )
                watchdog.watch(sock)
                self.sock = sock
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
                if self._tunnel_host:  # type: ignore[attr-defined]
                    self._tunnel()  # type: ignore[attr-defined]
                tls = self._context.wrap_socket(  # type: ignore[attr-defined]
                    sock,
                    server_hostname=self._tunnel_host or self.host,  # type: ignore[attr-defined]
                    do_handshake_on_connect=False,
                )
                self.sock = tls
                watchdog.watch(tls)
                tls.do_handshake()

        return self.do_open(Connection, req, context=self._context)  # type: ignore[attr-defined]


def _unreachable(server: str, proxy: ProxyConfig | None, exc: object) -> RelayError:
    """A call that got no answer from the relay, blaming the right one of the two."""
    text = str(exc)
    if proxy is not None:
        if text.startswith(_TUNNEL_FAILED):  # http.client: the proxy refused the CONNECT
            answer = text[len(_TUNNEL_FAILED) :].strip()
            return RelayError(
                0, "proxy", f"the proxy {proxy.address()} refused to connect to the relay: {answer}"
            )
        if isinstance(exc, ConnectionRefusedError | socket.gaierror):  # only the proxy is dialled
            return RelayError(
                0, "proxy", f"cannot reach the proxy {proxy.address()}: {network_error_text(exc)}"
            )
    if isinstance(exc, BaseException):
        text = network_error_text(exc)
    return RelayError(0, "unreachable", f"cannot reach the relay {server}: {text}")


def error_from_body(status: int, body: bytes) -> RelayError:
    try:
        data = json.loads(body)
        return RelayError(status, str(data["error"]), str(data["message"]))
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
        return RelayError(status, "http", f"the relay answered {status}: {text}")


def _opener(
    server: str, ca_file: str | None, watchdog: _Watchdog
) -> tuple[urllib.request.OpenerDirector, ProxyConfig | None]:
    """An opener that verifies the relay and goes through the proxy ``hatchway proxy``
    and ``forward`` use (``proxy_from_environment`` on the relay's host and port:
    HTTPS_PROXY unless NO_PROXY exempts the relay), and that proxy.

    That one decision is the route. The opener is built by hand, without urllib's
    defaults: no ProxyHandler (it makes its own NO_PROXY decision, port included, and
    sent Proxy-Authorization straight to the relay when the two disagreed), no
    redirect handler (the API never redirects: a 30x would replay the bearer token to
    another host, over http:// too) and no plain HTTP.
    """
    parts = validate_relay_url(server)
    proxy = proxy_from_environment(parts.hostname or "", parts.port or 443)
    context = client_context(Path(ca_file) if ca_file else None)
    opener = urllib.request.OpenerDirector()
    for handler in (
        _RelayHandler(context, watchdog, proxy),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPDefaultErrorHandler(),  # any status but 2xx: HTTPError
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener, proxy


def _redirected(url: str, exc: urllib.error.HTTPError) -> RelayError:
    """A 30x answer: the relay URL is not the relay's (or something in front of it
    redirects); the request is not repeated anywhere."""
    location = exc.headers.get("Location") if exc.headers is not None else None
    if not location:
        return RelayError(
            exc.code,
            "redirect",
            f"the relay answered with a redirect (HTTP {exc.code}); check the relay URL",
        )
    try:
        target = urllib.parse.urljoin(url, location)
    except ValueError:
        target = location
    return RelayError(
        exc.code,
        "redirect",
        f"the relay answered with a redirect to {printable(target)}; check the relay URL",
    )


def call(
    server: str,
    method: str,
    path: str,
    *,
    ca_file: str | None,
    token: str | None = None,
    body: dict[str, Any] | None = None,
) -> Any:
    """Call the API; RelayError (or ConfigError for a bad URL or proxy) with a sentence
    for a person when it fails."""
    with _Watchdog(DEADLINE) as watchdog:
        try:
            return _call(server, method, path, ca_file, token, body, watchdog)
        except RelayError:
            if watchdog.expired:
                raise RelayError(
                    0, "timeout", f"the relay {server} did not answer within {DEADLINE:.0f} s"
                ) from None
            raise


def _call(
    server: str,
    method: str,
    path: str,
    ca_file: str | None,
    token: str | None,
    body: dict[str, Any] | None,
    watchdog: _Watchdog,
) -> Any:
    opener, proxy = _opener(server, ca_file, watchdog)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.rstrip("/") + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            raw = response.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        with exc:
            if 300 <= exc.code < 400:
                raise _redirected(request.full_url, exc) from None
            raise error_from_body(exc.code, exc.read(64 * 1024)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise RelayError(
                0,
                "tls",
                f"the relay's certificate was refused: {reason.verify_message} (use --ca-file?)",
            ) from None
        raise _unreachable(server, proxy, reason) from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise _unreachable(server, proxy, exc) from None
    try:
        answer = json.loads(raw, object_hook=_Answer)
    except ValueError:
        raise RelayError(0, "bad_response", "the relay sent a response that is not JSON") from None
    if not isinstance(answer, dict):
        raise RelayError(0, "bad_response", "the relay's answer is not a JSON object")
    return answer


class _Answer(dict[str, Any]):
    """A JSON object from the relay: a field it lacks is the relay's mistake (or not a
    hatchway relay at that URL), said in a sentence rather than as a KeyError."""

    def __missing__(self, key: str) -> Any:
        raise RelayError(
            0,
            "bad_response",
            f"the relay's answer has no {printable(str(key), 64)!r} (is that a hatchway relay?)",
        )
