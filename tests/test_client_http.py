"""Where the client's API calls go and what they carry: through the proxy hatchway
chose or straight to the relay, never the proxy's credentials to the relay, and never
the bearer token anywhere a redirect points."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hatchway.client import relay_api
from hatchway.errors import RelayError
from hatchway.relay.pki import TlsFiles, ensure_tls_files
from hatchway.tunnel.connect import ProxyConfig, proxy_from_environment
from tests.procs import HATCHWAY, free_port, join_sockets, serve_connections

pytestmark = pytest.mark.timeout(60)

PROXY_AUTH = "Basic " + base64.b64encode(b"alice:S3cret-pw").decode()
DEVICES = b'{"devices": []}'


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls_files(tmp_path_factory.mktemp("tls"), "localhost")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def _read_head(conn: socket.socket) -> str:
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            break
        head += data
    return head.decode("latin-1")


def _read_body(conn: socket.socket, head: str) -> None:
    """Read (and drop) the body ``head`` announces with its Content-Length, if any: a
    head read with ``_read_head`` may already hold some of it."""
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    got = len(head.partition("\r\n\r\n")[2].encode("latin-1"))
    while got < length and (data := conn.recv(65536)):
        got += len(data)


def _response(status: str, extra: bytes = b"", body: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


@dataclass
class Server:
    """A loopback server that records each request head (over TLS when ``tls`` is
    given) and answers ``answer``."""

    answer: bytes
    tls: TlsFiles | None = None
    heads: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._context: ssl.SSLContext | None = None
        if self.tls is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        self.sock = serve_connections(self._handle)
        self.port = int(self.sock.getsockname()[1])

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self._context is not None:
                conn = self._context.wrap_socket(conn, server_side=True)
        except OSError:
            conn.close()
            return
        with conn:
            try:
                head = _read_head(conn)
                self.heads.append(head)
                _read_body(conn, head)  # all of it: closing on unread bytes resets
                conn.sendall(self.answer)
            except OSError:
                pass


class RecordingProxy:
    """An HTTP CONNECT proxy on loopback that records each CONNECT head and tunnels."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.sock = serve_connections(self._handle)
        self.port = int(self.sock.getsockname()[1])

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = _read_head(conn)
            self.heads.append(head)
            host, _, port = head.split("\r\n")[0].split()[1].rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port))) as upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                join_sockets(conn, upstream)


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    listeners: list[socket.socket] = []
    yield listeners
    for sock in listeners:
        sock.close()


def _relay(tls: TlsFiles, closing: list[socket.socket], answer: bytes) -> Server:
    relay = Server(answer, tls)
    closing.append(relay.sock)
    return relay


def _devices(relay: Server, tls: TlsFiles) -> object:
    return relay_api.call(
        f"https://localhost:{relay.port}",
        "GET",
        "/api/v1/devices",
        ca_file=str(tls.ca_cert),
        token="t0ken",
    )


