#!/usr/bin/env python3
"""The least a Python relay of hatchway's shape does: a floor for web_bench.py.

Not part of hatchway; a yardstick run by ``web_bench.py --only floor``. Two roles::

    floor_relay.py relay PORT TUNNEL_PORT CERT KEY   # TLS for browsers and for the agent
    floor_relay.py agent TUNNEL_PORT TARGET_PORT     # one TLS connection to the relay

The relay accepts TLS connections from browsers on PORT and one TLS connection from
the agent on TUNNEL_PORT (it starts serving browsers once the agent is in). Each
browser connection is a channel: what it sends goes to the agent in frames
``[u32 channel][u32 length][payload]`` (length 0: closed), the frames written during
one loop iteration leave in one write, and the agent opens a TCP connection to
TARGET_PORT per channel. Both run on uvloop, keep TCP_NODELAY on, and do what
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

HEADER = struct.Struct("!II")
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
        self.buffer = bytearray()
        self.needed = 8  # bytes the buffer must hold before a frame is complete
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

    def send(self, channel: int, data: bytes) -> None:
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(HEADER.pack(channel, len(data)))
        self.out.append(data)

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        if buffer:
            buffer += data
            if len(buffer) < self.needed:
                return
            data = bytes(buffer)
            buffer.clear()
        pos, end = 0, len(data)
        view = memoryview(data)
        self.needed = 8
        while end - pos >= 8:
            channel, length = HEADER.unpack_from(data, pos)
            if end - pos - 8 < length:
                self.needed = 8 + length
                break
            pos += 8
            self.frame(channel, view[pos : pos + length])
            pos += length
        if pos < end:
            buffer += view[pos:]

    def frame(self, channel: int, payload: memoryview) -> None:
        leg = self.channels.get(channel)
        if leg is None:
            if not payload or self.opener is None:
                return
            leg = self.opener(channel)
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
        tunnel.channels[channel] = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]
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
        self.tunnel.leg_paused(True)

    def resume_writing(self) -> None:
        self.tunnel.leg_paused(False)


async def relay(port: int, tunnel_port: int, cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tunnel = Tunnel()
    channels = iter(range(1, 1 << 32))
    agents = await loop.create_server(lambda: tunnel, "127.0.0.1", tunnel_port, ssl=context)
    await tunnel.connected
    agents.close()  # one agent
    await loop.create_server(
        lambda: Leg(tunnel, next(channels), BURN), "127.0.0.1", port, ssl=context
    )
    print(f"relay ready on {port}", flush=True)
    await loop.create_future()


async def agent(tunnel_port: int, target_port: int) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a loopback yardstick, not a product

    def opener(channel: int) -> Leg:
        leg = Leg(tunnel, channel)
        connect = loop.create_connection(lambda: leg, "127.0.0.1", target_port)
        loop.create_task(connect).add_done_callback(
            lambda task: task.exception() and leg.connection_lost(None)
        )
        return leg

    tunnel = Tunnel(opener)
    await loop.create_connection(lambda: tunnel, "127.0.0.1", tunnel_port, ssl=context)
    print("agent connected", flush=True)
    await loop.create_future()


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "relay":
        uvloop.run(relay(int(argv[1]), int(argv[2]), argv[3], argv[4]))
    elif len(argv) == 3 and argv[0] == "agent":
        uvloop.run(agent(int(argv[1]), int(argv[2])))
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
