"""The web-access test environment: a relay (domain relay.localhost), an agent for
dev1 in front of a real web stack, and a byte recorder; dev2 exists but stays offline.

Services of dev1: ``http`` (nginx: static files, /app/ proxied to uvicorn), ``direct``
(uvicorn itself), ``record`` (a TCP server that keeps every byte it receives and
answers every request head 200), ``closed`` (a port nobody listens on) and ``hang`` (a
listener that never accepts: the channel stays opening).
Use the ``web`` fixture (module scope): ``from tests.webenv import web``.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import Env, Proc, free_port, serve_connections
from tests.webclient import DOMAIN, WebClient, set_cookie_value
from tests.webstack import WebStack, start_web_stack

DEVICE_COOKIE = "__Host-hatchway-device"
RELAY_COOKIE = "__Host-hatchway"


class Recorder:
    """A TCP server that records what it receives and answers each request head 200."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lock = threading.Lock()
        self.sock = serve_connections(self._handle)
        self.port = self.sock.getsockname()[1]

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        pending = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.received += data
                pending += data
                while b"\r\n\r\n" in pending:
                    _, pending = pending.split(b"\r\n\r\n", 1)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nrecorded")

    def take(self) -> bytes:
        with self.lock:
            data = bytes(self.received)
            self.received.clear()
        return data

    def close(self) -> None:
        self.sock.close()


class Blackhole:
    """A listening socket that never accepts, its backlog full: a connection to it
    neither succeeds nor fails until the connecting side gives up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(filler)

    def close(self) -> None:
        for sock in [self.sock, *self.fillers]:
            sock.close()


@dataclass
class Web:
    env: Env
    stack: WebStack
    client: WebClient
    relay: Proc
    relay_url: str
    password: str
    recorder: Recorder
    blackhole: Blackhole

    def grant_url(self, device: str = "dev1", *args: str) -> str:
        # --no-check: links to dev2 (offline) are wanted too, for its offline page.
        out = self.env.hatchway("open", device, "--print-url", "--no-check", *args)
        return out.stdout.decode().strip()

    def cookie(self, device: str = "dev1", service: str = "http") -> str:
        """A fresh device session, through the one-time-link handshake."""
        url = urllib.parse.urlsplit(self.grant_url(device, "--service", service))
        resp = self.client.request("GET", f"{url.path}?{url.query}", device=device)
        assert resp.status == 303, resp
        return f"{DEVICE_COOKIE}={set_cookie_value(resp, DEVICE_COOKIE)}"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """Device web UIs on subdomains (the default routing), with a 4 MiB cache."""
    yield from start_web_env(tmp_path_factory.mktemp("web"), ["--web-cache-mb", "4"])


@pytest.fixture(scope="module")
def web_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """Device web UIs under https://relay.localhost/d/DEVICE/ only."""
    yield from start_web_env(tmp_path_factory.mktemp("web-path"), ["--web-routing", "path"])


@pytest.fixture(scope="module")
def web_idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """Web sessions end after 4 s unused."""
    yield from start_web_env(tmp_path_factory.mktemp("web-idle"), ["--session-idle", "4"])


def start_web_env(root: Path, extra: list[str]) -> Iterator[Web]:
    env = Env(root)
    stack = start_web_stack(root)
    recorder = Recorder()
    blackhole = Blackhole()
    try:
        relay, port, password = env.start_relay(
            extra=["--domain", DOMAIN, "--web-max-body", str(300 << 20), *extra]
        )
        assert password is not None
        url = f"https://127.0.0.1:{port}"
        secret = env.add_device("dev1")
        env.add_device("dev2")  # exists, never online
        env.start_agent(
            url,
            "dev1",
            secret,
            [
                f"http=127.0.0.1:{stack.nginx_port}",
                f"direct=127.0.0.1:{stack.app_port}",
                f"record=127.0.0.1:{recorder.port}",
                f"closed=127.0.0.1:{free_port()}",
                f"hang=127.0.0.1:{blackhole.port}",
                f"https=tls://127.0.0.1:{stack.nginx.tls_port}?ca={stack.nginx.device_ca}"
                "&name=camera.local&host=camera.local",
                f"https-unverified=tls://127.0.0.1:{stack.nginx.tls_port}?host=camera.local",
                f"https-wrongname=tls://127.0.0.1:{stack.nginx.tls_port}?ca={stack.nginx.device_ca}",
                f"http-nohost=tls://127.0.0.1:{stack.nginx.tls_port}",
            ],
        )
        relay.wait_output(r"device dev1 connected")
        env.login(url, "admin", password)
        client = WebClient(port, env.ca_file)
        yield Web(env, stack, client, relay, url, password, recorder, blackhole)
    finally:
        env.stop_all()
        stack.close()
        recorder.close()
        blackhole.close()
