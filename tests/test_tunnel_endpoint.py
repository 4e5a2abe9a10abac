"""Tunnel endpoints (tunnel/endpoint.py, tunnel/websocket.py) over a fake transport: a
peer that sends but never reads, a channel reset in the message that opened it, and a
tunnel that has used up its channel ids."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from pathlib import Path

import pytest
import sqlalchemy.exc
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import CLOSING, OPEN
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from hatchway.agent.config import AgentConfig, ServiceTarget
from hatchway.agent.runner import Agent, AgentTunnel
from hatchway.auth.device import derive_device_key
from hatchway.mux import Frame, FrameParser, FrameType, GoAwayReason, Multiplexer, OpenFailure, Role
from hatchway.mux.events import ChannelRequested
from hatchway.relay.registry import OnlineDevice
from hatchway.relay.server import RelayConfig, RelayServer
from hatchway.relay.tunnels import RelayTunnel
from hatchway.tunnel.endpoint import TUNNEL_HIGH_WATER, ChannelBinding, TunnelEndpoint
from hatchway.tunnel.websocket import WRITE_BUFFER_CAP
from tests.procs import free_port

pytestmark = pytest.mark.timeout(30)

WINDOW = 64 * 1024
PING = Frame(FrameType.PING, 0, b"12345678").serialize()


class FakeTransport:
    """Keeps what is written; reports ``buffered`` as its write buffer's size."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.buffered = 0
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def is_reading(self) -> bool:
        return True

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class Recorder(ChannelBinding):
    def __init__(self) -> None:
        super().__init__()
        self.failures: list[tuple[int, str]] = []

    def deliver(self, data: bytes) -> None:
        pass

    def deliver_eof(self) -> None:
        pass

    def pause_source(self) -> None:
        pass

    def resume_source(self) -> None:
        pass

    def on_open_failed(self, reason: int, message: str) -> None:
        self.failures.append((reason, message))


def agent_side(tunnel_class: type[TunnelEndpoint] = TunnelEndpoint) -> TunnelEndpoint:
    ws = ClientProtocol(parse_uri("wss://relay.example/"), state=OPEN)
    tunnel = tunnel_class(ws, Role.AGENT, window=WINDOW, max_channels=16)
    tunnel.connection_made(FakeTransport())  # type: ignore[arg-type]
    return tunnel


def transport_of(tunnel: TunnelEndpoint) -> FakeTransport:
    assert isinstance(tunnel.transport, FakeTransport)
    return tunnel.transport


def from_relay(tunnel: TunnelEndpoint, opcode: Opcode, data: bytes) -> None:
    """One WebSocket frame from the relay, as the agent's connection reads it."""
    tunnel.data_received(WsFrame(opcode, data).serialize(mask=False, extensions=[]))


def sent(tunnel: TunnelEndpoint) -> tuple[list[Frame], list[WsFrame]]:
    """The hatchway frames the tunnel sent, and its other WebSocket frames."""
    tunnel._flush_mux()
    server = ServerProtocol(state=OPEN)
    transport = transport_of(tunnel)
    server.receive_data(bytes(transport.written))
    transport.written.clear()
    frames = [e for e in server.events_received() if isinstance(e, WsFrame)]
    binary = b"".join(f.data for f in frames if f.opcode is Opcode.BINARY)
    return FrameParser().feed(binary), [f for f in frames if f.opcode is not Opcode.BINARY]


# --- a peer that sends but never reads ------------------------------------------------------


