"""A closed connection's objects go when it closes, by reference counting.

Left in a reference cycle, a browser connection's proxy, parser and framer, or a
WebSocket's protocol (and with them their TLS state and buffers), would stay until the
garbage collector's next full collection: memory held for nothing on a relay with many
short connections, and a full collection pauses every other connection while it walks
them. These tests run a real relay, agent and client in this process, with the
collector switched off, and check that after each kind of connection nothing of it is
left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httptools
import pytest
from websockets.server import ServerProtocol

from hatchway import allocator
from hatchway.agent.config import AgentConfig, parse_service
from hatchway.agent.runner import Agent
from hatchway.client.config import Login
from hatchway.client.streams import LocalSide, StreamClient, serve_forward_streams
from hatchway.relay.server import RelayConfig, RelayServer
from hatchway.tlsutil import client_context
from hatchway.tunnel.connect import open_websocket
from hatchway.tunnel.websocket import WebSocketEndpoint
from hatchway.web.access import DEVICE_COOKIE
from tests.procs import free_port

DOMAIN = "relay.localhost"
PAGE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
DEVICE_HOST = f"dev1.{DOMAIN}"
#: The classes a browser connection makes on the relay, by module.
CONNECTION_CLASSES = {
    "hatchway.relay.frontdoor": {"FrontDoor", "HttpRequest"},
    "hatchway.web.proxy": {"WebProxy", "_Request", "_Repeat", "_Capture"},
    "hatchway.web.framing": {"ResponseFramer", "ResponseHead"},
}


def connection_objects() -> list[object]:
    found: list[object] = []
    for obj in gc.get_objects():
        kind = type(obj)
        if kind.__qualname__ in CONNECTION_CLASSES.get(kind.__module__, ()) or isinstance(
            obj, httptools.HttpRequestParser
        ):
            found.append(obj)
    return found


async def answer_each_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The device's web server: a short page for every request, kept alive."""
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(PAGE)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[RelayServer, str]]:
    """A relay, and dev1's agent exposing a web server (all in this process)."""
    config = RelayConfig(
        data_dir=tmp_path / "relay", host="127.0.0.1", port=free_port(), domain=DOMAIN
    )
    server = RelayServer(config)
    store = server.store
    store.add_user("alice", "admin", "Correct horse battery staple 7!")
    device_secret = store.add_device("dev1")
    secret = store.create_web_session(
        "alice", "device", timedelta(hours=1), device="dev1", service="http"
    )
    web = await asyncio.start_server(answer_each_request, "127.0.0.1", 0)
    web_port = web.sockets[0].getsockname()[1]
    await server.start()
    agent = Agent(
        AgentConfig(
            server=f"https://127.0.0.1:{config.port}",
            device="dev1",
            secret=device_secret,
            services={"http": parse_service(f"http=127.0.0.1:{web_port}")},
            ca_file=server.ca_file,
        )
    )
    running = asyncio.create_task(agent.run())
    try:
        deadline = time.monotonic() + 15
        while server.registry.get("dev1") is None:
            assert time.monotonic() < deadline and not running.done(), "dev1 did not connect"
            await asyncio.sleep(0.05)
        yield server, secret
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await server.shutdown()
        web.close()


async def connect(
    server: RelayServer, name: str = DEVICE_HOST
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.ca_file is not None
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    return await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx, server_hostname=name)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except (OSError, ssl.SSLError):
        pass  # the relay closed first


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """What is garbage now is collected; until the end, only reference counting frees."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def settle(count: Callable[[], int], before: int, timeout: float = 5.0) -> int:
    """``count()`` once it is back to ``before`` (the peer saw the close and let go),
    or whatever it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (now := count()) > before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return now


def browser_connection_objects() -> int:
    return len(connection_objects())


async def assert_browser_connection_gone(before: int) -> None:
    if await settle(browser_connection_objects, before) > before:
        left = sorted({type(o).__qualname__ for o in connection_objects()})
        raise AssertionError(f"alive without a collection (some of): {left}")


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {DEVICE_HOST}:443", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


