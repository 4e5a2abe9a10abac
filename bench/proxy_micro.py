#!/usr/bin/env python3
"""Micro-benchmark: the Python cost of one small request through the relay's web path.

Run by hand from the repository root with the project's venv::

    .venv/bin/python bench/proxy_micro.py

In one process, no sockets, no TLS: a ``WebProxy`` with a stub transport (writes are
counted and dropped) reads a request, hands its rebuilt head to a real ``Multiplexer``
(the relay's end of a device tunnel), and the response comes back as a DATA frame
through the multiplexer, the tunnel's dispatch and ``deliver`` (the response framer and
the head rewriting). The session check hits the proxy's per-connection state, as on a
keep-alive connection. Each row is the best of several timed rounds, in µs per
operation, next to a floor measured in the same run: a protocol that only writes what
it reads. The figures move with the machine: compare rows of one run, and runs side by
side (before and after a change). The last rows time a WebSocket endpoint alone (the
tunnel's framing on either side), with and without its shorter path for whole binary
messages. See bench/README.md ("Web access").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tunnel_bench as tb
from websockets.client import ClientProtocol
from websockets.http11 import Request
from websockets.protocol import Protocol as WsProtocol
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from hatchway.mux import events as ev
from hatchway.mux.frames import MAX_WINDOW
from hatchway.mux.session import Multiplexer, Role
from hatchway.tunnel.endpoint import TUNNEL_MAX_MESSAGE
from hatchway.tunnel.websocket import WebSocketEndpoint
from hatchway.web.framing import ResponseFramer
from hatchway.web.proxy import WebProxy

HOST = b"dev1.relay.localhost:8443"
SECRET = "hwd_I_sR23T5gMnOBn5A12vhoFJjQ-X1oDXJbwVC_qrn3lM"
#: What wrk sends in web_bench.py: two fields.
WRK_REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: " + HOST + b"\r\n"
    b"Cookie: __Host-hatchway-device=" + SECRET.encode() + b"\r\n\r\n"
)
#: A browser's navigation request (Chromium's fields): fifteen fields.
BROWSER_REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="156", "Not-A.Brand";v="24"\r\nsec-ch-ua-mobile: ?0\r\n'
    b'sec-ch-ua-platform: "Linux"\r\nUpgrade-Insecure-Requests: 1\r\n'
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/156.0.0.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Sec-Fetch-Site: none\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-User: ?1\r\n"
    b"Sec-Fetch-Dest: document\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: __Host-hatchway-device=" + SECRET.encode() + b"\r\n\r\n"
)
BODY = b"x" * 615  # the size of web_bench.py's small page
#: An answer as nginx writes it for that page.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 07:43:46 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 615\r\n"
    b"Last-Modified: Mon, 30 Nov 2026 07:43:08 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6b0d290c-267"\r\nAccept-Ranges: bytes\r\n\r\n' + BODY
)


class Transport:
    """Counts and drops what is written; always open and reading."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def writelines(self, pieces: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True

    def resume_reading(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Floor(asyncio.Protocol):
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Tunnel:
    """The parts of a ``TunnelEndpoint`` a binding uses; flushing is left out."""

    write_paused = False

    def __init__(self, mux: Multiplexer) -> None:
        self.mux = mux
        self.bindings: dict[int, Any] = {}

    def request_flush(self) -> None:
        pass


def open_pair() -> tuple[Multiplexer, Multiplexer, int]:
    """A relay and an agent multiplexer with one open channel."""
    relay = Multiplexer(Role.RELAY, window=1 << 20, max_channels=100)
    # The agent's window is the relay's credit for requests, which nothing here hands
    # back: the largest window keeps every request on the path that sends it (a spent
    # window would queue them behind a backlog instead).
    agent = Multiplexer(Role.AGENT, window=MAX_WINDOW, max_channels=100)
    relay.mark_established()
    agent.mark_established()
    channel = relay.open_channel("http")
    agent.receive_data(b"".join(relay.data_to_send()))
    for event in agent.events_received():
        assert isinstance(event, ev.ChannelRequested)
        agent.accept_channel(event.channel)
    relay.receive_data(b"".join(agent.data_to_send()))
    relay.events_received()
    return relay, agent, channel


def proxy_round(request: bytes) -> Callable[[], None]:
    """One request in and its response out through a WebProxy on an open channel."""
    relay, agent, channel = open_pair()
    record = types.SimpleNamespace(
        kind="device", device="dev1", service="http", user="admin", session_id="s"
    )
    server = types.SimpleNamespace(
        config=types.SimpleNamespace(web_max_body=0), permits=lambda *args: True
    )
    access = types.SimpleNamespace(
        domain="relay.localhost",
        proxies=set(),
        server=server,
        cached=lambda secret, kind: (True, record),
        cache_for=lambda device: None,
        used=lambda session_id: None,
    )
    proxy = WebProxy(access, "dev1", HOST.decode(), "127.0.0.1", time.monotonic())
    proxy.connection_made(Transport())
    tunnel = Tunnel(relay)
    proxy.tunnel, proxy.channel = tunnel, channel
    tunnel.bindings[channel] = proxy
    proxy.channel_state, proxy.outcome = "open", "open"
    proxy.session_secret, proxy.session = SECRET, record
    agent.send_data(channel, RESPONSE)
    wire = b"".join(agent.data_to_send())

    def once() -> None:
        proxy.data_received(request)
        relay.data_to_send()
        relay.receive_data(wire)
        for event in relay.events_received():  # TunnelEndpoint.dispatch, DATA only
            if isinstance(event, ev.DataReceived):
                binding = tunnel.bindings.get(event.channel)
                if binding is not None:
                    binding._receive(event.data)

    once()
    if proxy.transport is None or proxy.requests != 1 or proxy._backlog is not None:
        raise SystemExit("the proxy did not forward the request: the stubs need updating")
    return once


def framer_round() -> Callable[[], None]:
    framer = ResponseFramer(lambda head: None)

    def once() -> None:
        framer.expect(b"GET")
        framer.feed(RESPONSE)

    return once


def mux_round() -> Callable[[], None]:
    relay, agent, channel = open_pair()

    def once() -> None:
        agent.send_data(channel, RESPONSE)
        relay.receive_data(b"".join(agent.data_to_send()))
        for event in relay.events_received():
            if isinstance(event, ev.DataReceived):
                relay.consumed(event.channel, len(event.data))
        agent.receive_data(b"".join(relay.data_to_send()))

    return once


class Endpoint(WebSocketEndpoint):
    def on_binary(self, data: bytes) -> None:
        pass


class LibraryEndpoint(Endpoint):
    """Every frame through websockets' parser and serializer."""

    def _try_fast(self) -> None:
        pass


def open_websockets() -> tuple[WsProtocol, WsProtocol]:
    """A relay's (server) and an agent's (client) websockets connection, open."""
    client = ClientProtocol(parse_uri("wss://relay.example/"), max_size=TUNNEL_MAX_MESSAGE)
    server = ServerProtocol(max_size=TUNNEL_MAX_MESSAGE)
    client.send_request(client.connect())
    for chunk in client.data_to_send():
        server.receive_data(chunk)
    server.send_response(server.accept(cast(Request, server.events_received()[0])))
    for chunk in server.data_to_send():
        client.receive_data(chunk)
    client.events_received()
    return server, client


def websocket_round(relay_side: bool, cls: type[Endpoint]) -> Callable[[], None]:
    """One 300-byte binary message from the peer read, one written, by an endpoint on
    the relay's side (masked in, plain out) or the agent's (plain in, masked out)."""
    server, client = open_websockets()
    ws, peer = (server, client) if relay_side else (client, server)
    endpoint = cls(ws)
    endpoint.connection_made(Transport())  # type: ignore[arg-type]
    payload = b"x" * 300
    peer.send_binary(payload)
    message = b"".join(peer.data_to_send())

    def once() -> None:
        endpoint.data_received(message)
        endpoint.send_binary(payload)

    return once


def floor_round() -> Callable[[], None]:
    protocol = Floor(Transport())

    def once() -> None:
        protocol.data_received(WRK_REQUEST)
        protocol.data_received(RESPONSE)

    return once


def best_us(once: Callable[[], None], count: int, rounds: int) -> float:
    for _ in range(min(count, 2000)):
        once()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            once()
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=50_000, help="operations per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the best is shown")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 10_000_000 or not 1 <= args.rounds <= 100:
        parser.error("--count must be 1..10000000 and --rounds 1..100")
    # A running loop: an agent's endpoint makes its handshake future when it is built.
    return asyncio.run(measure(args.count, args.rounds))


async def measure(count: int, rounds: int) -> int:
    rows = [
        ("floor: a protocol that writes what it reads (request and response)", floor_round()),
        ("response framer: one 615-byte response (head checked, framing read)", framer_round()),
        ("multiplexer: one DATA frame of that response, sent and received", mux_round()),
        ("web proxy: wrk's request (2 fields) and its response", proxy_round(WRK_REQUEST)),
        (
            "web proxy: a browser's request (15 fields) and its response",
            proxy_round(BROWSER_REQUEST),
        ),
    ]
    for side, relay_side in (("relay", True), ("agent", False)):
        for how, cls in (("websockets' parser", LibraryEndpoint), ("shorter path", Endpoint)):
            label = f"WebSocket, {side} side: a 300-byte message read and one sent ({how})"
            rows.append((label, websocket_round(relay_side, cls)))
    results = [(label, best_us(once, count, rounds)) for label, once in rows]
    floor = results[0][1]
    table = [[label, f"{us:.2f}", f"{us / floor:.1f}x"] for label, us in results]
    print(f"Python {sys.version.split()[0]}, best of {rounds} rounds of {count}:\n")
    print(tb.markdown_table(["operation", "µs", "to floor"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