async def test_a_peer_that_never_reads_is_aborted_past_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PONGs are answers the windows do not bound: past the cap (plus a window for each
    channel, which data may still fill) the connection is aborted, once, with a log line."""
    tunnel = agent_side()
    transport = transport_of(tunnel)
    tunnel.mux.mark_established()
    relay = Multiplexer(Role.RELAY, window=WINDOW)
    relay.mark_established()
    for _ in range(2):
        tunnel.open_binding("svc", Recorder())
    relay.receive_data(b"".join(tunnel.mux.data_to_send()))
    for event in relay.events_received():
        assert isinstance(event, ChannelRequested)
        relay.accept_channel(event.channel)
    from_relay(tunnel, Opcode.BINARY, b"".join(relay.data_to_send()))
    assert len(tunnel.bindings) == 2
    sent(tunnel)

    # Congested, with as much waiting as two channels' data may legitimately add.
    transport.buffered = WRITE_BUFFER_CAP + 2 * WINDOW
    tunnel.pause_writing()
    from_relay(tunnel, Opcode.BINARY, PING)
    frames, _ = sent(tunnel)
    assert [f.type for f in frames] == [FrameType.PONG] and not transport.aborted

    transport.buffered += 1
    with caplog.at_level(logging.WARNING):
        from_relay(tunnel, Opcode.BINARY, PING * 2)
        assert transport.aborted
        sent(tunnel)
        from_relay(tunnel, Opcode.BINARY, PING)
    assert [r.getMessage() for r in caplog.records] == [
        f"tunnel None: the peer does not read ({WRITE_BUFFER_CAP + 2 * WINDOW + 1} bytes "
        "waiting to be sent), aborting"
    ]
    # Nothing more is written to the aborted connection.
    assert sent(tunnel) == ([], [])


async def test_websocket_pings_before_the_handshake_get_the_high_water_mark_only() -> None:
    """A tunnel handshake sends a few small messages: an unauthenticated peer that has
    the library answer its WebSocket pings is aborted just past the high-water mark."""
    tunnel = agent_side()
    transport = transport_of(tunnel)
    transport.buffered = TUNNEL_HIGH_WATER
    tunnel.pause_writing()
    from_relay(tunnel, Opcode.PING, b"p" * 125)
    assert not transport.aborted
    transport.buffered += 1
    from_relay(tunnel, Opcode.PING, b"p" * 125)
    assert transport.aborted


async def test_data_below_the_high_water_mark_is_never_checked() -> None:
    tunnel = agent_side()
    transport = transport_of(tunnel)
    transport.buffered = 10 * WRITE_BUFFER_CAP  # not paused: the transport says all is well
    tunnel.mux.mark_established()
    from_relay(tunnel, Opcode.BINARY, PING)
    assert not transport.aborted


# --- OPEN and RESET of one channel in one message ---------------------------------------------


async def test_agent_survives_open_then_reset_of_an_unexposed_service() -> None:
    """The agent refuses the unexposed service after the batch, when the RESET already
    removed the channel: no OPEN_FAILED, no exception, the tunnel goes on."""
    ws = ClientProtocol(parse_uri("wss://relay.example/"), state=OPEN)
    services = {"ssh": ServiceTarget("ssh", "127.0.0.1", 22)}
    config = AgentConfig("https://relay.example", "dev1", "s3cret", services=services)
    tunnel = AgentTunnel(ws, config, derive_device_key("s3cret"))
    tunnel.connection_made(FakeTransport())  # type: ignore[arg-type]
    tunnel.mux.mark_established()
    relay = Multiplexer(Role.RELAY)
    relay.mark_established()
    channel = relay.open_channel("nope")
    relay.reset_channel(channel)
    relay.send_ping(b"after")
    from_relay(tunnel, Opcode.BINARY, b"".join(relay.data_to_send()))
    frames, others = sent(tunnel)
    assert frames == [Frame(FrameType.PONG, 0, b"after")] and others == []
    assert not transport_of(tunnel).aborted and tunnel.is_open
    # The next request for it is refused as usual.
    second = relay.open_channel("nope")
    from_relay(tunnel, Opcode.BINARY, b"".join(relay.data_to_send()))
    frames, _ = sent(tunnel)
    assert [(f.type, f.channel) for f in frames] == [(FrameType.OPEN_FAILED, second)]
    assert frames[0].payload[0] == OpenFailure.UNKNOWN_SERVICE


# --- the peer's data and EOF behind the WINDOW that frees a backlog ---------------------


class Sink(ChannelBinding):
    """Records what reaches the local side, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[object] = []

    def deliver(self, data: bytes) -> None:
        self.seen.append(bytes(data))

    def deliver_eof(self) -> None:
        self.seen.append("eof")

    def pause_source(self) -> None:
        pass

    def resume_source(self) -> None:
        pass

    def on_closed(self) -> None:
        self.seen.append("closed")

    def on_reset(self, reason: int, message: str) -> None:
        self.seen.append(("reset", reason))


async def test_data_and_eof_behind_the_window_that_frees_a_pending_eof_arrive() -> None:
    """The local side sent more than the credit, then EOF: both wait. The peer's WINDOW,
    its answer and its EOF come in one message. The WINDOW lets the backlog and the EOF
    go, which ends the channel in the multiplexer; the answer and the EOF behind it
    must still reach the local side, before the channel is closed."""

    class Accepting(TunnelEndpoint):
        def on_channel_requested(self, channel: int, service: str) -> None:
            self.sink = Sink()
            self.attach(channel, self.sink)

    tunnel = agent_side(Accepting)
    tunnel.mux.mark_established()
    relay = Multiplexer(Role.RELAY, window=16)
    relay.mark_established()
    channel = relay.open_channel("svc")
    from_relay(tunnel, Opcode.BINARY, b"".join(relay.data_to_send()))
    sink = tunnel.sink  # type: ignore[attr-defined]
    frames, _ = sent(tunnel)
    relay.receive_data(b"".join(f.serialize() for f in frames))  # OPEN_OK
    sink.forward(b"A" * 32)  # 16 go, 16 wait for credit
    sink.forward_eof()  # waits behind them
    frames, _ = sent(tunnel)
    relay.receive_data(b"".join(f.serialize() for f in frames))
    relay.events_received()

    relay.consumed(channel, 16)
    relay.send_data(channel, b"answer")
    relay.send_eof(channel)
    from_relay(tunnel, Opcode.BINARY, b"".join(relay.data_to_send()))

    assert sink.seen == [b"answer", "eof", "closed"]
    assert tunnel.bindings == {}
    frames, _ = sent(tunnel)
    assert [(f.type, f.payload) for f in frames] == [
        (FrameType.DATA, b"A" * 16),
        (FrameType.EOF, b""),
    ]


