"""A request that repeats the header lines of an earlier one on its connection is taken
without parsing them again (``WebProxy._repeated``). It must be exactly what llhttp's
path makes of the same bytes: these tests feed the same requests to a proxy with the
shortcut and to one without it, and compare what reaches the device and the browser.
"""

from __future__ import annotations

import asyncio
import re
import time
import types
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hatchway.mux import events as ev
from hatchway.mux.session import Multiplexer, Role
from hatchway.web.proxy import WebProxy

HOST = b"dev1.relay.localhost:8443"
SECRET = "hwd_I_sR23T5gMnOBn5A12vhoFJjQ-X1oDXJbwVC_qrn3lM"
COOKIE = b"Cookie: __Host-hatchway-device=" + SECRET.encode() + b"; theme=dark\r\n"
BLOCK = b"Host: " + HOST + b"\r\nAccept: */*\r\n" + COOKIE + b"\r\n"
BROWSER_BLOCK = (
    b"Host: " + HOST + b"\r\nConnection: keep-alive\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: text/html\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\nAuthorization: Bearer hwt_not_for_the_device\r\n"
    b"Accept-Encoding: gzip\r\n" + COOKIE + b"\r\n"
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
#: A request line in what reached the device (the tests' bodies hold none).
STATUS_LINE = re.compile(rb"HTTP/1\.[01] [0-9]{3} [^\r]*")
REQUEST_LINE = re.compile(rb"(?m)^([A-Z]+) /[^ ]* HTTP/1\.1\r$")


class Transport:
    """Keeps what the proxy writes to the browser."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: Any) -> None:
        self.written += data

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.written += piece

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Tunnel:
    """The parts of a ``TunnelEndpoint`` a binding uses; what is sent stays queued."""

    write_paused = False

    def __init__(self, mux: Multiplexer) -> None:
        self.mux = mux
        self.bindings: dict[int, Any] = {}

    def request_flush(self) -> None:
        pass

    def dispatch(self) -> None:
        pass


class Rig:
    """A proxy on an open channel, with the device's end of the tunnel in memory."""

    def __init__(self, shortcut: bool) -> None:
        relay = Multiplexer(Role.RELAY, window=1 << 20, max_channels=10)
        self.agent = Multiplexer(Role.AGENT, window=1 << 20, max_channels=10)
        relay.mark_established()
        self.agent.mark_established()
        channel = relay.open_channel("http")
        self.agent.receive_data(b"".join(relay.data_to_send()))
        for event in self.agent.events_received():
            assert isinstance(event, ev.ChannelRequested)
            self.agent.accept_channel(event.channel)
        relay.receive_data(b"".join(self.agent.data_to_send()))
        relay.events_received()
        self.relay, self.channel = relay, channel
        record = types.SimpleNamespace(
            kind="device", device="dev1", service="http", user="admin", session_id="s"
        )
        server = types.SimpleNamespace(
            config=types.SimpleNamespace(web_max_body=0),
            permits=lambda *args: True,
            track=lambda task: None,
        )
        access = types.SimpleNamespace(
            domain="relay.localhost",
            proxies=set(),
            server=server,
            cached=lambda secret, kind: (secret == SECRET, record if secret == SECRET else None),
            cache_for=lambda device: None,
            used=lambda session_id: None,
        )
        self.access, self.record = access, record
        proxy = WebProxy(access, "dev1", HOST.decode(), "192.0.2.7", time.monotonic())
        if not shortcut:
            proxy._repeated = lambda data, repeat: False  # type: ignore[method-assign]
        self.transport = Transport()
        proxy.connection_made(self.transport)  # type: ignore[arg-type]
        tunnel = Tunnel(relay)
        proxy.tunnel, proxy.channel = tunnel, channel  # type: ignore[assignment]
        tunnel.bindings[channel] = proxy
        proxy.channel_state, proxy.outcome = "open", "open"
        self.proxy = proxy
        self.device = bytearray()

    def send(self, data: bytes) -> None:
        """One read from the browser; the device answers each request it got."""
        self.proxy.data_received(data)
        self.exchange()

    def exchange(self) -> None:
        """What the proxy sent reaches the device, which answers each request."""
        before = len(self.device)
        self.agent.receive_data(b"".join(self.relay.data_to_send()))
        for event in self.agent.events_received():
            if isinstance(event, ev.DataReceived):
                self.device += event.data
        for method in REQUEST_LINE.findall(self.device, before):
            self.agent.send_data(self.channel, RESPONSE[: -2 if method == b"HEAD" else None])
        self.relay.receive_data(b"".join(self.agent.data_to_send()))
        for event in self.relay.events_received():
            if isinstance(event, ev.DataReceived):
                self.proxy._receive(event.data)

    def outcome(self) -> tuple[bytes, bytes, bool]:
        """(what reached the device, the browser's status lines, closed)."""
        lines = b"\n".join(STATUS_LINE.findall(self.transport.written))
        return bytes(self.device), lines, self.transport.closed


def both(requests: list[bytes]) -> tuple[tuple[bytes, bytes, bool], Rig]:
    """The outcome with the shortcut, checked equal to the one without it."""
    rigs = [Rig(shortcut=True), Rig(shortcut=False)]
    for rig in rigs:
        for data in requests:
            rig.send(data)
    fast, slow = (rig.outcome() for rig in rigs)
    assert fast == slow
    return fast, rigs[0]


@pytest.mark.parametrize("block", [BLOCK, BROWSER_BLOCK], ids=["wrk", "browser"])
def test_repeated_requests_skip_the_parser_and_reach_the_device_alike(block: bytes) -> None:
    requests = [b"GET /a HTTP/1.1\r\n" + block, b"GET /b?x=1 HTTP/1.1\r\n" + block]
    requests += [b"HEAD /c HTTP/1.1\r\n" + block, b"GET /a HTTP/1.1\r\n" + block]
    (device, statuses, closed), rig = both(requests)
    assert rig.proxy._begun == 1, "the repeated requests went through llhttp"
    assert rig.proxy.requests == 4 and statuses.count(b"HTTP/1.1 200 OK") == 4
    assert not closed
    assert device.count(b"X-Forwarded-For: 192.0.2.7\r\n") == 4
    assert b"6.6.6.6" not in device and b"hwt_" not in device and SECRET.encode() not in device
    assert device.count(b"Cookie: theme=dark\r\n") == 4
    for line in (b"GET /a ", b"GET /b?x=1 ", b"HEAD /c "):
        assert line in device


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\nConnection: close\r\n" + BLOCK,
        b"GET / HTTP/1.1\r\nContent-Length: 0\r\n" + BLOCK,
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n" + BLOCK + b"0\r\n\r\n",
        b"GET / HTTP/1.0\r\n" + BLOCK,
        b"POST / HTTP/1.1\r\nContent-Length: 2\r\n" + BLOCK + b"ok",
        b"GET / HTTP/1.1\r\n" + BLOCK + b"GET /pipelined HTTP/1.1\r\n" + BLOCK,
        b"\r\nGET / HTTP/1.1\r\n" + BLOCK,
    ],
    ids=["close", "length", "chunked", "http10", "post", "pipelined", "leading-crlf"],
)
def test_what_is_not_kept_for_repeating(first: bytes) -> None:
    _, rig = both([first, first])
    assert rig.proxy._repeat is None


