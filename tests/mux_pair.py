"""Two multiplexers, a relay and an agent, wired together in memory.

In the spirit of h11's ``ConnectionPair`` and trio's ``memory_stream_pump``: whatever
one end queues with ``data_to_send()`` is parked on a wire and handed to the other
end's ``receive_data()`` when the test pumps, optionally a few bytes (or one byte) at
a time, so frames that straddle reads are exercised everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hatchway.mux import Event, Frame, FrameParser, Multiplexer, Role


@dataclass
class Endpoint:
    """One end of the tunnel and the bytes it has sent that the peer has not read."""

    name: str
    mux: Multiplexer
    wire: bytearray = field(default_factory=bytearray)

    def collect(self) -> None:
        for chunk in self.mux.data_to_send():
            self.wire += chunk

    def sent_frames(self) -> list[Frame]:
        """Parse (and drop) everything this end has sent and the peer has not read."""
        self.collect()
        frames = FrameParser().feed(bytes(self.wire))
        self.wire.clear()
        return frames


class MuxPair:
    def __init__(
        self,
        *,
        window: int | None = None,
        relay_window: int | None = None,
        agent_window: int | None = None,
        relay_max_channels: int | None = None,
        agent_max_channels: int | None = None,
        establish: bool = True,
    ) -> None:
        self.relay = Endpoint("relay", _mux(Role.RELAY, relay_window or window, relay_max_channels))
        self.agent = Endpoint("agent", _mux(Role.AGENT, agent_window or window, agent_max_channels))
        if establish:
            self.handshake()

    def handshake(
        self, relay_info: dict[str, Any] | None = None, agent_info: dict[str, Any] | None = None
    ) -> tuple[list[Event], list[Event]]:
        """Exchange HELLOs, then mark both ends established; return the events."""
        self.relay.mux.send_hello(relay_info or {"version": 1, "role": "relay"})
        self.agent.mux.send_hello(agent_info or {"version": 1, "role": "agent"})
        events = self.pump()
        self.relay.mux.mark_established()
        self.agent.mux.mark_established()
        return events

    def peer(self, end: Endpoint) -> Endpoint:
        return self.agent if end is self.relay else self.relay

    def deliver(
        self, sender: Endpoint, max_bytes: int | None = None, limit: int | None = None
    ) -> int:
        """Hand at most ``limit`` of ``sender``'s bytes to its peer, ``max_bytes`` per call."""
        sender.collect()
        receiver = self.peer(sender)
        total = len(sender.wire) if limit is None else min(limit, len(sender.wire))
        step = max_bytes or total or 1
        done = 0
        while done < total:
            n = min(step, total - done)
            chunk = bytes(sender.wire[:n])
            del sender.wire[:n]
            done += n
            receiver.mux.receive_data(chunk)
        return done

    def pump(self, max_bytes: int | None = None) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until both wires are empty; return (relay, agent) events.

        The events include those either end queued locally before the pump (such as
        ``ChannelClosed`` after ``send_eof``).
        """
        while self.deliver(self.relay, max_bytes) + self.deliver(self.agent, max_bytes):
            pass
        return self.relay.mux.events_received(), self.agent.mux.events_received()


def _mux(role: Role, window: int | None, max_channels: int | None) -> Multiplexer:
    kwargs: dict[str, int] = {}
    if window is not None:
        kwargs["window"] = window
    if max_channels is not None:
        kwargs["max_channels"] = max_channels
    return Multiplexer(role, **kwargs)
