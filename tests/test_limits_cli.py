"""Limits on unauthenticated connections, and what the CLI tells its user.

- The relay ends a TLS handshake that does not finish within 10 s
  (``relay/server.py``, ``ssl_handshake_timeout``) and a device tunnel that does not
  authenticate within 10 s of its upgrade (``relay/tunnels.py``, GOAWAY ``TIMEOUT``).
  Neither limit can be set through the relay's config or CLI, so the tests wait for
  the real 10 s.
- ``hatchway proxy`` and ``hatchway forward`` word an unreachable service and a
  service that never answers as ``relay/streams.py`` says. Made deterministic in a
  network namespace that has only ``lo``, where the relay, the agent and the client
  all run: an address in 10.0.0.0/8 gives ENETUNREACH at once, and a port whose SYNs
  an iptables rule drops runs into the agent's 10 s connect timeout
  (``agent/runner.py``, ``LOCAL_CONNECT_TIMEOUT``). (A blackhole route would not do:
  ``connect()`` fails at once with EINVAL.)
- ``hatchway forward --local-port N --bind ADDR`` listens there and only there.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import OPEN
from websockets.uri import parse_uri

from hatchway.mux.frames import Frame, FrameParser, FrameType, GoAwayReason, decode_reason
from tests.conftest import require_root_tools
from tests.netns import (
    NAME_PREFIX,
    CommandError,
    destroy_namespace,
    remove_stale_namespaces,
    sh,
)
from tests.procs import Env, Proc, device_online, free_port, relay_health, wait_for
from tests.test_integration import RawWebSocket
from tests.test_nat_e2e import logs_on_failure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: The relay's TLS handshake limit and its tunnel authentication limit (both 10 s):
#: a connection must be gone within these bounds of its start.
EARLIEST, LATEST = 8.0, 20.0
DEVICE = "dev1"
#: No route in a namespace that has only lo: ENETUNREACH.
UNREACHABLE_ADDR = "10.254.0.1"
#: SYNs to 127.0.0.1 on this port are dropped in the namespace: a connect timeout.
STUCK_PORT = 9

_namespaces = itertools.count()


# --- the relay on loopback, for the two handshake limits ----------------------------------


@dataclass
class HostRelay:
    env: Env
    relay: Proc
    port: int


@pytest.fixture(scope="module")
def host_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostRelay]:
    env = Env(tmp_path_factory.mktemp("host-relay"))
    try:
        relay, port, _ = env.start_relay()
        yield HostRelay(env, relay, port)
    finally:
        env.stop_all()


def client_hello(ca_file: Path) -> bytes:
    """The first flight of a real TLS client: its ClientHello record."""
    context = ssl.create_default_context(cafile=str(ca_file))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 100, hello[:16]  # a handshake record
    return hello


def wait_all_closed(
    socks: dict[str, socket.socket], started: float, timeout: float
) -> dict[str, float]:
    """Read (and drop) whatever the peer sends until it closes each socket; return, by
    name, how long after ``started`` each one was closed."""
    closed: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks):
        open_ = {name: sock for name, sock in socks.items() if name not in closed}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"still open after {timeout} s: {sorted(open_)}")
        readable, _, _ = select.select(list(open_.values()), [], [], remaining)
        for name, sock in open_.items():
            if sock not in readable:
                continue
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                closed[name] = time.monotonic() - started
    return closed


def test_relay_drops_a_tls_handshake_that_does_not_finish_in_10_s(host_relay: HostRelay) -> None:
    """One client sends nothing after connecting, one half a ClientHello: the relay
    closes both after about 10 s, and serves a proper client meanwhile and after."""
    port, ca_file = host_relay.port, host_relay.env.ca_file
    hello = client_hello(ca_file)
    started = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    partial = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        partial.sendall(hello[: len(hello) // 2])
        # The slow clients do not hold the relay up.
        assert relay_health(port, ca_file)
        closed = wait_all_closed({"silent": silent, "partial": partial}, started, LATEST + 5)
    finally:
        silent.close()
        partial.close()
    print(f"\nclosed after: {', '.join(f'{k} {v:.1f} s' for k, v in sorted(closed.items()))}")
    for name, after in closed.items():
        assert EARLIEST <= after <= LATEST, f"{name} closed after {after:.1f} s"
    assert relay_health(port, ca_file)


class LateWebSocket(RawWebSocket):
    """A RawWebSocket whose upgrade request goes out ``delay`` seconds after the TLS
    handshake."""

    def __init__(self, port: int, ca_file: Path, delay: float) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        tcp = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.tls = context.wrap_socket(tcp, server_hostname="localhost")
        time.sleep(delay)
        self.ws = ClientProtocol(
            parse_uri(f"wss://localhost:{port}/api/v1/tunnel"),
            subprotocols=["hatchway.v1"],  # type: ignore[list-item]
        )
        self.ws.send_request(self.ws.connect())
        self.flush()


def never_authenticate(port: int, ca_file: Path, delay: float) -> tuple[float, float]:
    """Upgrade to /api/v1/tunnel (``delay`` s after the TLS handshake), read the relay's
    HELLO challenge, never answer. Checks the GOAWAY TIMEOUT and the close 1008; returns
    when they came and when the connection was gone, in seconds from the connect."""
    started = time.monotonic()
    with LateWebSocket(port, ca_file, delay) as raw:
        raw.tls.settimeout(LATEST + 5)
        first = raw.next_frame()
        assert raw.ws.state is OPEN and raw.ws.subprotocol == "hatchway.v1"
        assert first.opcode is Opcode.BINARY
        (challenge,) = FrameParser().feed(first.data)
        assert challenge.type is FrameType.HELLO and challenge.channel == 0
        assert json.loads(challenge.payload)["nonce"]

        frames: list[Frame] = []
        close: WsFrame | None = None
        while close is None:
            message = raw.next_frame()
            if message.opcode is Opcode.CLOSE:
                close = message
            else:
                assert message.opcode is Opcode.BINARY, message
                frames.extend(FrameParser().feed(message.data))
        goaway_after = time.monotonic() - started
        assert [f.type for f in frames] == [FrameType.GOAWAY], frames
        assert frames[0].channel == 0
        reason, text = decode_reason(frames[0].payload, "GOAWAY")
        assert reason == GoAwayReason.TIMEOUT and text == "handshake timed out"
        assert raw.ws.close_rcvd is not None and raw.ws.close_rcvd.code == 1008

        # The relay closes the connection itself (it aborts it 1 s after the GOAWAY if
        # the client does not answer the close).
        raw.tls.settimeout(10)
        try:
            while raw.tls.recv(65536):
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass
        gone_after = time.monotonic() - started
    return goaway_after, gone_after


def test_relay_sends_goaway_timeout_to_a_tunnel_that_never_authenticates(
    host_relay: HostRelay,
) -> None:
    """TLS and the WebSocket upgrade to /api/v1/tunnel go through, the relay sends its
    HELLO challenge, the client never answers: GOAWAY TIMEOUT, close 1008, and the
    connection is gone. The 10 s count from the TCP accept, whatever the phases took: a
    client that sends its upgrade request 6 s after the TLS handshake still hears the
    GOAWAY about 10 s after it connected, not 10 s after the upgrade."""
    port, ca_file = host_relay.port, host_relay.env.ca_file
    with ThreadPoolExecutor(2) as pool:
        prompt = pool.submit(never_authenticate, port, ca_file, 0.0)
        late = pool.submit(never_authenticate, port, ca_file, 6.0)
        timings = {"prompt": prompt.result(), "late upgrade": late.result()}
    for name, (goaway_after, gone_after) in timings.items():
        print(f"\n{name}: GOAWAY after {goaway_after:.1f} s, gone after {gone_after:.1f} s")
        assert EARLIEST <= goaway_after <= LATEST, f"{name}: GOAWAY after {goaway_after:.1f} s"
        assert gone_after - goaway_after <= 5
    # One budget from the accept: the late upgrade did not get 10 s more (it would
    # have heard the GOAWAY at ~16 s).
    assert timings["late upgrade"][0] < 6.0 + EARLIEST
    host_relay.relay.wait_output(r"tunnel handshake timed out", timeout=5)
    assert relay_health(port, ca_file)


def test_refused_connections_are_logged_once_per_interval(host_relay: HostRelay) -> None:
    """Past its 64 pending connections a source is refused at once; a source that
    connects in a loop gets one log line per interval, not one per connection."""
    port = host_relay.port
    refused = "too many pending connections, refused"
    before = host_relay.relay.output().count(refused)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(64)]
    try:
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                try:
                    assert sock.recv(1) == b""  # closed at once, nothing said
                except ConnectionResetError:
                    pass
        time.sleep(0.5)
        lines = [line for line in host_relay.relay.output().splitlines() if refused in line]
        assert len(lines) - before == 1, lines[before:]
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: relay_health(port, host_relay.env.ca_file), 15, "the relay to serve again")


# --- relay, agent and client in a namespace with only lo -----------------------------------


@dataclass
class Isolated:
    env: Env
    ns: str
    relay: Proc
    relay_port: int
    echo_port: int

    def connect(
        self, host: str, port: int, payload: bytes = b"", timeout: float = 30.0
    ) -> dict[str, str]:
        """Connect from inside the namespace; see ``_CLIENT``."""
        out = subprocess.run(
            [*self.env.prefix, sys.executable, "-c", _CLIENT, host, str(port),
             payload.decode(), str(timeout)],
            capture_output=True, text=True, timeout=timeout + 20,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        result: dict[str, str] = json.loads(out.stdout)
        return result


#: Connect, send the payload (if any) then EOF, read until the peer ends the stream.
_CLIENT = """
import json, socket, sys
host, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
try:
    conn = socket.create_connection((host, port), timeout=timeout)
