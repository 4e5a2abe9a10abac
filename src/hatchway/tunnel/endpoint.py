"""A tunnel endpoint: the multiplexer run over a WebSocket, and channel bindings.

``TunnelEndpoint`` feeds WebSocket binary frames into a ``Multiplexer`` and sends what
it produces, coalescing all frames queued in one event-loop turn into one WebSocket
message. ``ChannelBinding`` is the local end of one channel (a TCP connection on the
agent, a client's WebSocket on the relay) and carries backpressure both ways:

- tunnel → local: credit is returned to the peer only while the local sink accepts
  writes; when its transport pauses writing, the credit is held back, so the peer
  stops after one window.
- local → tunnel: when the peer's credit runs out, the rest of the chunk is kept and
  the local source stops reading until a ``SendWindowAvailable`` arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time

from websockets.protocol import Protocol as WsProtocol

from hatchway.errors import LocalProtocolError, RemoteProtocolError
from hatchway.mux import events as ev
from hatchway.mux.frames import GoAwayReason, OpenFailure, ResetReason
from hatchway.mux.session import Multiplexer, Role
from hatchway.tunnel.websocket import WRITE_BUFFER_CAP, WebSocketEndpoint

log = logging.getLogger(__name__)

#: A PING is sent this often (seconds) on every tunnel, whatever the traffic.
PING_INTERVAL = 15.0
#: A tunnel that received nothing for this long is presumed dead and dropped.
DEAD_AFTER = 35.0
#: Largest WebSocket message a tunnel accepts (frames may span messages).
TUNNEL_MAX_MESSAGE = 4 * 1024 * 1024
#: A tunnel sends a message once this much is batched (see ``_flush_mux``).
TUNNEL_SEND_MESSAGE = 64 * 1024

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001
#: The tunnel connection's write buffer above which every channel stops reading.
TUNNEL_HIGH_WATER = 1024 * 1024


class ChannelBinding:
    """Local end of one channel. Subclasses implement the ``deliver_*``/``*_source``
    hooks and call ``forward``/``forward_eof``/``local_closed``/``sink_*``."""

    def __init__(self) -> None:
        self.tunnel: TunnelEndpoint | None = None
        self.channel = 0
        self.bytes_to_tunnel = 0
        self.bytes_from_tunnel = 0
        self.started = time.monotonic()
        self._backlog: bytearray | None = None
        self._eof_pending = False
        self._sink_paused = False
        self._held_credit = 0
        # The tunnel's own write buffer is full (``TunnelEndpoint.pause_writing``).
        self._congested = False
        self.finished = False

    # --- hooks --------------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        raise NotImplementedError

    def deliver_eof(self) -> None:
        raise NotImplementedError

    def pause_source(self) -> None:
        raise NotImplementedError

    def resume_source(self) -> None:
        raise NotImplementedError

    def on_open_ok(self) -> None:
        """The channel we opened was accepted."""

    def on_open_failed(self, reason: int, message: str) -> None:
        """The channel we opened was refused."""

    def on_reset(self, reason: int, message: str) -> None:
        """The channel was aborted (by the peer, or because the tunnel went away)."""

    def on_closed(self) -> None:
        """Both directions ended with EOF."""

    # --- called by the subclass ---------------------------------------------------------

    def forward(self, data: bytes | bytearray | memoryview) -> None:
        tunnel = self.tunnel
        if tunnel is None or self.finished:
            return
        if not tunnel.mux.is_open(self.channel):
            # Gone in the same batch of frames (a RESET behind a WINDOW or EOF): its
            # ChannelReset event is next and cleans up; nothing can be sent any more.
            return
        if self._backlog is not None:
            # The source is paused, but a splice may still hand over what one batch of
            # frames carried (bounded by the other side's window): keep it in order.
            self._backlog += data
            return
        n = tunnel.mux.send_data(self.channel, data)
        self.bytes_to_tunnel += n
        tunnel.request_flush()
        if n < len(data):
            self._backlog = bytearray(memoryview(data)[n:])
            self.pause_source()
        elif tunnel.write_paused and not self._congested:
            self.tunnel_congested()  # a source that started while the tunnel was full

    def forward_eof(self) -> None:
        if self.tunnel is None or self.finished or not self.tunnel.mux.is_open(self.channel):
            return
        if self._backlog is not None:
            self._eof_pending = True
            return
        self.tunnel.mux.send_eof(self.channel)
        self.tunnel.request_flush()
        self.tunnel.dispatch()

    def local_closed(self) -> None:
        """The local connection is gone: reset the channel unless it ended cleanly."""
        self.reset_channel(ResetReason.CONNECTION_LOST, "connection closed")

    def reset_channel(self, reason: ResetReason, message: str) -> None:
        """Reset the channel (if it is still there) and forget it."""
        tunnel = self.tunnel
        if tunnel is None or self.finished:
            return
        self.finished = True
        tunnel.mux.reset_channel(self.channel, reason, message)
        tunnel.bindings.pop(self.channel, None)
        tunnel.request_flush()

    def tunnel_congested(self) -> None:
        """The tunnel cannot take more for now: stop reading, whatever the credit."""
        if not self.finished:
            self._congested = True
            self.pause_source()

    def tunnel_drained(self) -> None:
        if self._congested:
            self._congested = False
            if self._backlog is None and not self.finished:
                self.resume_source()

    def may_read(self) -> bool:
        """Whether the source may be read now (credit left and the tunnel not full)."""
        return self._backlog is None and not self._congested

    def sink_paused(self) -> None:
        self._sink_paused = True

    def sink_resumed(self) -> None:
        self._sink_paused = False
        if self._held_credit and self.tunnel is not None:
            credit, self._held_credit = self._held_credit, 0
            self.tunnel.mux.consumed(self.channel, credit)
            self.tunnel.request_flush()

    # --- called by the tunnel -------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        n = len(data)
        self.bytes_from_tunnel += n
        self.deliver(data)
        if self._sink_paused:
            self._held_credit += n
        elif self.tunnel is not None:
            self.tunnel.mux.consumed(self.channel, n)

    def _send_window(self) -> None:
        backlog, self._backlog = self._backlog, None
        if backlog is not None:
            self.forward(backlog)
        if self._backlog is None:
            if self._eof_pending:
                self._eof_pending = False
                self.forward_eof()
            if not self._congested:
                self.resume_source()


class TunnelEndpoint(WebSocketEndpoint):
    """One end of a device tunnel. Subclasses handle HELLO and channel requests."""

    def __init__(self, ws: WsProtocol, role: Role, *, window: int, max_channels: int) -> None:
        super().__init__(ws)
        self.mux = Multiplexer(role, window=window, max_channels=max_channels)
        self.bindings: dict[int, ChannelBinding] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._last_rx = time.monotonic()
        self._last_ping = self._last_rx
        self._dispatching = False
        self.closed = False

    # --- hooks --------------------------------------------------------------------------

    def on_hello(self, info: dict[str, object]) -> None:
        raise NotImplementedError

    def on_channel_requested(self, channel: int, service: str) -> None:
        self.reject(channel, OpenFailure.NOT_PERMITTED, "this end accepts no channels")

    def on_tunnel_closed(self) -> None:
        """The tunnel is gone (after every binding was reset)."""

    # --- backpressure from the tunnel's own connection ------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.transport is not None:
            # Channels stop reading while this much waits to be written: what a congested
            # tunnel holds in memory is bounded by this, not by the sum of the windows.
            self.transport.set_write_buffer_limits(high=TUNNEL_HIGH_WATER)

    def pause_writing(self) -> None:
        super().pause_writing()
        for binding in list(self.bindings.values()):
            binding.tunnel_congested()

    def on_writable(self) -> None:
        for binding in list(self.bindings.values()):
            binding.tunnel_drained()

    def write_buffer_limit(self) -> int:
        if not self.mux.established:
            return TUNNEL_HIGH_WATER  # a handshake sends a few small messages
        # Once the sources paused, each channel may still add about a window: a splice's
        # other side delivers what it already had credit for.
        return WRITE_BUFFER_CAP + len(self.bindings) * self.mux.window

    # --- channels -----------------------------------------------------------------------

    def open_binding(self, service: str, binding: ChannelBinding) -> int:
        """Open a channel for ``binding``; if the tunnel cannot open one (closing, out
        of channel ids), the binding hears it as a refused open, soon after."""
        try:
            channel = self.mux.open_channel(service)
        except LocalProtocolError as exc:
            log.warning("%s: cannot open a channel to %s: %s", self.describe(), service, exc)
            binding.tunnel = self
            binding.finished = True
            loop = asyncio.get_running_loop()
            loop.call_soon(binding.on_open_failed, OpenFailure.SHUTTING_DOWN, str(exc))
            if self.mux.ids_used_up:  # only a new tunnel can open more: make way for it
                self.shutdown(GoAwayReason.NORMAL, "no channel ids left")
            return 0
        binding.tunnel = self
        binding.channel = channel
        self.bindings[channel] = binding
        self.request_flush()
        return channel

    def attach(self, channel: int, binding: ChannelBinding) -> None:
        """Accept a channel the peer requested and bind it."""
        binding.tunnel = self
        binding.channel = channel
        self.bindings[channel] = binding
        self.mux.accept_channel(channel)
        self.request_flush()

    def reject(self, channel: int, reason: OpenFailure, message: str) -> None:
        self.mux.reject_channel(channel, reason, message)
        self.request_flush()

    # --- WebSocket hooks ----------------------------------------------------------------

    def start_keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick_handle = loop.call_later(PING_INTERVAL / 3, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_rx > DEAD_AFTER:
            log.warning(
                "%s: nothing received for %.0f s, dropping the tunnel", self.describe(), DEAD_AFTER
            )
            self.abort()
            return
        if now - self._last_ping >= PING_INTERVAL:
            self._last_ping = now
            self.mux.send_ping(int(now * 1000).to_bytes(8, "big"))
            self._flush_mux()
        self._tick_handle = asyncio.get_running_loop().call_later(PING_INTERVAL / 3, self._tick)

    binary_views = True  # the multiplexer copies each payload it keeps

    def on_binary(self, data: bytes | memoryview) -> None:
        if self.mux.failed is not None:
            return  # after a protocol error, nothing more is read (the tunnel is closing)
        self._last_rx = time.monotonic()
        try:
            self.mux.receive_data(data)
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error from peer: %s", self.describe(), exc)
            self.dispatch()
            self._flush_mux()
            self.close(CLOSE_PROTOCOL_ERROR, "protocol error")
            return
        self.dispatch()
        self._flush_mux()

    def on_text(self, data: bytes) -> None:
        log.warning("%s: text frame on a tunnel", self.describe())
        self.close(CLOSE_PROTOCOL_ERROR, "text frames are not allowed")

    def on_close_frame(self) -> None:
        self._last_rx = time.monotonic()

    def on_connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for handle in (self._flush_handle, self._tick_handle):
            if handle is not None:
                handle.cancel()
        bindings, self.bindings = self.bindings, {}
        text = self.closed_text()
        for binding in bindings.values():
            binding.finished = True
            binding.on_reset(ResetReason.TUNNEL_CLOSED, text)
        self.on_tunnel_closed()

    def shutdown(self, reason: GoAwayReason, message: str, code: int = CLOSE_GOING_AWAY) -> None:
        if self.is_open:
            self.mux.send_goaway(reason, message)
            self._flush_mux()
        self.close(code, message)

    # --- plumbing -------------------------------------------------------------------------

    def request_flush(self) -> None:
        if self._flush_handle is None and not self.closed:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_mux)

    def _flush_mux(self) -> None:
        """Send what the multiplexer queued, in WebSocket messages of about
        ``TUNNEL_SEND_MESSAGE`` bytes: the peer parses a message only once it has all
        of it, so small messages keep the path pipelined."""
        self._flush_handle = None
        chunks = self.mux.data_to_send()
        if not chunks:
            return
        batch: list[bytes] = []
        size = 0
        for chunk in chunks:
            batch.append(chunk)
            size += len(chunk)
            if size >= TUNNEL_SEND_MESSAGE:
                self.send_message(batch)
                batch, size = [], 0
        if batch:
            self.send_message(batch)

    def dispatch(self) -> None:
        """Hand the multiplexer's events to the bindings, in order.

        A binding may make new events while it handles one (its EOF closes a channel
        whose peer had ended already): those wait behind the rest of the batch, so a
        channel's data and EOF still reach it before it is closed."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while events := self.mux.events_received():
                for event in events:
                    self._dispatch_one(event)
        finally:
            self._dispatching = False

    def _dispatch_one(self, event: ev.Event) -> None:
        bindings = self.bindings
        if isinstance(event, ev.DataReceived):
            binding = bindings.get(event.channel)
            if binding is not None:
                binding._receive(event.data)
        elif isinstance(event, ev.SendWindowAvailable):
            binding = bindings.get(event.channel)
            if binding is not None:
                binding._send_window()
        elif isinstance(event, ev.EofReceived):
            binding = bindings.get(event.channel)
            if binding is not None:
                binding.deliver_eof()
        elif isinstance(event, ev.ChannelClosed):
            binding = bindings.pop(event.channel, None)
            if binding is not None:
                binding.finished = True
                binding.on_closed()
        elif isinstance(event, ev.ChannelReset):
            binding = bindings.pop(event.channel, None)
            if binding is not None:
                binding.finished = True
                binding.on_reset(event.reason, event.message)
        elif isinstance(event, ev.ChannelOpened):
            binding = bindings.get(event.channel)
            if binding is not None:
                binding.on_open_ok()
        elif isinstance(event, ev.ChannelOpenFailed):
            binding = bindings.pop(event.channel, None)
            if binding is not None:
                binding.finished = True
                binding.on_open_failed(event.reason, event.message)
        elif isinstance(event, ev.ChannelRequested):
            self.on_channel_requested(event.channel, event.service)
        elif isinstance(event, ev.HelloReceived):
            try:
                self.on_hello(event.info)
            except LocalProtocolError as exc:
                log.warning("%s: %s", self.describe(), exc)
                self.close(CLOSE_PROTOCOL_ERROR, "protocol error")
        elif isinstance(event, ev.GoAwayReceived):
            self.on_goaway(event.reason, event.message)

    def on_goaway(self, reason: int, message: str) -> None:
        log.info("%s: peer is going away (%s: %s)", self.describe(), reason, message)
        self.close(CLOSE_GOING_AWAY, "going away")

    def describe(self) -> str:
        return f"tunnel {self.peer_address()}"

    def closed_text(self) -> str:
        """What the channels of this tunnel are told when it ends (a client shows it)."""
        return "the tunnel closed"