def test_the_call_goes_through_the_proxy_hatchway_chose_even_where_urllib_would_not(
    tls: TlsFiles, closing: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """hatchway's decision is the route: urllib's own NO_PROXY check (here: everything
    exempt) is not made, and the proxy's credentials go on the CONNECT only."""
    relay = _relay(tls, closing, _response("200 OK", body=DEVICES))
    proxy = RecordingProxy()
    closing.append(proxy.sock)
    chosen = ProxyConfig("127.0.0.1", proxy.port, PROXY_AUTH)
    monkeypatch.setattr(relay_api, "proxy_from_environment", lambda host, port=None: chosen)
    monkeypatch.setenv("HTTPS_PROXY", f"http://alice:S3cret-pw@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "*")
    assert _devices(relay, tls) == {"devices": []}
    assert len(proxy.heads) == 1
    connect = proxy.heads[0].split("\r\n")
    assert connect[0] == f"CONNECT localhost:{relay.port} HTTP/1.0"
    assert f"Proxy-Authorization: {PROXY_AUTH}" in connect
    assert len(relay.heads) == 1
    lines = relay.heads[0].split("\r\n")
    assert lines[0] == "GET /api/v1/devices HTTP/1.1"
    assert f"Host: localhost:{relay.port}" in lines
    assert "Authorization: Bearer t0ken" in lines
    assert not [line for line in lines if line.lower().startswith("proxy-")], lines


def test_no_proxy_chosen_means_a_direct_call_whatever_the_environment(
    tls: TlsFiles, closing: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = _relay(tls, closing, _response("200 OK", body=DEVICES))
    monkeypatch.setattr(relay_api, "proxy_from_environment", lambda host, port=None: None)
    monkeypatch.setenv("HTTPS_PROXY", f"http://alice:S3cret-pw@127.0.0.1:{free_port()}")
    assert _devices(relay, tls) == {"devices": []}
    assert len(relay.heads) == 1
    assert "proxy-" not in relay.heads[0].lower()


def test_no_proxy_with_a_port_never_sends_the_proxy_password_to_the_relay(
    tls: TlsFiles, closing: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """NO_PROXY=HOST:PORT: urllib's check (with the port) and hatchway's (without) had
    disagreed, and the call went straight to the relay with Proxy-Authorization. Now
    the relay on that port is exempt for hatchway too, as for the streams
    (``proxy_from_environment`` with the port), and an entry for another port is not."""
    relay = _relay(tls, closing, _response("200 OK", body=DEVICES))
    proxy = RecordingProxy()
    closing.append(proxy.sock)
    monkeypatch.setenv("HTTPS_PROXY", f"http://alice:S3cret-pw@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", f"localhost:{relay.port}")
    assert proxy_from_environment("localhost", relay.port) is None  # what the streams do
    assert _devices(relay, tls) == {"devices": []}
    assert proxy.heads == []
    assert len(relay.heads) == 1
    assert "proxy-" not in relay.heads[0].lower()
    assert base64.b64encode(b"alice:S3cret-pw").decode() not in relay.heads[0]
    # An entry for another port: through the proxy, its password on the CONNECT only.
    monkeypatch.setenv("NO_PROXY", f"localhost:{free_port()}")
    assert _devices(relay, tls) == {"devices": []}
    assert len(proxy.heads) == 1
    assert f"Proxy-Authorization: {PROXY_AUTH}" in proxy.heads[0].split("\r\n")
    assert len(relay.heads) == 2
    assert "proxy-" not in relay.heads[1].lower()


@pytest.mark.parametrize("status", ["301 Moved Permanently", "302 Found", "307 Temporary Redirect"])
def test_a_redirect_is_refused_and_the_token_goes_nowhere(
    tls: TlsFiles, closing: list[socket.socket], status: str
) -> None:
    other = Server(_response("200 OK", body=b"{}"))
    closing.append(other.sock)
    target = f"http://127.0.0.1:{other.port}/x"
    relay = _relay(tls, closing, _response(status, f"Location: {target}\r\n".encode()))
    with pytest.raises(RelayError) as info:
        _devices(relay, tls)
    assert str(info.value) == (
        f"the relay answered with a redirect to {target}; check the relay URL"
    )
    assert (info.value.status, info.value.code) == (int(status.split()[0]), "redirect")
    assert len(relay.heads) == 1
    assert other.heads == []


def test_a_redirects_location_is_shown_inert_and_whole(
    tls: TlsFiles, closing: list[socket.socket]
) -> None:
    relay = _relay(tls, closing, _response("302 Found", b"Location: /login\x1b[31mred\r\n"))
    with pytest.raises(RelayError) as info:
        _devices(relay, tls)
    assert str(info.value) == (
        f"the relay answered with a redirect to https://localhost:{relay.port}/login"
        "\\x1b[31mred; check the relay URL"
    )
    relay = _relay(tls, closing, _response("303 See Other"))
    with pytest.raises(RelayError) as info:
        _devices(relay, tls)
    assert str(info.value) == "the relay answered with a redirect (HTTP 303); check the relay URL"
    assert len(relay.heads) == 1


@pytest.mark.parametrize(
    ("no_proxy", "port", "proxied"),
    [
        ("relay.example.com:8443", 8443, False),
        ("relay.example.com:8443", 9443, True),
        ("relay.example.com:443", None, False),  # wss:// without a port: 443
        ("relay.example.com", 9443, False),  # a host alone: any port
    ],
)
def test_streams_take_the_route_of_the_api_calls(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str, port: int | None, proxied: bool
) -> None:
    """`forward` and `proxy` decide on the proxy as the API calls do, the relay's port
    included: a NO_PROXY entry HOST:PORT exempts both or neither."""
    from hatchway.client.streams import relay_proxy

    monkeypatch.setenv("HTTPS_PROXY", "http://alice:S3cret-pw@127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    netloc = "relay.example.com" + (f":{port}" if port else "")
    assert (relay_proxy(f"wss://{netloc}/api/v1/client") is not None) is proxied
    assert (proxy_from_environment("relay.example.com", port or 443) is not None) is proxied


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"hello": "world"}', "the relay's answer has no 'token' (is that a hatchway relay?)"),
        (b'["token"]', "the relay's answer is not a JSON object"),
    ],
)
def test_login_to_a_server_that_is_no_hatchway_relay_says_so(
    tls: TlsFiles, closing: list[socket.socket], tmp_path: Path, body: bytes, says: str
) -> None:
    """A relay URL that answers JSON of another shape: one sentence, no traceback."""
    relay = _relay(tls, closing, _response("200 OK", body=body))
    environ = {**os.environ, "HATCHWAY_CONFIG_DIR": str(tmp_path / "config")}
    out = subprocess.run(
        [*HATCHWAY, "login", f"https://localhost:{relay.port}", "--user", "admin",
         "--password-stdin", "--ca-file", str(tls.ca_cert)],
        input=b"Vivid-Lantern-482!\n", capture_output=True, timeout=30, env=environ,
    )  # fmt: skip
    assert (out.returncode, out.stdout) == (1, b"")
    assert out.stderr.decode() == f"hatchway: {says}\n"
