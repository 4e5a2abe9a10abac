"""An asyncio ``Protocol`` that drives a ``websockets`` sans-I/O connection.

We use the websockets library for the WebSocket protocol (handshake, framing, masking,
close handshake) but drive it from buffer-level callbacks instead of its asyncio
layer: no task, queue or await per message on the data path, and backpressure comes
straight from ``pause_writing``/``resume_writing`` of the transport.

Once the connection is open, the commonest frame, a whole binary message, takes a
shorter path both ways (``_receive_fast``, ``send_binary``): its header is read or
written here, its payload masked or unmasked by websockets' own ``apply_mask``. Every
other frame (control frames, text, fragments, anything malformed or too large) is
still parsed by websockets, which only ever sees whole frames, so its parser stays at
a frame boundary and its checks, errors and close handshake are the library's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import CLOSED, CONNECTING, OPEN
from websockets.protocol import Protocol as WsProtocol
from websockets.streams import StreamReader

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

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
# No TCP_USER_TIMEOUT: it would also notice a peer that vanished with data unacknowledged
# (keepalive probes only go out on an idle connection), but Linux then also ends a
# connection whose peer is there and merely stopped reading (a zero window: a paused
# download) once that lasts as long. A tunnel notices a dead peer by its PINGs.


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


#: The first header byte of a whole binary message: FIN, no RSV bits, opcode 2.
_FIN_BINARY = 0x82
#: Opcodes whose whole frames may be handed to websockets one at a time (continuation,
#: text, binary, close, ping, pong): it checks their bits and sizes once it has read
#: them whole, as it would have anyway. Any other opcode is an error it reports as soon
#: as it reads the header.
_KNOWN_OPCODES = frozenset((0x0, 0x1, 0x2, 0x8, 0x9, 0xA))
#: Masks for the frames a client sends come from os.urandom (as websockets' own do, via
#: ``secrets``), drawn this many bytes at a time.
_MASK_POOL = 4096
#: Below this size a frame's header and payload are joined into one write.
_JOIN_BELOW = 16 * 1024
#: The code objects of websockets' frame loop and of the wait in it for a frame's first
#: byte: a parser suspended there, with nothing buffered, is between two frames.
_PARSE_CODE = WsProtocol.parse.__code__
_AT_EOF_CODE = StreamReader.at_eof.__code__


def at_frame_boundary(ws: WsProtocol) -> bool:
    """True if websockets' parser is waiting for the first byte of a frame: no part of
    a frame has been read, so the next frame may be parsed elsewhere."""
    outer, gen = None, ws.parser
    while True:
        inner = getattr(gen, "gi_yieldfrom", None)
        if inner is None:
            break
        outer, gen = gen, inner
    return (
        getattr(gen, "gi_code", None) is _AT_EOF_CODE
        and getattr(outer, "gi_code", None) is _PARSE_CODE
        and not ws.reader.buffer
    )


_masks = b""
_mask_at = 0


def _next_mask() -> bytes:
    """Four fresh bytes from the process's pool of os.urandom output."""
    global _masks, _mask_at
    at = _mask_at
    if at + 4 > len(_masks):
        _masks = os.urandom(_MASK_POOL)
        at = 0
    _mask_at = at + 4
    return _masks[at : at + 4]


def _masked(parts: Sequence[bytes | bytearray | memoryview], mask: bytes) -> list[bytes]:
    """``parts`` masked as one payload: each part with the mask turned to where it
    starts, so no part is copied more than once."""
    out = []
    offset = 0
    for part in parts:
        turn = offset % 4
        out.append(apply_mask(part, mask[turn:] + mask[:turn] if turn else mask))
        offset += len(part)
    return out


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        tune_socket(sock)


