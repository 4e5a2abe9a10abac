"""The multiplexer: handshake, channels, flow control, half-close, resets, errors.

Most tests run a relay and an agent wired together in memory (``MuxPair``); frames a
well-behaved peer never sends are hand-crafted and fed straight to ``receive_data``.
"""

from __future__ import annotations

import struct
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hatchway.errors import LocalProtocolError, RemoteProtocolError
from hatchway.mux import (
    DEFAULT_WINDOW,
    MAX_PAYLOAD,
    ChannelClosed,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelRequested,
    ChannelReset,
    DataReceived,
    EofReceived,
    Event,
    Frame,
    FrameParser,
    FrameType,
    GoAwayReason,
    GoAwayReceived,
    HelloReceived,
    Multiplexer,
    OpenFailure,
    PongReceived,
    ResetReason,
    Role,
    SendWindowAvailable,
)
from hatchway.mux.frames import (
    MAX_CONTROL_PAYLOAD,
    MAX_SERVICE_NAME,
    MAX_WINDOW,
    PAYLOAD_LIMITS,
    FrameHeaderError,
)
from hatchway.mux.session import DATA_CHUNK
from hatchway.text import printable
from tests.mux_pair import MuxPair

U32 = struct.Struct("!I")


def shown(message: str) -> str:
    """A reason text as the other end's application gets it: cut to 1024 bytes of
    UTF-8 on the wire, then made inert (hatchway.text.printable)."""
    return printable(message.encode()[:1024].decode(errors="ignore"), 1024)


def frame(frame_type: FrameType, channel: int, payload: bytes = b"") -> bytes:
    return Frame(frame_type, channel, payload).serialize()


def open_payload(window: int, service: str) -> bytes:
    return U32.pack(window) + service.encode()


def reason_payload(code: int, message: str = "") -> bytes:
    return bytes([code]) + message.encode()


def sent_frames(mux: Multiplexer) -> list[Frame]:
    return FrameParser().feed(b"".join(mux.data_to_send()))


def received_bytes(events: list[Event], channel: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.channel == channel)


def established(role: Role, **kwargs: int) -> Multiplexer:
    mux = Multiplexer(role, **kwargs)
    mux.mark_established()
    return mux


def open_pair(
    pair: MuxPair, opener: str = "relay", service: str = "ssh", max_bytes: int | None = None
) -> int:
    """Open a channel from ``opener``, accept it on the other end, return its id."""
    src = pair.relay if opener == "relay" else pair.agent
    dst = pair.peer(src)
    channel = src.mux.open_channel(service)
    pair.pump(max_bytes)
    dst.mux.accept_channel(channel)
    relay_events, agent_events = pair.pump(max_bytes)
    src_events = relay_events if src is pair.relay else agent_events
    assert src_events == [ChannelOpened(channel)]
    return channel


@pytest.fixture
def pair() -> MuxPair:
    return MuxPair()


# --- construction and handshake -------------------------------------------------------


@pytest.mark.parametrize("window", [0, -1, MAX_WINDOW + 1])
def test_window_out_of_range_is_refused(window: int) -> None:
    with pytest.raises(ValueError, match="window"):
        Multiplexer(Role.RELAY, window=window)


def test_hello_both_ways_then_established() -> None:
    pair = MuxPair(establish=False)
    assert not pair.relay.mux.established
    relay_events, agent_events = pair.handshake({"version": 1, "x": [1, 2]}, {"version": 1})
    assert relay_events == [HelloReceived({"version": 1})]
    assert agent_events == [HelloReceived({"version": 1, "x": [1, 2]})]
    assert pair.relay.mux.established
    assert pair.agent.mux.established


def test_hello_byte_by_byte() -> None:
    pair = MuxPair(establish=False)
    pair.relay.mux.send_hello({"name": "relay-1"})
    pair.agent.mux.send_hello({"name": "agent-1", "caps": ["tcp"]})
    relay_events, agent_events = pair.pump(max_bytes=1)
    assert relay_events == [HelloReceived({"name": "agent-1", "caps": ["tcp"]})]
    assert agent_events == [HelloReceived({"name": "relay-1"})]


def test_hello_too_large_is_a_local_error() -> None:
    mux = Multiplexer(Role.AGENT)
    with pytest.raises(LocalProtocolError, match="too large"):
        mux.send_hello({"pad": "x" * MAX_CONTROL_PAYLOAD})
    assert not mux.has_data_to_send()


def test_open_before_established_is_a_local_error_on_the_sender() -> None:
    pair = MuxPair(establish=False)
    with pytest.raises(LocalProtocolError, match="not established"):
        pair.relay.mux.open_channel("ssh")
    assert not pair.relay.mux.has_data_to_send()


def test_open_before_established_is_a_remote_error_on_the_receiver() -> None:
    agent = Multiplexer(Role.AGENT)
    with pytest.raises(RemoteProtocolError, match="before the tunnel was established"):
        agent.receive_data(frame(FrameType.OPEN, 2, open_payload(1024, "ssh")))


@pytest.mark.parametrize("frame_type", [FrameType.DATA, FrameType.WINDOW, FrameType.RESET])
def test_channel_frames_before_established_are_errors(frame_type: FrameType) -> None:
    with pytest.raises(RemoteProtocolError, match="before the tunnel was established"):
        Multiplexer(Role.RELAY).receive_data(frame(frame_type, 1, b"\x00\x00\x00\x01"))


def test_hello_after_established_is_an_error(pair: MuxPair) -> None:
    pair.agent.mux.send_hello({"again": True})
    with pytest.raises(RemoteProtocolError, match="HELLO after"):
        pair.pump()


@pytest.mark.parametrize("payload", [b"{", b"", b"\xff\xfe\x00", b"{'a': 1}", b"[" * 10])
def test_invalid_json_hello_is_an_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="not valid JSON"):
        Multiplexer(Role.RELAY).receive_data(frame(FrameType.HELLO, 0, payload))


@pytest.mark.parametrize("payload", [b"[]", b"1", b'"hello"', b"null"])
def test_hello_that_is_not_an_object_is_an_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="not a JSON object"):
        Multiplexer(Role.RELAY).receive_data(frame(FrameType.HELLO, 0, payload))


def test_deeply_nested_hello_is_a_protocol_error() -> None:
    # Within the 8 KiB limit, but deeper than the interpreter's recursion limit.
    with pytest.raises(RemoteProtocolError):
        Multiplexer(Role.RELAY).receive_data(frame(FrameType.HELLO, 0, b"[" * 8000))


@pytest.mark.parametrize(
    "frame_type", [FrameType.HELLO, FrameType.PING, FrameType.PONG, FrameType.GOAWAY]
)
def test_session_frames_off_channel_zero_are_errors(frame_type: FrameType) -> None:
    with pytest.raises(RemoteProtocolError, match="on channel 1"):
        established(Role.RELAY).receive_data(frame(frame_type, 1, b"\x00"))


@pytest.mark.parametrize(
    "frame_type",
    [
        FrameType.OPEN,
        FrameType.OPEN_OK,
        FrameType.OPEN_FAILED,
        FrameType.DATA,
        FrameType.EOF,
        FrameType.RESET,
        FrameType.WINDOW,
    ],
)
def test_channel_frames_on_channel_zero_are_errors(frame_type: FrameType) -> None:
    with pytest.raises(RemoteProtocolError, match="on channel 0"):
        payload = b"\x00\x00\x00\x01x"[: PAYLOAD_LIMITS[frame_type]]
        established(Role.RELAY).receive_data(frame(frame_type, 0, payload))


# --- opening channels -----------------------------------------------------------------


