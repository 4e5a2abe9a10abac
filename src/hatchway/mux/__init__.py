"""The sans-I/O tunnel multiplexer. See docs/PROTOCOL.md for the wire format."""

from hatchway.mux.events import (
    ChannelClosed,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelRequested,
    ChannelReset,
    DataReceived,
    EofReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    SendWindowAvailable,
)
from hatchway.mux.frames import (
    MAX_PAYLOAD,
    Frame,
    FrameParser,
    FrameType,
    GoAwayReason,
    OpenFailure,
    ResetReason,
)
from hatchway.mux.session import DEFAULT_WINDOW, PROTOCOL_VERSION, Multiplexer, Role

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "ChannelClosed",
    "ChannelOpenFailed",
    "ChannelOpened",
    "ChannelRequested",
    "ChannelReset",
    "DataReceived",
    "EofReceived",
    "Event",
    "Frame",
    "FrameParser",
    "FrameType",
    "GoAwayReason",
    "GoAwayReceived",
    "HelloReceived",
    "Multiplexer",
    "OpenFailure",
    "PongReceived",
    "ResetReason",
    "Role",
    "SendWindowAvailable",
]