# --- channel ids used up --------------------------------------------------------------------


async def test_a_tunnel_out_of_channel_ids_refuses_the_open_and_goes_away() -> None:
    """The binding hears a refused open (as every caller already handles); the tunnel
    sends GOAWAY and closes, so that a new tunnel takes its place."""
    tunnel = agent_side()
    tunnel.mux.mark_established()
    tunnel.mux._next_local = 2**32 + 1  # as after 2**31 opens
    binding = Recorder()
    assert tunnel.open_binding("svc", binding) == 0
    assert binding.failures == [] and binding.finished
    await asyncio.sleep(0)
    assert binding.failures == [(OpenFailure.SHUTTING_DOWN, "no channel ids left on this tunnel")]
    frames, others = sent(tunnel)
    assert frames == [
        Frame(FrameType.GOAWAY, 0, bytes([GoAwayReason.NORMAL]) + b"no channel ids left")
    ]
    assert [f.opcode for f in others] == [Opcode.CLOSE]
    assert tunnel.ws.state is CLOSING and tunnel.bindings == {}


async def test_relay_shuts_down_while_a_dropped_tunnel_is_closing(tmp_path: Path) -> None:
    """An agent's connection ends and the relay shuts down at once, before the TLS close
    is over: asyncio's SSL transport, once closed twice (by the EOF and by the closed
    WebSocket), raises on every call until connection_lost, and the shutdown must not
    ask it anything."""
    config = RelayConfig(data_dir=tmp_path / "relay", host="127.0.0.1", port=free_port())
    server = RelayServer(config)
    secret = server.store.add_device("dev1")
    await server.start()
    agent = Agent(
        AgentConfig(
            server=f"https://127.0.0.1:{config.port}",
            device="dev1",
            secret=secret,
            ca_file=server.ca_file,
        )
    )
    async with asyncio.timeout(20):
        tunnel = await agent.connect_once()
        tunnel.abort()
        await tunnel.done
        # Straight on, in the same loop turn as the relay's side of the close: this
        # raised AttributeError from asyncio's sslproto.
        await server.shutdown()
    assert server.registry.get("dev1") is None


# --- the relay's side of a device's handshake ---------------------------------------------


def _agent_for(secret: str) -> AgentTunnel:
    services = {"ssh": ServiceTarget("ssh", "127.0.0.1", 22)}
    config = AgentConfig("https://relay.example", "dev1", secret, services=services)
    ws = ClientProtocol(parse_uri("wss://relay.example/"), state=OPEN)
    agent = AgentTunnel(ws, config, derive_device_key(secret))
    agent.connection_made(FakeTransport())  # type: ignore[arg-type]
    return agent


def _relay_tunnel(server: RelayServer) -> RelayTunnel:
    tunnel = RelayTunnel(ServerProtocol(state=OPEN), server)
    tunnel.connection_made(FakeTransport())  # type: ignore[arg-type]
    tunnel.mux.send_hello(  # the challenge, as on_handshake sends it
        {"version": 1, "role": "relay", "nonce": base64.b64encode(tunnel.nonce).decode()}
    )
    return tunnel


def _relay_to_agent(relay: RelayTunnel, agent: AgentTunnel) -> list[list[FrameType]]:
    """Hand the agent what the relay wrote; the frame types of each WebSocket message."""
    relay._flush_mux()
    reader = ClientProtocol(parse_uri("wss://relay.example/"), state=OPEN)
    reader.receive_data(bytes(transport_of(relay).written))
    transport_of(relay).written.clear()
    messages = [e.data for e in reader.events_received() if isinstance(e, WsFrame)]
    for message in messages:
        from_relay(agent, Opcode.BINARY, message)
    return [[f.type for f in FrameParser().feed(m)] for m in messages]