def test_a_read_with_more_than_the_repeated_request_takes_the_parser() -> None:
    first = b"GET / HTTP/1.1\r\n" + BLOCK
    smuggled = first + b"GET /admin HTTP/1.1\r\nHost: other\r\n\r\n"
    (device, statuses, closed), rig = both([first, smuggled])
    assert rig.proxy._begun == 3
    assert b"GET /admin" not in device and closed  # refused: another Host
    assert statuses.endswith(b"HTTP/1.1 421 Misdirected Request")


def test_two_repeated_requests_in_one_read_are_two_requests() -> None:
    first = b"GET / HTTP/1.1\r\n" + BLOCK
    (_, statuses, _), rig = both([first, first + first])
    assert rig.proxy.requests == 3 and statuses.count(b"200 OK") == 3


@pytest.mark.parametrize(
    ("extra", "body"),
    [
        (b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
        (b"Content-Length: 3\r\n", b"abc"),
        (b"X-Extra: 1\r\n", b""),
    ],
)
def test_fields_before_the_repeated_ones_take_the_parser(extra: bytes, body: bytes) -> None:
    first = b"GET / HTTP/1.1\r\n" + BLOCK
    (device, statuses, _), rig = both([first, b"GET /two HTTP/1.1\r\n" + extra + BLOCK + body])
    assert rig.proxy._begun == 2 and statuses.count(b"200 OK") == 2
    assert extra in device and device.endswith(body)


@pytest.mark.parametrize(
    "line",
    [
        b"GET http://evil/ HTTP/1.1\r\n",
        b"GET /a b HTTP/1.1\r\n",
        b"GET /a\tb HTTP/1.1\r\n",
        b"GET /a\x00 HTTP/1.1\r\n",
        b"GET /a HTTP/1.1\n",
        b"GET /a HTTP/1.1\r",
        b"GET  /a HTTP/1.1\r\n",
        b"get /a HTTP/1.1\r\n",
        b"GET /a HTTP/2.0\r\n",
        b"CONNECT /a HTTP/1.1\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n",
        b"GET /\xff HTTP/1.1\r\n",
    ],
)
def test_request_lines_the_shortcut_does_not_take(line: bytes) -> None:
    _, rig = both([b"GET / HTTP/1.1\r\n" + BLOCK, line + BLOCK])
    assert rig.proxy._begun == 2


TARGET = st.binary(max_size=40).map(lambda b: b"/" + b)
LINE = st.one_of(
    st.tuples(st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"OPTIONS"]), TARGET).map(
        lambda t: t[0] + b" " + t[1] + b" HTTP/1.1\r\n"
    ),
    st.binary(max_size=60),
)


