"""The tunnel wire format: frame layout, the incremental parser and payload codecs."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchway.errors import RemoteProtocolError
from hatchway.mux.frames import (
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_SERVICE_NAME,
    MAX_WINDOW,
    PAYLOAD_LIMITS,
    Frame,
    FrameHeaderError,
    FrameParser,
    FrameType,
    decode_open,
    decode_reason,
    decode_u32,
    encode_header,
    encode_open,
    encode_reason,
)

U32_MAX = 2**32 - 1
PING_FRAME = Frame(FrameType.PING, 0, b"12345678")


def limit_of(frame_type: FrameType) -> int:
    return PAYLOAD_LIMITS[frame_type]


@st.composite
def frames(draw: st.DrawFn, max_payload: int = 600) -> Frame:
    frame_type = draw(st.sampled_from(FrameType))
    channel = draw(st.integers(0, U32_MAX))
    payload = draw(st.binary(max_size=min(max_payload, limit_of(frame_type))))
    return Frame(frame_type, channel, payload)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- layout ---------------------------------------------------------------------------


def test_header_layout_is_big_endian_type_channel_length() -> None:
    frame = Frame(FrameType.DATA, 0x01020304, b"xyz")
    assert frame.serialize() == b"\x05\x01\x02\x03\x04\x00\x00\x00\x03xyz"
    assert HEADER_SIZE == 9
    assert encode_header(FrameType.WINDOW, 7, 4) == b"\x08\x00\x00\x00\x07\x00\x00\x00\x04"


def test_frame_is_frozen_and_defaults_to_empty_payload() -> None:
    frame = Frame(FrameType.EOF, 3)
    assert frame.payload == b""
    assert frame.serialize() == b"\x06\x00\x00\x00\x03\x00\x00\x00\x00"
    with pytest.raises(AttributeError):
        frame.channel = 5  # type: ignore[misc]


def test_wire_constants_are_stable() -> None:
    # These values are on the wire: changing one breaks every deployed agent.
    assert [(t.name, t.value) for t in FrameType] == [
        ("HELLO", 1),
        ("OPEN", 2),
        ("OPEN_OK", 3),
        ("OPEN_FAILED", 4),
        ("DATA", 5),
        ("EOF", 6),
        ("RESET", 7),
        ("WINDOW", 8),
        ("PING", 9),
        ("PONG", 10),
        ("GOAWAY", 11),
    ]


# --- round trips ----------------------------------------------------------------------


@given(frames())
def test_parse_of_serialize_is_identity(frame: Frame) -> None:
    parser = FrameParser()
    assert parser.feed(frame.serialize()) == [frame]
    assert parser.buffered() == 0


@pytest.mark.parametrize("frame_type", list(FrameType))
def test_payload_exactly_at_the_limit_round_trips(frame_type: FrameType) -> None:
    limit = limit_of(frame_type)
    frame = Frame(frame_type, 1, (bytes(range(256)) * (limit // 256 + 1))[:limit])
    assert len(frame.payload) == limit_of(frame_type)
    assert FrameParser().feed(frame.serialize()) == [frame]


@given(st.lists(frames(), max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_random_chunkings_yield_the_same_frames(sent: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(f.serialize() for f in sent)
    parser = FrameParser()
    received: list[Frame] = []
    for chunk in split(stream, cuts):
        received += parser.feed(chunk)
        # What is held back is only the start of the next, incomplete frame.
        pending = received and len(received) < len(sent)
        if pending:
            assert parser.buffered() < len(sent[len(received)].serialize())
    assert received == sent
    assert parser.buffered() == 0


@settings(max_examples=30)
@given(st.lists(frames(max_payload=40), max_size=6))
def test_byte_by_byte_yields_the_same_frames(sent: list[Frame]) -> None:
    stream = b"".join(f.serialize() for f in sent)
    parser = FrameParser()
    received: list[Frame] = []
    for i in range(len(stream)):
        got = parser.feed(stream[i : i + 1])
        assert len(got) <= 1
        received += got
    assert received == sent
    assert parser.buffered() == 0


def test_feed_accepts_bytearray_and_memoryview() -> None:
    frame = Frame(FrameType.DATA, 9, b"payload")
    raw = frame.serialize()
    parser = FrameParser()
    assert parser.feed(bytearray(raw[:4])) == []
    assert parser.feed(memoryview(raw)[4:]) == [frame]


def test_parsed_payload_is_independent_of_the_input_buffer() -> None:
    raw = bytearray(Frame(FrameType.DATA, 1, b"abc").serialize())
    (frame,) = FrameParser().feed(raw)
    raw[-3:] = b"zzz"
    assert frame.payload == b"abc"
    assert isinstance(frame.payload, bytes)


def test_empty_feed_returns_nothing() -> None:
    parser = FrameParser()
    assert parser.feed(b"") == []
    assert parser.buffered() == 0


# --- limits and garbage ---------------------------------------------------------------


@pytest.mark.parametrize("frame_type", list(FrameType))
def test_oversized_header_raises_before_the_payload_arrives(frame_type: FrameType) -> None:
    parser = FrameParser()
    header = encode_header(frame_type, 1, limit_of(frame_type) + 1)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        parser.feed(header)


def test_empty_frame_types_complete_with_their_header() -> None:
    assert limit_of(FrameType.EOF) == 0
    assert FrameParser().feed(encode_header(FrameType.EOF, 1, 0)) == [Frame(FrameType.EOF, 1)]


@pytest.mark.parametrize("frame_type", [t for t in FrameType if limit_of(t) > 0])
def test_header_at_the_limit_waits_for_its_payload(frame_type: FrameType) -> None:
    parser = FrameParser()
    assert parser.feed(encode_header(frame_type, 1, limit_of(frame_type))) == []
    assert parser.buffered() == HEADER_SIZE


@pytest.mark.parametrize(
    ("frame_type", "size"),
    [
        (FrameType.WINDOW, 5),
        (FrameType.OPEN_OK, 5),
        (FrameType.EOF, 1),
        (FrameType.PING, 9),
        (FrameType.PONG, 9),
        (FrameType.RESET, MAX_CONTROL_PAYLOAD + 1),
    ],
)
def test_fixed_size_frames_are_refused_when_longer(frame_type: FrameType, size: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"{frame_type.name} frame of {size} bytes"):
        FrameParser().feed(encode_header(frame_type, 1, size))


def test_oversized_header_after_a_good_frame_raises() -> None:
    good = Frame(FrameType.PING, 0, b"12345678").serialize()
    bad = encode_header(FrameType.HELLO, 0, MAX_CONTROL_PAYLOAD + 1)
    with pytest.raises(RemoteProtocolError):
        FrameParser().feed(good + bad)


BAD_HEADERS = {
    "oversized": encode_header(FrameType.GOAWAY, 0, MAX_CONTROL_PAYLOAD + 1),
    "unknown type": struct.pack("!BII", 0xEE, 1, 0),
}


@pytest.mark.parametrize("bad", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_a_refused_header_carries_the_frames_before_it(bad: bytes) -> None:
    """The receiver still handles them (PROTOCOL.md section 7): the error hands them
    over, in order, and nothing of the refused frame or after it."""
    before = [
        Frame(FrameType.PONG, 0, b"x"),
        Frame(FrameType.DATA, 3, b"payload"),
        Frame(FrameType.EOF, 3),
        Frame(FrameType.RESET, 5, b"\x00"),
    ]
    data = b"".join(f.serialize() for f in before) + bad + PING_FRAME.serialize()
    with pytest.raises(FrameHeaderError) as caught:
        FrameParser().feed(data)
    assert isinstance(caught.value, RemoteProtocolError)
    assert caught.value.frames == before


@pytest.mark.parametrize("bad", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_a_refused_header_carries_the_frames_completed_from_the_buffer(bad: bytes) -> None:
    """Frames whose start an earlier feed brought (the parser's buffer path) too."""
    first = Frame(FrameType.DATA, 3, b"split across feeds")
    raw = first.serialize()
    parser = FrameParser()
    assert parser.feed(raw[:12]) == []
    with pytest.raises(FrameHeaderError) as caught:
        parser.feed(raw[12:] + PING_FRAME.serialize() + bad)
    assert caught.value.frames == [first, PING_FRAME]


def test_a_refused_first_header_carries_no_frames() -> None:
    with pytest.raises(FrameHeaderError, match="unknown frame type 0xee") as caught:
        FrameParser().feed(BAD_HEADERS["unknown type"])
    assert caught.value.frames == []


@given(st.integers(0, 255).filter(lambda t: t not in set(FrameType)), st.integers(0, U32_MAX))
def test_unknown_frame_type_raises(frame_type: int, length: int) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown frame type"):
        FrameParser().feed(struct.pack("!BII", frame_type, 1, length))


def test_a_partial_header_is_not_judged_yet() -> None:
    parser = FrameParser()
    assert parser.feed(b"\xff\x00\x00\x00") == []
    with pytest.raises(RemoteProtocolError):
        parser.feed(b"\x01\x00\x00\x00\x00")


@given(st.binary(max_size=300))
def test_garbage_either_parses_or_raises_remote_protocol_error(data: bytes) -> None:
    try:
        FrameParser().feed(data)
    except RemoteProtocolError:
        pass


# --- payload codecs -------------------------------------------------------------------


@given(st.integers(1, MAX_WINDOW), st.text(min_size=1, max_size=MAX_SERVICE_NAME))
def test_open_payload_round_trips(window: int, service: str) -> None:
    assert decode_open(encode_open(window, service)) == (window, service)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "too short"),
        (b"\x00\x00\x00\x01", "too short"),
        (b"\x00\x00\x00\x00ssh", "invalid window size 0"),
        (struct.pack("!I", MAX_WINDOW + 1) + b"ssh", "invalid window size"),
        (b"\x00\x00\x00\x01\xff\xfe", "not UTF-8"),
        (b"\x00\x00\x00\x01" + b"s" * (MAX_SERVICE_NAME + 1), "too long"),
    ],
)
def test_bad_open_payload_raises(payload: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_open(payload)


@given(st.integers(0, U32_MAX))
def test_u32_round_trips(value: int) -> None:
    assert decode_u32(struct.pack("!I", value), "WINDOW") == value


@pytest.mark.parametrize("length", [0, 3, 5, 8])
def test_u32_of_the_wrong_length_raises(length: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"got {length}"):
        decode_u32(b"\x00" * length, "WINDOW")


@given(st.integers(0, 255), st.text(max_size=300))
def test_reason_round_trips(code: int, message: str) -> None:
    assert decode_reason(encode_reason(code, message), "RESET") == (code, message)


@given(st.integers(0, 255), st.text(min_size=200, max_size=1500))
def test_long_reason_is_cut_to_1024_bytes_of_valid_utf8(code: int, message: str) -> None:
    payload = encode_reason(code, message)
    assert len(payload) <= 1 + 1024
    got_code, got_message = decode_reason(payload, "OPEN_FAILED")
    assert got_code == code
    assert message.startswith(got_message)
    assert len(got_message.encode()) > 1024 - 4 or got_message == message


def test_reason_cut_never_splits_a_multibyte_character() -> None:
    message = "€" * 400  # 3 bytes each: 1024 falls inside a character
    code, got = decode_reason(encode_reason(5, message), "OPEN_FAILED")
    assert (code, got) == (5, "€" * 341)


def test_empty_reason_payload_raises() -> None:
    with pytest.raises(RemoteProtocolError, match="too short"):
        decode_reason(b"", "GOAWAY")


def test_reason_message_must_be_utf8() -> None:
    with pytest.raises(RemoteProtocolError, match="not UTF-8"):
        decode_reason(b"\x01\xc3", "RESET")