except ConnectionRefusedError:
    print(json.dumps({"result": "refused"}))
    sys.exit()
chunks, end = [], "eof"
with conn:
    if payload:
        conn.sendall(payload.encode())
        conn.shutdown(socket.SHUT_WR)
    try:
        while data := conn.recv(65536):
            chunks.append(data)
    except ConnectionResetError:
        end = "reset"
print(json.dumps({"result": "connected", "data": b"".join(chunks).decode(), "end": end}))
"""

#: A TCP echo service on the namespace's loopback.
_ECHO = """
import socket, threading
server = socket.create_server(("127.0.0.1", 0))
print("echo listening on", server.getsockname()[1], flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


def drop_syns(prefix: list[str], port: int) -> None:
    """Drop TCP to 127.0.0.1:port inside the namespace (iptables, else iptables-legacy)."""
    errors = []
    for tool in ("iptables", "iptables-legacy"):
        rule = ["-p", "tcp", "-d", "127.0.0.1", "--dport", str(port), "-j", "DROP"]
        try:
            sh([*prefix, tool, "-w", "-A", "OUTPUT", *rule])
        except (CommandError, OSError) as exc:
            errors.append(str(exc))
        else:
            return
    raise CommandError("cannot install the DROP rule: " + "; ".join(errors))


@pytest.fixture(scope="module")
def isolated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Isolated]:
    require_root_tools("ip", "iptables", "ss")
    remove_stale_namespaces()
    ns = f"{NAME_PREFIX}{os.getpid()}x{next(_namespaces)}-lim"
    prefix = ["ip", "netns", "exec", ns]
    env = Env(tmp_path_factory.mktemp("isolated"), prefix=prefix)
    try:
        try:
            sh(["ip", "netns", "add", ns])
        except CommandError as exc:
            if "not permitted" in str(exc) or "Permission denied" in str(exc):
                pytest.skip(f"cannot create network namespaces here: {exc}")
            raise
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        drop_syns(prefix, STUCK_PORT)
        with logs_on_failure(env):
            relay, port, password = env.start_relay()
            assert password is not None
            echo = env.spawn("echo", [sys.executable, "-c", _ECHO])
            echo_port = int(echo.wait_output(r"echo listening on (\d+)").group(1))
            url = f"https://localhost:{port}"
            env.start_agent(
                url,
                DEVICE,
                env.add_device(DEVICE),
                [
                    f"echo=127.0.0.1:{echo_port}",
                    f"unreach={UNREACHABLE_ADDR}:22",
                    f"stuck=127.0.0.1:{STUCK_PORT}",
                ],
            )
            env.login(url, "admin", password)
            wait_for(lambda: device_online(env, DEVICE), 30, f"{DEVICE} online", 0.2)
        yield Isolated(env, ns, relay, port, echo_port)
    finally:
        env.stop_all()
        destroy_namespace(ns)