def _agent_to_relay(agent: AgentTunnel, relay: RelayTunnel) -> None:
    agent._flush_mux()
    relay.data_received(bytes(transport_of(agent).written))  # masked, as on the wire
    transport_of(agent).written.clear()


async def _authenticated(relay: RelayTunnel) -> None:
    assert relay._auth_task is not None
    await relay._auth_task


async def test_the_welcome_goes_out_before_any_open_on_the_new_tunnel(tmp_path: Path) -> None:
    """The agent takes an OPEN only once it handled the welcome, and it handles a
    message's frames once it parsed all of them: an OPEN queued in the loop turn that
    registered the device must not share the welcome's message."""
    server = RelayServer(RelayConfig(data_dir=tmp_path / "relay", host="127.0.0.1", port=1))
    secret = server.store.add_device("dev1")
    relay, agent = _relay_tunnel(server), _agent_for(secret)
    _relay_to_agent(relay, agent)
    register, opened = server.registry.register, []

    def register_and_open(entry: OnlineDevice) -> OnlineDevice | None:
        previous = register(entry)
        # Anything that runs once the device is online: a stream's open, straight away.
        opened.append(entry.tunnel.open_binding("vnc", Recorder()))
        return previous

    server.registry.register = register_and_open  # type: ignore[method-assign]
    _agent_to_relay(agent, relay)  # its HELLO with the proof
    await _authenticated(relay)
    (channel,) = opened
    assert _relay_to_agent(relay, agent) == [[FrameType.HELLO], [FrameType.OPEN]]
    assert agent.mux.failed is None and agent.is_open
    frames, _ = sent(agent)  # the agent answered the OPEN (it exposes only ssh)
    assert [(f.type, f.channel, f.payload[0]) for f in frames] == [
        (FrameType.OPEN_FAILED, channel, OpenFailure.UNKNOWN_SERVICE)
    ]
    server.store.close()


@pytest.mark.parametrize("how", ["second HELLO", "GOAWAY", "close"])
async def test_a_tunnel_closing_during_its_key_lookup_replaces_nothing(
    tmp_path: Path, how: str
) -> None:
    """A connection that began to close while the relay looked up the device's key
    (a second HELLO, the agent's GOAWAY, a WebSocket close) is not registered: the
    device's working tunnel stays."""
    server = RelayServer(RelayConfig(data_dir=tmp_path / "relay", host="127.0.0.1", port=1))
    secret = server.store.add_device("dev1")
    live, live_agent = _relay_tunnel(server), _agent_for(secret)
    _relay_to_agent(live, live_agent)
    _agent_to_relay(live_agent, live)
    await _authenticated(live)
    assert server.registry.get("dev1").tunnel is live  # type: ignore[union-attr]

    late, agent = _relay_tunnel(server), _agent_for(secret)
    _relay_to_agent(late, agent)
    _agent_to_relay(agent, late)  # the HELLO: the key lookup starts in a thread
    if how == "second HELLO":
        agent.mux.send_hello({"version": 1, "device": "dev1", "proof": "AAAA"})
        _agent_to_relay(agent, late)
    elif how == "GOAWAY":
        agent.shutdown(GoAwayReason.NORMAL, "going away")
        _agent_to_relay(agent, late)
    else:
        agent.close(1000, "bye")
        _agent_to_relay(agent, late)
    assert not late.is_open or late.mux.goaway_sent or late.mux.goaway_received
    await _authenticated(late)
    assert server.registry.get("dev1").tunnel is live  # type: ignore[union-attr]
    assert live.is_open and not live.mux.goaway_sent
    assert late.device_id is None and not late.mux.established
    server.store.close()


# --- a store that fails while an upgrade is checked -----------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/connect?device=dev1&service=ssh", "/api/v1/client"])
async def test_a_store_error_in_an_upgrade_s_token_check_answers_500(
    tmp_path: Path, path: str
) -> None:
    """Not a connection left waiting with its reading paused, its timer stopped and its
    source's slot given back: an error answer, and the connection ends."""
    config = RelayConfig(data_dir=tmp_path / "relay", host="127.0.0.1", port=free_port())
    server = RelayServer(config)

    def broken(token: str) -> None:
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is locked"))

    server.store.user_for_token = broken  # type: ignore[method-assign,assignment]
    await server.start()
    try:
        context = ssl.create_default_context(cafile=str(server.ca_file))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", config.port, ssl=context, server_hostname="localhost"
        )
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: hatchway.v1\r\n"
            "Authorization: Bearer hwt_whatever\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            answer = await reader.read()  # to the end: the relay closes
        writer.close()
        assert answer.startswith(b"HTTP/1.1 500 ")
        assert b'"error": "internal"' in answer
    finally:
        await server.shutdown()