def test_open_and_accept(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("ssh")
    relay_events, agent_events = pair.pump()
    assert relay_events == []
    assert agent_events == [ChannelRequested(channel, "ssh")]
    assert pair.agent.mux.service_of(channel) == "ssh"
    assert pair.relay.mux.send_window(channel) == 0  # not open yet
    assert pair.agent.mux.send_window(channel) == 0  # not accepted yet
    pair.agent.mux.accept_channel(channel)
    relay_events, agent_events = pair.pump()
    assert relay_events == [ChannelOpened(channel)]
    assert agent_events == []
    assert pair.relay.mux.send_window(channel) == DEFAULT_WINDOW
    assert pair.agent.mux.send_window(channel) == DEFAULT_WINDOW
    assert pair.relay.mux.channel_ids() == pair.agent.mux.channel_ids() == [channel]


def test_windows_are_advertised_per_side() -> None:
    pair = MuxPair(relay_window=1000, agent_window=300)
    channel = open_pair(pair, "relay")
    assert pair.relay.mux.send_window(channel) == 300
    assert pair.agent.mux.send_window(channel) == 1000
    channel = open_pair(pair, "agent")
    assert pair.relay.mux.send_window(channel) == 300
    assert pair.agent.mux.send_window(channel) == 1000


def test_open_from_the_agent(pair: MuxPair) -> None:
    channel = pair.agent.mux.open_channel("http")
    relay_events, _ = pair.pump()
    assert relay_events == [ChannelRequested(channel, "http")]
    assert pair.relay.mux.service_of(channel) == "http"
    pair.relay.mux.accept_channel(channel)
    _, agent_events = pair.pump()
    assert agent_events == [ChannelOpened(channel)]
    assert pair.agent.mux.service_of(channel) == "http"
    assert pair.agent.mux.service_of(channel + 2) is None


@pytest.mark.parametrize("reason", list(OpenFailure))
@pytest.mark.parametrize("opener", ["relay", "agent"])
def test_reject_with_every_reason(pair: MuxPair, reason: OpenFailure, opener: str) -> None:
    src = pair.relay if opener == "relay" else pair.agent
    dst = pair.peer(src)
    channel = src.mux.open_channel("db")
    pair.pump()
    message = f"nope: {reason.name.lower()} — ünïcode"
    dst.mux.reject_channel(channel, reason, message)
    assert dst.mux.channel_ids() == []
    relay_events, agent_events = pair.pump()
    src_events = relay_events if src is pair.relay else agent_events
    assert src_events == [ChannelOpenFailed(channel, reason, message)]
    assert src.mux.channel_ids() == []


def test_relay_ids_are_even_and_increasing_agent_ids_odd(pair: MuxPair) -> None:
    relay_ids = [pair.relay.mux.open_channel("s") for _ in range(5)]
    agent_ids = [pair.agent.mux.open_channel("s") for _ in range(5)]
    assert relay_ids == [2, 4, 6, 8, 10]
    assert agent_ids == [1, 3, 5, 7, 9]
    relay_events, agent_events = pair.pump()
    assert agent_events == [ChannelRequested(i, "s") for i in relay_ids]
    assert relay_events == [ChannelRequested(i, "s") for i in agent_ids]


def test_ids_are_not_reused_after_close(pair: MuxPair) -> None:
    first = open_pair(pair)
    pair.relay.mux.reset_channel(first)
    pair.pump()
    assert pair.relay.mux.open_channel("s") == first + 2


@pytest.mark.parametrize("service", ["", "x" * (MAX_SERVICE_NAME + 1)])
def test_invalid_service_name_is_a_local_error(pair: MuxPair, service: str) -> None:
    with pytest.raises(LocalProtocolError, match="service name"):
        pair.relay.mux.open_channel(service)


def test_longest_service_name_is_fine(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("é" * MAX_SERVICE_NAME)
    _, agent_events = pair.pump()
    assert agent_events == [ChannelRequested(channel, "é" * MAX_SERVICE_NAME)]


@pytest.mark.parametrize(
    ("role", "channel"),
    [(Role.AGENT, 1), (Role.AGENT, 3), (Role.RELAY, 2), (Role.RELAY, 4)],
)
def test_open_with_wrong_parity_is_an_error(role: Role, channel: int) -> None:
    with pytest.raises(RemoteProtocolError, match="invalid channel id"):
        established(role).receive_data(frame(FrameType.OPEN, channel, open_payload(10, "s")))


@pytest.mark.parametrize("second", [5, 3])
def test_open_with_reused_or_decreasing_id_is_an_error(second: int) -> None:
    relay = established(Role.RELAY)
    relay.receive_data(frame(FrameType.OPEN, 5, open_payload(10, "s")))
    assert relay.events_received() == [ChannelRequested(5, "s")]
    with pytest.raises(RemoteProtocolError, match="invalid channel id"):
        relay.receive_data(frame(FrameType.OPEN, second, open_payload(10, "s")))


def test_open_ids_may_skip(pair: MuxPair) -> None:
    relay = established(Role.RELAY)
    relay.receive_data(frame(FrameType.OPEN, 1, open_payload(10, "a")))
    relay.receive_data(frame(FrameType.OPEN, 9, open_payload(10, "b")))
    assert relay.events_received() == [ChannelRequested(1, "a"), ChannelRequested(9, "b")]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x00\x00\x01",
        U32.pack(0) + b"s",
        U32.pack(MAX_WINDOW + 1) + b"s",
        b"\0\0\0\1\xff",
    ],
)
def test_malformed_open_is_an_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        established(Role.RELAY).receive_data(frame(FrameType.OPEN, 1, payload))


def test_too_many_channels_is_refused_automatically() -> None:
    pair = MuxPair(agent_max_channels=2)
    a = open_pair(pair)
    b = pair.relay.mux.open_channel("s")
    c = pair.relay.mux.open_channel("s")
    relay_events, agent_events = pair.pump()
    assert agent_events == [ChannelRequested(b, "s")]
    assert relay_events == [
        ChannelOpenFailed(c, OpenFailure.TOO_MANY_CHANNELS, "too many open channels")
    ]
    # Closing one makes room again; the refused id stays burnt.
    pair.relay.mux.reset_channel(a)
    d = pair.relay.mux.open_channel("s")
    relay_events, agent_events = pair.pump()
    assert agent_events == [ChannelReset(a, ResetReason.CANCEL, ""), ChannelRequested(d, "s")]
    assert sorted(pair.agent.mux.channel_ids()) == [b, d]


def test_open_after_goaway_sent_is_refused_shutting_down(pair: MuxPair) -> None:
    channel = pair.agent.mux.open_channel("ssh")  # crosses the relay's GOAWAY
    pair.relay.mux.send_goaway(GoAwayReason.SHUTDOWN, "maintenance")
    relay_events, agent_events = pair.pump()
    assert relay_events == []
    assert agent_events == [
        GoAwayReceived(GoAwayReason.SHUTDOWN, "maintenance"),
        ChannelOpenFailed(channel, OpenFailure.SHUTTING_DOWN, "the tunnel is closing"),
    ]
    assert pair.relay.mux.channel_ids() == pair.agent.mux.channel_ids() == []


def test_no_open_once_goaway_was_sent_or_received(pair: MuxPair) -> None:
    pair.relay.mux.send_goaway(GoAwayReason.NORMAL)
    pair.pump()
    with pytest.raises(LocalProtocolError, match="closing"):
        pair.relay.mux.open_channel("s")
    with pytest.raises(LocalProtocolError, match="closing"):
        pair.agent.mux.open_channel("s")