def lines(proc: Proc) -> list[str]:
    return proc.output().splitlines()


@pytest.mark.netns
def test_cli_says_why_a_service_is_unreachable_or_timed_out(isolated: Isolated) -> None:
    """``proxy`` and ``forward`` (multiplexed, the default) each print one line for a
    service the device has no route to (at once) and for one whose SYNs are dropped
    (after the agent's 10 s connect timeout), and no traceback anywhere."""
    env = isolated.env
    unreachable = f"hatchway: {DEVICE} cannot reach unreach: network is unreachable"
    timed_out = f"hatchway: {DEVICE} timed out connecting to stuck"
    with logs_on_failure(env), ThreadPoolExecutor(max_workers=2) as pool:
        # The two that wait for the agent's connect timeout, at the same time.
        started = time.monotonic()
        stuck_proxy = pool.submit(
            env.hatchway, "proxy", DEVICE, "stuck", input=b"", check=False, timeout=60
        )
        stuck_forward, stuck_port = env.start_forward(DEVICE, "stuck")
        stuck_client: Future[dict[str, str]] = pool.submit(
            isolated.connect, "127.0.0.1", stuck_port
        )
        try:
            # Unreachable: at once.
            out = env.hatchway("proxy", DEVICE, "unreach", input=b"", check=False, timeout=30)
            assert out.returncode == 1
            assert out.stdout == b""
            assert out.stderr.decode() == unreachable + "\n"
            forward, port = env.start_forward(DEVICE, "unreach")
            try:
                result = isolated.connect("127.0.0.1", port)
                assert result["result"] == "connected" and result["data"] == "", result
                forward.wait_output(re.escape(unreachable), timeout=10)
                assert lines(forward) == [f"listening on 127.0.0.1:{port}", unreachable]
            finally:
                forward.stop()

            # Timed out.
            out = stuck_proxy.result(timeout=60)
            proxy_after = time.monotonic() - started
            assert out.returncode == 1
            assert out.stdout == b""
            assert out.stderr.decode() == timed_out + "\n"
            result = stuck_client.result(timeout=60)
            assert result["result"] == "connected" and result["data"] == "", result
            stuck_forward.wait_output(re.escape(timed_out), timeout=10)
            assert lines(stuck_forward) == [f"listening on 127.0.0.1:{stuck_port}", timed_out]
            print(f"\nproxy to the stuck service gave up after {proxy_after:.1f} s")
        finally:
            stuck_forward.stop()
    # The agent saw the two failures for what they were.
    agent = next(p for p in env.procs if p.name == f"agent-{DEVICE}").output()
    assert f"unreach ({UNREACHABLE_ADDR}:22): network is unreachable" in agent
    assert f"stuck (127.0.0.1:{STUCK_PORT}): timed out" in agent
    for proc in env.procs:
        assert "Traceback" not in proc.output(), proc.name


