"""Outbound WebSocket connections to the relay: DNS, HTTP CONNECT proxy, TLS, handshake.

Stdlib and websockets only: the agent uses this on small devices.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import re
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from hatchway.errors import ConfigError, HatchwayError, network_error_text
from hatchway.text import printable
from hatchway.tunnel.websocket import WebSocketEndpoint

MAX_PROXY_RESPONSE = 16 * 1024
#: What a proxy's response head may not hold outside its CRLF line ends: C0 controls
#: but HTAB (bare CR and LF, ESC), and DEL.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

E = TypeVar("E", bound=WebSocketEndpoint)


class ConnectError(HatchwayError):
    """The relay could not be reached or refused the WebSocket handshake."""

    def __init__(
        self, message: str, status: int | None = None, body: bytes = b"", auth_refused: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        #: The relay refused the device's credentials (its GOAWAY said so).
        self.auth_refused = auth_refused


def _redacted(url: str) -> str:
    """``url`` fit for a message or a log: whatever precedes its last ``@`` (a user name
    and password) becomes ``***``. Only a plain ``SCHEME://`` in front is kept: what looks
    like one further on may be part of a password."""
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url)
    prefix = scheme.group() if scheme else ""
    rest = url[len(prefix) :]
    _, at, hostpart = rest.rpartition("@")
    if at:
        rest = "***@" + hostpart
    shown = f"{prefix}{rest}"
    return shown if shown.isprintable() else repr(shown)[1:-1]


def _port_of(parts: urllib.parse.SplitResult, what: str) -> int | None:
    try:
        port = parts.port
    except ValueError:
        # After the user name and password, if any: ProxyConfig.parse refuses a URL
        # where they could reach past their "@".
        port_text = parts.netloc.rpartition("@")[2].rpartition("]")[2].rpartition(":")[2]
        if port_text.isascii() and port_text.isdigit():
            raise ConfigError(f"{what}: port {port_text} out of range (1-65535)") from None
        if "@" in parts.netloc:  # never the text then: it could be part of a password
            raise ConfigError(f"{what}: invalid port (expected 1-65535)") from None
        raise ConfigError(f"{what}: invalid port {port_text!r}") from None
    if port == 0:
        raise ConfigError(f"{what}: port 0 out of range (1-65535)")
    return port


def check_host_name(host: str, what: str) -> str:
    """``host`` if it is a host name that name lookups and TLS take (or an IPv4
    address): letters, digits, '.', '-' and '_', in dot-separated labels of 1 to 63
    characters and 253 in all once IDNA-encoded (one final dot allowed). ConfigError
    with a sentence otherwise, not a UnicodeError from getaddrinfo at every connect."""
    if not host:
        raise ConfigError(f"{what}: no host")
    valid = all(ch.isalnum() or ch in "._-" for ch in host)
    if valid:
        try:
            encoded = (host[:-1] if host.endswith(".") else host).encode("idna")
        except UnicodeError:
            valid = False
        else:
            valid = 0 < len(encoded) <= 253 and all(
                0 < len(label) <= 63 for label in encoded.split(b".")
            )
    if not valid:
        raise ConfigError(
            f"{what}: invalid host name {host!r} (expected dot-separated labels of 1-63 "
            "letters, digits, '-' or '_', at most 253 characters in all)"
        )
    return host


def _check_host(host: str | None, netloc: str, what: str) -> str:
    if not host:
        raise ConfigError(f"{what}: no host")
    if netloc.rpartition("@")[2].startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what}: invalid IPv6 address {host!r}") from None
        return host
    return check_host_name(host, what)


def _split(url: str, what: str) -> urllib.parse.SplitResult:
    if any(not ch.isprintable() or ch.isspace() for ch in url):
        raise ConfigError(f"{what}: a URL may not contain spaces or control characters")
    try:
        return urllib.parse.urlsplit(url)
    except ValueError:  # the only one: "Invalid IPv6 URL"
        raise ConfigError(f"{what}: invalid IPv6 address (expected [ADDRESS]:PORT)") from None


@dataclass(frozen=True)
class ProxyConfig:
    host: str
    port: int
    authorization: str | None = None

    @classmethod
    def parse(cls, url: str, source: str = "proxy URL") -> ProxyConfig:
        """``http://[USER:PASSWORD@]HOST[:PORT]`` (port 3128 by default). Messages
        never include the user name or password."""
        if not isinstance(url, str):
            raise ConfigError(f'{source}: expected a string like "http://HOST:PORT"')
        what = f"{source} {_redacted(url)}"
        full = url if "://" in url else f"http://{url}"
        parts = _split(full, what)
        # An "@" outside the authority (a "/", "?" or "#" in the user name or password
        # ended it early) or two in it (an "@" in the user name or password): where the
        # user name and password end is a guess, and a wrong guess would send them to,
        # or show them as, a host or a port. Checked before anything is shown.
        at_signs = parts.netloc.count("@")
        if at_signs > 1 or full.count("@") != at_signs:
            raise ConfigError(
                f"{what}: percent-encode the user name and password ('@' as %40, ':' as "
                "%3A, '/' as %2F, '?' as %3F, '#' as %23)"
            )
        if parts.scheme not in ("http", ""):
            raise ConfigError(
                f"{what}: unsupported proxy scheme {parts.scheme!r}: use http://HOST:PORT "
                "(an HTTP CONNECT proxy)"
            )
        host = _check_host(parts.hostname, parts.netloc, what)
        port = _port_of(parts, what)
        auth = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return cls(host, port or 3128, auth)

    def address(self) -> str:
        """``HOST:PORT`` (IPv6 in brackets), without credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def no_proxy_exempts(host: str, port: int | None = None) -> bool:
    """Whether ``NO_PROXY``/``no_proxy`` exempts ``host`` (a name or an IP address,
    IPv6 without brackets) reached on ``port``. urllib's rules: ``*`` exempts every host;
    an entry ``example.com`` (or ``.example.com``) exempts that host and the names under
    it, on any port; an entry with a port, ``relay.example.com:8443`` (``[::1]:8443``),
    only on that port."""
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if bypass(host):
        return True
    if port is None:
        return False
    # urllib compares the entries with both the bare host and HOST:PORT: an entry with
    # a port matches only the latter, and only with that port.
    return bool(bypass(f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))