@settings(max_examples=300, deadline=None)
@given(line=LINE, block=st.sampled_from([BLOCK, BROWSER_BLOCK]))
def test_any_request_line_before_repeated_fields_is_treated_as_by_the_parser(
    line: bytes, block: bytes
) -> None:
    both([b"GET / HTTP/1.1\r\n" + block, line + block, b"GET /after HTTP/1.1\r\n" + block])


def test_a_repeated_request_for_a_relay_page_is_answered_alike() -> None:
    requests = [b"GET /a HTTP/1.1\r\n" + BLOCK, b"GET /__hatchway/nothing HTTP/1.1\r\n" + BLOCK]
    (device, statuses, closed), _ = both(requests)
    assert statuses == b"HTTP/1.1 200 OK\nHTTP/1.1 404 Not Found" and closed
    assert device.count(b"GET ") == 1


async def test_repeated_requests_that_wait_for_the_session_check_keep_their_order() -> None:
    """The session cache expired: the next request waits for the store, and one behind
    it waits its turn, with the shortcut as without it."""
    outcomes = []
    for shortcut in (True, False):
        rig = Rig(shortcut)
        rig.send(b"GET /a HTTP/1.1\r\n" + BLOCK)
        cached, store_read = rig.access.cached, asyncio.Event()

        async def load(
            secret: str, kind: str, rig: Rig = rig, store_read: asyncio.Event = store_read
        ) -> Any:
            await store_read.wait()
            return rig.record

        rig.access.cached = lambda secret, kind: (False, None)
        rig.access.load = load
        rig.send(b"GET /b HTTP/1.1\r\n" + BLOCK)
        rig.send(b"GET /c HTTP/1.1\r\n" + BLOCK)
        assert rig.proxy.blocked == "session" and rig.device.count(b"GET ") == 1
        rig.access.cached = cached
        store_read.set()
        for _ in range(5):
            await asyncio.sleep(0)
        rig.exchange()
        outcomes.append(rig.outcome())
        assert REQUEST_LINE.findall(rig.device) == [b"GET"] * 3
        assert [line.split(b" ")[1] for line in re.findall(rb"GET [^ ]+ ", rig.device)] == [
            b"/a",
            b"/b",
            b"/c",
        ]
    assert outcomes[0] == outcomes[1]
    _, statuses, closed = outcomes[0]
    assert statuses.count(b"200 OK") == 3 and not closed