def test_existing_channels_keep_working_after_goaway(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.agent.mux.send_goaway(GoAwayReason.REPLACED, "new session")
    pair.relay.mux.send_data(channel, b"still here")
    relay_events, agent_events = pair.pump()
    assert relay_events == [GoAwayReceived(GoAwayReason.REPLACED, "new session")]
    assert agent_events == [DataReceived(channel, b"still here")]


def test_goaway_is_sent_once(pair: MuxPair) -> None:
    pair.relay.mux.send_goaway(GoAwayReason.NORMAL, "bye")
    pair.relay.mux.send_goaway(GoAwayReason.TIMEOUT, "again")
    frames = pair.relay.sent_frames()
    assert frames == [Frame(FrameType.GOAWAY, 0, b"\x00bye")]


def test_accept_or_reject_twice_is_a_local_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    with pytest.raises(LocalProtocolError, match="is open"):
        pair.agent.mux.accept_channel(channel)
    with pytest.raises(LocalProtocolError, match="is open"):
        pair.agent.mux.reject_channel(channel, OpenFailure.REFUSED, "")
    with pytest.raises(LocalProtocolError, match="does not exist"):
        pair.agent.mux.accept_channel(99)


@pytest.mark.parametrize("answer", ["accept", "reject"])
def test_answering_a_channel_reset_in_the_same_message_is_a_no_op(answer: str) -> None:
    """OPEN then RESET in one message: the application hears ChannelRequested and then
    answers, but the channel is gone; the answer sends nothing and raises nothing."""
    relay = established(Role.RELAY)
    relay.receive_data(
        frame(FrameType.OPEN, 1, open_payload(65536, "dev1/BAD"))
        + frame(FrameType.RESET, 1, reason_payload(ResetReason.CANCEL, "bye"))
    )
    assert relay.events_received() == [
        ChannelRequested(1, "dev1/BAD"),
        ChannelReset(1, ResetReason.CANCEL, "bye"),
    ]
    if answer == "accept":
        relay.accept_channel(1)
    else:
        relay.reject_channel(1, OpenFailure.BAD_REQUEST, "no")
    assert not relay.has_data_to_send() and relay.channel_ids() == []
    # The tunnel goes on: the next channel works.
    relay.receive_data(frame(FrameType.OPEN, 3, open_payload(65536, "x")))
    assert relay.events_received() == [ChannelRequested(3, "x")]
    relay.accept_channel(3)
    assert [f.type for f in sent_frames(relay)] == [FrameType.OPEN_OK]
    # A channel the peer never opened is still a local error.
    with pytest.raises(LocalProtocolError, match="does not exist"):
        relay.reject_channel(5, OpenFailure.BAD_REQUEST, "no")


def test_running_out_of_channel_ids_is_a_local_error() -> None:
    relay = established(Role.RELAY)
    relay._next_local = 2**32 - 2  # as after 2**31 - 1 opens on one tunnel
    assert relay.open_channel("s") == 2**32 - 2  # the last id
    assert relay.ids_used_up
    sent_frames(relay)
    with pytest.raises(LocalProtocolError, match="no channel ids left"):
        relay.open_channel("s")
    assert not relay.has_data_to_send()


def test_opener_cannot_accept_its_own_channel(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("s")
    with pytest.raises(LocalProtocolError, match="opening"):
        pair.relay.mux.accept_channel(channel)
    with pytest.raises(LocalProtocolError, match="opening"):
        pair.relay.mux.send_data(channel, b"x")


def test_open_ok_twice_is_an_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    with pytest.raises(RemoteProtocolError, match="not opening"):
        pair.relay.mux.receive_data(frame(FrameType.OPEN_OK, channel, U32.pack(10)))


def test_open_failed_for_an_open_channel_is_an_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    with pytest.raises(RemoteProtocolError, match="not opening"):
        pair.relay.mux.receive_data(frame(FrameType.OPEN_FAILED, channel, b"\x02"))


@pytest.mark.parametrize("payload", [U32.pack(0), U32.pack(MAX_WINDOW + 1), b"\x00\x01"])
def test_open_ok_with_a_bad_window_is_an_error(pair: MuxPair, payload: bytes) -> None:
    channel = pair.relay.mux.open_channel("s")
    pair.relay.sent_frames()
    with pytest.raises(RemoteProtocolError):
        pair.relay.mux.receive_data(frame(FrameType.OPEN_OK, channel, payload))


# --- data -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [None, 1, 7])
def test_data_both_ways(pair: MuxPair, max_bytes: int | None) -> None:
    channel = open_pair(pair, max_bytes=max_bytes)
    assert pair.relay.mux.send_data(channel, b"ping from relay") == 15
    assert pair.agent.mux.send_data(channel, bytearray(b"pong from agent")) == 15
    assert pair.agent.mux.send_data(channel, memoryview(b"...and more")) == 11
    relay_events, agent_events = pair.pump(max_bytes)
    assert received_bytes(relay_events, channel) == b"pong from agent...and more"
    assert received_bytes(agent_events, channel) == b"ping from relay"


def test_byte_by_byte_pumping_of_many_channels() -> None:
    pair = MuxPair(window=64)
    channels = [open_pair(pair, opener, max_bytes=1) for opener in ("relay", "agent", "relay")]
    for i, channel in enumerate(channels):
        pair.relay.mux.send_data(channel, bytes([i]) * 40)
        pair.agent.mux.send_data(channel, bytes([i + 100]) * 30)
    relay_events, agent_events = pair.pump(max_bytes=1)
    for i, channel in enumerate(channels):
        assert received_bytes(agent_events, channel) == bytes([i]) * 40
        assert received_bytes(relay_events, channel) == bytes([i + 100]) * 30


def test_empty_send_is_a_no_op(pair: MuxPair) -> None:
    channel = open_pair(pair)
    assert pair.relay.mux.send_data(channel, b"") == 0
    assert not pair.relay.mux.has_data_to_send()
    pair.relay.mux.receive_data(frame(FrameType.DATA, channel, b""))  # tolerated
    assert pair.relay.mux.events_received() == []


def test_large_payload_is_split_at_data_chunk() -> None:
    pair = MuxPair(window=4 * MAX_PAYLOAD)
    channel = open_pair(pair)
    data = bytes(range(256)) * ((2 * DATA_CHUNK + 1000) // 256)
    assert pair.relay.mux.send_data(channel, data) == len(data)
    frames = pair.relay.sent_frames()
    assert [f.type for f in frames] == [FrameType.DATA] * 3
    assert [len(f.payload) for f in frames] == [DATA_CHUNK, DATA_CHUNK, len(data) % DATA_CHUNK]
    assert b"".join(f.payload for f in frames) == data


def test_large_payload_round_trips_in_odd_chunks() -> None:
    pair = MuxPair(window=4 * MAX_PAYLOAD)
    channel = open_pair(pair)
    data = bytes(i * 7 % 251 for i in range(3 * MAX_PAYLOAD + 5))
    assert pair.agent.mux.send_data(channel, data) == len(data)
    relay_events, _ = pair.pump(max_bytes=65_537)
    assert received_bytes(relay_events, channel) == data
    assert all(len(e.data) <= MAX_PAYLOAD for e in relay_events if isinstance(e, DataReceived))


def test_send_data_copies_the_callers_buffer(pair: MuxPair) -> None:
    channel = open_pair(pair)
    buf = bytearray(b"original")
    pair.relay.mux.send_data(channel, buf)
    buf[:] = b"mutated!"
    _, agent_events = pair.pump()
    assert agent_events == [DataReceived(channel, b"original")]


def test_data_on_a_requested_channel_is_an_error(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("s")
    pair.pump()
    with pytest.raises(RemoteProtocolError, match="requested"):
        pair.agent.mux.receive_data(frame(FrameType.DATA, channel, b"early"))


def test_data_on_a_requested_channel_is_a_local_error(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("s")
    pair.pump()
    with pytest.raises(LocalProtocolError, match="requested"):
        pair.agent.mux.send_data(channel, b"early")


def test_data_on_an_opening_channel_is_an_error(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("s")
    pair.relay.sent_frames()
    with pytest.raises(RemoteProtocolError, match="opening"):
        pair.relay.mux.receive_data(frame(FrameType.DATA, channel, b"x"))


# --- flow control ---------------------------------------------------------------------


def test_sender_is_held_to_the_peer_window_until_consumed() -> None:
    pair = MuxPair(window=100)
    channel = open_pair(pair)
    assert pair.relay.mux.send_data(channel, b"a" * 150) == 100
    assert pair.relay.mux.send_window(channel) == 0
    assert pair.relay.mux.send_data(channel, b"b") == 0
    relay_events, agent_events = pair.pump()
    assert received_bytes(agent_events, channel) == b"a" * 100
    assert relay_events == []

    pair.agent.mux.consumed(channel, 24)  # below a quarter window: no WINDOW yet
    assert pair.pump() == ([], [])
    assert pair.relay.mux.send_window(channel) == 0

    pair.agent.mux.consumed(channel, 1)  # 25 consumed: a quarter window
    relay_events, _ = pair.pump()
    assert relay_events == [SendWindowAvailable(channel)]
    assert pair.relay.mux.send_window(channel) == 25
    assert pair.relay.mux.send_data(channel, b"c" * 60) == 25


def test_send_window_available_only_after_being_held_back() -> None:
    pair = MuxPair(window=100)
    channel = open_pair(pair)
    assert pair.relay.mux.send_data(channel, b"a" * 100) == 100  # all taken: not blocked
    pair.pump()
    pair.agent.mux.consumed(channel, 100)
    relay_events, _ = pair.pump()
    assert relay_events == []
    assert pair.relay.mux.send_window(channel) == 100


def test_window_grants_accumulate() -> None:
    pair = MuxPair(window=10)
    channel = open_pair(pair)
    pair.relay.mux.send_data(channel, b"x" * 10)
    pair.pump()
    pair.agent.mux.consumed(channel, 5)
    pair.agent.mux.consumed(channel, 5)
    frames = pair.agent.sent_frames()
    assert frames == [Frame(FrameType.WINDOW, channel, U32.pack(5))] * 2


def test_consumed_on_unknown_channel_or_nonpositive_is_ignored(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.agent.mux.consumed(999, 10**6)
    pair.agent.mux.consumed(channel, 0)
    pair.agent.mux.consumed(channel, -5)
    assert not pair.agent.mux.has_data_to_send()


def test_exceeding_credit_with_a_crafted_frame_is_an_error() -> None:
    pair = MuxPair(window=100)
    channel = open_pair(pair)
    pair.agent.mux.receive_data(frame(FrameType.DATA, channel, b"x" * 60))
    with pytest.raises(RemoteProtocolError, match="41 bytes sent with only 40 bytes of credit"):
        pair.agent.mux.receive_data(frame(FrameType.DATA, channel, b"x" * 41))


def test_credit_is_restored_only_by_window_frames() -> None:
    pair = MuxPair(window=100)
    channel = open_pair(pair)
    pair.agent.mux.receive_data(frame(FrameType.DATA, channel, b"x" * 100))
    pair.agent.mux.consumed(channel, 100)
    pair.agent.mux.receive_data(frame(FrameType.DATA, channel, b"x" * 100))
    with pytest.raises(RemoteProtocolError, match="credit"):
        pair.agent.mux.receive_data(frame(FrameType.DATA, channel, b"x"))


def test_one_blocked_channel_does_not_block_another() -> None:
    pair = MuxPair(window=32)
    slow = open_pair(pair)
    fast = open_pair(pair)
    assert pair.relay.mux.send_data(slow, b"s" * 100) == 32
    assert pair.relay.mux.send_data(fast, b"f" * 32) == 32
    _, agent_events = pair.pump()
    assert received_bytes(agent_events, fast) == b"f" * 32
    for _ in range(10):  # the reader drains ``fast`` only; ``slow`` stays stuck
        pair.agent.mux.consumed(fast, 32)
        relay_events, _ = pair.pump()
        assert SendWindowAvailable(slow) not in relay_events
        assert pair.relay.mux.send_data(fast, b"f" * 32) == 32
        assert pair.relay.mux.send_data(slow, b"s") == 0
        _, agent_events = pair.pump()
        assert received_bytes(agent_events, fast) == b"f" * 32
        assert received_bytes(agent_events, slow) == b""


@pytest.mark.parametrize("window", [1, 2, 3, 100, 4096])
def test_slow_reader_bounds_bytes_in_flight(window: int) -> None:
    pair = MuxPair(window=window)
    channel = open_pair(pair)
    data = bytes(range(256)) * 40
    arrived = b""
    sent = 0
    for _ in range(50):  # the writer keeps trying; the reader never consumes
        sent += pair.relay.mux.send_data(channel, data[sent:])
        _, agent_events = pair.pump(max_bytes=5)
        arrived += received_bytes(agent_events, channel)
        assert len(arrived) <= window
    assert arrived == data[:window]
    assert sent == window


@pytest.mark.parametrize("window", [1, 7, 1000])
def test_a_reader_that_consumes_gets_everything(window: int) -> None:
    pair = MuxPair(window=window)
    channel = open_pair(pair, "agent")
    data = bytes(i % 253 for i in range(5000))
    sent = pair.agent.mux.send_data(channel, data)
    arrived = b""
    while len(arrived) < len(data):
        relay_events, agent_events = pair.pump(max_bytes=3)
        chunk = received_bytes(relay_events, channel)
        assert len(chunk) <= window
        arrived += chunk
        pair.relay.mux.consumed(channel, len(chunk))
        if SendWindowAvailable(channel) in agent_events or pair.agent.mux.send_window(channel):
            sent += pair.agent.mux.send_data(channel, data[sent:])
    assert arrived == data


def test_window_of_zero_is_an_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    with pytest.raises(RemoteProtocolError, match="WINDOW of 0"):
        pair.relay.mux.receive_data(frame(FrameType.WINDOW, channel, U32.pack(0)))


def test_window_overflow_is_an_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    with pytest.raises(RemoteProtocolError, match="overflow"):
        pair.relay.mux.receive_data(frame(FrameType.WINDOW, channel, U32.pack(MAX_WINDOW)))


def test_window_of_the_wrong_size_is_an_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    with pytest.raises(RemoteProtocolError, match="4 bytes"):
        pair.relay.mux.receive_data(frame(FrameType.WINDOW, channel, b"\x00\x01"))


def test_window_before_accept_is_an_error(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("s")
    pair.pump()
    with pytest.raises(RemoteProtocolError, match=r"WINDOW for channel .* which is requested"):
        pair.agent.mux.receive_data(frame(FrameType.WINDOW, channel, U32.pack(1)))


# --- half-close -----------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [None, 1])
def test_half_close_then_close(pair: MuxPair, max_bytes: int | None) -> None:
    channel = open_pair(pair)
    pair.relay.mux.send_data(channel, b"request")
    pair.relay.mux.send_eof(channel)
    relay_events, agent_events = pair.pump(max_bytes)
    assert relay_events == []
    assert agent_events == [DataReceived(channel, b"request"), EofReceived(channel)]

    # The other direction still flows.
    pair.agent.mux.send_data(channel, b"response 1")
    pair.agent.mux.send_data(channel, b", response 2")
    relay_events, agent_events = pair.pump(max_bytes)
    assert received_bytes(relay_events, channel) == b"response 1, response 2"
    assert pair.relay.mux.channel_ids() == pair.agent.mux.channel_ids() == [channel]

    pair.agent.mux.send_eof(channel)
    relay_events, agent_events = pair.pump(max_bytes)
    assert agent_events == [ChannelClosed(channel)]
    assert relay_events == [EofReceived(channel), ChannelClosed(channel)]
    assert pair.relay.mux.channel_ids() == pair.agent.mux.channel_ids() == []


def test_eofs_that_cross_close_both_sides(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.relay.mux.send_eof(channel)
    pair.agent.mux.send_eof(channel)
    relay_events, agent_events = pair.pump()
    assert relay_events == [EofReceived(channel), ChannelClosed(channel)]
    assert agent_events == [EofReceived(channel), ChannelClosed(channel)]


def test_local_eof_twice_sends_one_eof(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.relay.mux.send_eof(channel)
    pair.relay.mux.send_eof(channel)
    assert pair.relay.sent_frames() == [Frame(FrameType.EOF, channel)]


def test_data_after_local_eof_is_a_local_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.relay.mux.send_eof(channel)
    with pytest.raises(LocalProtocolError, match="after EOF"):
        pair.relay.mux.send_data(channel, b"late")


def test_data_after_remote_eof_is_a_remote_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.relay.mux.receive_data(frame(FrameType.EOF, channel))
    with pytest.raises(RemoteProtocolError, match="DATA after EOF"):
        pair.relay.mux.receive_data(frame(FrameType.DATA, channel, b"late"))


def test_double_eof_from_peer_is_an_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.relay.mux.receive_data(frame(FrameType.EOF, channel))
    with pytest.raises(RemoteProtocolError, match="second EOF"):
        pair.relay.mux.receive_data(frame(FrameType.EOF, channel))


def test_eof_on_an_unanswered_channel_is_an_error(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("s")
    pair.pump()
    with pytest.raises(RemoteProtocolError, match="requested"):
        pair.agent.mux.receive_data(frame(FrameType.EOF, channel))
    with pytest.raises(LocalProtocolError, match="opening"):
        pair.relay.mux.send_eof(channel)


def test_no_window_grants_after_remote_eof() -> None:
    pair = MuxPair(window=10)
    channel = open_pair(pair)
    pair.relay.mux.send_data(channel, b"x" * 10)
    pair.relay.mux.send_eof(channel)
    pair.pump()
    pair.agent.mux.consumed(channel, 10)
    assert not pair.agent.mux.has_data_to_send()


def test_blocked_sender_that_sent_eof_gets_no_window_event() -> None:
    pair = MuxPair(window=10)
    channel = open_pair(pair)
    assert pair.relay.mux.send_data(channel, b"x" * 20) == 10
    pair.pump()
    pair.agent.mux.consumed(channel, 10)  # the WINDOW crosses the EOF
    pair.relay.mux.send_eof(channel)
    relay_events, agent_events = pair.pump()
    assert relay_events == []
    assert agent_events == [EofReceived(channel)]


# --- reset ----------------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(ResetReason))
def test_reset_forgets_the_channel_on_both_sides(pair: MuxPair, reason: ResetReason) -> None:
    channel = open_pair(pair)
    pair.agent.mux.reset_channel(channel, reason, "bye ✓")
    assert pair.agent.mux.channel_ids() == []
    relay_events, agent_events = pair.pump()
    assert relay_events == [ChannelReset(channel, reason, "bye ✓")]
    assert agent_events == []
    assert pair.relay.mux.channel_ids() == []
    with pytest.raises(LocalProtocolError, match="does not exist"):
        pair.relay.mux.send_data(channel, b"x")


def test_frames_crossing_a_reset_are_ignored() -> None:
    pair = MuxPair(window=100)
    channel = open_pair(pair)
    pair.agent.mux.send_data(channel, b"in flight")
    pair.pump()
    pair.agent.mux.send_data(channel, b"x" * 60)
    pair.agent.mux.send_eof(channel)
    pair.relay.mux.consumed(channel, 9)  # no WINDOW yet: below half a window
    pair.relay.mux.reset_channel(channel, ResetReason.REVOKED, "access revoked")
    relay_events, agent_events = pair.pump(max_bytes=3)
    assert relay_events == []  # the DATA and EOF that crossed the RESET are dropped
    assert agent_events == [ChannelReset(channel, ResetReason.REVOKED, "access revoked")]
    assert pair.relay.mux.channel_ids() == pair.agent.mux.channel_ids() == []


def test_resets_that_cross_are_both_ignored(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.relay.mux.send_data(channel, b"lost")
    pair.relay.mux.reset_channel(channel)
    pair.agent.mux.reset_channel(channel, ResetReason.TUNNEL_CLOSED)
    assert pair.pump(max_bytes=1) == ([], [])
    assert pair.relay.mux.channel_ids() == pair.agent.mux.channel_ids() == []


def test_late_frames_for_a_reset_channel_are_ignored(pair: MuxPair) -> None:
    channel = open_pair(pair)
    pair.relay.mux.reset_channel(channel)
    pair.pump()
    for late in [
        frame(FrameType.DATA, channel, b"late"),
        frame(FrameType.WINDOW, channel, U32.pack(100)),
        frame(FrameType.EOF, channel),
        frame(FrameType.RESET, channel, b"\x00"),
        frame(FrameType.OPEN_OK, channel, U32.pack(100)),
    ]:
        pair.relay.mux.receive_data(late)
        pair.agent.mux.receive_data(late)
    assert pair.relay.mux.events_received() == pair.agent.mux.events_received() == []


def test_reset_of_an_unknown_channel_is_a_no_op(pair: MuxPair) -> None:
    pair.relay.mux.reset_channel(42)
    assert not pair.relay.mux.has_data_to_send()


def test_reset_before_the_answer_ignores_the_late_open_ok(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("s")
    pair.pump()
    pair.agent.mux.accept_channel(channel)
    pair.agent.mux.send_data(channel, b"hi")
    pair.relay.mux.reset_channel(channel)
    relay_events, agent_events = pair.pump()
    assert relay_events == []
    assert agent_events == [ChannelReset(channel, ResetReason.CANCEL, "")]


def test_reset_of_a_requested_channel_reaches_the_opener(pair: MuxPair) -> None:
    channel = pair.relay.mux.open_channel("s")
    pair.pump()
    pair.agent.mux.reset_channel(channel, ResetReason.REVOKED, "no")
    relay_events, _ = pair.pump()
    assert relay_events == [ChannelReset(channel, ResetReason.REVOKED, "no")]


def test_open_cancelled_before_the_peer_sees_it(pair: MuxPair) -> None:
    channel = pair.agent.mux.open_channel("s")
    pair.agent.mux.reset_channel(channel)
    relay_events, _ = pair.pump()
    assert relay_events == [ChannelRequested(channel, "s"), ChannelReset(channel, 0, "")]


def test_auto_refused_open_ignores_the_openers_reset() -> None:
    pair = MuxPair(agent_max_channels=0)
    channel = pair.relay.mux.open_channel("s")
    pair.relay.mux.reset_channel(channel)  # crosses the OPEN_FAILED
    assert pair.pump() == ([], [])


@pytest.mark.parametrize(
    ("frame_type", "payload"),
    [
        (FrameType.DATA, b"x"),
        (FrameType.WINDOW, U32.pack(1)),
        (FrameType.EOF, b""),
        (FrameType.RESET, b"\x00"),
        (FrameType.OPEN_OK, U32.pack(1)),
        (FrameType.OPEN_FAILED, b"\x01"),
    ],
)
@pytest.mark.parametrize("channel", [2, 3, 100, 101])
def test_frames_for_a_never_opened_channel_are_errors(
    pair: MuxPair, frame_type: FrameType, payload: bytes, channel: int
) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown channel"):
        pair.relay.mux.receive_data(frame(frame_type, channel, payload))


def test_empty_reset_payload_is_an_error(pair: MuxPair) -> None:
    channel = open_pair(pair)
    with pytest.raises(RemoteProtocolError, match="RESET frame too short"):
        pair.relay.mux.receive_data(frame(FrameType.RESET, channel))


# --- ping and goaway ------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"\x00", b"12345678"])
def test_ping_gets_a_pong_with_the_same_payload(pair: MuxPair, payload: bytes) -> None:
    pair.relay.mux.send_ping(payload)
    relay_events, agent_events = pair.pump(max_bytes=1)
    assert relay_events == [PongReceived(payload)]
    assert agent_events == []


def test_ping_payload_is_cut_to_8_bytes(pair: MuxPair) -> None:
    pair.agent.mux.send_ping(b"0123456789")
    _, agent_events = pair.pump()
    assert agent_events == [PongReceived(b"01234567")]


@pytest.mark.parametrize("frame_type", [FrameType.PING, FrameType.PONG])
def test_ping_or_pong_before_established_is_an_error(frame_type: FrameType) -> None:
    """An unauthenticated peer gets no answers: keep-alive starts after the welcome."""
    relay = Multiplexer(Role.RELAY)
    with pytest.raises(RemoteProtocolError, match="before the tunnel was established"):
        relay.receive_data(frame(frame_type, 0, b"t"))
    assert [f.type for f in sent_frames(relay)] == [FrameType.GOAWAY]


def test_oversized_ping_is_an_error() -> None:
    with pytest.raises(RemoteProtocolError, match="PING frame of 9 bytes exceeds"):
        Multiplexer(Role.AGENT).receive_data(frame(FrameType.PING, 0, b"123456789"))


@pytest.mark.parametrize("reason", list(GoAwayReason))
def test_goaway_is_reported(pair: MuxPair, reason: GoAwayReason) -> None:
    pair.agent.mux.send_goaway(reason, "closing down")
    relay_events, _ = pair.pump()
    assert relay_events == [GoAwayReceived(reason, "closing down")]
    assert pair.relay.mux.goaway_received
    assert pair.agent.mux.goaway_sent


# --- protocol errors end the tunnel ---------------------------------------------------


def test_after_a_remote_error_receive_raises_again_and_goaway_is_queued(pair: MuxPair) -> None:
    channel = open_pair(pair)
    with pytest.raises(RemoteProtocolError) as first:
        pair.relay.mux.receive_data(frame(FrameType.EOF, 0))
    assert pair.relay.mux.failed is first.value
    frames = pair.relay.sent_frames()
    assert frames == [
        Frame(FrameType.GOAWAY, 0, bytes([GoAwayReason.PROTOCOL_ERROR]) + str(first.value).encode())
    ]
    with pytest.raises(RemoteProtocolError) as second:
        pair.relay.mux.receive_data(frame(FrameType.DATA, channel, b"fine"))
    assert second.value is first.value
    assert pair.relay.mux.goaway_sent
    with pytest.raises(LocalProtocolError):
        pair.relay.mux.open_channel("s")
    # The peer hears why.
    pair.agent.mux.receive_data(frames[0].serialize())
    (event,) = pair.agent.mux.events_received()
    assert isinstance(event, GoAwayReceived)
    assert event.reason == GoAwayReason.PROTOCOL_ERROR
    assert "channel 0" in event.message


def test_events_before_the_bad_frame_are_kept(pair: MuxPair) -> None:
    pair.relay.mux.send_ping(b"a")
    data = b"".join(pair.relay.mux.data_to_send())
    with pytest.raises(RemoteProtocolError):
        pair.agent.mux.receive_data(data + frame(FrameType.PONG, 0, b"x") + frame(FrameType.EOF, 0))
    assert pair.agent.mux.events_received() == [PongReceived(b"x")]
    assert [f.type for f in pair.agent.sent_frames()] == [FrameType.PONG, FrameType.GOAWAY]


def test_oversized_frame_header_fails_the_tunnel(pair: MuxPair) -> None:
    header = Frame(FrameType.DATA, 2, b"").serialize()[:5] + U32.pack(MAX_PAYLOAD + 1)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        pair.agent.mux.receive_data(header)
    assert pair.agent.sent_frames()[0].type is FrameType.GOAWAY


BAD_HEADERS = {
    "oversized": (
        frame(FrameType.GOAWAY, 0)[:5] + U32.pack(MAX_CONTROL_PAYLOAD + 1),
        "GOAWAY frame of 8193 bytes exceeds the limit of 8192",
    ),
    "unknown type": (struct.pack("!BII", 0xEE, 0, 0), "unknown frame type 0xee"),
}


@pytest.mark.parametrize(("bad", "error"), BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_frames_before_a_refused_header_are_handled(pair: MuxPair, bad: bytes, error: str) -> None:
    """PROTOCOL.md section 7, as for a frame the session refuses (above): a header the
    parser refuses still lets the frames before it in the message take effect."""
    kept, reset = open_pair(pair), open_pair(pair)
    pair.relay.mux.send_ping(b"a")
    pair.relay.mux.send_data(kept, b"last bytes")
    pair.relay.mux.send_eof(kept)
    pair.relay.mux.reset_channel(reset, ResetReason.REVOKED, "access revoked")
    message = b"".join(pair.relay.mux.data_to_send()) + frame(FrameType.PONG, 0, b"x")
    with pytest.raises(RemoteProtocolError, match=f"^{error}$") as caught:
        pair.agent.mux.receive_data(message + bad + frame(FrameType.PING, 0, b"after"))
    assert pair.agent.mux.events_received() == [
        DataReceived(kept, b"last bytes"),
        EofReceived(kept),
        ChannelReset(reset, ResetReason.REVOKED, "access revoked"),
        PongReceived(b"x"),
    ]
    assert pair.agent.sent_frames() == [
        Frame(FrameType.PONG, 0, b"a"),  # the PING's answer, not the later one's
        Frame(FrameType.GOAWAY, 0, bytes([GoAwayReason.PROTOCOL_ERROR]) + error.encode()),
    ]
    assert pair.agent.mux.channel_ids() == [kept]
    assert pair.agent.mux.failed is caught.value
    # The failed tunnel keeps the error, not the frames (and payloads) it carried.
    assert isinstance(caught.value, FrameHeaderError)
    assert caught.value.frames == []
    with pytest.raises(RemoteProtocolError, match=f"^{error}$"):
        pair.agent.mux.receive_data(frame(FrameType.PING, 0, b"more"))
    assert pair.agent.mux.events_received() == []
    assert pair.agent.sent_frames() == []


def test_a_frame_completed_before_a_refused_header_is_handled(pair: MuxPair) -> None:
    """The same for a frame whose start came in an earlier message."""
    channel = open_pair(pair)
    pair.relay.mux.send_data(channel, b"split across messages")
    data = b"".join(pair.relay.mux.data_to_send())
    pair.agent.mux.receive_data(data[:12])
    assert pair.agent.mux.events_received() == []
    bad, error = BAD_HEADERS["oversized"]
    with pytest.raises(RemoteProtocolError, match=f"^{error}$"):
        pair.agent.mux.receive_data(data[12:] + bad)
    assert pair.agent.mux.events_received() == [DataReceived(channel, b"split across messages")]


def test_an_error_before_a_refused_header_is_the_one_reported(pair: MuxPair) -> None:
    """The frames are handled in order: the first error ends the tunnel, and the GOAWAY
    names it, not the refused header behind it."""
    bad, _ = BAD_HEADERS["oversized"]
    data = frame(FrameType.PONG, 0, b"x") + frame(FrameType.EOF, 0) + bad
    with pytest.raises(RemoteProtocolError, match=r"^EOF frame on channel 0$") as caught:
        pair.agent.mux.receive_data(data)
    assert pair.agent.mux.failed is caught.value
    assert pair.agent.mux.events_received() == [PongReceived(b"x")]
    assert pair.agent.sent_frames() == [
        Frame(FrameType.GOAWAY, 0, bytes([GoAwayReason.PROTOCOL_ERROR]) + b"EOF frame on channel 0")
    ]


# --- garbage --------------------------------------------------------------------------

any_frame = st.builds(
    Frame,
    st.sampled_from(FrameType),
    st.integers(0, 12),
    st.one_of(
        st.binary(max_size=12),
        st.builds(lambda w, s: U32.pack(w) + s.encode(), st.integers(0, 2**32 - 1), st.text()),
        st.sampled_from([b"{}", b'{"a":1}', b"\x00", b"\x00\x00\x00\x05"]),
    ),
)


def feed_garbage(mux: Multiplexer, data: bytes, chunk: int) -> None:
    try:
        for i in range(0, len(data), chunk):
            mux.receive_data(data[i : i + chunk])
    except RemoteProtocolError:
        assert mux.failed is not None
        assert sent_frames(mux)[-1].type is FrameType.GOAWAY
    for event in mux.events_received():
        assert isinstance(event, Event)


@settings(max_examples=150)
@given(st.binary(max_size=200), st.sampled_from(Role), st.booleans(), st.integers(1, 64))
def test_random_bytes_raise_only_remote_protocol_error(
    data: bytes, role: Role, is_established: bool, chunk: int
) -> None:
    mux = Multiplexer(role, window=64, max_channels=3)
    if is_established:
        mux.mark_established()
    feed_garbage(mux, data, chunk)


@settings(max_examples=200)
@given(st.lists(any_frame, max_size=12), st.sampled_from(Role), st.booleans(), st.integers(1, 64))
def test_random_frames_raise_only_remote_protocol_error(
    frames: list[Frame], role: Role, is_established: bool, chunk: int
) -> None:
    mux = Multiplexer(role, window=64, max_channels=3)
    if is_established:
        mux.mark_established()
        mux.open_channel("s")
    feed_garbage(mux, b"".join(f.serialize() for f in frames), chunk)


def test_json_hello_info_round_trips_unicode() -> None:
    pair = MuxPair(establish=False)
    info = {"name": "pompe à chaleur", "tags": ["ü", None, 1.5], "nested": {"k": True}}
    relay_events, _ = pair.handshake(agent_info=info)
    assert relay_events == [HelloReceived(info)]


# --- random sequences of well-behaved operations --------------------------------------

SIDES = ("relay", "agent")
messages = st.text(max_size=12) | st.text(min_size=300, max_size=600)
Key = tuple[str, int]


class TunnelMachine(RuleBasedStateMachine):
    """Both ends do random, legal things; frames cross in flight; nothing may break.

    The model mirrors what each application knows from its own calls and events. It
    checks that the events make sense (parity, order, reasons), that every channel's
    bytes arrive as a prefix of what was sent and in full once the wire is drained,
    and that credit stays within [0, window].
    """

    pair: MuxPair

    @initialize(
        relay_window=st.sampled_from([1, 2, 5, 64, 1000]),
        agent_window=st.sampled_from([1, 3, 7, 64, 1000]),
        relay_max=st.integers(1, 6),
        agent_max=st.integers(1, 6),
        prepared=st.lists(st.sampled_from(SIDES), min_size=1, max_size=4),
    )
    def setup(
        self,
        relay_window: int,
        agent_window: int,
        relay_max: int,
        agent_max: int,
        prepared: list[str],
    ) -> None:
        self.pair = MuxPair(
            relay_window=relay_window,
            agent_window=agent_window,
            relay_max_channels=relay_max,
            agent_max_channels=agent_max,
        )
        self.ends = {"relay": self.pair.relay, "agent": self.pair.agent}
        self.windows = {"relay": relay_window, "agent": agent_window}
        self.state: dict[str, dict[int, str]] = {"relay": {}, "agent": {}}
        self.services: dict[int, str] = {}
        self.last_opened = {"relay": 0, "agent": -1}
        self.local_eof: set[Key] = set()
        self.remote_eof: set[Key] = set()
        self.sent: dict[Key, bytearray] = defaultdict(bytearray)
        self.received: dict[Key, bytearray] = defaultdict(bytearray)
        self.consumed_total: dict[Key, int] = defaultdict(int)
        self.blocked: set[Key] = set()
        self.rejections: dict[int, tuple[int, str]] = {}
        self.resets: dict[Key, tuple[int, str]] = {}
        self.pings: dict[str, list[bytes]] = {"relay": [], "agent": []}
        # Start with a few channels open (when room allows) so that short runs, too,
        # get to data, flow control and half-close.
        for side in prepared:
            self.open(side, "ssh")
        self.drain(None)
        for side in SIDES:
            for _ in range(len(prepared)):
                self.answer(side, 0, None, "")
        self.drain(None)

    # --- helpers ------------------------------------------------------------------

    @staticmethod
    def other(side: str) -> str:
        return "agent" if side == "relay" else "relay"

    def mux(self, side: str) -> Multiplexer:
        return self.ends[side].mux

    def pick(self, side: str, index: int, *, open_only: bool = False, state: str = "") -> int:
        """The index-th channel of ``side`` that fits, or 0 if there is none."""
        candidates = sorted(
            ch
            for ch, st_ in self.state[side].items()
            if (not state or st_ == state)
            and (not open_only or (st_ == "open" and (side, ch) not in self.local_eof))
        )
        return candidates[index % len(candidates)] if candidates else 0

    def forget(self, side: str, channel: int) -> None:
        del self.state[side][channel]
        self.blocked.discard((side, channel))

    def unconsumed(self, side: str, channel: int) -> int:
        return len(self.received[side, channel]) - self.consumed_total[side, channel]

    def process(self, side: str) -> None:
        for event in self.mux(side).events_received():
            self.apply(side, event)

    def apply(self, side: str, event: Event) -> None:
        peer = self.other(side)
        mux = self.mux(side)
        state = self.state[side]
        if isinstance(event, ChannelRequested):
            ch = event.channel
            assert ch % 2 == (1 if side == "relay" else 0)
            assert ch not in state
            assert event.service == self.services[ch]
            state[ch] = "requested"
        elif isinstance(event, ChannelOpened):
            assert state.get(event.channel) == "opening"
            state[event.channel] = "open"
            if event.channel in mux.channel_ids():
                assert mux.send_window(event.channel) == self.windows[peer]
        elif isinstance(event, ChannelOpenFailed):
            assert state.get(event.channel) == "opening"
            self.forget(side, event.channel)
            if event.channel in self.rejections:
                reason, message = self.rejections[event.channel]
                assert event.reason == reason
                assert event.message == shown(message)
            else:
                assert event.reason in (OpenFailure.TOO_MANY_CHANNELS, OpenFailure.SHUTTING_DOWN)
        elif isinstance(event, DataReceived):
            key = (side, event.channel)
            assert state.get(event.channel) == "open"
            assert key not in self.remote_eof
            assert event.data
            self.received[key] += event.data
            assert self.sent[peer, event.channel].startswith(self.received[key])
        elif isinstance(event, EofReceived):
            key = (side, event.channel)
            assert state.get(event.channel) == "open"
            assert key not in self.remote_eof
            self.remote_eof.add(key)
            assert self.received[key] == self.sent[peer, event.channel]
        elif isinstance(event, ChannelReset):
            assert event.channel in state
            self.forget(side, event.channel)
            reason, message = self.resets[peer, event.channel]
            assert event.reason == reason
            assert event.message == shown(message)
        elif isinstance(event, ChannelClosed):
            key = (side, event.channel)
            assert key in self.local_eof
            assert key in self.remote_eof
            self.forget(side, event.channel)
        elif isinstance(event, SendWindowAvailable):
            key = (side, event.channel)
            assert key in self.blocked
            self.blocked.discard(key)
            if event.channel in mux.channel_ids():
                assert mux.send_window(event.channel) > 0
        elif isinstance(event, PongReceived):
            assert self.pings[side].pop(0) == event.payload
        elif isinstance(event, GoAwayReceived):
            assert mux.goaway_received
            assert self.mux(peer).goaway_sent
        else:
            raise AssertionError(f"unexpected event {event!r}")

    def drain(self, max_bytes: int | None) -> None:
        while any(self.pair.deliver(self.ends[side], max_bytes) for side in SIDES):
            for side in SIDES:
                self.process(side)
        for side in SIDES:
            self.process(side)

    # --- rules --------------------------------------------------------------------

    @rule(side=st.sampled_from(SIDES), service=st.sampled_from(["ssh", "http", "é" * 64]))
    def open(self, side: str, service: str) -> None:
        mux = self.mux(side)
        if mux.goaway_sent or mux.goaway_received:
            with pytest.raises(LocalProtocolError):
                mux.open_channel(service)
            return
        ch = mux.open_channel(service)
        assert ch > self.last_opened[side]
        assert ch % 2 == (0 if side == "relay" else 1)
        self.last_opened[side] = ch
        self.services[ch] = service
        self.state[side][ch] = "opening"

    @rule(
        side=st.sampled_from(SIDES),
        index=st.integers(0, 7),
        refusal=st.none() | st.sampled_from(OpenFailure),
        message=messages,
    )
    def answer(self, side: str, index: int, refusal: OpenFailure | None, message: str) -> None:
        """Accept (``refusal`` is None) or reject a channel the peer asked for."""
        if not (ch := self.pick(side, index, state="requested")):
            return
        mux = self.mux(side)
        if refusal is None:
            mux.accept_channel(ch)
            self.state[side][ch] = "open"
            assert mux.send_window(ch) == self.windows[self.other(side)]
        else:
            mux.reject_channel(ch, refusal, message)
            self.rejections[ch] = (refusal, message)
            self.forget(side, ch)

    @rule(side=st.sampled_from(SIDES), index=st.integers(0, 7), data=st.binary(max_size=1500))
    def send(self, side: str, index: int, data: bytes) -> None:
        if ch := self.pick(side, index, open_only=True):
            mux = self.mux(side)
            before = mux.send_window(ch)
            n = mux.send_data(ch, data)
            assert n == min(len(data), before)
            assert mux.send_window(ch) == before - n
            self.sent[side, ch] += data[:n]
            if n < len(data):
                self.blocked.add((side, ch))

    @rule(side=st.sampled_from(SIDES), index=st.integers(0, 7), amount=st.integers(1, 2000))
    def consume(self, side: str, index: int, amount: int) -> None:
        candidates = sorted(ch for ch in self.state[side] if self.unconsumed(side, ch))
        if candidates:
            ch = candidates[index % len(candidates)]
            n = min(amount, self.unconsumed(side, ch))
            self.mux(side).consumed(ch, n)
            self.consumed_total[side, ch] += n

    @rule(
        side=st.sampled_from(SIDES),
        index=st.integers(0, 7),
        reset=st.sampled_from([None, None, None, *ResetReason]),
        message=messages,
    )
    def close(self, side: str, index: int, reset: ResetReason | None, message: str) -> None:
        """Send EOF on an open channel or (``reset`` given) abort any channel."""
        mux = self.mux(side)
        if reset is None:
            if ch := self.pick(side, index, open_only=True):
                mux.send_eof(ch)
                self.local_eof.add((side, ch))
                self.blocked.discard((side, ch))
                self.process(side)
        elif ch := self.pick(side, index):
            mux.reset_channel(ch, reset, message)
            self.resets[side, ch] = (reset, message)
            self.forget(side, ch)

    @rule(
        side=st.sampled_from(SIDES),
        payload=st.binary(max_size=10),
        goaway=st.sampled_from(GoAwayReason) | st.none(),
        dice=st.integers(0, 19),
    )
    def ping_or_goaway(
        self, side: str, payload: bytes, goaway: GoAwayReason | None, dice: int
    ) -> None:
        if goaway is not None and dice == 0:  # rare: it stops new channels for good
            self.mux(side).send_goaway(goaway, "bye")
        else:
            self.mux(side).send_ping(payload)
            self.pings[side].append(payload[:8])

    @rule(side=st.sampled_from(SIDES), limit=st.integers(1, 300), max_bytes=st.integers(1, 40))
    def deliver(self, side: str, limit: int, max_bytes: int) -> None:
        """Part of one direction arrives, so frames from both ends cross in flight."""
        self.pair.deliver(self.ends[side], max_bytes, limit)
        self.process(self.other(side))

    @rule(max_bytes=st.none() | st.integers(1, 64))
    def settle(self, max_bytes: int | None) -> None:
        """Drain the wire, let both readers consume everything, drain again."""
        self.drain(max_bytes)
        for side in SIDES:
            for ch in list(self.state[side]):
                if n := self.unconsumed(side, ch):
                    self.mux(side).consumed(ch, n)
                    self.consumed_total[side, ch] += n
        self.drain(max_bytes)

        assert not self.pair.relay.wire
        assert not self.pair.agent.wire
        assert self.pings == {"relay": [], "agent": []}
        relay, agent = self.state["relay"], self.state["agent"]
        assert relay.keys() == agent.keys()
        for ch in relay:
            opener, acceptor = ("relay", "agent") if ch % 2 == 0 else ("agent", "relay")
            assert (self.state[opener][ch], self.state[acceptor][ch]) in {
                ("opening", "requested"),
                ("open", "open"),
            }
            if relay[ch] != "open":
                continue
            for side in SIDES:
                peer = self.other(side)
                assert self.received[side, ch] == self.sent[peer, ch]  # nothing lost
                # With nothing in flight, the sender's window is the receiver's credit.
                assert self.mux(side).send_window(ch) == self.mux(peer)._channels[ch].recv_credit
                if (side, ch) not in self.local_eof:
                    assert (side, ch) not in self.blocked, "a drained reader left a writer stuck"
                    assert self.mux(side).send_window(ch) > 0

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def model_matches_the_multiplexers(self) -> None:
        for side in SIDES:
            assert sorted(self.state[side]) == sorted(self.mux(side).channel_ids())
            assert self.mux(side).failed is None

    @invariant()
    def credit_stays_within_the_window(self) -> None:
        for side in SIDES:
            window = self.windows[side]
            for ch, channel in self.mux(side)._channels.items():
                assert channel.send_window >= 0
                assert 0 <= channel.recv_credit <= window
                # Bytes in flight plus bytes not yet consumed never exceed the window.
                in_flight = len(self.sent[self.other(side), ch]) - self.consumed_total[side, ch]
                assert 0 <= in_flight <= window


TunnelMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
test_tunnel_state_machine = TunnelMachine.TestCase
