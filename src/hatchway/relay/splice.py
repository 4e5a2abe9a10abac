"""Two channels on two tunnels joined end to end (a client tunnel and a device tunnel).

Each side's local sink is the other side's channel, so the credit rules of
``ChannelBinding`` chain across the relay: when one side runs out of send credit it
pauses its source, which here means the other side holds back the credit it would
return to its peer.
"""

from __future__ import annotations

from hatchway.mux.frames import ResetReason
from hatchway.tunnel.endpoint import ChannelBinding

#: The RESET reasons a RESET frame may carry (docs/PROTOCOL.md, section 4).
_WIRE_RESET_REASONS: dict[int, ResetReason] = {
    int(reason): reason for reason in ResetReason if reason is not ResetReason.TUNNEL_CLOSED
}


class SpliceBinding(ChannelBinding):
    def __init__(self) -> None:
        super().__init__()
        self.peer: SpliceBinding | None = None

    def deliver(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.forward(data)

    def deliver_eof(self) -> None:
        if self.peer is not None:
            self.peer.forward_eof()

    def pause_source(self) -> None:
        if self.peer is not None:
            self.peer.sink_paused()

    def resume_source(self) -> None:
        if self.peer is not None:
            self.peer.sink_resumed()

    def on_reset(self, reason: int, message: str) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            # TUNNEL_CLOSED is local only (this side's tunnel went away), never on the
            # wire: the other side's peer hears CONNECTION_LOST, as for any code that
            # is not one of the wire's.
            peer.reset_channel(
                _WIRE_RESET_REASONS.get(reason, ResetReason.CONNECTION_LOST), message
            )

    def on_closed(self) -> None:
        self.peer = None