def proxy_from_environment(host: str, port: int | None = None) -> ProxyConfig | None:
    """``HTTPS_PROXY``/``https_proxy``, unless ``NO_PROXY`` exempts ``host`` (on
    ``port``: give it, or entries of the form ``HOST:PORT`` never match).
    Raises ConfigError, naming the variable, when it is not a usable proxy URL."""
    for name in ("HTTPS_PROXY", "https_proxy"):
        url = os.environ.get(name)
        if url:
            break
    else:
        return None
    if no_proxy_exempts(host, port):
        return None
    return ProxyConfig.parse(url, name)


def validate_relay_url(server: str, what: str = "relay URL") -> urllib.parse.SplitResult:
    """Check a relay URL (``https://HOST[:PORT]`` or ``wss://...``) and return its parts;
    ConfigError with a sentence for a person otherwise."""
    if not isinstance(server, str):
        raise ConfigError(f"{what} must be a string like https://relay.example.com:8443")
    shown = f"{what} {_redacted(server)}"
    parts = _split(server, shown)
    if "@" in server:  # checked first: nothing of a user name or password is shown
        raise ConfigError(f"{shown}: a relay URL carries no user name or password")
    if parts.scheme not in ("https", "wss"):
        raise ConfigError(f"{shown} must start with https:// or wss:// (TLS is required)")
    _check_host(parts.hostname, parts.netloc, shown)
    _port_of(parts, shown)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{shown}: expected https://HOST[:PORT], without a path or query")
    return parts


def relay_websocket_url(server: str, path: str) -> str:
    """``https://relay:8443`` or ``wss://relay:8443`` → ``wss://relay:8443/<path>``."""
    parts = validate_relay_url(server)
    return urllib.parse.urlunsplit(("wss", parts.netloc, path, "", ""))


