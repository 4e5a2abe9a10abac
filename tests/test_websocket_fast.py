"""The shorter path for whole binary frames (tunnel/websocket.py) against websockets'
own parser and serializer.

The tests are differential: the same bytes, cut at the same places, go to an endpoint
with the shorter path and to one that leaves every frame to websockets; what each hands
its owner (messages, close frames), what each writes back (pongs, close frames) and the
state each ends in must be equal after every read.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from hatchway.tunnel.websocket import WebSocketEndpoint, at_frame_boundary
from tests.test_tunnel_endpoint import FakeTransport as Transport

MAX_SIZE = 70_000
SIZES_BY_HAND = (0, 1, 125, 126, 300)


class Recorder(WebSocketEndpoint):
    def __init__(self, ws: Any) -> None:
        super().__init__(ws)
        self.got: list[tuple[str, bytes]] = []

    def on_handshake(self, event: Any) -> None:
        if isinstance(self.ws, ServerProtocol):  # as the relay answers a device
            self.ws.send_response(self.ws.accept(event))
            self.flush()

    def on_binary(self, data: bytes | memoryview) -> None:
        assert type(data) is bytes
        self.got.append(("binary", data))

    def on_text(self, data: bytes) -> None:
        self.got.append(("text", data))

    def on_close_frame(self) -> None:
        self.got.append(("close", b""))


class ViewRecorder(Recorder):
    """Takes memoryviews, as a tunnel does (``binary_views``); keeps copies of them."""

    binary_views = True

    def on_binary(self, data: bytes | memoryview) -> None:
        assert isinstance(data, (bytes, memoryview))
        self.got.append(("binary", bytes(data)))


class LibraryOnly(Recorder):
    """Every frame goes through websockets' parser."""

    def _try_fast(self) -> None:
        pass


def open_endpoint(cls: type[Recorder], side: str) -> Recorder:
    """An endpoint past a real opening handshake, as a relay (server) or an agent
    (client) holds it; what it wrote for the handshake is cleared."""
    transport = Transport()
    if side == "server":
        client = ClientProtocol(parse_uri("wss://relay.example/"))
        client.send_request(client.connect())
        endpoint = cls(ServerProtocol(max_size=MAX_SIZE))
        endpoint.connection_made(transport)  # type: ignore[arg-type]
        endpoint.data_received(b"".join(client.data_to_send()))
    else:
        server = ServerProtocol()
        endpoint = cls(ClientProtocol(parse_uri("wss://relay.example/"), max_size=MAX_SIZE))
        endpoint.connection_made(transport)  # type: ignore[arg-type]
        server.receive_data(bytes(transport.written))
        server.send_response(server.accept(server.events_received()[0]))
        endpoint.data_received(b"".join(server.data_to_send()))
    assert endpoint.ws.state is OPEN
    transport.written.clear()
    return endpoint


def written(endpoint: Recorder) -> list[tuple[int, bytes, bool]]:
    """The frames an endpoint wrote after its handshake, unmasked."""
    transport = endpoint.transport
    assert isinstance(transport, Transport)
    data = bytes(transport.written)
    if isinstance(endpoint.ws, ServerProtocol):
        reader: Any = ClientProtocol(parse_uri("ws://x/"), state=OPEN, max_size=None)
    else:
        reader = ServerProtocol(state=OPEN, max_size=None)
    reader.receive_data(data)
    return [(f.opcode.value, f.data, f.fin) for f in reader.events_received()]


def state_of(endpoint: Recorder) -> tuple[Any, ...]:
    ws = endpoint.ws
    transport = endpoint.transport
    assert isinstance(transport, Transport)
    return (
        ws.state,
        ws.close_rcvd,
        ws.close_sent,
        repr(ws.parser_exc),
        transport.closed,
        transport.aborted,
    )


# --- frames, well-formed and not ---------------------------------------------------------


def raw_frame(head1: int, payload: bytes, masked: bool, length: int | None = None) -> bytes:
    """A frame written by hand, so that it may break any rule."""
    n = len(payload) if length is None else length
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((head1, bit | n))
    elif n < 65536:
        head = struct.pack("!BBH", head1, bit | 126, n)
    else:
        head = struct.pack("!BBQ", head1, bit | 127, n)
    if masked:
        mask = b"\x13\x37\xbe\xef"
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


