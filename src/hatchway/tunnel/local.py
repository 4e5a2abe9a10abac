"""A channel bound to a local TCP connection (the agent's services, the client's
forwarded connections)."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from hatchway.tunnel.endpoint import ChannelBinding
from hatchway.tunnel.websocket import set_nodelay

log = logging.getLogger(__name__)


def pause_reading(transport: asyncio.Transport | None) -> None:
    """Stop reading from a (still open) transport; harmless if already paused."""
    if transport is not None and not transport.is_closing() and transport.is_reading():
        transport.pause_reading()


def resume_reading(transport: asyncio.Transport | None) -> None:
    """Read again from a transport that is still open; harmless if already reading."""
    if transport is not None and not transport.is_closing() and not transport.is_reading():
        transport.resume_reading()


class TcpBinding(asyncio.Protocol, ChannelBinding):
    """Splices one TCP connection with one channel, backpressure both ways.

    Reading starts paused: the owner calls ``start()`` once the channel is bound.
    """

    def __init__(self) -> None:
        ChannelBinding.__init__(self)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        # Some loops (uvloop) deliver a read before pause_reading() in connection_made
        # takes effect: keep it until the channel is bound.
        self._early: list[bytes] = []
        self._early_eof = False
        self._started = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        set_nodelay(transport)
        transport.pause_reading()

    def start(self) -> None:
        """The channel is open: pass on what arrived early, then read."""
        self._started = True
        early, self._early = self._early, []
        for data in early:
            self.forward(data)
        if self._early_eof:
            self.forward_eof()
        elif self.may_read() and self.transport is not None:
            self.resume_source()  # else resumed when the peer grants credit (or drains)

    def data_received(self, data: bytes) -> None:
        if not self._started:
            self._early.append(data)
            self.pause_source()
            return
        self.forward(data)

    def eof_received(self) -> bool:
        if not self._started:
            self._early_eof = True
            return True
        self.forward_eof()
        return True  # keep the write half open (TCP half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.local_closed()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.sink_paused()

    def resume_writing(self) -> None:
        self.sink_resumed()

    # --- ChannelBinding -----------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def deliver_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_source(self) -> None:
        pause_reading(self.transport)

    def resume_source(self) -> None:
        resume_reading(self.transport)

    def on_reset(self, reason: int, message: str) -> None:
        if self.transport is not None:
            self.transport.abort()

    def on_closed(self) -> None:
        if self.transport is not None:
            self.transport.close()

    on_open_failed = on_reset
