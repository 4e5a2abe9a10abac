"""A tunnel whose own connection is congested stops every channel's source, whatever
their credit, and starts them again once it drains (tunnel/endpoint.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.client import ClientProtocol
from websockets.protocol import OPEN
from websockets.uri import parse_uri

from hatchway.mux import Multiplexer, Role
from hatchway.mux.events import ChannelRequested
from hatchway.tunnel.endpoint import TUNNEL_HIGH_WATER, ChannelBinding, TunnelEndpoint


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.limits: dict[str, Any] = {}

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = {"high": high, "low": low}

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return False


class Source(ChannelBinding):
    """A binding that only counts what is asked of its source."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True

    def deliver(self, data: bytes) -> None:
        pass

    def deliver_eof(self) -> None:
        pass

    def pause_source(self) -> None:
        self.reading = False

    def resume_source(self) -> None:
        self.reading = True


async def test_congestion_pauses_every_source_and_drain_resumes_them() -> None:
    ws = ClientProtocol(parse_uri("wss://relay.example/"), state=OPEN)
    tunnel = TunnelEndpoint(ws, Role.AGENT, window=4096, max_channels=16)
    transport = FakeTransport()
    tunnel.connection_made(transport)  # type: ignore[arg-type]
    assert transport.limits["high"] == TUNNEL_HIGH_WATER
    tunnel.mux.mark_established()
    relay = Multiplexer(Role.RELAY, window=4096)
    relay.mark_established()
    sources = [Source() for _ in range(3)]
    for source in sources:
        tunnel.open_binding("svc", source)
    relay.receive_data(b"".join(tunnel.mux.data_to_send()))
    for event in relay.events_received():
        assert isinstance(event, ChannelRequested)
        relay.accept_channel(event.channel)
    tunnel.mux.receive_data(b"".join(relay.data_to_send()))
    tunnel.dispatch()
    assert all(tunnel.mux.is_open(s.channel) for s in sources)
    # The third source runs out of credit: paused by its window.
    sources[2].forward(b"x" * 5000)
    assert sources[2].reading is False
    # The connection's buffer passes its high-water mark: everybody stops.
    tunnel.pause_writing()
    assert [s.reading for s in sources] == [False, False, False]
    # Drained: those with credit read again; the one without credit waits for WINDOW.
    tunnel.resume_writing()
    assert [s.reading for s in sources] == [True, True, False]
    # A source that forwards while the connection is full stops at once.
    tunnel.write_paused = True
    sources[0].forward(b"y" * 10)
    assert sources[0].reading is False and sources[1].reading is True
    tunnel.resume_writing()
    assert sources[0].reading is True
    await asyncio.sleep(0)