SIZES = st.sampled_from([0, 1, 2, 125, 126, 127, 200, 65535, 65536, 69_999, 70_000])


@st.composite
def frames(draw: st.DrawFn, masked: bool) -> bytes:
    kind = draw(
        st.sampled_from(
            ["binary"] * 8
            + ["text", "ping", "pong", "fragments", "first-fragment", "close", "bad"]
            + ["wrong-mask", "too-big"]
        )
    )
    if kind == "binary":
        size = draw(st.one_of(SIZES, st.integers(0, 300)))
        return raw_frame(0x82, bytes([size % 251]) * size, masked)
    if kind == "text":
        return raw_frame(0x81, draw(st.sampled_from([b"eof", "é".encode(), b"\xff"])), masked)
    if kind in ("ping", "pong"):
        return raw_frame(0x89 if kind == "ping" else 0x8A, draw(st.binary(max_size=125)), masked)
    if kind == "fragments":
        # (A fragmented text message is refused by the endpoint itself: see below.)
        return raw_frame(0x02, b"ab", masked) + raw_frame(0x80, b"cd", masked)
    if kind == "first-fragment":  # whatever comes next must continue it
        return raw_frame(0x02, b"ab", masked)
    if kind == "close":
        return raw_frame(0x88, struct.pack("!H", 1000) + b"bye", masked)
    if kind == "wrong-mask":
        return raw_frame(0x82, b"xyz", not masked)
    if kind == "too-big":
        return raw_frame(0x82, b"", masked, length=draw(st.sampled_from([70_001, 2**40])))
    head1 = draw(
        st.sampled_from(
            [
                0xC2,  # RSV1
                0x92,  # RSV3
                0x83,  # reserved opcode
                0x8B,  # reserved control opcode
                0x09,  # fragmented ping
                0x80,  # continuation with nothing to continue
                0x00,  # same, not final
            ]
        )
    )
    payload = draw(st.sampled_from([b"", b"x" * 126, b"hello"]))
    return raw_frame(head1, payload, masked)


