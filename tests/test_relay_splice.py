"""The relay's splice (relay/splice.py): a client's channel and a device's channel joined
end to end. A RESET on one leg resets the other, with a reason the wire may carry:
TUNNEL_CLOSED is local only (PROTOCOL.md section 4, RESET reasons)."""

from __future__ import annotations

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from hatchway.mux import ChannelRequested, ChannelReset, Multiplexer, ResetReason, Role
from hatchway.relay.splice import SpliceBinding
from hatchway.tunnel.endpoint import TunnelEndpoint
from tests.test_tunnel_endpoint import FakeTransport, transport_of

pytestmark = pytest.mark.timeout(30)

WIRE_REASONS = [reason for reason in ResetReason if reason is not ResetReason.TUNNEL_CLOSED]


class Leg(SpliceBinding):
    """A splice leg that records the resets it is asked to send."""

    def __init__(self) -> None:
        super().__init__()
        self.resets: list[tuple[int, str]] = []

    def reset_channel(self, reason: ResetReason, message: str) -> None:
        self.resets.append((reason, message))


def spliced() -> tuple[Leg, Leg]:
    a, b = Leg(), Leg()
    a.peer, b.peer = b, a
    return a, b


@pytest.mark.parametrize("reason", WIRE_REASONS)
def test_a_wire_reason_passes_through(reason: ResetReason) -> None:
    a, b = spliced()
    a.on_reset(reason, "why")
    assert b.resets == [(reason, "why")]
    assert type(b.resets[0][0]) is ResetReason
    assert a.peer is None and b.peer is None


@pytest.mark.parametrize("reason", [ResetReason.TUNNEL_CLOSED, 6, 255])
def test_tunnel_closed_and_unknown_reasons_go_on_as_connection_lost(reason: int) -> None:
    a, b = spliced()
    a.on_reset(reason, "the tunnel to dev1 closed")
    assert b.resets == [(ResetReason.CONNECTION_LOST, "the tunnel to dev1 closed")]
    a.on_reset(reason, "again")  # the splice is undone: once only
    b.on_reset(reason, "back")
    assert a.resets == [] and b.resets == [
        (ResetReason.CONNECTION_LOST, "the tunnel to dev1 closed")
    ]


# --- through two relay tunnels --------------------------------------------------------


class DeviceDown(TunnelEndpoint):
    def closed_text(self) -> str:
        return "the tunnel to dev1 closed"


class ClientDown(TunnelEndpoint):
    def closed_text(self) -> str:
        return "the connection to the relay was lost"


def relay_tunnel(tunnel_class: type[TunnelEndpoint]) -> TunnelEndpoint:
    tunnel = tunnel_class(ServerProtocol(state=OPEN), Role.RELAY, window=64 * 1024, max_channels=16)
    tunnel.connection_made(FakeTransport())  # type: ignore[arg-type]
    tunnel.mux.mark_established()
    return tunnel


def to_relay(tunnel: TunnelEndpoint, data: bytes) -> None:
    """One WebSocket message from a client or an agent (masked)."""
    tunnel.data_received(WsFrame(Opcode.BINARY, data).serialize(mask=True, extensions=[]))


def from_relay(tunnel: TunnelEndpoint) -> bytes:
    """The hatchway bytes the relay sent on ``tunnel``."""
    tunnel._flush_mux()
    transport = transport_of(tunnel)
    peer = ClientProtocol(parse_uri("wss://relay.example/"), state=OPEN)
    peer.receive_data(bytes(transport.written))
    transport.written.clear()
    frames = [e for e in peer.events_received() if isinstance(e, WsFrame)]
    return b"".join(f.data for f in frames if f.opcode is Opcode.BINARY)


def established(role: Role) -> Multiplexer:
    mux = Multiplexer(role)
    mux.mark_established()
    return mux


def splice_through(
    client_class: type[TunnelEndpoint], device_class: type[TunnelEndpoint]
) -> tuple[TunnelEndpoint, Multiplexer, int, TunnelEndpoint, Multiplexer, int]:
    """A client channel to "dev1/ssh" spliced by the relay to a channel on the device's
    tunnel, as relay/client_tunnels.py does: both open."""
    device_tunnel = relay_tunnel(device_class)

    class ClientTunnel(client_class):  # type: ignore[valid-type, misc]
        def on_channel_requested(self, channel: int, service: str) -> None:
            client_leg, device_leg = SpliceBinding(), SpliceBinding()
            client_leg.peer, device_leg.peer = device_leg, client_leg
            device_tunnel.open_binding(service, device_leg)
            device_leg.on_open_ok = lambda: self.attach(channel, client_leg)  # type: ignore[method-assign]

    client_tunnel = relay_tunnel(ClientTunnel)
    client, agent = established(Role.AGENT), established(Role.AGENT)
    client_channel = client.open_channel("dev1/ssh")
    to_relay(client_tunnel, b"".join(client.data_to_send()))
    agent.receive_data(from_relay(device_tunnel))
    (request,) = agent.events_received()
    assert isinstance(request, ChannelRequested)
    agent.accept_channel(request.channel)
    to_relay(device_tunnel, b"".join(agent.data_to_send()))
    client.receive_data(from_relay(client_tunnel))
    assert client.is_open(client_channel) and agent.is_open(request.channel)
    client.events_received()
    return client_tunnel, client, client_channel, device_tunnel, agent, request.channel


async def test_the_device_tunnel_dropping_resets_the_client_with_connection_lost() -> None:
    client_tunnel, client, channel, device_tunnel, _, _ = splice_through(TunnelEndpoint, DeviceDown)
    device_tunnel.connection_lost(None)
    client.receive_data(from_relay(client_tunnel))
    assert client.events_received() == [
        ChannelReset(channel, ResetReason.CONNECTION_LOST, "the tunnel to dev1 closed")
    ]


async def test_the_client_tunnel_dropping_resets_the_device_with_connection_lost() -> None:
    client_tunnel, _, _, device_tunnel, agent, channel = splice_through(ClientDown, TunnelEndpoint)
    client_tunnel.connection_lost(None)
    agent.receive_data(from_relay(device_tunnel))
    assert agent.events_received() == [
        ChannelReset(channel, ResetReason.CONNECTION_LOST, "the connection to the relay was lost")
    ]


async def test_a_reset_from_the_device_reaches_the_client_unchanged() -> None:
    client_tunnel, client, client_channel, device_tunnel, agent, channel = splice_through(
        TunnelEndpoint, TunnelEndpoint
    )
    agent.reset_channel(channel, ResetReason.CANCEL, "gave up")
    to_relay(device_tunnel, b"".join(agent.data_to_send()))
    client.receive_data(from_relay(client_tunnel))
    assert client.events_received() == [ChannelReset(client_channel, ResetReason.CANCEL, "gave up")]