@pytest.mark.netns
def test_forward_listens_on_the_given_address_and_port(isolated: Isolated) -> None:
    """``--local-port N --bind 127.0.0.2``: printed, served there, and not on
    127.0.0.1:N (nor on any other address: the namespace is ours alone)."""
    env = isolated.env
    port = free_port("127.0.0.2")
    assert port not in (isolated.relay_port, isolated.echo_port)
    with logs_on_failure(env):
        forward = env.spawn(
            "forward-bind",
            [sys.executable, "-m", "hatchway", "forward", DEVICE, "echo",
             "--local-port", str(port), "--bind", "127.0.0.2"],
        )  # fmt: skip
        try:
            forward.wait_output(r"listening on ")
            assert lines(forward)[0] == f"listening on 127.0.0.2:{port}"
            assert isolated.connect("127.0.0.2", port, b"through the bind address") == {
                "result": "connected",
                "data": "through the bind address",
                "end": "eof",
            }
            assert isolated.connect("127.0.0.1", port, b"x") == {"result": "refused"}
            # Nothing else listens on that port in the namespace either.
            listeners = sh([*env.prefix, "ss", "-Htln", f"sport = :{port}"]).split()
            assert f"127.0.0.2:{port}" in listeners
            assert [w for w in listeners if w.endswith(f":{port}")] == [f"127.0.0.2:{port}"]
        finally:
            forward.stop()
        assert "Traceback" not in forward.output()