@st.composite
def traffic(draw: st.DrawFn) -> tuple[str, bytes, list[int], bool]:
    side = draw(st.sampled_from(["server", "client"]))
    data = b"".join(draw(st.lists(frames(side == "server"), min_size=1, max_size=8)))
    if draw(st.booleans()):  # the connection ends inside a frame
        data = data[: draw(st.integers(0, len(data)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return side, data, cuts, draw(st.booleans())


def feed_both(
    side: str, data: bytes, cuts: list[int], eof: bool = False, fast_cls: type[Recorder] = Recorder
) -> tuple[Recorder, Recorder]:
    fast, slow = open_endpoint(fast_cls, side), open_endpoint(LibraryOnly, side)
    assert fast._fast and not slow._fast
    bounds = [0, *cuts, len(data)]
    for start, end in itertools.pairwise(bounds):
        if start == end:
            continue
        for endpoint in (fast, slow):
            if not endpoint._lost and not endpoint.transport.is_closing():  # type: ignore[union-attr]
                endpoint.data_received(data[start:end])
        assert fast.got == slow.got
        assert written(fast) == written(slow)
        assert state_of(fast) == state_of(slow)
    if eof:
        for endpoint in (fast, slow):
            if not endpoint._lost and not endpoint.transport.is_closing():  # type: ignore[union-attr]
                endpoint.eof_received()
        assert written(fast) == written(slow)
        assert state_of(fast) == state_of(slow)
    return fast, slow


def run(
    side: str, data: bytes, cuts: list[int], eof: bool = False, fast_cls: type[Recorder] = Recorder
) -> tuple[Recorder, Recorder]:
    async def main() -> tuple[Recorder, Recorder]:
        return feed_both(side, data, cuts, eof, fast_cls)

    return asyncio.run(main())


@settings(max_examples=400, deadline=None)
@given(traffic())
def test_the_shorter_path_reads_what_websockets_reads(
    case: tuple[str, bytes, list[int], bool],
) -> None:
    run(*case)


@settings(max_examples=200, deadline=None)
@given(traffic())
def test_memoryviews_carry_what_websockets_reads(
    case: tuple[str, bytes, list[int], bool],
) -> None:
    """With ``binary_views`` (a tunnel's endpoint) the payloads come as views of the
    received bytes, also out of a frame put together from several reads."""
    run(*case, fast_cls=ViewRecorder)


@pytest.mark.parametrize("side", ["server", "client"])
def test_binary_frames_byte_by_byte(side: str) -> None:
    masked = side == "server"
    data = b"".join(raw_frame(0x82, bytes([n % 256]) * n, masked) for n in SIZES_BY_HAND)
    data += raw_frame(0x89, b"ping", masked) + raw_frame(0x82, b"after", masked)
    fast, _ = run(side, data, list(range(1, len(data))))
    assert [data for _, data in fast.got] == [bytes([n % 256]) * n for n in SIZES_BY_HAND] + [
        b"after"
    ]
    assert written(fast) == [(Opcode.PONG.value, b"ping", True)]
    assert fast._fast


@pytest.mark.parametrize("side", ["server", "client"])
def test_after_a_fragmented_message_the_shorter_path_resumes(side: str) -> None:
    masked = side == "server"
    data = (
        raw_frame(0x02, b"ab", masked)
        + raw_frame(0x80, b"cd", masked)
        + raw_frame(0x82, b"whole", masked)
    )
    fast, _ = run(side, data, [])
    assert fast.got == [("binary", b"ab"), ("binary", b"cd"), ("binary", b"whole")]
    fast2, _ = run(side, data, [len(data) - 3])
    assert fast2._fast  # the parser was between frames again when the last read came


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_frame_past_the_limit_closes_with_1009_before_its_payload(side: str) -> None:
    masked = side == "server"
    data = raw_frame(0x82, b"ok", masked) + raw_frame(0x82, b"", masked, length=MAX_SIZE + 1)
    fast, _ = run(side, data, [])
    assert fast.got == [("binary", b"ok")]
    assert fast.ws.close_sent is not None and fast.ws.close_sent.code == 1009


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("cut", [False, True])
async def test_a_fragmented_text_message_is_refused_and_nothing_after_it_read(
    side: str, cut: bool
) -> None:
    masked = side == "server"
    data = raw_frame(0x01, b"ab", masked) + raw_frame(0x80, b"cd", masked)
    data += raw_frame(0x82, b"more", masked)
    for endpoint in (open_endpoint(Recorder, side), open_endpoint(LibraryOnly, side)):
        if cut:
            endpoint.data_received(data[:4])
            endpoint.data_received(data[4:])
        else:
            endpoint.data_received(data)
        assert endpoint.got == []
        assert endpoint.ws.close_sent is not None and endpoint.ws.close_sent.code == 1003
        closing = raw_frame(0x88, struct.pack("!H", 1003), masked)
        endpoint.data_received(closing)  # the peer's answer still completes the handshake
        assert endpoint.got == [("close", b"")]


@pytest.mark.parametrize("side", ["server", "client"])
async def test_a_reserved_opcode_fails_the_connection_at_its_header(side: str) -> None:
    """websockets refuses an unknown opcode as soon as it reads the header, without
    waiting for the payload: so does the shorter path."""
    masked = side == "server"
    frame = raw_frame(0x83, b"x" * 300, masked)
    for endpoint in (open_endpoint(Recorder, side), open_endpoint(LibraryOnly, side)):
        endpoint.data_received(raw_frame(0x82, b"ok", masked) + frame[:20])
        assert endpoint.got == [("binary", b"ok")]
        assert endpoint.ws.close_sent is not None and endpoint.ws.close_sent.code == 1002


# --- sending ---------------------------------------------------------------------------------


async def test_a_server_sends_the_bytes_websockets_would() -> None:
    endpoint = open_endpoint(Recorder, "server")
    assert endpoint._fast
    transport = endpoint.transport
    assert isinstance(transport, Transport)
    for size in (0, 1, 125, 126, 65535, 65536, 100_000):
        transport.written.clear()
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        endpoint.send_binary(payload)
        expected = Frame(Opcode.BINARY, payload).serialize(mask=False, extensions=[])
        assert bytes(transport.written) == expected, size


async def test_a_client_masks_each_frame_afresh() -> None:
    endpoint = open_endpoint(Recorder, "client")
    assert endpoint._fast
    transport = endpoint.transport
    assert isinstance(transport, Transport)
    payloads = [bytes([n % 256]) * n for n in (0, 4, 125, 126, 65535, 65536, 100_000)]
    payloads += [b"\0" * 8] * 2000  # past one pool of masks
    masks = set()
    for payload in payloads:
        before = len(transport.written)
        endpoint.send_binary(payload)
        head = bytes(transport.written[before : before + 14])
        offset = 2 if head[1] & 0x7F < 126 else 4 if head[1] & 0x7F == 126 else 10
        assert head[1] & 0x80
        masks.add(head[offset : offset + 4])
    assert written(endpoint) == [(Opcode.BINARY.value, p, True) for p in payloads]
    assert len(masks) > len(payloads) - 5  # 32 random bits each: a repeat or two at most


#: Parts of one message: frame headers around payloads, odd sizes to turn the mask.
PARTS = [b"h" * 9, bytes(range(256)) * 70, b"", b"\x01" * 3, b"\x02" * 16_385, b"w" * 13]


@pytest.mark.parametrize("count", [1, 2, 3, len(PARTS)])
async def test_a_message_sent_in_parts_is_the_message_joined(count: int) -> None:
    """``send_message`` writes what ``send_binary`` of the joined parts would: byte for
    byte from a server, the same frame (afresh masked) from a client."""
    parts = PARTS[:count]
    joined = b"".join(parts)
    server = open_endpoint(Recorder, "server")
    transport = server.transport
    assert isinstance(transport, Transport)
    server.send_message(parts)
    assert bytes(transport.written) == Frame(Opcode.BINARY, joined).serialize(
        mask=False, extensions=[]
    )
    client = open_endpoint(Recorder, "client")
    client.send_message(parts)
    client.send_message([b"a", b"bc", b"defgh"])
    assert written(client) == [(Opcode.BINARY.value, joined, True), (2, b"abcdefgh", True)]


async def test_small_parts_go_out_with_the_header_large_ones_alone() -> None:
    """A tunnel's message is headers around large payloads: the headers join the
    WebSocket header (no TLS record each), the payloads are not copied into one."""
    endpoint = open_endpoint(Recorder, "server")
    transport = endpoint.transport
    assert isinstance(transport, Transport)
    calls: list[list[bytes]] = []
    transport.writelines = lambda items: calls.append([bytes(i) for i in items])
    big = b"x" * 70_000
    endpoint.send_message([b"H1", big, b"H2", b"H3", big])
    head = struct.pack("!BBQ", 0x82, 127, 140_006)
    assert calls == [[head + b"H1", big, b"H2H3", big]]


async def test_nothing_is_sent_once_closing() -> None:
    endpoint = open_endpoint(Recorder, "server")
    endpoint.close(1000, "bye")
    transport = endpoint.transport
    assert isinstance(transport, Transport)
    before = bytes(transport.written)
    endpoint.send_binary(b"late")
    assert bytes(transport.written) == before


# --- when the shorter path is taken --------------------------------------------------------


async def test_the_parser_is_found_between_frames_and_not_inside_one() -> None:
    endpoint = open_endpoint(LibraryOnly, "server")
    ws = endpoint.ws
    assert at_frame_boundary(ws)
    whole = raw_frame(0x82, b"x" * 300, True)
    ws.receive_data(whole[:3])  # a header: the parser waits inside the frame
    assert not at_frame_boundary(ws)
    ws.receive_data(whole[3:])
    assert at_frame_boundary(ws)
    ws.receive_data(whole[:2] + whole[2:4])  # the length read, the mask not yet
    assert not at_frame_boundary(ws)


async def test_a_header_cut_before_its_handshake_ends_is_left_to_websockets() -> None:
    """The agent's first read may hold the handshake's response and part of a frame:
    the shorter path waits until websockets has read that frame."""
    server = ServerProtocol(max_size=MAX_SIZE)
    endpoint = Recorder(ClientProtocol(parse_uri("wss://relay.example/"), max_size=MAX_SIZE))
    transport = Transport()
    endpoint.connection_made(transport)  # type: ignore[arg-type]
    server.receive_data(bytes(transport.written))
    server.send_response(server.accept(server.events_received()[0]))
    server.send_binary(b"first message")
    data = b"".join(server.data_to_send())
    endpoint.data_received(data[:-5])
    assert not endpoint._fast and endpoint.ws.state is OPEN
    endpoint.data_received(data[-5:])
    assert endpoint._fast
    assert endpoint.got == [("binary", b"first message")]
