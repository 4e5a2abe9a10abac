"""Response framing for the web proxy: where responses start and end, bytes passed through."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hatchway import extensions
from hatchway.errors import HatchwayError
from hatchway.web import framing
from hatchway.web.framing import (
    MAX_CHUNK_LINE,
    ResponseError,
    ResponseFramer,
    ResponseHead,
    Rewrite,
)

Pieces = list[bytes | memoryview]

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
OK = OK_HEAD + b"hello"


def joined(pieces: Pieces) -> bytes:
    return b"".join(bytes(piece) for piece in pieces)


def framer_for(*methods: bytes, rewrite: Rewrite | None = None, **kwargs: int) -> ResponseFramer:
    framer = ResponseFramer(rewrite, **kwargs)
    for method in methods:
        framer.expect(method)
    return framer


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_in_pieces(framer: ResponseFramer, data: bytes, cuts: list[int]) -> bytes:
    return b"".join(joined(framer.feed(chunk)) for chunk in split_at(data, cuts))


def feed_bytewise(framer: ResponseFramer, data: bytes) -> bytes:
    return b"".join(joined(framer.feed(data[i : i + 1])) for i in range(len(data)))


def response_error(data: bytes, *methods: bytes, **kwargs: int) -> ResponseError:
    """The error that both one-shot and byte-by-byte feeding of ``data`` raise."""
    with pytest.raises(ResponseError) as one_shot:
        framer_for(*(methods or (b"GET",)), **kwargs).feed(data)
    with pytest.raises(ResponseError) as bytewise:
        feed_bytewise(framer_for(*(methods or (b"GET",)), **kwargs), data)
    assert str(bytewise.value) == str(one_shot.value)
    return one_shot.value


# --- Content-Length ---------------------------------------------------------------------


def test_content_length_response_in_one_piece_is_passed_as_the_same_object() -> None:
    framer = framer_for(b"GET")
    pieces = framer.feed(OK)
    assert len(pieces) == 1 and pieces[0] is OK
    assert (framer.responses, framer.pending, framer.in_message) == (1, 0, False)
    assert not framer.must_close and not framer.upgraded
    assert framer.feed_eof() == []


def test_content_length_body_across_feeds() -> None:
    framer = framer_for(b"GET")
    assert joined(framer.feed(OK[:-3])) == OK[:-3]
    assert framer.in_message and framer.responses == 0 and framer.pending == 1
    assert joined(framer.feed(OK[-3:])) == b"llo"
    assert not framer.in_message and framer.responses == 1 and framer.pending == 0


def test_zero_content_length_ends_at_the_head() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(data)) == data
    assert (framer.responses, framer.pending, framer.in_message) == (1, 1, False)


def test_large_body_slices_are_not_copied() -> None:
    body = bytes(range(256)) * 64
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    data = head + body + b"HTTP/1.1 204 No Content\r\n\r\n"
    framer = framer_for(
        b"GET", b"GET", rewrite=lambda h: h.serialize() if h.status == 204 else None
    )
    pieces = framer.feed(data)
    assert [type(piece) for piece in pieces] == [memoryview, bytes]
    assert isinstance(pieces[0], memoryview) and pieces[0].obj is data
    assert bytes(pieces[0]) == head + body
    assert framer.responses == 2
    # A feed that is all pass-through goes out as the very object fed in.
    framer = framer_for(b"GET")
    whole = head + body
    pieces = framer.feed(whole)
    assert len(pieces) == 1 and pieces[0] is whole


@pytest.mark.parametrize(
    "lengths",
    [[b"5, 5"], [b"5", b"5"], [b"5,5 , 5"], [b"00005"], [b"5", b"005"]],
)
def test_repeated_identical_content_lengths_are_accepted(lengths: list[bytes]) -> None:
    fields = b"".join(b"Content-Length: %s\r\n" % value for value in lengths)
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello" + OK
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(data)) == data
    assert framer.responses == 2


def test_largest_content_length_is_accepted() -> None:
    framer = framer_for(b"GET")
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nabc" % (2**63 - 1))
    assert framer.in_message and framer.responses == 0
    with pytest.raises(ResponseError, match="before the end of a body"):
        framer.feed_eof()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (b"Content-Length: +5\r\n", "invalid Content-Length"),
        (b"Content-Length: -1\r\n", "invalid Content-Length"),
        (b"Content-Length: 5 5\r\n", "invalid Content-Length"),
        (b"Content-Length: 0x10\r\n", "invalid Content-Length"),
        (b"Content-Length: \r\n", "invalid Content-Length"),
        (b"Content-Length: 5,\r\n", "invalid Content-Length"),
        (b"Content-Length: \xd9\xa5\r\n", "invalid Content-Length"),
        (b"Content-Length: 5, 6\r\n", "conflicting Content-Length"),
        (b"Content-Length: 5\r\nContent-Length: 6\r\n", "conflicting Content-Length"),
        (b"Content-Length: %d\r\n" % 2**63, "too large"),
        (b"Content-Length: 1%s\r\n" % (b"0" * 30), "invalid Content-Length"),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "both Transfer-Encoding"),
        (b"Content-Length: 5\r\nTransfer-Encoding: gzip\r\n", "both Transfer-Encoding"),
    ],
)
def test_bad_framing_fields_are_errors(fields: bytes, message: str) -> None:
    error = response_error(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello")
    assert message in str(error)
    assert isinstance(error, HatchwayError)


# --- chunked ------------------------------------------------------------------------------

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
    b"5\r\nhello\r\n"
    b"0A;name=value;flag\r\n0123456789\r\n"
    b'1f ; spaced="quoted"\r\n' + b"z" * 31 + b"\r\n"
    b"0\r\nX-Checksum: 1234\r\nX-Other:\tyes\r\n\r\n"
)


def test_chunked_body_with_extensions_and_trailers_passes_through() -> None:
    framer = framer_for(b"GET", b"GET")
    pieces = framer.feed(CHUNKED + OK)
    assert len(pieces) == 1 and joined(pieces) == CHUNKED + OK
    assert (framer.responses, framer.pending, framer.in_message) == (2, 0, False)


def test_chunked_body_byte_by_byte() -> None:
    framer = framer_for(b"GET")
    out = []
    for i in range(len(CHUNKED)):
        assert framer.in_message == (i > 0) and framer.responses == 0
        out.append(joined(framer.feed(CHUNKED[i : i + 1])))
    assert b"".join(out) == CHUNKED
    assert framer.responses == 1 and not framer.in_message
    # Only the head is held back; body bytes go out as they come.
    head_size = CHUNKED.index(b"\r\n\r\n") + 4
    assert out[: head_size - 1] == [b""] * (head_size - 1)
    assert out[head_size - 1] == CHUNKED[:head_size]
    assert all(len(piece) == 1 for piece in out[head_size:])


def test_chunked_without_trailers_and_with_bare_lf() -> None:
    data = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n3\nabc\n0\n\n"
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(data + OK)) == data + OK
    assert framer.responses == 2


@pytest.mark.parametrize(
    "codings", [[b"gzip, chunked"], [b"gzip", b"chunked"], [b"Chunked"], [b"chunked, "]]
)
def test_final_chunked_coding_means_chunked(codings: list[bytes]) -> None:
    fields = b"".join(b"Transfer-Encoding: %s\r\n" % value for value in codings)
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n2\r\nhi\r\n0\r\n\r\n" + OK
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(data)) == data
    assert framer.responses == 2 and not framer.must_close


@pytest.mark.parametrize("codings", [[b"gzip"], [b"gzip, deflate"], [b"gzip", b"identity"]])
def test_other_final_coding_means_body_delimited_by_close(codings: list[bytes]) -> None:
    fields = b"".join(b"Transfer-Encoding: %s\r\n" % value for value in codings)
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n2\r\nhi\r\n0\r\n\r\n" + OK
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(data)) == data
    assert framer.must_close and framer.in_message and framer.responses == 0
    framer.feed_eof()
    assert framer.responses == 1 and framer.pending == 1


@pytest.mark.parametrize(
    "codings",
    [
        [b"chunked, gzip"],
        [b"chunked", b"identity"],
        [b"Chunked, identity"],
        [b"chunked, chunked"],
        [b"chunked", b"chunked"],
        [b"gzip, chunked;x=1"],
    ],
)
def test_chunked_anywhere_but_once_at_the_end_is_refused(codings: list[bytes]) -> None:
    """RFC 9112 reads these bodies to the close, browsers as chunked (Chromium looks for
    the token anywhere): the device could end a response where the browser does not and
    slip the next one past the head rewriting. Refused, as nginx does."""
    fields = b"".join(b"Transfer-Encoding: %s\r\n" % value for value in codings)
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n5\r\nhello\r\n0\r\n\r\n" + OK
    framer = framer_for(b"GET", b"GET")
    with pytest.raises(ResponseError, match="final transfer coding") as caught:
        framer.feed(data)
    assert caught.value.pieces == []


def test_chunked_in_http_10_is_framed_but_closes() -> None:
    data = (
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    framer = framer_for(b"GET")
    assert joined(framer.feed(data)) == data
    assert framer.responses == 1 and framer.must_close


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"g\r\n", "malformed chunk-size line"),
        (b"-1\r\n", "malformed chunk-size line"),
        (b" 5\r\nhello\r\n", "malformed chunk-size line"),
        (b"\r\n", "malformed chunk-size line"),
        (b"5\r\r\n", "malformed chunk-size line"),
        (b"5;a\x00b\r\n", "malformed chunk-size line"),
        (b"1" + b"0" * 16 + b"\r\n", "malformed chunk-size line"),
        (b"5;" + b"x" * MAX_CHUNK_LINE + b"\r\n", "chunk-size line longer than"),
        (b"5\r\nhelloXY", "not followed by CRLF"),
        (b"5\r\nhello\rX", "not followed by CRLF"),
        (b"5\r\nhello\r\r\n", "not followed by CRLF"),
        (b"0\r\nbad trailer\r\n\r\n", "malformed trailer line"),
        (b"0\r\n folded\r\n\r\n", "malformed trailer line"),
        (b"0\r\nX: a\rb\r\n\r\n", "malformed trailer line"),
    ],
)
def test_bad_chunked_bodies_are_errors(body: bytes, message: str) -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    assert message in str(response_error(data))


def test_sixteen_hex_digits_are_accepted() -> None:
    framer = framer_for(b"GET")
    framer.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nab")
    assert framer.in_message


def test_trailer_section_is_bounded_by_max_head() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 40) for i in range(10))
    framer = framer_for(b"GET", max_head=len(trailers) + 2)
    assert joined(framer.feed(head + trailers + b"\r\n")) == head + trailers + b"\r\n"
    assert framer.responses == 1
    error = response_error(head + trailers + b"\r\n", max_head=len(trailers) + 1)
    assert "trailer section larger than" in str(error)


# --- responses without a body -----------------------------------------------------------


def test_head_request_response_has_no_body_whatever_the_fields_say() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    chunked_head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    bare_head = b"HTTP/1.1 200 OK\r\n\r\n"
    data = head + chunked_head + bare_head + OK
    framer = framer_for(b"HEAD", b"HEAD", b"HEAD", b"GET")
    assert joined(framer.feed(data)) == data
    assert (framer.responses, framer.pending, framer.must_close) == (4, 0, False)


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
@pytest.mark.parametrize(
    "fields",
    [b"", b"Content-Length: 12\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: x\r\n"],
)
def test_204_and_304_have_no_body(status: bytes, fields: bytes) -> None:
    data = b"HTTP/1.1 " + status + b"\r\n" + fields + b"\r\n" + OK
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(data)) == data
    assert (framer.responses, framer.pending, framer.must_close) == (2, 0, False)


# --- 1xx and upgrades -------------------------------------------------------------------


def test_interim_responses_do_not_complete_the_request() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    seen: list[int] = []

    def rewrite(head: ResponseHead) -> None:
        seen.append(head.status)

    framer = framer_for(b"POST", rewrite=rewrite)
    assert joined(framer.feed(interim)) == interim
    assert (framer.responses, framer.pending, framer.in_message) == (0, 1, False)
    assert joined(framer.feed(OK)) == OK
    assert (framer.responses, framer.pending) == (1, 0)
    assert seen == [100, 103, 200]


def test_interim_response_with_content_length_has_no_body() -> None:
    data = b"HTTP/1.1 100 Continue\r\nContent-Length: 10\r\n\r\n" + OK
    framer = framer_for(b"POST")
    assert joined(framer.feed(data)) == data
    assert framer.responses == 1


def test_101_to_an_upgrade_request_switches_to_raw_bytes() -> None:
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    tail = b"\x81\x05hello HTTP/1.1 200 OK\r\n\r\n garbage \x00"
    framer = ResponseFramer()
    framer.expect(b"GET", upgrade=True)
    assert joined(framer.feed(switch + tail)) == switch + tail
    assert framer.upgraded and framer.responses == 1 and framer.pending == 0
    assert not framer.in_message and not framer.must_close
    more = b"\x00\xff" * 100
    pieces = framer.feed(more)
    assert len(pieces) == 1 and pieces[0] is more
    assert framer.feed(b"") == []
    assert framer.feed_eof() == []


def test_101_after_interim_and_across_feeds() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching\r\n\r\nraw"
    framer = ResponseFramer()
    framer.expect(b"GET", upgrade=True)
    assert feed_bytewise(framer, data) == data
    assert framer.upgraded


def test_101_to_a_request_without_upgrade_is_an_error() -> None:
    error = response_error(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert "101" in str(error)


def test_refused_upgrade_closes_the_connection() -> None:
    framer = ResponseFramer()
    framer.expect(b"GET", upgrade=True)
    assert joined(framer.feed(OK)) == OK
    assert framer.must_close and not framer.upgraded and framer.responses == 1
    with pytest.raises(ResponseError, match="closes the connection"):
        framer.feed(b"H")


# --- connection management --------------------------------------------------------------


def test_body_delimited_by_close() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(head + b"<html>")) == head + b"<html>"
    assert framer.must_close and framer.in_message and framer.responses == 0
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 3
    assert joined(framer.feed(body)) == body
    assert framer.feed_eof() == []
    assert framer.responses == 1 and framer.pending == 1 and not framer.in_message


def test_connection_close_ends_the_stream() -> None:
    data = b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 2\r\n\r\nhi"
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(data)) == data
    assert framer.must_close and framer.responses == 1 and framer.pending == 1
    assert framer.feed_eof() == []


def test_data_after_a_closing_response_is_an_error_but_the_response_goes_out() -> None:
    data = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
    framer = framer_for(b"GET", b"GET")
    with pytest.raises(ResponseError, match="closes the connection") as caught:
        framer.feed(data + OK)
    assert joined(caught.value.pieces) == data
    with pytest.raises(ResponseError, match="already broken"):
        framer.feed(b"x")
    with pytest.raises(ResponseError, match="already broken"):
        framer.feed_eof()


def test_http_10_closes_unless_keep_alive() -> None:
    plain = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    framer = framer_for(b"GET")
    assert joined(framer.feed(plain)) == plain
    assert framer.must_close and framer.responses == 1

    kept = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
    framer = framer_for(b"GET", b"GET")
    assert joined(framer.feed(kept + kept)) == kept + kept
    assert not framer.must_close and framer.responses == 2

    unframed = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nhi"
    framer = framer_for(b"GET")
    assert joined(framer.feed(unframed)) == unframed
    assert framer.must_close and framer.in_message


def test_pipelined_responses_in_one_feed() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        + OK
        + CHUNKED
        + b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'
        + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"  # HEAD: no body
        + b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"
    )
    framer = framer_for(b"POST", b"GET", b"GET", b"HEAD", b"GET")
    pieces = framer.feed(data)
    assert pieces == [data]
    assert (framer.responses, framer.pending, framer.in_message) == (5, 0, False)


def test_unsolicited_response_is_an_error() -> None:
    assert "unsolicited" in str(response_error(OK + OK, b"GET"))
    framer = ResponseFramer()
    with pytest.raises(ResponseError, match="unsolicited"):
        framer.feed(OK)
    framer = framer_for(b"GET")
    with pytest.raises(ResponseError, match="unsolicited") as caught:
        framer.feed(OK + b"H")
    assert joined(caught.value.pieces) == OK
    assert framer.responses == 1


# --- head parsing -----------------------------------------------------------------------


def test_head_fields_are_parsed() -> None:
    seen: list[ResponseHead] = []
    raw = (
        b"HTTP/1.0 404 Not  Found \r\nServer:  tiny\t \r\nSet-Cookie: a=1\r\n"
        b"X-Empty:\r\nset-cookie:b=2\r\n\r\n"
    )
    framer = framer_for(b"GET", rewrite=lambda head: seen.append(head))
    framer.feed(raw)
    (head,) = seen
    assert head.version == b"HTTP/1.0" and head.status == 404 and head.reason == b"Not  Found "
    assert head.headers == [
        (b"Server", b"tiny"),
        (b"Set-Cookie", b"a=1"),
        (b"X-Empty", b""),
        (b"set-cookie", b"b=2"),
    ]
    assert head.raw == raw
    assert head.get(b"SET-COOKIE") == b"a=1" and head.get(b"missing") is None
    assert head.get_all(b"Set-Cookie") == [b"a=1", b"b=2"]
    assert head.serialize() == (
        b"HTTP/1.0 404 Not  Found \r\nServer: tiny\r\nSet-Cookie: a=1\r\n"
        b"X-Empty: \r\nset-cookie: b=2\r\n\r\n"
    )


@pytest.mark.parametrize(
    "status_line", [b"HTTP/1.1 200", b"HTTP/1.1 200 ", b"HTTP/1.1 599 Custom \x80\xff reason"]
)
def test_tolerated_status_lines(status_line: bytes) -> None:
    data = status_line + b"\r\nContent-Length: 0\r\n\r\n"
    framer = framer_for(b"GET")
    assert joined(framer.feed(data)) == data
    assert framer.responses == 1


def test_bare_lf_heads_are_tolerated() -> None:
    seen: list[ResponseHead] = []
    data = b"HTTP/1.1 200 OK\nContent-Length: 2\r\nServer: old\n\nhi"
    framer = framer_for(b"GET", rewrite=lambda head: seen.append(head))
    assert feed_bytewise(framer, data) == data
    assert framer.responses == 1
    assert seen[0].headers == [(b"Content-Length", b"2"), (b"Server", b"old")]
    assert seen[0].raw == data[:-2]


def test_head_ending_in_lf_crlf() -> None:
    data = b"HTTP/1.1 200 OK\nContent-Length: 2\n\r\nhi"
    framer = framer_for(b"GET")
    assert joined(framer.feed(data)) == data
    assert framer.responses == 1


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nServer : x\r\n\r\n", "whitespace before the colon"),
        (b"HTTP/1.1 200 OK\r\nServer\t: x\r\n\r\n", "whitespace before the colon"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "no colon"),
        (b"HTTP/1.1 200 OK\r\n: empty name\r\n\r\n", "invalid field name"),
        (b"HTTP/1.1 200 OK\r\nBad(name): x\r\n\r\n", "invalid field name"),
        (b"HTTP/1.1 200 OK\r\nN\xc3\xa4me: x\r\n\r\n", "invalid field name"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "NUL in header line 1"),
        (b"HTTP/1.1 200 OK\r\nX\x00: ab\r\n\r\n", "NUL in header line 1"),
        (b"HTTP/1.1 200 OK\r\nA: 1\r\nX: a\rb\r\n\r\n", "bare CR in header line 2"),
        (b"HTTP/1.1 200 OK\r\nX: ab\r\r\n\r\n", "bare CR in header line 1"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", "obsolete line folding"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n\tfolded\r\n\r\n", "obsolete line folding"),
        (b"HTTP/1.1 200 O\x00K\r\n\r\n", "NUL in status line"),
        (b"HTTP/1.1 200 O\rK\r\n\r\n", "bare CR in status line"),
        (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "empty line before the status line"),
        (b"\nHTTP/1.1 200 OK\r\n\r\n", "empty line before the status line"),
        (b"\r\n\r\n", "empty line before the status line"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.2 200 OK\r\n\r\n", "malformed status line"),
        (b"http/1.1 200 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1  200 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "invalid status code"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed status line"),
    ],
)
def test_bad_heads_are_errors(head: bytes, message: str) -> None:
    assert message in str(response_error(head + b"tail"))


def test_head_size_limit_is_exact() -> None:
    def head_of(size: int) -> bytes:
        start = b"HTTP/1.1 204 No Content\r\nX-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    fits = head_of(300)
    assert len(fits) == 300
    for feed in (lambda f, d: joined(f.feed(d)), feed_bytewise):
        framer = framer_for(b"GET", max_head=300)
        assert feed(framer, fits) == fits
        assert framer.responses == 1
    error = response_error(head_of(301), max_head=300)
    assert "larger than 300 bytes" in str(error)
    # A head that never ends is refused as soon as max_head bytes have come in.
    endless = b"HTTP/1.1 200 OK\r\n" + b"x" * 283
    assert len(endless) == 300
    assert "larger than 300 bytes" in str(response_error(endless, max_head=300))
    framer = framer_for(b"GET", max_head=300)
    assert framer.feed(endless[:299]) == [] and framer.in_message


def test_header_count_limit() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(10))
    framer = framer_for(b"GET", max_headers=10)
    data = b"HTTP/1.1 204 No Content\r\n" + fields + b"\r\n"
    assert joined(framer.feed(data)) == data
    error = response_error(
        b"HTTP/1.1 204 No Content\r\n" + fields + b"X-10: v\r\n\r\n", max_headers=10
    )
    assert "more than 10 fields" in str(error)


def test_pathological_blanks_are_parsed_in_linear_time() -> None:
    started = time.perf_counter()
    for line in (b"X:" + b" " * 60000 + b"\r", b"X: a" + b" \t" * 30000 + b"\r", b"a" * 60000):
        with pytest.raises(ResponseError):
            framer_for(b"GET").feed(b"HTTP/1.1 200 OK\r\n" + line + b"\r\n\r\n")
    framer = framer_for(b"GET")
    long_value = b"HTTP/1.1 204 OK\r\nX: a" + b" a" * 30000 + b"  \r\n\r\n"
    framer.feed(long_value)
    assert framer.responses == 1
    assert time.perf_counter() - started < 1.0


# --- the rewrite hook -------------------------------------------------------------------


def drop_cookies(head: ResponseHead) -> bytes | None:
    if head.get(b"Set-Cookie") is None:
        return None
    head.headers = [(n, v) for n, v in head.headers if n.lower() != b"set-cookie"]
    return head.serialize()


def test_rewrite_replaces_the_head_and_keeps_the_body() -> None:
    first = b"HTTP/1.1 200 OK\nSet-Cookie: a=1\nContent-Length: 10\nSet-Cookie: b=2\n\n0123456789"
    data = first + OK
    expected = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789" + OK
    one_shot = framer_for(b"GET", b"GET", rewrite=drop_cookies)
    pieces = one_shot.feed(data)
    assert joined(pieces) == expected
    assert pieces[-1] == b"0123456789" + OK  # the rest is one slice of the input
    for cut in range(len(data) + 1):
        framer = framer_for(b"GET", b"GET", rewrite=drop_cookies)
        assert feed_in_pieces(framer, data, [cut]) == expected
        assert framer.responses == 2
    assert feed_bytewise(framer_for(b"GET", b"GET", rewrite=drop_cookies), data) == expected


def test_rewrite_returning_none_keeps_the_raw_head() -> None:
    framer = framer_for(b"GET", rewrite=lambda head: None)
    assert framer.feed(OK) == [OK]


def test_a_failing_rewrite_hook_breaks_the_framer() -> None:
    def rewrite(head: ResponseHead) -> bytes:
        raise KeyError("oops")

    framer = framer_for(b"GET", b"GET", rewrite=rewrite)
    with pytest.raises(KeyError):
        framer.feed(OK)
    with pytest.raises(ResponseError, match="rewrite hook raised KeyError"):
        framer.feed(OK)


def test_serialize_refuses_to_emit_a_broken_head() -> None:
    head = ResponseHead(b"HTTP/1.1", 200, b"OK", [(b"X", b"a")], b"")
    assert head.serialize() == b"HTTP/1.1 200 OK\r\nX: a\r\n\r\n"
    for broken in (
        ResponseHead(b"HTTP/1.1", 200, b"OK", [(b"X", b"a\r\nSet-Cookie: evil")], b""),
        ResponseHead(b"HTTP/1.1", 200, b"OK", [(b"X Y", b"a")], b""),
        ResponseHead(b"HTTP/1.1", 200, b"OK\r\nX: y", [], b""),
        ResponseHead(b"HTTP/2", 200, b"OK", [], b""),
        ResponseHead(b"HTTP/1.1", 42, b"OK", [], b""),
    ):
        with pytest.raises(ValueError):
            broken.serialize()


# --- end of stream ----------------------------------------------------------------------


def test_eof_at_a_message_boundary_is_clean() -> None:
    framer = framer_for(b"GET", b"GET")
    assert framer.feed_eof() == []
    framer = framer_for(b"GET", b"GET")
    framer.feed(OK)
    assert framer.feed_eof() == [] and framer.feed_eof() == []
    assert framer.responses == 1 and framer.pending == 1
    with pytest.raises(ResponseError, match="after the end of the stream"):
        framer.feed(OK)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Le", "in a response head"),
        (b"H", "in a response head"),
        (OK[:-2], "2 bytes before the end of a body"),
        (CHUNKED[:-40], "in a chunked body"),
        (CHUNKED[: CHUNKED.index(b"hello") + 2], "in a chunked body"),
        (CHUNKED[: CHUNKED.index(b"hello") + 6], "in a chunked body"),
        (CHUNKED[:-2], "in a chunked body"),
    ],
)
def test_eof_inside_a_framed_response_is_an_error(data: bytes, message: str) -> None:
    framer = framer_for(b"GET")
    assert joined(framer.feed(data)) == (b"" if b"\r\n\r\n" not in data else data)
    assert framer.in_message
    with pytest.raises(ResponseError, match=message):
        framer.feed_eof()
    with pytest.raises(ResponseError, match="already broken"):
        framer.feed_eof()


# --- properties -------------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING_NAMES = {"content-length", "transfer-encoding", "connection"}
field_names = st.text(TCHARS, min_size=1, max_size=12).filter(
    lambda name: name.lower() not in FRAMING_NAMES
)
field_values = st.binary(max_size=20).map(
    lambda value: bytes(b for b in value if b not in b"\r\n\x00")
)


@dataclass
class Exchange:
    """A generated response stream: what to expect, what comes back, what should happen."""

    requests: list[tuple[bytes, bool]] = field(default_factory=list)
    stream: bytes = b""
    heads: list[bytes] = field(default_factory=list)
    fields: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    responses: int = 0
    must_close: bool = False
    upgraded: bool = False
    needs_eof: bool = False  # the last body is delimited by close


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    exchange = Exchange()
    count = draw(st.integers(1, 4))
    nl = draw(st.sampled_from([b"\r\n", b"\n"]))
    for index in range(count):
        last = index == count - 1
        ending = draw(
            st.sampled_from(
                ["keep", "close-field", "http10", "close-body", "upgrade", "refused"]
                if last
                else ["keep"]
            )
        )
        method = draw(st.sampled_from([b"GET", b"POST", b"HEAD"]))
        exchange.requests.append((method, ending in ("upgrade", "refused")))

        def add_head(status_line: bytes, framing: list[tuple[bytes, bytes]]) -> None:
            extra = draw(st.lists(st.tuples(field_names, field_values), max_size=4))
            fields = [(name.encode(), value) for name, value in extra]
            fields[draw(st.integers(0, len(fields))) : 0] = framing
            head = status_line + nl
            head += b"".join(name + b":" + value + nl for name, value in fields)
            head += nl
            exchange.heads.append(head)
            exchange.fields.append([(name, value.strip(b" \t")) for name, value in fields])
            exchange.stream += head

        for status in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
            add_head(b"HTTP/1.1 %d Interim" % status, [])

        exchange.responses += 1
        if ending == "upgrade":
            add_head(b"HTTP/1.1 101 Switching Protocols", [(b"Upgrade", b"websocket")])
            exchange.stream += draw(st.binary(max_size=40))
            exchange.upgraded = True
            break

        status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500]))
        framing: list[tuple[bytes, bytes]] = []
        if ending == "http10":
            version = b"HTTP/1.0"
        elif ending == "keep" and draw(st.booleans()):
            version = b"HTTP/1.0"
            framing.append((b"Connection", draw(st.sampled_from([b"keep-alive", b"Keep-Alive"]))))
        else:
            version = b"HTTP/1.1"
        if ending == "close-field":
            framing.append((b"Connection", b"close"))
        body = draw(st.binary(max_size=60))
        no_body = method == b"HEAD" or status in (204, 304)
        if ending == "close-body":
            kind = "close"
        elif version == b"HTTP/1.0":
            kind = "length"  # chunked in HTTP/1.0 closes the connection
        else:
            kind = draw(st.sampled_from(["length", "chunked"]))
        if kind == "length":
            framing.append((b"Content-Length", b"%d" % len(body)))
            wire_body = body
        elif kind == "chunked":
            framing.append((b"Transfer-Encoding", b"chunked"))
            wire_body = b""
            rest = body
            while rest:
                size = draw(st.integers(1, len(rest)))
                digits = draw(st.sampled_from([b"%x", b"%X", b"%04x"])) % size
                ext = draw(st.sampled_from([b"", b";a=b", b" ;x"]))
                wire_body += digits + ext + nl + rest[:size] + nl
                rest = rest[size:]
            trailers = draw(st.lists(st.tuples(field_names, field_values), max_size=2))
            wire_body += b"0" + nl
            wire_body += b"".join(name.encode() + b": " + value + nl for name, value in trailers)
            wire_body += nl
        else:
            wire_body = body
            exchange.needs_eof = not no_body
        add_head(b"%s %d Status" % (version, status), framing)
        if not no_body:
            exchange.stream += wire_body
        exchange.must_close = ending != "keep" and not (ending == "close-body" and no_body)
    return exchange


def run_exchange(exchange: Exchange, chunks: list[bytes]) -> tuple[bytes, list[ResponseHead]]:
    seen: list[ResponseHead] = []
    framer = ResponseFramer(lambda head: seen.append(head))
    for method, upgrade in exchange.requests:
        framer.expect(method, upgrade=upgrade)
    out = b"".join(joined(framer.feed(chunk)) for chunk in chunks)
    assert framer.upgraded == exchange.upgraded
    assert framer.in_message == exchange.needs_eof
    assert framer.feed_eof() == []
    assert framer.responses == exchange.responses
    assert framer.pending == 0
    assert framer.must_close == exchange.must_close
    return out, seen


@settings(max_examples=300, deadline=None)
@given(exchanges(), st.lists(st.integers(0, 10_000), max_size=8))
def test_generated_streams_pass_through_whole_however_they_are_split(
    exchange: Exchange, cuts: list[int]
) -> None:
    event(f"{exchange.responses} responses")
    event("upgraded" if exchange.upgraded else "must close" if exchange.must_close else "keep")
    data = exchange.stream
    out, seen = run_exchange(exchange, split_at(data, cuts))
    assert out == data
    assert [head.raw for head in seen] == exchange.heads
    assert [head.headers for head in seen] == exchange.fields


@settings(max_examples=50, deadline=None)
@given(exchanges())
def test_generated_streams_byte_by_byte(exchange: Exchange) -> None:
    data = exchange.stream
    out, seen = run_exchange(exchange, [data[i : i + 1] for i in range(len(data))])
    assert out == data
    assert [head.raw for head in seen] == exchange.heads


@settings(max_examples=100, deadline=None)
@given(exchanges(), st.lists(st.integers(0, 10_000), max_size=8))
def test_rewritten_output_does_not_depend_on_the_split(exchange: Exchange, cuts: list[int]) -> None:
    def rewrite(head: ResponseHead) -> bytes:
        head.headers.append((b"X-Seen", b"%d" % head.status))
        return head.serialize()

    def output(cut_points: list[int]) -> bytes:
        framer = ResponseFramer(rewrite)
        for method, upgrade in exchange.requests:
            framer.expect(method, upgrade=upgrade)
        result = feed_in_pieces(framer, exchange.stream, cut_points)
        assert framer.responses == exchange.responses or exchange.needs_eof
        return result

    whole = output([])
    assert whole.count(b"\r\nX-Seen: ") == len(exchange.heads)
    assert output(cuts) == whole


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [OK, CHUNKED, b"HTTP/1.1 100 Continue\r\n\r\n", b"\r\n", b"0\r\n", b"5;x\r\n", b"\n"]
        )
        | st.binary(max_size=12),
        max_size=6,
    ),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.lists(st.sampled_from([b"GET", b"HEAD"]), max_size=4),
)
def test_arbitrary_input_fails_the_same_way_however_it_is_split(
    parts: list[bytes], cuts: list[int], methods: list[bytes]
) -> None:
    data = b"".join(parts)

    def outcome(chunks: list[bytes]) -> tuple[bytes, str | None, int]:
        framer = framer_for(*methods, max_head=128)
        out = b""
        try:
            for chunk in chunks:
                out += joined(framer.feed(chunk))
            framer.feed_eof()
        except ResponseError as exc:
            return b"", str(exc), framer.responses
        return out, None, framer.responses

    whole = outcome([data])
    event("error" if whole[1] else "clean")
    assert outcome([data[i : i + 1] for i in range(len(data))]) == whole
    assert outcome(split_at(data, cuts)) == whole
    if whole[1] is None:
        assert whole[0] == data


#: Tests that subclass ResponseFramer run on its Python source only: the compiled class
#: takes no subclass from Python. scripts/test.sh runs this file a second time with
#: HATCHWAY_NO_EXTENSIONS=1, where they do run; both builds come from the same source.
subclasses_framer = pytest.mark.skipif(
    extensions.is_compiled(framing),
    reason="subclasses the compiled ResponseFramer; runs with HATCHWAY_NO_EXTENSIONS=1",
)


class GeneralPathOnly(ResponseFramer):
    """The framer without its one-pass fast path for a whole Content-Length response."""

    def _feed_one(self, data: bytes) -> list[bytes | memoryview] | None:
        return None


Trace = list[tuple[object, ...]]


def framer_trace(cls: type[ResponseFramer], exchange: Exchange, chunks: list[bytes]) -> Trace:
    def rewrite(head: ResponseHead) -> bytes | None:
        # Odd statuses get their head rebuilt from its fields (parsed on demand).
        return head.serialize() if head.status % 2 else None

    framer = cls(rewrite, max_headers=3)
    for method, upgrade in exchange.requests:
        framer.expect(method, upgrade=upgrade)
    trace: Trace = []
    for chunk in chunks:
        try:
            out = joined(framer.feed(chunk))
        except ResponseError as exc:
            trace.append(("error", str(exc), joined(exc.pieces)))
            return trace
        except ValueError as exc:  # serialize() refused a head
            trace.append(("hook", str(exc)))
            return trace
        state = (framer.responses, framer.pending, framer.in_message, framer.must_close)
        trace.append((out, *state, framer.upgraded))
    return trace


@subclasses_framer
@settings(max_examples=400, deadline=None)
@given(exchanges(), st.data())
def test_the_fast_path_decides_as_the_general_one(exchange: Exchange, data: st.DataObject) -> None:
    # One feed per response head, as the relay mostly sees them, and sometimes one
    # byte of a head spoiled: both paths give the same output, state and errors.
    stream, starts, pos = exchange.stream, [], 0
    for head in exchange.heads:
        pos = stream.index(head, pos)
        starts.append(pos)
        pos += len(head)
    if data.draw(st.booleans()):
        k = data.draw(st.integers(0, len(starts) - 1))
        spot = starts[k] + data.draw(st.integers(0, len(exchange.heads[k]) - 1))
        byte = data.draw(st.sampled_from([b"\r", b"\n", b"\x00", b" ", b":", b"\t", b"x"]))
        stream = stream[:spot] + byte + stream[spot + 1 :]
        event("spoiled")
    chunks = split_at(stream, starts[1:])
    fast = framer_trace(ResponseFramer, exchange, chunks)
    event("error" if fast and fast[-1][0] in ("error", "hook") else "clean")
    assert fast == framer_trace(GeneralPathOnly, exchange, chunks)


@subclasses_framer
def test_the_fast_path_takes_the_common_response() -> None:
    taken: list[bool] = []

    class Watched(ResponseFramer):
        def _feed_one(self, data: bytes) -> list[bytes | memoryview] | None:
            result = super()._feed_one(data)
            taken.append(result is not None)
            return result

    framer = Watched()
    for data, requests in ((OK, 1), (OK_HEAD + b"hel", 1), (b"lo", 0), (CHUNKED, 1), (OK + OK, 2)):
        for _ in range(requests):
            framer.expect(b"GET")
        assert joined(framer.feed(data)) == data
    # Not for the rest of a body, a chunked response or two responses in one feed.
    assert taken == [True, True, False, False]
    assert framer.responses == 5 and framer.pending == 0


@pytest.mark.parametrize(
    ("method", "upgrade", "data"),
    [
        (b"GET", False, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
        (b"GET", False, b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
        (b"HEAD", False, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        (b"GET", True, b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\nraw"),
        (
            b"GET",
            False,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
        ),
        (
            b"GET",
            False,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (b"GET", False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi"),
        (b"GET", False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi"),
        (b"GET", False, b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nhi"),
        (b"GET", False, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
        (
            b"GET",
            False,
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\nhi",
        ),
        (
            b"GET",
            False,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, close\r\n\r\nhi",
        ),
        (b"GET", False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"),
        (b"GET", False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\n"),
        (b"GET", False, b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 2\r\n\r\nhi"),
        (b"GET", False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded\r\n\r\nhi"),
        (
            b"GET",
            False,
            b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nContent-Length: 0\r\n\r\n",
        ),
    ],
)
@subclasses_framer
def test_the_fast_path_leaves_the_rest_to_the_general_one(
    method: bytes, upgrade: bool, data: bytes
) -> None:
    exchange = Exchange(requests=[(method, upgrade), (b"GET", False)])
    assert framer_trace(ResponseFramer, exchange, [data]) == framer_trace(
        GeneralPathOnly, exchange, [data]
    )


# --- watched fields: what the one pass tells the rewrite hook ----------------------------

WATCH_LINES = [
    b"Content-Type: text/html",
    b"Set-Cookie: a=1",
    b"set-COOKIE: b=2",
    b"Location: /x",
    b"Content-Location: /y",
    b"Clear-Site-Data: *",
    b"Keep-Alive: timeout=5",
    b"Proxy-Connection: x",
    b"TE: trailers",
    b"Upgrade: websocket",
    b"Connection: keep-alive",
    b"Connection: close",
    b"connection:\tKeep-Alive \t",
    b"Connection: upgrade",
    b"Connection: keep-alive, te",
    b"X-Location: /z",
    b"Tee: x",
    b"Set-Cookie2: c=3",
    b'ETag: "x"',
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(WATCH_LINES), max_size=5))
def test_a_plain_head_is_one_the_proxy_would_not_rewrite(lines: list[bytes]) -> None:
    from hatchway.web.proxy import _REWRITTEN_FIELDS, _WATCHED_FIELDS

    heads: list[ResponseHead] = []
    framer = ResponseFramer(lambda head: heads.append(head), watch=_WATCHED_FIELDS)
    framer.expect(b"GET")
    data = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines)
    data += b"Content-Length: 2\r\n\r\nhi"
    assert joined(framer.feed(data)) == data
    (head,) = heads
    event(f"plain {head.plain}")
    if head.plain is not None:
        assert head.plain == (_REWRITTEN_FIELDS.search(head.lower) is None)


def test_the_one_pass_says_whether_a_watched_field_is_there() -> None:
    heads: list[ResponseHead] = []
    framer = ResponseFramer(lambda head: heads.append(head), watch=frozenset({b"set-cookie"}))
    for extra in (b"", b"Set-Cookie: a=1\r\n", b"X-Set-Cookie: b\r\n"):
        framer.expect(b"GET")
        framer.feed(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 0\r\n\r\n")
    assert [head.plain for head in heads] == [True, False, True]
    framer = ResponseFramer(lambda head: heads.append(head))  # nothing watched
    framer.expect(b"GET")
    framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert heads[-1].plain is None
