"""How client streams end, with real relay, agent and client processes on loopback:
half-closes from the device, local clients that leave early, and streams cut short
by a relay or an agent that dies."""

from __future__ import annotations

import base64
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.procs import (
    HATCHWAY,
    Env,
    Proc,
    device_online,
    join_sockets,
    serve_connections,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


class Service:
    """A TCP service on loopback. ``echo``: echoes until EOF, then half-closes.
    ``banner``: sends a line, half-closes at once, then reads until EOF and keeps
    what it read in ``received``. Counts the connections it holds open."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.open = 0
        self.accepted = 0
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self.sock = serve_connections(self._handle)
        self.port = self.sock.getsockname()[1]

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.open += 1
            self.accepted += 1
        try:
            with conn:
                conn.settimeout(60)
                if self.mode == "banner":
                    conn.sendall(b"hello\n")
                    conn.shutdown(socket.SHUT_WR)
                    self.received.append(_read_all(conn))
                    return
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                self.open -= 1

    def close(self) -> None:
        self.sock.close()


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while data := conn.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


@dataclass
class Running:
    env: Env
    relay: Proc
    agent: Proc
    echo: Service
    banner: Service


@pytest.fixture
def running(env: Env) -> Iterator[Running]:
    echo, banner = Service("echo"), Service("banner")
    relay, port, password = env.start_relay()
    assert password is not None
    url = f"https://localhost:{port}"
    services = [f"echo=127.0.0.1:{echo.port}", f"banner=127.0.0.1:{banner.port}"]
    agent = env.start_agent(url, "dev1", env.add_device("dev1"), services)
    env.login(url, "admin", password)
    wait_for(lambda: device_online(env, "dev1"), 20, "dev1 online")
    try:
        yield Running(env, relay, agent, echo, banner)
    finally:
        echo.close()
        banner.close()


def _proxy(env: Env, service: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*HATCHWAY, "proxy", "dev1", service],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env.environ(),
    )


def test_proxy_passes_the_devices_half_close_and_keeps_sending(running: Running) -> None:
    with _proxy(running.env, "banner") as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        # The device's EOF reaches standard output...
        assert proc.stdout.read() == b"hello\n", proc.stderr.read()
        # ...and standard input still flows to the device until it ends.
        payload = b"".join(b"after the device's eof %d\n" % i for i in range(200))
        time.sleep(0.5)
        proc.stdin.write(payload)
        proc.stdin.close()
        assert proc.wait(20) == 0, proc.stderr.read()
        assert proc.stderr.read() == b""
    wait_for(lambda: len(running.banner.received) == 1, 10, "the service to read to EOF")
    assert running.banner.received == [payload]


def _nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("mode", [["--no-mux"], []], ids=["stream-per-connection", "mux"])
def test_forward_releases_clients_that_leave_before_the_stream_opened(
    running: Running, mode: list[str]
) -> None:
    fwd, port = running.env.start_forward("dev1", "echo", extra=mode)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"x")  # the relay connection (mux) is up, and so is one stream
        assert conn.recv(1) == b"x"
    wait_for(lambda: running.echo.open == 0, 10, "the first connection to end")
    base, accepted = _nfds(fwd.popen.pid), running.echo.accepted
    for _ in range(20):
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset, before the stream or channel could open
    # Each still reached the device (the reset is seen once reading starts)...
    wait_for(lambda: running.echo.accepted == accepted + 20, 20, "the streams to open")
    # ...and nothing is left behind: not on the device, not in the forwarding process.
    wait_for(lambda: running.echo.open == 0, 20, "the device's connections to close")
    wait_for(lambda: _nfds(fwd.popen.pid) <= base, 20, "forward's descriptors to be freed")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"still works")
        assert conn.recv(100) == b"still works"


@pytest.mark.parametrize("victim", ["relay", "agent"])
def test_proxy_reports_a_stream_cut_short(running: Running, victim: str) -> None:
    with _proxy(running.env, "echo") as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ping\n"
        (running.relay if victim == "relay" else running.agent).stop(signal.SIGKILL)
        assert proc.wait(30) == 1
        err = proc.stderr.read().decode()
    expected = (
        "the connection to the relay was lost" if victim == "relay" else "the tunnel to dev1 closed"
    )
    assert err == f"hatchway: {expected}\n"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("mode", [["--no-mux"], []], ids=["stream-per-connection", "mux"])
@pytest.mark.parametrize("victim", ["relay", "agent"])
def test_forward_resets_the_local_connection_when_the_stream_breaks(
    running: Running, mode: list[str], victim: str
) -> None:
    fwd, port = running.env.start_forward("dev1", "echo", extra=mode)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"abc")
        assert conn.recv(10) == b"abc"
        (running.relay if victim == "relay" else running.agent).stop(signal.SIGKILL)
        with pytest.raises(ConnectionResetError):
            conn.recv(10)  # not b"": the application must not take it for a clean end
    said = (
        "the connection to the relay was lost" if victim == "relay" else "the tunnel to dev1 closed"
    )
    fwd.wait_output(f"hatchway: dev1/echo: {said}\n", timeout=10)
    assert "Traceback" not in fwd.output()


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that wants ``Basic alice:S3cret-pw``."""

    AUTH = "Basic " + base64.b64encode(b"alice:S3cret-pw").decode()

    def __init__(self) -> None:
        self.tunnels = 0
        self.sock = serve_connections(self._handle)
        self.port = self.sock.getsockname()[1]

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            lines = head.decode("latin-1").split("\r\n")
            if f"Proxy-Authorization: {self.AUTH}" not in lines:
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                return
            host, _, port = lines[0].split()[1].rpartition(":")
            with socket.create_connection((host.strip("[]"), int(port))) as upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self.tunnels += 1
                join_sockets(conn, upstream)

    def close(self) -> None:
        self.sock.close()


def test_client_goes_through_https_proxy_and_never_shows_its_password(
    running: Running,
) -> None:
    proxy = ConnectProxy()
    environ = running.env.environ()
    environ["HTTPS_PROXY"] = f"http://alice:S3cret-pw@127.0.0.1:{proxy.port}"

    def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*HATCHWAY, *args], input=stdin, capture_output=True, env=environ, timeout=30
        )

    assert b"dev1" in run("devices").stdout  # the API through the proxy
    assert run("proxy", "dev1", "echo", stdin=b"via the proxy").stdout == b"via the proxy"
    assert proxy.tunnels == 2
    environ["HTTPS_PROXY"] = f"http://alice:Wrong-pw@127.0.0.1:{proxy.port}"
    for args in (["devices"], ["proxy", "dev1", "echo"]):
        out = run(*args)
        err = out.stderr.decode()
        assert out.returncode == 1 and "407" in err, err
        assert "Wrong-pw" not in err and "Traceback" not in err
    proxy.close()