CASES = {
    # The relay's own API: the front door answers alone.
    "relay API": (
        DOMAIN,
        b"GET /api/v1/devices HTTP/1.1\r\nHost: " + DOMAIN.encode() + b"\r\n"
        b"Connection: close\r\n\r\n",
    ),
    # A request cut in the middle of its head, then the browser goes.
    "half a head": (DEVICE_HOST, b"GET / HTTP/1.1\r\nHost: " + DEVICE_HOST.encode()),
    # A device's page without a session: the proxy answers with the way to log in.
    "no session": (DEVICE_HOST, get("/", "Connection: close")),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_closed_connection_leaves_nothing_behind(
    relay: tuple[RelayServer, str], case: str
) -> None:
    server, _secret = relay
    name, request = CASES[case]
    with collector_off():
        before = browser_connection_objects()
        reader, writer = await connect(server, name)
        writer.write(request)
        if request.endswith(b"\r\n\r\n"):
            answer = await asyncio.wait_for(reader.read(), 10)  # until the relay closes
            assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        else:
            await writer.drain()
            await asyncio.sleep(0.2)  # the relay has read it
        await close(writer)
        await assert_browser_connection_gone(before)


async def test_keep_alive_requests_through_the_proxy_leave_nothing_behind(
    relay: tuple[RelayServer, str],
) -> None:
    """With the device's session: requests to the device (the later ones repeat the
    first's header lines), then the browser closes its keep-alive connection."""
    server, secret = relay
    cookie = f"Cookie: {DEVICE_COOKIE}={secret}"
    with collector_off():
        before = browser_connection_objects()
        reader, writer = await connect(server)
        statuses = []
        for path in ("/a", "/b", "/c"):
            writer.write(get(path, cookie))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            statuses.append(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), 10)
        assert statuses == [b"200"] * 3
        assert browser_connection_objects() > before  # the proxy is there while it is open
        await close(writer)
        await assert_browser_connection_gone(before)


def test_freeze_startup_collects_first_then_freezes() -> None:
    """Garbage from before is collected, not frozen; what is alive is frozen."""

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    del a, b
    try:
        frozen = allocator.freeze_startup()
        assert ref() is None
        assert frozen == gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def server_protocols() -> int:
    return sum(isinstance(obj, ServerProtocol) for obj in gc.get_objects())


class _Endpoint(WebSocketEndpoint):
    """A client stream that keeps nothing."""

    def on_binary(self, data: bytes) -> None:
        pass


@pytest.mark.parametrize("end", ["close", "abort"])
async def test_a_client_websocket_to_the_relay_leaves_nothing_behind(
    relay: tuple[RelayServer, str], end: str
) -> None:
    """``open_websocket`` (the agent's tunnel, the client's streams): once the
    connection is over, closed or cut, its WebSocket protocol object goes with it,
    on both sides."""
    server, _secret = relay
    assert server.ca_file is not None
    token = server.store.create_token("alice", "test", None)
    url = f"wss://127.0.0.1:{server.port}/api/v1/connect?device=dev1&service=http"
    with collector_off():
        relay_side = server_protocols()
        endpoint = await open_websocket(
            url,
            _Endpoint,
            ssl_context=client_context(server.ca_file),
            headers=[("Authorization", f"Bearer {token}")],
        )
        protocol = weakref.ref(endpoint.ws)
        if end == "close":
            endpoint.close(1000)
        else:  # each side's parser fails on the missing close frame (an EOFError)
            assert endpoint.transport is not None
            endpoint.transport.abort()
        del endpoint  # the transport keeps it until the connection is lost

        def client_side() -> int:
            return int(protocol() is not None)

        assert await settle(client_side, 0) == 0, "the WebSocket protocol outlived its connection"
        assert await settle(server_protocols, relay_side) == relay_side, (
            "the relay's side outlived the connection"
        )


async def test_a_forwarded_connection_leaves_nothing_behind_in_the_client(
    relay: tuple[RelayServer, str],
) -> None:
    """``hatchway forward --no-mux``: a WebSocket per local connection; once the
    local connection is closed, its stream and local side are gone."""
    server, _secret = relay
    assert server.ca_file is not None
    login = Login(
        server=f"https://127.0.0.1:{server.port}",
        user="alice",
        token=server.store.create_token("alice", "test", None),
        ca_file=str(server.ca_file),
    )
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    forwarding = asyncio.create_task(
        serve_forward_streams(
            login, "dev1", "http", "127.0.0.1", 0, lambda host, port: listening.set_result(port)
        )
    )

    def alive() -> int:
        return sum(isinstance(obj, (StreamClient, LocalSide)) for obj in gc.get_objects())

    try:
        with collector_off():
            port = await asyncio.wait_for(listening, 10)
            before = alive()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(get("/a"))
            answer = await asyncio.wait_for(reader.readexactly(len(PAGE)), 10)
            assert answer == PAGE
            assert alive() > before  # the stream is there while the connection is
            writer.close()
            await writer.wait_closed()
            assert await settle(alive, before) == before, "the client's stream outlived it"
    finally:
        forwarding.cancel()
        await asyncio.gather(forwarding, return_exceptions=True)
