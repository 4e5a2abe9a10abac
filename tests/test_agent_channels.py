"""Whatever goes wrong when the agent connects a service, the relay's channel request
is answered with the reason; and what a proxy or a resolver says is put in words.

The agent's ``AgentTunnel._connect`` runs for real (real sockets, the real resolver, on
loopback) with a stand-in for the tunnel that notes the answer; the proxy tests run a
proxy on loopback; one test runs a relay, an agent and the client.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hatchway.agent.config import ServiceTarget
from hatchway.agent.runner import AgentTunnel
from hatchway.mux.frames import OpenFailure
from hatchway.relay.pki import ensure_tls_files
from hatchway.tlsutil import client_context
from hatchway.tunnel.connect import ConnectError, ProxyConfig, _open_via_proxy, open_websocket
from tests.procs import HATCHWAY, Env, device_online, wait_for

pytestmark = pytest.mark.timeout(60)


class Answered:
    """What ``_connect`` uses of its tunnel: the channel is still requested, and the
    answer is noted."""

    def __init__(self) -> None:
        self.closed = False
        self.mux = SimpleNamespace(is_requested=lambda channel: True)
        self.rejected: list[tuple[int, OpenFailure, str]] = []

    def reject(self, channel: int, reason: OpenFailure, message: str) -> None:
        self.rejected.append((channel, reason, message))

    def attach(self, channel: int, binding: Any) -> None:
        raise AssertionError("the service must not be connected")


async def connect(target: ServiceTarget) -> list[tuple[int, OpenFailure, str]]:
    tunnel = Answered()
    await asyncio.wait_for(AgentTunnel._connect(tunnel, 7, target), 20)  # type: ignore[arg-type]
    return tunnel.rejected


async def test_a_host_name_idna_cannot_encode_is_rejected_not_left_unanswered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Checked at start; were one to get through, getaddrinfo's UnicodeError (no
    OSError) killed the task and the user waited 15 s for the relay's timeout."""
    for host in ("foo..bar", "a" * 64 + ".example"):
        assert await connect(ServiceTarget("bad", host, 22)) == [
            (7, OpenFailure.UNREACHABLE, "bad: invalid host name")
        ]
    assert "Traceback" not in caplog.text


