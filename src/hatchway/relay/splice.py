"""Two channels on two tunnels joined end to end (a client tunnel and a device tunnel).

Each side's local sink is the other side's channel, so the credit rules of
``ChannelBinding`` chain across the relay: when one side runs out of send credit it
pauses its source, which here means the other side holds back the credit it would
return to its peer.
"""

from __future__ import annotations

from hatchway.mux.frames import ResetReason
from hatchway.tunnel.endpoint import ChannelBinding


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
            known = reason in ResetReason._value2member_map_
            peer.reset_channel(
                ResetReason(reason) if known else ResetReason.CONNECTION_LOST, message
            )

    def on_closed(self) -> None:
        self.peer = None