class WebSocketEndpoint(asyncio.Protocol):
    """Base class: subclasses override the ``on_*`` hooks."""

    transport: asyncio.Transport | None
    #: ``on_binary`` may be given a memoryview of the received bytes (valid for the
    #: call only) instead of a copy: set by subclasses that copy what they keep.
    binary_views = False

    def __init__(self, ws: WsProtocol) -> None:
        self.ws = ws
        self.transport = None
        self.write_paused = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._peer = "?"
        # The shorter path for whole binary frames (see the module's docstring): on
        # once the connection is open and websockets' parser sits between frames.
        self._fast = False
        self._rbuf = bytearray()  # a frame's first bytes, until the rest arrives
        self._need = 0  # how many bytes _rbuf needs before it is worth parsing again
        self._max_frame = 0
        self._client = isinstance(ws, ClientProtocol)
        self._refused = False  # set once a fragmented text message was refused
        # A client waits for the handshake's response; a server gets the request in
        # on_handshake and keeps nothing of it (a relay holds many tunnels).
        self.handshake: asyncio.Future[Response] | None = (
            asyncio.get_running_loop().create_future() if isinstance(ws, ClientProtocol) else None
        )

    # --- hooks ------------------------------------------------------------------------

    def on_handshake(self, event: Request | Response) -> None:
        """The opening handshake's request (server) or response (client) arrived."""

    def on_binary(self, data: bytes | memoryview) -> None:
        """A binary frame (or a continuation of one) arrived: a memoryview only where
        ``binary_views`` is set."""

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
        if self._fast:
            self._receive_fast(data)
        else:
            self._receive_slow(data)

    def _receive_slow(self, data: bytes | bytearray) -> None:
        """Everything goes through websockets' parser."""
        ws = self.ws
        ws.receive_data(data)
        self.flush()
        self._take_events()
        self._after_receive()
        if ws.state is OPEN and not self._lost:
            self._try_fast()

    def _take_events(self) -> None:
        for event in self.ws.events_received():
            if self._lost:
                return
            if isinstance(event, Frame):
                opcode = event.opcode
                if opcode is Opcode.CLOSE:
                    self.on_close_frame()
                elif self._refused:
                    pass  # closing for what the peer sent: nothing more of its data is read
                elif opcode is Opcode.BINARY or opcode is Opcode.CONT:
                    self.on_binary(bytes(event.data))
                elif opcode is Opcode.TEXT:
                    if not event.fin:
                        self._refused = True
                        self.close(1003, "fragmented text messages are not supported")
                        continue
                    self.on_text(bytes(event.data))
            else:
                handshake = self.handshake
                if handshake is not None and not handshake.done():
                    handshake.set_result(cast(Response, event))
                self.on_handshake(event)

    def _try_fast(self) -> None:
        """Take the shorter path from here on if websockets' parser is between frames,
        outside a fragmented message, with no extension that could touch a frame."""
        ws = self.ws
        if ws.extensions or ws.debug or ws.current_size is not None:
            return
        if not self._max_frame:
            sizes = [n for n in (ws.max_message_size, ws.max_fragment_size) if n is not None]
            self._max_frame = min(sizes) if sizes else 2**63 - 1
        if at_frame_boundary(ws):
            self._fast = True

    def _receive_fast(self, data: bytes | bytearray) -> None:
        """Whole binary frames go to ``on_binary`` straight from here; any other whole
        frame is handed to websockets alone; a frame this path does not take (or cannot
        yet judge) goes to websockets with everything after it, and the shorter path
        ends until websockets' parser is between frames again."""
        rbuf = self._rbuf
        if rbuf:
            rbuf += data
            if len(rbuf) < self._need:
                return
            # The stash becomes the data as it is (no copy); a later stash starts anew,
            # so nothing resizes a buffer that a view below may still refer to.
            data, self._rbuf = rbuf, bytearray()
        view = memoryview(data)
        views = self.binary_views
        ws = self.ws
        masked = not self._client  # a server reads masked frames, a client plain ones
        mask_bit = 0x80 if masked else 0
        limit = self._max_frame
        size = len(data)
        pos = 0
        while pos < size:
            if size - pos < 2:
                self._stash(data, pos, 2)
                return
            head1 = data[pos]
            head2 = data[pos + 1]
            # Checked in the order websockets checks them, each as soon as it can be.
            if head1 != _FIN_BINARY and head1 & 0x0F not in _KNOWN_OPCODES:
                return self._hand_over(data, pos)
            if head2 & 0x80 != mask_bit:
                return self._hand_over(data, pos)
            length = head2 & 0x7F
            start = pos + 2
            if length >= 126:
                start += 2 if length == 126 else 8
                if start > size:
                    self._stash(data, pos, start - pos)
                    return
                length = int.from_bytes(data[pos + 2 : start], "big")
            if length > limit:
                return self._hand_over(data, pos)
            if masked:
                start += 4
            end = start + length
            if end > size:
                self._stash(data, pos, end - pos)
                return
            if head1 == _FIN_BINARY:
                if masked:
                    self.on_binary(apply_mask(view[start:end], data[start - 4 : start]))
                else:
                    self.on_binary(view[start:end] if views else bytes(view[start:end]))
            else:
                # A frame websockets must see (control, text, fragment): alone and
                # whole, so its parser ends between frames again.
                ws.receive_data(data[pos:end])
                self.flush()
                self._take_events()
                self._after_receive()
                if ws.current_size is not None:
                    self._fast = False
                    if end < size and ws.state is not CLOSED:
                        self._receive_slow(data[end:])
                    return
            pos = end
            if self._lost:
                return
            if ws.state is not OPEN:
                # We or the peer began to close: websockets reads the rest.
                self._fast = False
                if pos < size and ws.state is not CLOSED:
                    self._receive_slow(data[pos:])
                return

    def _stash(self, data: bytes | bytearray, pos: int, need: int) -> None:
        self._rbuf += memoryview(data)[pos:]
        self._need = need

    def _hand_over(self, data: bytes | bytearray, pos: int) -> None:
        self._fast = False
        self._receive_slow(data[pos:] if pos else data)

    def eof_received(self) -> bool | None:
        if self._rbuf:  # a frame cut short: websockets judges it as it would have
            self._fast = False
            self.ws.receive_data(bytes(self._rbuf))
            self._rbuf.clear()
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
        # websockets' parser is a generator that refers to its protocol; once the
        # connection is over it waits at its end for nothing. Closing it breaks that
        # cycle: the protocol and what it buffered go with this endpoint, not at the next
        # full garbage collection. So does dropping the tracebacks of what the parser
        # failed on (a connection cut short: EOFError; a refused handshake), whose
        # frames hold the protocol.
        ws = self.ws
        ws.parser.close()
        for exc in (ws.parser_exc, ws.handshake_exc):
            if exc is not None:
                exc.__traceback__ = None
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

    def limit_messages(self, size: int) -> None:
        """Take messages of up to ``size`` bytes from now on (a peer that authenticated
        may send larger ones than a peer that has not)."""
        self.ws.max_message_size = size
        if self._max_frame:
            fragment = self.ws.max_fragment_size
            self._max_frame = size if fragment is None else min(size, fragment)

    def send_binary(self, data: bytes | bytearray | memoryview) -> None:
        self.send_message((data,))

    def send_message(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send ``parts``, in order, as one binary message: they are not joined first
        (a tunnel's message is frame headers around large payloads)."""
        if not self.is_open:
            return
        if not self._fast:
            self.ws.send_binary(parts[0] if len(parts) == 1 else b"".join(parts))
            self.flush()
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.ws.writes:  # what websockets queued goes first
            self.flush()
        # What websockets' Frame.serialize writes for a whole binary message.
        length = sum(map(len, parts))
        if self._client:
            if length < 126:
                head = bytes((_FIN_BINARY, 0x80 | length))
            elif length < 65536:
                head = struct.pack("!BBH", _FIN_BINARY, 0x80 | 126, length)
            else:
                head = struct.pack("!BBQ", _FIN_BINARY, 0x80 | 127, length)
            mask = _next_mask()
            head += mask
            parts = _masked(parts, mask)
        elif length < 126:
            head = bytes((_FIN_BINARY, length))
        elif length < 65536:
            head = struct.pack("!BBH", _FIN_BINARY, 126, length)
        else:
            head = struct.pack("!BBQ", _FIN_BINARY, 127, length)
        # Small parts are joined with what precedes them (the header, other frames'
        # headers), so they do not each cost a TLS record; large ones go as they are.
        writes: list[bytes | bytearray | memoryview] = []
        small: list[bytes | bytearray | memoryview] = [head]
        for part in parts:
            if len(part) < _JOIN_BELOW:
                small.append(part)
                continue
            if small:
                writes.append(small[0] if len(small) == 1 else b"".join(small))
                small = []
            writes.append(part)
        if small:
            writes.append(small[0] if len(small) == 1 else b"".join(small))
        if len(writes) == 1:
            transport.write(writes[0])
        else:
            transport.writelines(writes)
        if self.write_paused:
            self._check_backlog(transport)

    def send_text(self, data: bytes) -> None:
        if self.is_open:
            self.ws.send_text(data)
            self.flush()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection follows."""
        if self._lost:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing() and not transport.is_reading():
            # Reading may be paused by backpressure; the peer's close frame must be read.
            # (A transport that is closing must not be asked: asyncio's SSL transport,
            # closed twice, raises on every call until connection_lost.)
            transport.resume_reading()
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
        if self.write_paused:
            self._check_backlog(transport)

    def _check_backlog(self, transport: asyncio.Transport) -> None:
        """Past the high-water mark: is the peer reading at all?"""
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
        transport = self.transport
        if (
            self.ws.state is CLOSED
            and transport is not None
            and not self._lost
            and not transport.is_closing()
        ):
            transport.close()

    def peer_address(self) -> str:
        return self._peer


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