async def test_a_service_name_that_does_not_resolve_is_host_not_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gaierror's errno is an EAI code: os.strerror made "Unknown error -2" of it."""

    def no_such_host(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    assert await connect(ServiceTarget("nohost", "nosuchhost.invalid", 80)) == [
        (7, OpenFailure.UNREACHABLE, "nohost: host not found")
    ]


async def test_a_service_ca_that_is_no_pem_rejects_the_channel(tmp_path: Path) -> None:
    """The agent loads it at start (test_agent_config.py); were it to fail later, the
    ConfigError killed the task and the channel went unanswered."""
    notpem = tmp_path / "notpem.pem"
    notpem.write_text("this is not a certificate\n")
    rejected = await connect(ServiceTarget("badca", "127.0.0.1", 9, True, notpem))
    assert len(rejected) == 1
    channel, reason, message = rejected[0]
    assert (channel, reason) == (7, OpenFailure.UNREACHABLE)
    assert message.startswith(f"badca: cannot load CA certificates from {notpem}: ")


async def test_an_unexpected_error_is_logged_once_and_rejects_the_channel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(asyncio.BaseEventLoop, "create_connection", broken)
    with caplog.at_level(logging.WARNING, logger="hatchway.agent"):
        assert await connect(ServiceTarget("web", "127.0.0.1", 80)) == [
            (7, OpenFailure.UNREACHABLE, "web: agent error")
        ]
    records = [r for r in caplog.records if r.name == "hatchway.agent"]
    assert [r.getMessage() for r in records] == ["channel 7: web (127.0.0.1:80): unexpected error"]
    assert records[0].exc_info is not None


# --- names the resolver cannot encode, past the start checks ---------------------------


async def test_open_websocket_says_invalid_host_name() -> None:
    """getaddrinfo's UnicodeError went past ``except OSError``: the agent logged a
    traceback at every attempt."""
    ctx = client_context(None)
    with pytest.raises(ConnectError) as info:
        await open_websocket("wss://relay..example.com:8443/t", lambda ws: None, ssl_context=ctx)  # type: ignore[arg-type,return-value]
    assert str(info.value) == "cannot reach relay..example.com:8443: invalid host name"
    with pytest.raises(ConnectError) as info:
        await open_websocket(
            "wss://127.0.0.1:8443/t",
            lambda ws: None,  # type: ignore[arg-type,return-value]
            ssl_context=ctx,
            proxy=ProxyConfig("proxy..corp", 3128),
        )
    assert str(info.value) == "cannot reach the proxy proxy..corp:3128: invalid host name"


# --- what the proxy answers to CONNECT --------------------------------------------------


@pytest.fixture
async def proxy_answers() -> AsyncIterator[tuple[list[bytes], int]]:
    """A proxy on loopback that answers each CONNECT with the next of the answers."""
    answers: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield answers, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


FORGED = (
    b"HTTP/1.1 403 Forbidden\n2026-01-01 00:00:00,000 INFO hatchway.agent: connected to "
    b"https://relay.example.com:8443 as dev1\x1b[31mRED\x1b[0m\r\n\r\n"
)


@pytest.mark.parametrize(
    "head",
    [
        FORGED,
        b"HTTP/1.1 403 Forbidden\x1b[2J\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nVia: x\ry\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nVia: \x00\r\n\r\n",
        b"HTTP/1.1 403 \x7f\r\n\r\n",
    ],
)
async def test_a_connect_response_with_control_characters_is_refused(
    proxy_answers: tuple[list[bytes], int], head: bytes
) -> None:
    answers, port = proxy_answers
    answers.append(head)
    with pytest.raises(ConnectError) as info:
        await _open_via_proxy(ProxyConfig("127.0.0.1", port), "relay.example.com", 8443)
    assert str(info.value) == (
        "the proxy's CONNECT response is malformed (control characters in its head)"
    )


async def test_a_refusing_status_line_is_shown_inert(
    proxy_answers: tuple[list[bytes], int],
) -> None:
    answers, port = proxy_answers
    answers.append(b"HTTP/1.1 407 Proxy \x9b2J\xe9 Auth\tRequired\r\nX: \xe9\r\n\r\n")
    answers.append(b"HTTP/1.1 403 " + b"x" * 400 + b"\r\n\r\n")
    proxy = ProxyConfig("127.0.0.1", port)
    with pytest.raises(ConnectError) as info:
        await _open_via_proxy(proxy, "relay.example.com", 8443)
    assert str(info.value) == (
        "the proxy refused CONNECT: HTTP/1.1 407 Proxy \\x9b2J\xe9 Auth\\tRequired"
    )
    with pytest.raises(ConnectError) as info:
        await _open_via_proxy(proxy, "relay.example.com", 8443)
    assert str(info.value) == "the proxy refused CONNECT: HTTP/1.1 403 " + "x" * 187


async def test_a_tab_in_a_proxys_field_is_no_control_character(
    proxy_answers: tuple[list[bytes], int],
) -> None:
    answers, port = proxy_answers
    answers.append(b"HTTP/1.1 200 Connection established\r\nVia:\t1.1 proxy\r\n\r\n")
    sock = await _open_via_proxy(ProxyConfig("127.0.0.1", port), "relay.example.com", 8443)
    sock.close()


def test_the_agents_log_gets_one_line_per_attempt_from_a_forging_proxy(
    env: Env, tmp_path: Path
) -> None:
    """The reviewer's proof: the forged line and the escape reached the log as they
    were, two log lines per attempt and red text."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        listener.settimeout(0.2)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                conn.recv(4096)
                conn.sendall(FORGED)

    threading.Thread(target=serve, daemon=True).start()
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    environ = env.environ()
    environ["HTTPS_PROXY"] = f"http://127.0.0.1:{port}"
    environ.pop("NO_PROXY", None)
    environ.pop("no_proxy", None)
    try:
        agent = env.start_agent(
            "https://relay.example.com:8443",
            "dev1",
            secret,
            ["ssh=localhost:22"],
            ca_file=ensure_tls_files(tmp_path / "tls", "localhost").ca_cert,
            env=environ,
        )
        agent.wait_output("malformed", timeout=20)
        agent.stop()
    finally:
        listener.close()
    lines = agent.output().splitlines()
    assert "\x1b" not in agent.output() and "RED" not in agent.output()
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert any(
        line.endswith(
            "WARNING hatchway.agent: cannot connect: the proxy's CONNECT response is "
            "malformed (control characters in its head); reconnecting in "
            + line.rpartition("reconnecting in ")[2]
        )
        for line in lines
    )


# --- the whole path: relay, agent, client ----------------------------------------------


def test_the_user_reads_host_not_found_for_a_service_that_does_not_resolve(env: Env) -> None:
    _, port, password = env.start_relay()
    assert password is not None
    secret = env.add_device("dev1")
    server = f"https://localhost:{port}"
    agent = env.start_agent(server, "dev1", secret, ["nohost=nosuchhost.invalid:80"])
    env.login(server, "admin", password)
    wait_for(lambda: device_online(env, "dev1"), 20, "dev1 online")
    started = time.monotonic()
    out = subprocess.run(
        [*HATCHWAY, "proxy", "dev1", "nohost"],
        input=b"",
        capture_output=True,
        timeout=30,
        env=env.environ(),
    )
    assert time.monotonic() - started < 10  # answered, not the relay's 15 s timeout
    assert out.returncode == 1
    err = out.stderr.decode()
    # .invalid never resolves (RFC 6761); where no resolver answers at all, the
    # resolver's own words follow "name lookup failed".
    assert err == "hatchway: dev1 cannot reach nohost: host not found\n" or re.fullmatch(
        r"hatchway: dev1 cannot reach nohost: name lookup failed \([^)]+\)\n", err
    ), err
    agent.wait_output(r"channel \d+: nohost \(nosuchhost\.invalid:80\): ")
