"""Events the multiplexer reports to the code that drives it (records to read, not to
change: they are not frozen because that makes each one slower to create)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class HelloReceived:
    """The peer's HELLO: a JSON object (version, capabilities, identity...)."""

    info: dict[str, Any]


@dataclass(slots=True)
class ChannelRequested:
    """The peer asks to open ``channel`` to ``service``: accept or reject it."""

    channel: int
    service: str


@dataclass(slots=True)
class ChannelOpened:
    """The peer accepted a channel we opened."""

    channel: int


@dataclass(slots=True)
class ChannelOpenFailed:
    channel: int
    reason: int
    message: str


@dataclass(slots=True)
class DataReceived:
    """Bytes for ``channel``; report them with ``consumed()`` once delivered."""

    channel: int
    data: bytes


@dataclass(slots=True)
class EofReceived:
    """The peer will send no more data on ``channel`` (TCP half-close)."""

    channel: int


@dataclass(slots=True)
class ChannelReset:
    """The channel was aborted by the peer; it is gone."""

    channel: int
    reason: int
    message: str


@dataclass(slots=True)
class ChannelClosed:
    """Both directions ended cleanly with EOF; the channel is gone."""

    channel: int


@dataclass(slots=True)
class SendWindowAvailable:
    """A channel whose sender was held back by flow control may send again."""

    channel: int


@dataclass(slots=True)
class PongReceived:
    payload: bytes


@dataclass(slots=True)
class GoAwayReceived:
    """The peer is closing the tunnel; no new channels will be accepted."""

    reason: int
    message: str


Event = (
    HelloReceived
    | ChannelRequested
    | ChannelOpened
    | ChannelOpenFailed
    | DataReceived
    | EofReceived
    | ChannelReset
    | ChannelClosed
    | SendWindowAvailable
    | PongReceived
    | GoAwayReceived
)
