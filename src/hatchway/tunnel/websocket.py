"""An asyncio ``Protocol`` that drives a ``websockets`` sans-I/O connection.

We use the websockets library for the WebSocket protocol (handshake, framing, masking,
close handshake) but drive it from buffer-level callbacks instead of its asyncio
layer: no task, queue or await per message on the data path, and backpressure comes
straight from ``pause_writing``/``resume_writing`` of the transport.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, CONNECTING, OPEN
from websockets.protocol import Protocol as WsProtocol

log = logging.getLogger(__name__)

#: How long to wait for the peer to finish a closing handshake.
CLOSE_TIMEOUT = 5.0
#: Data is bounded by the channels' credit and by sources pausing at the high-water
#: mark, but answers to what the peer sends (WebSocket pongs, PONG frames) are not: a
#: peer that sends and never reads would grow the write buffer without end. Past this
#: (plus what ``write_buffer_limit`` allows for data), the connection is aborted.
WRITE_BUFFER_CAP = 16 * 1024 * 1024


#: TCP keepalive on every socket: a vanished peer is noticed in about 60 s even on
#: client streams, which carry no keepalive of their own.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (we batch writes ourselves) and TCP keepalive."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        tune_socket(sock)


class WebSocketEndpoint(asyncio.Protocol):
    """Base class: subclasses override the ``on_*`` hooks."""

    transport: asyncio.Transport | None

    def __init__(self, ws: WsProtocol) -> None:
        self.ws = ws
        self.transport = None
        self.write_paused = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._peer = "?"
        # A client waits for the handshake's response; a server gets the request in
        # on_handshake and keeps nothing of it (a relay holds many tunnels).
        self.handshake: asyncio.Future[Response] | None = (
            asyncio.get_running_loop().create_future() if isinstance(ws, ClientProtocol) else None
        )

    # --- hooks ------------------------------------------------------------------------

    def on_handshake(self, event: Request | Response) -> None:
        """The opening handshake's request (server) or response (client) arrived."""

    def on_binary(self, data: bytes) -> None:
        """A binary frame (or a continuation of one) arrived."""

    def on_text(self, data: bytes) -> None:
        """A text frame arrived."""

    def on_close_frame(self) -> None:
        """The peer started or answered the closing handshake."""

    def on_writable(self) -> None:
        """The transport's write buffer drained below its low-water mark."""

    def on_connection_lost(self, exc: Exception | None) -> None:
        """The TCP connection is gone; release everything."""

    def write_buffer_limit(self) -> int:
        """Bytes that may wait to be written before the peer is taken for one that
        does not read; subclasses add what their data may queue past the high-water
        mark."""
        return WRITE_BUFFER_CAP

    def describe(self) -> str:
        return f"connection {self.peer_address()}"

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.transport = transport
        self._peer = _format_peer(transport.get_extra_info("peername"))
        set_nodelay(transport)
        if isinstance(self.ws, ClientProtocol) and self.ws.state is CONNECTING:
            self.ws.send_request(self.ws.connect())
            self.flush()

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        self.flush()
        for event in ws.events_received():
            if self._lost:
                return
            if isinstance(event, Frame):
                opcode = event.opcode
                if opcode is Opcode.BINARY or opcode is Opcode.CONT:
                    self.on_binary(bytes(event.data))
                elif opcode is Opcode.TEXT:
                    if not event.fin:
                        self.close(1003, "fragmented text messages are not supported")
                        return
                    self.on_text(bytes(event.data))
                elif opcode is Opcode.CLOSE:
                    self.on_close_frame()
            else:
                handshake = self.handshake
                if handshake is not None and not handshake.done():
                    handshake.set_result(cast(Response, event))
                self.on_handshake(event)
        self._after_receive()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self.flush()
        self._after_receive()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self.ws.state is not CLOSED:
            self.ws.receive_eof()
        handshake = self.handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(ConnectionError("connection closed during the handshake"))
            handshake.exception()  # mark retrieved: nobody may be waiting
        self.on_connection_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.on_writable()

    # --- sending ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.ws.state is OPEN and not self._lost

    def send_binary(self, data: bytes | bytearray | memoryview) -> None:
        if self.is_open:
            self.ws.send_binary(data)
            self.flush()

    def send_text(self, data: bytes) -> None:
        if self.is_open:
            self.ws.send_text(data)
            self.flush()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection follows."""
        if self._lost:
            return
        if self.transport is not None and not self.transport.is_reading():
            # Reading may be paused by backpressure; the peer's close frame must be read.
            self.transport.resume_reading()
        if self.ws.state is OPEN:
            try:
                # A close reason is at most 123 bytes of UTF-8.
                self.ws.send_close(code, reason.encode()[:120].decode(errors="ignore"))
            except InvalidState:
                pass
            self.flush()
            self._after_receive()
        elif self.ws.state is CONNECTING and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self._lost or transport.is_closing():
            return
        chunks = self.ws.data_to_send()
        if not chunks:
            return
        if chunks[-1] == b"":
            chunks.pop()
            if chunks:
                transport.writelines(chunks)
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        elif len(chunks) == 1:
            transport.write(chunks[0])
        else:
            transport.writelines(chunks)
        if self.write_paused:  # past the high-water mark: is the peer reading at all?
            size = transport.get_write_buffer_size()
            if size > self.write_buffer_limit():
                log.warning(
                    "%s: the peer does not read (%d bytes waiting to be sent), aborting",
                    self.describe(),
                    size,
                )
                transport.abort()

    def _after_receive(self) -> None:
        if self.ws.close_expected() and self._close_timer is None and not self._lost:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.abort)
        if self.ws.state is CLOSED and self.transport is not None and not self._lost:
            self.transport.close()

    def peer_address(self) -> str:
        return self._peer


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
