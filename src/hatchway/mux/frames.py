"""Tunnel frames: their types, their wire layout, and a bounded incremental parser.

Every frame is a 9-byte header followed by a payload::

    0       1               5               9
    +-------+---------------+---------------+------------ ... -+
    | type  | channel (u32) | length (u32)  | payload          |
    +-------+---------------+---------------+------------ ... -+

All integers are big-endian. Frames travel as a byte stream inside WebSocket binary
messages: a message may carry several frames and a frame may span messages.
docs/PROTOCOL.md is the reference; keep it in step with this module.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from hatchway.errors import RemoteProtocolError

HEADER = struct.Struct("!BII")
HEADER_SIZE = HEADER.size
U32 = struct.Struct("!I")
OPEN_FAILED_HEAD = struct.Struct("!B")

#: Largest payload a frame may carry. DATA frames are cut to at most this size.
MAX_PAYLOAD = 256 * 1024
#: Largest control payload (HELLO, OPEN, GOAWAY...): these are small by nature.
MAX_CONTROL_PAYLOAD = 8 * 1024
#: Long enough for "DEVICE/SERVICE" on client tunnels (63 + 1 + 32).
MAX_SERVICE_NAME = 128
MAX_WINDOW = 2**31 - 1


class FrameType(enum.IntEnum):
    HELLO = 0x01
    OPEN = 0x02
    OPEN_OK = 0x03
    OPEN_FAILED = 0x04
    DATA = 0x05
    EOF = 0x06
    RESET = 0x07
    WINDOW = 0x08
    PING = 0x09
    PONG = 0x0A
    GOAWAY = 0x0B


class OpenFailure(enum.IntEnum):
    """Why a channel could not be opened; the user sees the matching text."""

    UNKNOWN_SERVICE = 1
    REFUSED = 2
    UNREACHABLE = 3
    TIMEOUT = 4
    NOT_PERMITTED = 5
    TOO_MANY_CHANNELS = 6
    SHUTTING_DOWN = 7
    OFFLINE = 8
    BAD_REQUEST = 9


class ResetReason(enum.IntEnum):
    CANCEL = 0
    CONNECTION_LOST = 1
    PROTOCOL_ERROR = 2
    FLOW_CONTROL = 3
    REVOKED = 4
    TUNNEL_CLOSED = 5


class GoAwayReason(enum.IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    AUTH_FAILED = 2
    REPLACED = 3
    SHUTDOWN = 4
    TIMEOUT = 5
    VERSION = 6


#: The largest payload each frame type may carry; a header announcing more is refused
#: before its payload is read.
PAYLOAD_LIMITS: dict[int, int] = {
    FrameType.HELLO: MAX_CONTROL_PAYLOAD,
    FrameType.OPEN: MAX_CONTROL_PAYLOAD,
    FrameType.OPEN_OK: 4,
    FrameType.OPEN_FAILED: MAX_CONTROL_PAYLOAD,
    FrameType.DATA: MAX_PAYLOAD,
    FrameType.EOF: 0,
    FrameType.RESET: MAX_CONTROL_PAYLOAD,
    FrameType.WINDOW: 4,
    FrameType.PING: 8,
    FrameType.PONG: 8,
    FrameType.GOAWAY: MAX_CONTROL_PAYLOAD,
}
# For the parser: each type's member and payload limit in one lookup.
_LIMITS: dict[int, tuple[FrameType, int]] = {
    int(ftype): (FrameType(ftype), limit) for ftype, limit in PAYLOAD_LIMITS.items()
}
_new_frame = tuple.__new__
#: Frames that always travel on channel 0.
SESSION_TYPES = frozenset({FrameType.HELLO, FrameType.PING, FrameType.PONG, FrameType.GOAWAY})


class Frame(NamedTuple):
    """One frame (immutable; a tuple, so that the parser makes one cheaply)."""

    type: FrameType
    channel: int
    payload: bytes = b""

    def serialize(self) -> bytes:
        return HEADER.pack(self.type, self.channel, len(self.payload)) + self.payload


def encode_header(frame_type: FrameType, channel: int, length: int) -> bytes:
    return HEADER.pack(frame_type, channel, length)


def encode_open(window: int, service: str) -> bytes:
    return U32.pack(window) + service.encode()


def decode_open(payload: bytes) -> tuple[int, str]:
    if len(payload) < 5:
        raise RemoteProtocolError("OPEN frame too short")
    (window,) = U32.unpack_from(payload)
    service = _utf8(payload[4:], "service name")
    if len(service) > MAX_SERVICE_NAME:
        raise RemoteProtocolError("service name too long")
    return _window(window), service


def decode_u32(payload: bytes, what: str) -> int:
    if len(payload) != 4:
        raise RemoteProtocolError(f"{what} frame must carry 4 bytes, got {len(payload)}")
    return int(U32.unpack(payload)[0])


def encode_reason(code: int, message: str) -> bytes:
    # Cut at 1024 bytes without splitting a character: the peer rejects invalid UTF-8.
    raw = message.encode()[:1024].decode(errors="ignore").encode()
    return OPEN_FAILED_HEAD.pack(code) + raw


def decode_reason(payload: bytes, what: str) -> tuple[int, str]:
    if len(payload) < 1:
        raise RemoteProtocolError(f"{what} frame too short")
    return payload[0], _utf8(payload[1:], f"{what} message")


def _window(value: int) -> int:
    if value == 0 or value > MAX_WINDOW:
        raise RemoteProtocolError(f"invalid window size {value}")
    return value


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not UTF-8") from None


class FrameHeaderError(RemoteProtocolError):
    """The parser refused a header (an unknown type, a length over the limit).

    ``frames`` are the whole frames that came before that header in the same feed: the
    receiver still handles them before the error ends the tunnel (PROTOCOL.md section
    7), as it does for frames before one that the session refuses.
    """

    def __init__(self, message: str, frames: list[Frame]) -> None:
        super().__init__(message)
        self.frames = frames


class FrameParser:
    """Turns a byte stream into frames, holding at most one frame's worth of bytes.

    A header it refuses raises ``FrameHeaderError``, which carries the frames parsed
    before it in that feed. A stream cannot be resynchronised after a bad header: feed
    the parser nothing more then.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        buf = self._buffer
        # Whole frames are sliced straight from ``data`` when nothing is pending: one
        # copy of each payload instead of two. Only a trailing partial frame is kept.
        source: bytes | bytearray | memoryview
        if buf:
            buf += data
            source = buf
        else:
            source = data
        frames: list[Frame] = []
        offset = 0
        end = len(source)
        unpack = HEADER.unpack_from
        limits = _LIMITS
        while end - offset >= HEADER_SIZE:
            ftype, channel, length = unpack(source, offset)
            known = limits.get(ftype)
            if known is None or length > known[1]:
                raise _header_error(ftype, length, frames)
            stop = offset + HEADER_SIZE + length
            if stop > end:
                break
            payload = bytes(source[offset + HEADER_SIZE : stop])
            frames.append(_new_frame(Frame, (known[0], channel, payload)))
            offset = stop
        if source is buf:
            if offset:
                del buf[:offset]
        elif offset < end:
            buf += memoryview(data)[offset:]
        return frames


def _header_error(ftype: int, length: int, frames: list[Frame]) -> FrameHeaderError:
    """What is wrong with a header the parser refused; ``frames`` came before it."""
    limit = PAYLOAD_LIMITS.get(ftype)
    if limit is None:
        return FrameHeaderError(f"unknown frame type 0x{ftype:02x}", frames)
    return FrameHeaderError(
        f"{FrameType(ftype).name} frame of {length} bytes exceeds the limit of {limit}", frames
    )