async def _open_via_proxy(proxy: ProxyConfig, host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:  # not the relay's fault: say whose
        raise ConnectError(
            f"cannot reach the proxy {proxy.address()}: {network_error_text(exc)}"
        ) from None
    except ValueError:  # UnicodeError: a name IDNA cannot encode (checked at start)
        raise ConnectError(f"cannot reach the proxy {proxy.address()}: invalid host name") from None
    last: OSError | None = None
    sock: socket.socket | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
            break
        except OSError as exc:
            sock.close()
            sock, last = None, exc
    if sock is None:
        reason = network_error_text(last) if last is not None else "no address"
        raise ConnectError(f"cannot reach the proxy {proxy.address()}: {reason}")
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy.authorization:
            head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        await loop.sock_sendall(sock, (head + "\r\n").encode())
        response = bytearray()
        while b"\r\n\r\n" not in response:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ConnectError("the proxy closed the connection during CONNECT")
            response += chunk
            if len(response) > MAX_PROXY_RESPONSE:
                raise ConnectError("the proxy's CONNECT response is too large")
        answer = bytes(response[: response.index(b"\r\n\r\n")])
        if _CONTROL.search(answer.replace(b"\r\n", b"")):
            # A bare line feed or an escape sequence would forge log lines and drive
            # the terminal of whoever reads them.
            raise ConnectError(
                "the proxy's CONNECT response is malformed (control characters in its head)"
            )
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        fields = status_line.split(" ", 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or fields[1] != "200":
            raise ConnectError(f"the proxy refused CONNECT: {printable(status_line.strip(), 200)}")
        if response.index(b"\r\n\r\n") + 4 != len(response):
            raise ConnectError("the proxy sent data before the TLS handshake")
        return sock
    except BaseException:
        sock.close()
        raise


async def open_websocket(
    url: str,
    factory: Callable[[ClientProtocol], E],
    *,
    ssl_context: ssl.SSLContext,
    proxy: ProxyConfig | None = None,
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    max_size: int = 1024 * 1024,
    timeout: float = 10.0,
) -> E:
    """Connect, complete the WebSocket handshake and return the endpoint.

    Raises ``ConnectError`` (with the HTTP status and body when the relay answered
    with an error) and ``TimeoutError``.
    """
    try:
        wsuri = parse_uri(url)
    except ValueError:  # UnicodeError: a name IDNA cannot encode (checked at start)
        raise ConnectError("invalid host name in the relay URL") from None
    loop = asyncio.get_running_loop()
    ws = ClientProtocol(
        wsuri,
        subprotocols=[Subprotocol(s) for s in subprotocols] or None,
        extensions=None,
        max_size=max_size,
    )

    def make() -> E:
        return factory(ws)

    async def establish() -> E:
        try:
            if proxy is not None:
                sock = await _open_via_proxy(proxy, wsuri.host, wsuri.port)
                _, endpoint = await loop.create_connection(
                    make, sock=sock, ssl=ssl_context, server_hostname=wsuri.host
                )
            else:
                _, endpoint = await loop.create_connection(
                    make, wsuri.host, wsuri.port, ssl=ssl_context
                )
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(
                f"the relay's TLS certificate was refused: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake with the relay failed: {exc.reason}") from exc
        except OSError as exc:
            raise ConnectError(
                f"cannot reach {wsuri.host}:{wsuri.port}: {network_error_text(exc)}"
            ) from exc
        except ValueError:  # UnicodeError: a name IDNA cannot encode (checked at start)
            raise ConnectError(
                f"cannot reach {printable(wsuri.host, 253)}:{wsuri.port}: invalid host name"
            ) from None
        assert endpoint.handshake is not None  # a client endpoint
        try:
            response = await endpoint.handshake
        except BaseException:
            endpoint.abort()
            raise
        if ws.handshake_exc is not None:
            endpoint.abort()
            raise ConnectError(
                f"the relay refused the connection: {ws.handshake_exc}",
                response.status_code,
                bytes(response.body or b""),
            )
        return endpoint

    request_headers = Headers(headers)
    # ClientProtocol builds its request from these when connection_made runs.
    ws_connect = ws.connect

    def connect_with_headers() -> object:
        request = ws_connect()
        request.headers.update(request_headers)
        return request

    ws.connect = connect_with_headers  # type: ignore[method-assign,assignment]
    try:
        return await asyncio.wait_for(establish(), timeout)
    except TimeoutError:
        raise ConnectError(f"timed out connecting to {wsuri.host}:{wsuri.port}") from None
    except ConnectionError as exc:
        raise ConnectError(f"connection to {wsuri.host}:{wsuri.port} lost: {exc}") from exc
    finally:
        # The request was built (or never will be). The wrapper holds ws's own method:
        # left on ws, the two would outlive the connection in a reference cycle.
        del ws.connect
