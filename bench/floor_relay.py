#!/usr/bin/env python3
"""The least a Python relay of hatchway's shape does: a floor for web_bench.py.

Not part of hatchway; a yardstick run by ``web_bench.py`` and ``tunnel_bench.py --only floor``::

    floor_relay.py relay PORT[,PORT2] TUNNEL_PORT CERT KEY   # TLS for users and the agent
    floor_relay.py agent TUNNEL_PORT TARGET[,TARGET2]        # one TLS connection to the relay
    floor_relay.py client LISTEN_PORT RELAY_PORT             # plain TCP in, TLS to the relay

The relay accepts TLS connections from browsers on PORT and one TLS connection from
the agent on TUNNEL_PORT (it starts serving browsers once the agent is in). Each
browser connection is a channel: what it sends goes to the agent in frames
``[u32 channel][u32 length][payload]`` (length 0: closed; 2**32-1: opened, with no
payload), the frames written during one loop iteration leave in one write, and the agent opens a TCP connection to
TARGET per channel (TARGET2 for channels from PORT2). The client, for
tunnel_bench.py, is what ``hatchway forward --no-mux`` is at the socket level: it
accepts plain TCP on LISTEN_PORT and opens a TLS connection to the relay for each, so
a byte crosses four loopback TCP connections and is encrypted twice, as through
hatchway. All run on uvloop, keep TCP_NODELAY on, and do what
hatchway's relay and agent do at the socket level (TLS to the browser, one TLS tunnel,
one write per loop iteration on it) and nothing else: no HTTP parsing, no login check,
no WebSocket framing, no per-channel windows (a full socket pauses everything instead).

``FLOOR_BURN_US`` adds that many microseconds of CPU (a busy loop) to the relay per
read from a browser, one per request in web_bench's tests: the relay's per-request
cost then approaches hatchway's, which shows what a given relay cost per request
does to the rate and the tail on the machine at hand.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
import sys
from time import perf_counter
from typing import Any

import uvloop

from hatchway import allocator

HEADER = struct.Struct("!II")
#: The length of a frame that opens a channel (it carries no payload).
OPEN = 0xFFFFFFFF
BURN = float(os.environ.get("FLOOR_BURN_US", "0")) / 1e6
#: Bytes buffered in a transport above which the other side stops reading.
HIGH_WATER = 1 << 20


class Tunnel(asyncio.Protocol):
    """The relay's or the agent's end of the one TLS connection between them."""

    def __init__(self, opener: Any = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, Leg] = {}
        self.opener = opener  # the agent's: makes a Leg for a new channel
        self.out: list[bytes] = []
        self.head = bytearray()  # the part of a frame header that came in the last read
        self.current, self.remaining = 0, 0  # the payload being read
        self.paused_legs = 0
        self.loop = asyncio.get_running_loop()
        self.connected = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]
        self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        for leg in list(self.channels.values()):
            if leg.transport is not None:
                leg.transport.close()
        if not self.connected.done():
            self.connected.set_result(None)

    def send(self, channel: int, data: bytes, length: int | None = None) -> None:
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(HEADER.pack(channel, len(data) if length is None else length))
        if data:
            self.out.append(data)

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        """Frames are parsed as a stream: a payload is passed on in the pieces it
        arrives in, without gathering it first (as hatchway's multiplexer does)."""
        pos, end = 0, len(data)
        view = memoryview(data)
        while pos < end:
            if self.remaining:  # in the middle of a payload
                n = min(self.remaining, end - pos)
                self.frame(self.current, view[pos : pos + n])
                self.remaining -= n
                pos += n
                continue
            head = self.head
            if head or end - pos < 8:  # a header split across reads
                take = min(8 - len(head), end - pos)
                head += view[pos : pos + take]
                pos += take
                if len(head) < 8:
                    return
                channel, length = HEADER.unpack(head)
                head.clear()
            else:
                channel, length = HEADER.unpack_from(data, pos)
                pos += 8
            if length == OPEN:
                if self.opener is not None and channel not in self.channels:
                    self.opener(channel)
            elif length == 0:
                self.frame(channel, view[0:0])  # closed
            else:
                self.current, self.remaining = channel, length

    def frame(self, channel: int, payload: memoryview) -> None:
        leg = self.channels.get(channel)
        if leg is not None:
            leg.deliver(payload)

    # A full tunnel pauses every leg; a full leg pauses the tunnel.
    def pause_writing(self) -> None:
        for leg in self.channels.values():
            if leg.transport is not None:
                leg.transport.pause_reading()

    def resume_writing(self) -> None:
        for leg in self.channels.values():
            if leg.transport is not None:
                leg.transport.resume_reading()

    def leg_paused(self, paused: bool) -> None:
        self.paused_legs += 1 if paused else -1
        if self.transport is not None and not self.transport.is_closing():
            if self.paused_legs:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()


class Leg(asyncio.Protocol):
    """A browser's connection (relay) or the connection to the target (agent)."""

    def __init__(self, tunnel: Tunnel, channel: int, burn: float = 0.0) -> None:
        self.tunnel, self.channel, self.burn = tunnel, channel, burn
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes | memoryview] = []
        self.paused = False  # its transport is full: the tunnel stops reading
        tunnel.channels[channel] = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]
        if self.tunnel.opener is None:  # the relay's: the agent opens its side now
            self.tunnel.send(self.channel, b"", OPEN)
        for data in self.early:
            self.deliver(data)
        self.early = []

    def data_received(self, data: bytes) -> None:
        if self.burn:
            end = perf_counter() + self.burn
            while perf_counter() < end:
                pass
        self.tunnel.send(self.channel, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.paused:  # a full leg that went away must not keep the tunnel stopped
            self.resume_writing()
        if self.tunnel.channels.pop(self.channel, None) is not None:
            self.tunnel.send(self.channel, b"")

    def deliver(self, data: bytes | memoryview) -> None:
        if self.transport is None:
            self.early.append(data)
        elif data:
            self.transport.write(data)
        else:
            self.tunnel.channels.pop(self.channel, None)
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True
        self.tunnel.leg_paused(True)

    def resume_writing(self) -> None:
        self.paused = False
        self.tunnel.leg_paused(False)


class Splice(asyncio.Protocol):
    """One side of the client's splice: what it reads, the other side writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Splice | None = None
        self.early: list[bytes] = []  # read before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


async def relay(ports: list[int], tunnel_port: int, cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tunnel = Tunnel()
    numbers = iter(range(1, 1 << 31))
    agents = await loop.create_server(lambda: tunnel, "127.0.0.1", tunnel_port, ssl=context)
    await tunnel.connected
    agents.close()  # one agent
    for index, port in enumerate(ports):  # the low bit of a channel says which port
        await loop.create_server(
            lambda i=index: Leg(tunnel, next(numbers) << 1 | i, BURN),  # type: ignore[misc]
            "127.0.0.1",
            port,
            ssl=context,
        )
    print(f"relay ready on {ports}", flush=True)
    await loop.create_future()


async def client(listen_port: int, relay_port: int) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a loopback yardstick, not a product

    class Accepted(Splice):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            upstream = Splice()
            upstream.other, self.other = self, upstream
            connect = loop.create_connection(lambda: upstream, "127.0.0.1", relay_port, ssl=context)
            loop.create_task(connect).add_done_callback(self.connected)

        def connected(self, task: asyncio.Task[Any]) -> None:
            if self.transport is None:
                return
            if task.cancelled() or task.exception() is not None:
                self.transport.close()
            elif self.other is not None and self.other.transport is not None:
                self.other.transport.writelines(self.early)
                self.early = []

    await loop.create_server(Accepted, "127.0.0.1", listen_port)
    print(f"client ready on {listen_port}", flush=True)
    await loop.create_future()


async def agent(tunnel_port: int, targets: list[int]) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a loopback yardstick, not a product

    def opener(channel: int) -> Leg:
        leg = Leg(tunnel, channel)
        target = targets[(channel & 1) % len(targets)]
        connect = loop.create_connection(lambda: leg, "127.0.0.1", target)
        loop.create_task(connect).add_done_callback(
            lambda task: task.exception() and leg.connection_lost(None)
        )
        return leg

    tunnel = Tunnel(opener)
    await loop.create_connection(lambda: tunnel, "127.0.0.1", tunnel_port, ssl=context)
    print("agent connected", flush=True)
    await loop.create_future()


def _ports(text: str) -> list[int]:
    return [int(port) for port in text.split(",")][:2]


def main(argv: list[str]) -> int:
    allocator.tune()  # what ``python -m hatchway`` does at start, for the same TLS costs
    if len(argv) == 5 and argv[0] == "relay":
        uvloop.run(relay(_ports(argv[1]), int(argv[2]), argv[3], argv[4]))
    elif len(argv) == 3 and argv[0] == "agent":
        uvloop.run(agent(int(argv[1]), _ports(argv[2])))
    elif len(argv) == 3 and argv[0] == "client":
        uvloop.run(client(int(argv[1]), int(argv[2])))
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
