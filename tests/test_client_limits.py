"""Limits the client and the agent keep against what they read: a relay (or something
posing as one) that answers slowly or without end, and local files that never end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from hatchway.client import relay_api, session
from hatchway.client.config import Login
from hatchway.client.session import SUBPROTOCOL
from hatchway.errors import RelayError
from hatchway.mux import events as ev
from hatchway.mux.session import DEFAULT_WINDOW, PROTOCOL_VERSION, Role
from hatchway.relay.pki import TlsFiles, ensure_tls_files
from hatchway.tunnel.endpoint import TunnelEndpoint
from tests.procs import HATCHWAY, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls_files(tmp_path_factory.mktemp("tls"), "localhost")


def _server_context(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.server_cert, files.server_key)
    return context


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Starts a one-connection TCP server on loopback that hands each accepted socket
    to ``serve`` in a thread; everything is closed at the end."""
    listeners: list[socket.socket] = []

    def start(serve: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(30)
        listeners.append(listener)

        def run() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                try:
                    serve(conn)
                except OSError:
                    pass

        threading.Thread(target=run, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()


def test_a_relay_that_never_answers_ends_the_call_at_its_deadline(
    raw_server: Callable[[Callable[[socket.socket], None]], int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Accepts and says nothing, not even its half of the TLS handshake: the call ends
    at the whole call's deadline, before any single read's timeout (15 s)."""
    monkeypatch.setattr(relay_api, "DEADLINE", 1.5)
    stop = threading.Event()
    port = raw_server(lambda conn: stop.wait(30))
    started = time.monotonic()
    try:
        with pytest.raises(RelayError) as caught:
            relay_api.call(f"https://127.0.0.1:{port}", "GET", "/api/v1/devices", ca_file=None)
    finally:
        stop.set()
    took = time.monotonic() - started
    assert caught.value.code == "timeout", caught.value
    assert str(caught.value) == f"the relay https://127.0.0.1:{port} did not answer within 2 s"
    assert took < relay_api.TIMEOUT, took


def test_a_relay_that_dribbles_its_answer_ends_the_call_at_its_deadline(
    raw_server: Callable[[Callable[[socket.socket], None]], int],
    monkeypatch: pytest.MonkeyPatch,
    tls: TlsFiles,
) -> None:
    """TLS goes through and the answer starts, then one byte of header every 0.2 s:
    no read ever waits long, yet the call ends at its deadline."""
    monkeypatch.setattr(relay_api, "DEADLINE", 2.0)
    context = _server_context(tls)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.recv(65536)  # the request
            tls_conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.wait(0.2):
                tls_conn.sendall(b"a")

    port = raw_server(serve)
    started = time.monotonic()
    try:
        with pytest.raises(RelayError) as caught:
            relay_api.call(
                f"https://localhost:{port}", "GET", "/api/v1/devices", ca_file=str(tls.ca_cert)
            )
    finally:
        stop.set()
    took = time.monotonic() - started
    assert caught.value.code == "timeout", caught.value
    assert 1.5 < took < 10, took


class _CirclingRelay(BaseHTTPRequestHandler):
    """Every page of the device list names the same next page."""

    requests: list[str] = []

    def do_GET(self) -> None:
        _CirclingRelay.requests.append(self.path)
        body = json.dumps(
            {"devices": [{"id": "dev1", "online": False, "services": []}], "next": "dev1"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_devices_stops_when_the_relays_pages_go_round(tls: TlsFiles, tmp_path: Path) -> None:
    """A relay whose device list names a page it already gave: ``hatchway devices`` says
    so and stops, instead of asking for ever and growing without end."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CirclingRelay)
    server.socket = _server_context(tls).wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _CirclingRelay.requests = []
    config = tmp_path / "config"
    config.mkdir(mode=0o700)
    login = {
        "server": f"https://localhost:{server.server_address[1]}",
        "user": "admin",
        "token": "t0ken",
        "ca_file": str(tls.ca_cert),
    }
    (config / "login.json").write_text(json.dumps(login))
    (config / "login.json").chmod(0o600)
    try:
        out = subprocess.run(
            [*HATCHWAY, "devices"],
            capture_output=True,
            env={**os.environ, "HATCHWAY_CONFIG_DIR": str(config)},
            timeout=30,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 1, out
    assert out.stderr.decode() == "hatchway: the relay's device list does not move on; stopped\n"
    assert _CirclingRelay.requests == ["/api/v1/devices", "/api/v1/devices?after=dev1"]


@pytest.mark.parametrize("flag", ["--secret-file", "--config"])
def test_agent_refuses_a_file_that_never_ends(flag: str) -> None:
    """``/dev/zero`` as the secret or the config: one sentence at once, not a read
    until memory runs out."""
    args = [*HATCHWAY, "agent", flag, "/dev/zero"]
    if flag == "--secret-file":
        args += [
            "--server",
            "https://localhost:1",
            "--device",
            "dev1",
            "--service",
            "a=localhost:1",
        ]
    out = subprocess.run(args, capture_output=True, timeout=30)
    err = out.stderr.decode()
    assert out.returncode != 0, err
    assert "Traceback" not in err, err
    what = "the secret file" if flag == "--secret-file" else "the config file"
    assert f"{what} /dev/zero is too large" in err, err
    assert len(err.strip().splitlines()) == 1, err


class _SilentRelay(TunnelEndpoint):
    """Welcomes a client tunnel, keeps it alive, never answers an OPEN; records the
    OPENs and the RESETs it receives."""

    def __init__(self, ws: ServerProtocol, seen: list[str]) -> None:
        super().__init__(ws, Role.RELAY, window=DEFAULT_WINDOW, max_channels=16)
        self.seen = seen

    def on_handshake(self, event: Request | Response) -> None:
        assert isinstance(self.ws, ServerProtocol) and isinstance(event, Request)
        self.ws.send_response(self.ws.accept(event))
        self.flush()
        self.mux.mark_established()
        self.start_keepalive()
        self.mux.send_hello({"version": PROTOCOL_VERSION, "role": "relay", "welcome": True})
        self.request_flush()

    def on_hello(self, info: dict[str, object]) -> None:
        pass

    def on_channel_requested(self, channel: int, service: str) -> None:
        self.seen.append(f"open {service}")

    def _dispatch_one(self, event: ev.Event) -> None:
        if isinstance(event, ev.ChannelReset):
            self.seen.append(f"reset {event.reason}")
        super()._dispatch_one(event)


async def test_forward_gives_up_on_an_open_the_relay_never_answers(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The relay keeps the client tunnel alive (so no dead-peer check ends it) but never
    answers the OPEN: the local connection is closed and the channel reset after
    OPEN_TIMEOUT, instead of waiting for ever."""
    monkeypatch.setattr(session, "OPEN_TIMEOUT", 1.0)
    seen: list[str] = []
    relays: list[_SilentRelay] = []
    loop = asyncio.get_running_loop()

    def relay_side() -> _SilentRelay:
        ws = ServerProtocol(subprotocols=[SUBPROTOCOL], extensions=None)  # type: ignore[list-item]
        relays.append(_SilentRelay(ws, seen))
        return relays[-1]

    server = await loop.create_server(relay_side, "127.0.0.1", 0, ssl=_server_context(tls))
    port = server.sockets[0].getsockname()[1]
    login = Login(f"https://localhost:{port}", "admin", "t0ken", str(tls.ca_cert))
    listening: asyncio.Future[int] = loop.create_future()
    forward = loop.create_task(
        session.serve_forward_mux(
            login, "dev1", "ssh", "127.0.0.1", 0, lambda _h, p: listening.set_result(p)
        )
    )
    try:
        local_port = await asyncio.wait_for(listening, 10)
        reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
        writer.write(b"hello")
        started = loop.time()
        try:
            assert await asyncio.wait_for(reader.read(100), 10) == b""
        except ConnectionResetError:
            pass
        took = loop.time() - started
        writer.close()
        async with asyncio.timeout(5):
            while "reset 0" not in seen:  # ResetReason.CANCEL
                await asyncio.sleep(0.05)
    finally:
        forward.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forward
        for relay in relays:  # the client's tunnel goes with it
            relay.abort()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.1)  # connection_lost everywhere
    assert seen == ["open dev1/ssh", "reset 0"]
    assert 0.5 < took < 5, took
    assert "dev1/ssh: the relay did not answer within 1 s" in capsys.readouterr().err


def _logged_in(tmp_path: Path, server: str, ca_file: Path) -> dict[str, str]:
    """An environment whose saved login names ``server``."""
    config = tmp_path / "config"
    config.mkdir(mode=0o700, exist_ok=True)
    login = {"server": server, "user": "admin", "token": "t0ken", "ca_file": str(ca_file)}
    (config / "login.json").write_text(json.dumps(login))
    (config / "login.json").chmod(0o600)
    environ = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "no_proxy")}
    return {**environ, "HATCHWAY_CONFIG_DIR": str(config)}


def test_the_client_says_whether_the_proxy_or_the_relay_failed(
    raw_server: Callable[[Callable[[socket.socket], None]], int], tls: TlsFiles, tmp_path: Path
) -> None:
    """With HTTPS_PROXY set, the client only ever dials the proxy: a refused or
    unknown proxy, or one that refuses the CONNECT, is named as the proxy; a port that
    does not speak TLS is named as such."""
    closed = free_port()
    environ = _logged_in(tmp_path, f"https://localhost:{closed}", tls.ca_cert)

    def refuse_connect(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")

    strict = raw_server(refuse_connect)
    cases = [
        (
            f"http://127.0.0.1:{closed}",
            f"cannot reach the proxy 127.0.0.1:{closed}: connection refused",
        ),
        (
            "http://noproxy.invalid:3128",
            "cannot reach the proxy noproxy.invalid:3128: host not found",
        ),
        (
            f"http://127.0.0.1:{strict}",
            f"the proxy 127.0.0.1:{strict} refused to connect to the relay: "
            "407 Proxy Authentication Required",
        ),
    ]
    for proxy, message in cases:
        out = subprocess.run(
            [*HATCHWAY, "devices"],
            capture_output=True,
            env={**environ, "HTTPS_PROXY": proxy},
            timeout=30,
        )
        assert (out.returncode, out.stderr.decode()) == (1, f"hatchway: {message}\n"), proxy
    # The stream path (proxy, forward, the agent) names an unknown proxy too.
    out = subprocess.run(
        [*HATCHWAY, "proxy", "dev1", "ssh"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={**environ, "HTTPS_PROXY": "http://noproxy.invalid:3128"},
        timeout=30,
    )
    assert (out.returncode, out.stderr.decode()) == (
        1,
        "hatchway: cannot reach the proxy noproxy.invalid:3128: host not found\n",
    )
    # No proxy, and a port that answers in plain text.
    plain = raw_server(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    environ = _logged_in(tmp_path, f"https://localhost:{plain}", tls.ca_cert)
    out = subprocess.run([*HATCHWAY, "devices"], capture_output=True, env=environ, timeout=30)
    assert out.returncode == 1
    assert out.stderr.decode() == (
        f"hatchway: cannot reach the relay https://localhost:{plain}: "
        "it does not speak TLS there (is that the relay's port?)\n"
    )
