"""The sans-I/O multiplexer: one tunnel, many channels, per-channel credit.

``Multiplexer`` turns received bytes into events (``receive_data`` →
``events_received``) and commands into bytes (``open_channel``, ``send_data``... →
``data_to_send``). It performs no I/O and reads no clock, so it is tested with two
instances wired together in memory.

Channel ids: the relay opens even ids, the agent odd ids, each side's strictly
increasing; id 0 is the session itself. A frame for an id that was used and is now
closed is ignored (it crossed a RESET in flight); a frame for an id never opened is a
protocol error.

Flow control: each side advertises a receive window when it opens or accepts a
channel and may never be sent more than the credit it granted. The receiver grants
more with WINDOW frames as the application reports bytes ``consumed``, in batches of
a quarter window, so a slow reader stalls only its own channel and the bytes in flight
per channel never exceed its window.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from hatchway.errors import LocalProtocolError, RemoteProtocolError
from hatchway.mux import events as ev
from hatchway.mux.frames import (
    HEADER,
    MAX_CONTROL_PAYLOAD,
    MAX_PAYLOAD,
    MAX_SERVICE_NAME,
    MAX_WINDOW,
    SESSION_TYPES,
    U32,
    Frame,
    FrameHeaderError,
    FrameParser,
    FrameType,
    GoAwayReason,
    OpenFailure,
    ResetReason,
    decode_open,
    decode_reason,
    decode_u32,
    encode_header,
    encode_open,
    encode_reason,
)
from hatchway.text import printable

PROTOCOL_VERSION = 1
DEFAULT_WINDOW = 1024 * 1024
#: DATA frames are cut to this size when sent. A receiver acts only on whole frames, but
#: each frame (and the WebSocket message around it) costs every hop a fixed amount of
#: Python; with 256 KiB (what one read of a socket brings) bulk moved ~12 % more than
#: with 64 KiB and the relay spent ~11 % less CPU per byte (bench/README.md, 1 Dec).
DATA_CHUNK = MAX_PAYLOAD
_DATA_HEADER = HEADER.pack
DEFAULT_MAX_CHANNELS = 1024
#: Channel ids are u32: an end runs out after 2**31 opens on one tunnel.
MAX_CHANNEL_ID = 2**32 - 1


def _reason(payload: bytes, what: str) -> tuple[int, str]:
    """A peer's reason code and text; the text is for people and logs, so its line
    breaks and escape sequences are made inert."""
    code, message = decode_reason(payload, what)
    return code, printable(message, 1024)


class Role(enum.Enum):
    RELAY = "relay"
    AGENT = "agent"


class _State(enum.Enum):
    OPENING = "opening"  # we sent OPEN, no answer yet
    REQUESTED = "requested"  # the peer sent OPEN, we have not answered
    OPEN = "open"


class _Channel:
    __slots__ = (
        "id",
        "local_eof",
        "recv_credit",
        "recv_pending",
        "recv_window",
        "remote_eof",
        "send_blocked",
        "send_window",
        "service",
        "state",
    )

    def __init__(self, channel_id: int, service: str, state: _State, recv_window: int) -> None:
        self.id = channel_id
        self.service = service
        self.state = state
        self.send_window = 0
        self.send_blocked = False
        self.recv_window = recv_window
        self.recv_credit = recv_window
        self.recv_pending = 0
        self.local_eof = False
        self.remote_eof = False


class Multiplexer:
    """One end of a tunnel. Not thread-safe; drive it from one event loop."""

    def __init__(
        self,
        role: Role,
        *,
        window: int = DEFAULT_WINDOW,
        max_channels: int = DEFAULT_MAX_CHANNELS,
    ) -> None:
        if not 0 < window <= MAX_WINDOW:
            raise ValueError("window out of range")
        self.role = role
        self.window = window
        self.max_channels = max_channels
        self._parser = FrameParser()
        self._channels: dict[int, _Channel] = {}
        self._next_local = 2 if role is Role.RELAY else 1
        self._last_remote = 0
        self._remote_parity = 1 if role is Role.RELAY else 0
        self._events: list[ev.Event] = []
        self._out: list[bytes] = []
        self.established = False
        self.goaway_sent = False
        self.goaway_received = False
        self.failed: RemoteProtocolError | None = None

    # --- session ---------------------------------------------------------------------

    def send_hello(self, info: dict[str, Any]) -> None:
        payload = json.dumps(info, separators=(",", ":")).encode()
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError("HELLO too large")
        self._control(FrameType.HELLO, 0, payload)

    def mark_established(self) -> None:
        """Called once the peer is authenticated: channels may be opened from now on."""
        self.established = True

    def send_ping(self, payload: bytes = b"") -> None:
        self._control(FrameType.PING, 0, payload[:8])

    def send_goaway(self, reason: GoAwayReason, message: str = "") -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self._control(FrameType.GOAWAY, 0, encode_reason(reason, message))

    # --- channels --------------------------------------------------------------------

    def open_channel(self, service: str) -> int:
        if not self.established:
            raise LocalProtocolError("the tunnel is not established yet")
        if self.goaway_sent or self.goaway_received:
            raise LocalProtocolError("the tunnel is closing")
        if not service or len(service) > MAX_SERVICE_NAME:
            raise LocalProtocolError("invalid service name")
        if self.ids_used_up:
            raise LocalProtocolError("no channel ids left on this tunnel")
        channel_id = self._next_local
        self._next_local += 2
        self._channels[channel_id] = _Channel(channel_id, service, _State.OPENING, self.window)
        self._control(FrameType.OPEN, channel_id, encode_open(self.window, service))
        return channel_id

    @property
    def ids_used_up(self) -> bool:
        """True once this end has opened its last channel id: only a new tunnel can
        open more."""
        return self._next_local > MAX_CHANNEL_ID

    def accept_channel(self, channel_id: int) -> None:
        """Accept a requested channel; a no-op if the peer already reset it (its
        ``ChannelReset`` event tells the application)."""
        ch = self._requested(channel_id)
        if ch is not None:
            ch.state = _State.OPEN
            self._control(FrameType.OPEN_OK, channel_id, U32.pack(self.window))

    def reject_channel(self, channel_id: int, reason: OpenFailure, message: str) -> None:
        """Refuse a requested channel; a no-op if the peer already reset it."""
        if self._requested(channel_id) is not None:
            del self._channels[channel_id]
            self._control(FrameType.OPEN_FAILED, channel_id, encode_reason(reason, message))

    def send_window(self, channel_id: int) -> int:
        ch = self._channels.get(channel_id)
        return ch.send_window if ch is not None and ch.state is _State.OPEN else 0

    def send_data(self, channel_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the peer's credit allows; return how much.

        When less than all of it was taken, a ``SendWindowAvailable`` event follows
        once the peer grants more credit.
        """
        ch = self._get(channel_id, _State.OPEN)
        if ch.local_eof:
            raise LocalProtocolError(f"channel {channel_id}: data after EOF")
        total = len(data)
        n = min(total, ch.send_window)
        if n < total:
            ch.send_blocked = True
        if n == 0:
            return 0
        ch.send_window -= n
        if n == total and n <= DATA_CHUNK:  # one frame: the common case
            self._out += (_DATA_HEADER(FrameType.DATA, channel_id, n), bytes(data))
            return n
        view = memoryview(data)
        out = self._out
        for start in range(0, n, DATA_CHUNK):
            chunk = view[start : min(n, start + DATA_CHUNK)]
            out.append(encode_header(FrameType.DATA, channel_id, len(chunk)))
            out.append(bytes(chunk))
        return n

    def consumed(self, channel_id: int, n: int) -> None:
        """The application has delivered ``n`` received bytes: grant the peer credit."""
        ch = self._channels.get(channel_id)
        if ch is None or ch.remote_eof or n <= 0:
            return
        ch.recv_pending += n
        if ch.recv_pending >= ch.recv_window // 4:
            grant, ch.recv_pending = ch.recv_pending, 0
            ch.recv_credit += grant
            self._control(FrameType.WINDOW, channel_id, U32.pack(grant))

    def send_eof(self, channel_id: int) -> None:
        ch = self._get(channel_id, _State.OPEN)
        if ch.local_eof:
            return
        ch.local_eof = True
        self._control(FrameType.EOF, channel_id, b"")
        if ch.remote_eof:
            del self._channels[channel_id]
            self._events.append(ev.ChannelClosed(channel_id))

    def reset_channel(
        self, channel_id: int, reason: ResetReason = ResetReason.CANCEL, message: str = ""
    ) -> None:
        if self._channels.pop(channel_id, None) is not None:
            self._control(FrameType.RESET, channel_id, encode_reason(reason, message))

    def channel_ids(self) -> list[int]:
        return list(self._channels)

    def is_open(self, channel_id: int) -> bool:
        """True while data and EOF may still be sent on the channel."""
        ch = self._channels.get(channel_id)
        return ch is not None and ch.state is _State.OPEN and not ch.local_eof

    def is_requested(self, channel_id: int) -> bool:
        """True while a channel the peer asked for still awaits our answer."""
        ch = self._channels.get(channel_id)
        return ch is not None and ch.state is _State.REQUESTED

    def service_of(self, channel_id: int) -> str | None:
        ch = self._channels.get(channel_id)
        return ch.service if ch is not None else None

    # --- I/O -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer. A ``RemoteProtocolError`` ends the tunnel: send
        what ``data_to_send`` returns (a GOAWAY) and close."""
        if self.failed is not None:
            # A fresh traceback: re-raising the same object would chain every call's
            # frames (and the bytes they hold) onto it.
            raise self.failed.with_traceback(None)
        channels, events, established = self._channels, self._events, self.established
        header_error: FrameHeaderError | None = None
        try:
            frames = self._parser.feed(data)
        except FrameHeaderError as refused:
            # The frames before the bad header are handled first (PROTOCOL.md section
            # 7); they leave the exception, which outlives this call as ``failed``.
            # (Not named ``exc``: mypyc gives a name one type for the whole function.)
            frames, refused.frames = refused.frames, []
            header_error = refused
        try:
            for frame in frames:
                ftype, channel_id, payload = frame
                if ftype is FrameType.DATA and established:
                    # The common frame in one step; anything unusual about it (an
                    # unknown or closed channel, no credit, no payload) takes _handle.
                    ch = channels.get(channel_id)
                    if (
                        ch is not None
                        and ch.state is _State.OPEN
                        and not ch.remote_eof
                        and 0 < len(payload) <= ch.recv_credit
                    ):
                        ch.recv_credit -= len(payload)
                        events.append(ev.DataReceived(channel_id, payload))
                        continue
                self._handle(frame)
            if header_error is not None:
                raise header_error
        except RemoteProtocolError as exc:
            self.failed = exc
            self.send_goaway(GoAwayReason.PROTOCOL_ERROR, str(exc))
            raise

    def events_received(self) -> list[ev.Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    # --- internals -------------------------------------------------------------------

    def _control(self, ftype: FrameType, channel_id: int, payload: bytes) -> None:
        self._out.append(encode_header(ftype, channel_id, len(payload)) + payload)

    def _get(self, channel_id: int, state: _State) -> _Channel:
        ch = self._channels.get(channel_id)
        if ch is None:
            raise LocalProtocolError(f"channel {channel_id} does not exist")
        if ch.state is not state:
            raise LocalProtocolError(f"channel {channel_id} is {ch.state.value}")
        return ch

    def _requested(self, channel_id: int) -> _Channel | None:
        """The channel to answer; None if it is closed: the peer reset it, perhaps in
        the very message that carried its OPEN, before the application answered."""
        closed = channel_id not in self._channels and 0 < channel_id <= self._last_remote
        if closed and channel_id % 2 == self._remote_parity:
            return None
        return self._get(channel_id, _State.REQUESTED)

    def _was_used(self, channel_id: int) -> bool:
        if channel_id % 2 == self._remote_parity:
            return channel_id <= self._last_remote
        return channel_id < self._next_local

    def _handle(self, frame: Frame) -> None:
        ftype = frame.type
        if ftype in SESSION_TYPES:
            if frame.channel != 0:
                raise RemoteProtocolError(f"{ftype.name} frame on channel {frame.channel}")
            self._handle_session(frame)
            return
        if frame.channel == 0:
            raise RemoteProtocolError(f"{ftype.name} frame on channel 0")
        if not self.established:
            raise RemoteProtocolError(f"{ftype.name} frame before the tunnel was established")
        if ftype is FrameType.OPEN:
            self._handle_open(frame)
            return
        ch = self._channels.get(frame.channel)
        if ch is None:
            if self._was_used(frame.channel):
                return  # crossed a RESET or OPEN_FAILED in flight
            raise RemoteProtocolError(f"{ftype.name} frame for unknown channel {frame.channel}")
        if ftype is FrameType.DATA:
            self._handle_data(ch, frame.payload)
        elif ftype is FrameType.WINDOW:
            self._handle_window(ch, decode_u32(frame.payload, "WINDOW"))
        elif ftype is FrameType.EOF:
            self._handle_eof(ch)
        elif ftype is FrameType.RESET:
            reason, message = _reason(frame.payload, "RESET")
            del self._channels[ch.id]
            self._events.append(ev.ChannelReset(ch.id, reason, message))
        elif ftype is FrameType.OPEN_OK:
            if ch.state is not _State.OPENING:
                raise RemoteProtocolError(f"OPEN_OK for channel {ch.id} which is not opening")
            window = decode_u32(frame.payload, "OPEN_OK")
            if window == 0 or window > MAX_WINDOW:
                raise RemoteProtocolError(f"invalid window size {window}")
            ch.state = _State.OPEN
            ch.send_window = window
            self._events.append(ev.ChannelOpened(ch.id))
        elif ftype is FrameType.OPEN_FAILED:
            if ch.state is not _State.OPENING:
                raise RemoteProtocolError(f"OPEN_FAILED for channel {ch.id} which is not opening")
            reason, message = _reason(frame.payload, "OPEN_FAILED")
            del self._channels[ch.id]
            self._events.append(ev.ChannelOpenFailed(ch.id, reason, message))

    def _handle_session(self, frame: Frame) -> None:
        ftype = frame.type
        if not self.established and ftype in (FrameType.PING, FrameType.PONG):
            # Nobody pings before the welcome; an unauthenticated peer gets no answers.
            raise RemoteProtocolError(f"{ftype.name} frame before the tunnel was established")
        if ftype is FrameType.PING:
            self._control(FrameType.PONG, 0, frame.payload)
        elif ftype is FrameType.PONG:
            self._events.append(ev.PongReceived(frame.payload))
        elif ftype is FrameType.HELLO:
            if self.established:
                raise RemoteProtocolError("HELLO after the tunnel was established")
            try:
                info = json.loads(frame.payload)
            except (ValueError, RecursionError):  # deep nesting fits in 8 KiB
                raise RemoteProtocolError("HELLO is not valid JSON") from None
            if not isinstance(info, dict):
                raise RemoteProtocolError("HELLO is not a JSON object")
            self._events.append(ev.HelloReceived(info))
        elif ftype is FrameType.GOAWAY:
            reason, message = _reason(frame.payload, "GOAWAY")
            self.goaway_received = True
            self._events.append(ev.GoAwayReceived(reason, message))

    def _handle_open(self, frame: Frame) -> None:
        channel_id = frame.channel
        if channel_id % 2 != self._remote_parity or channel_id <= self._last_remote:
            raise RemoteProtocolError(f"OPEN with invalid channel id {channel_id}")
        self._last_remote = channel_id
        window, service = decode_open(frame.payload)
        if self.goaway_sent:
            self._control(
                FrameType.OPEN_FAILED,
                channel_id,
                encode_reason(OpenFailure.SHUTTING_DOWN, "the tunnel is closing"),
            )
            return
        if len(self._channels) >= self.max_channels:
            self._control(
                FrameType.OPEN_FAILED,
                channel_id,
                encode_reason(OpenFailure.TOO_MANY_CHANNELS, "too many open channels"),
            )
            return
        ch = _Channel(channel_id, service, _State.REQUESTED, self.window)
        ch.send_window = window
        self._channels[channel_id] = ch
        self._events.append(ev.ChannelRequested(channel_id, service))

    def _handle_data(self, ch: _Channel, payload: bytes) -> None:
        if ch.state is not _State.OPEN:
            raise RemoteProtocolError(f"DATA for channel {ch.id} which is {ch.state.value}")
        if ch.remote_eof:
            raise RemoteProtocolError(f"DATA after EOF on channel {ch.id}")
        n = len(payload)
        if n > ch.recv_credit:
            raise RemoteProtocolError(
                f"channel {ch.id}: {n} bytes sent with only {ch.recv_credit} bytes of credit"
            )
        ch.recv_credit -= n
        if n:
            self._events.append(ev.DataReceived(ch.id, payload))

    def _handle_window(self, ch: _Channel, increment: int) -> None:
        if increment == 0:
            raise RemoteProtocolError(f"WINDOW of 0 on channel {ch.id}")
        if ch.state is not _State.OPEN:
            raise RemoteProtocolError(f"WINDOW for channel {ch.id} which is {ch.state.value}")
        ch.send_window += increment
        if ch.send_window > MAX_WINDOW:
            raise RemoteProtocolError(f"channel {ch.id}: window overflow")
        if ch.send_blocked and ch.state is _State.OPEN and not ch.local_eof:
            ch.send_blocked = False
            self._events.append(ev.SendWindowAvailable(ch.id))

    def _handle_eof(self, ch: _Channel) -> None:
        if ch.state is not _State.OPEN:
            raise RemoteProtocolError(f"EOF for channel {ch.id} which is {ch.state.value}")
        if ch.remote_eof:
            raise RemoteProtocolError(f"second EOF on channel {ch.id}")
        ch.remote_eof = True
        self._events.append(ev.EofReceived(ch.id))
        if ch.local_eof:
            del self._channels[ch.id]
            self._events.append(ev.ChannelClosed(ch.id))
