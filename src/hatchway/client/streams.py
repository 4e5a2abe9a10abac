"""Client streams: a local byte stream (TCP connection or stdin/stdout) joined to a
device service through one WebSocket to the relay.

Backpressure: when the WebSocket's transport pauses writing, the local side stops
reading; when the local side pauses writing, the WebSocket stops reading (and the
relay, then the device, stop after one channel window).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import ssl
import stat
import struct
import sys
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from websockets.client import ClientProtocol

from hatchway.client.config import Login
from hatchway.client.relay_api import error_from_body
from hatchway.errors import ConfigError, HatchwayError, RelayError
from hatchway.tlsutil import client_context
from hatchway.tunnel.connect import (
    ConnectError,
    ProxyConfig,
    open_websocket,
    proxy_from_environment,
    relay_websocket_url,
)
from hatchway.tunnel.websocket import WebSocketEndpoint, set_nodelay

log = logging.getLogger("hatchway.client")

EOF_MESSAGE = b"eof"
STREAM_MAX_MESSAGE = 1024 * 1024
E = TypeVar("E", bound=WebSocketEndpoint)
#: The largest message a stream sends: what one read of a socket brings (256 KiB).
#: Every message costs the relay a fixed amount of work; 64 KiB ones moved ~6 % less
#: (bench/README.md, 1 Dec). Relays take messages of up to STREAM_MAX_MESSAGE.
MESSAGE_CHUNK = 256 * 1024


def abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Abort a local connection so that its peer sees a reset (RST), not an orderly
    end (FIN): a stream that broke must not pass for a complete one. Pipes (stdio)
    have no such signal: they are closed, and what was received is still written."""
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        transport.close()
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    cast(asyncio.WriteTransport, transport).abort()


class LocalSide:
    """The local end: where bytes from the device go, and where ours come from."""

    def __init__(self) -> None:
        self.read_transport: asyncio.ReadTransport | None = None
        self.write_transport: asyncio.WriteTransport | None = None
        self.stream: StreamClient | None = None
        self.write_paused = False
        loop = asyncio.get_running_loop()
        #: The stream is over for the local side (its transports are closing).
        self.done: asyncio.Future[None] = loop.create_future()
        #: Everything for the local side was written (or can no longer be).
        self.output_closed: asyncio.Future[None] = loop.create_future()
        #: The device's EOF was passed on: the output was ended on purpose.
        self.output_ended = False
        #: Our input ended with an EOF (sent to the device, or to be once attached).
        self.input_ended = False
        #: The local side went away and closed the stream itself.
        self.gone = False
        #: Tells the user why the stream broke, before the local side is reset.
        self.report: Callable[[str], None] | None = None
        # Pipe transports may deliver a read before pause_reading() takes effect.
        self._early: list[bytes] = []
        self._early_eof = False

    # from the device
    def write(self, data: bytes | memoryview) -> None:
        if self.write_transport is not None and not self.write_transport.is_closing():
            self.write_transport.write(data)

    def write_eof(self) -> None:
        wt = self.write_transport
        if wt is None or wt.is_closing():
            return
        # A pipe's write_eof() closes it: that is the device's EOF, not the reader
        # going away, and our input keeps flowing to the device.
        self.output_ended = True
        if wt.can_write_eof():
            wt.write_eof()
        elif wt is not self.read_transport:  # type: ignore[comparison-overlap]
            wt.close()

    def close(self) -> None:
        for transport in (self.read_transport, self.write_transport):
            if transport is not None and not transport.is_closing():
                transport.close()
        self._finish()

    def reset(self) -> None:
        """The stream broke: reset the local connection (see ``abort_with_reset``)."""
        for transport in (self.read_transport, self.write_transport):
            if transport is not None:
                abort_with_reset(transport)
        self._finish()

    def _finish(self) -> None:
        if self.write_transport is None and not self.output_closed.done():
            self.output_closed.set_result(None)
        if not self.done.done():
            self.done.set_result(None)

    def pause_reading(self) -> None:
        if self.read_transport is not None and self.read_transport.is_reading():
            self.read_transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_transport is not None and not self.read_transport.is_reading():
            self.read_transport.resume_reading()

    # to the device
    def attach(self, stream: StreamClient) -> None:
        self.stream = stream
        if self.done.done():  # the local connection went away while the stream opened
            self.gone = True
            stream.close(1000)
            return
        early, self._early = self._early, []
        for data in early:
            stream.send_binary(data)
        if self._early_eof:
            stream.send_text(EOF_MESSAGE)
        self.resume_reading()

    def received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            self._early.append(data)
            self.pause_reading()
            return
        if len(data) <= MESSAGE_CHUNK:
            stream.send_binary(data)
        else:  # what a read brought beyond one message (a pipe may bring more)
            view = memoryview(data)
            for start in range(0, len(data), MESSAGE_CHUNK):
                stream.send_binary(view[start : start + MESSAGE_CHUNK])
        if stream.write_paused:
            self.pause_reading()

    def received_eof(self) -> None:
        self.input_ended = True
        if self.stream is not None:
            self.stream.send_text(EOF_MESSAGE)
        else:
            self._early_eof = True

    def lost(self) -> None:
        self.gone = True
        if self.stream is not None:
            self.stream.close(1000)
        self.close()

    def sink_paused(self) -> None:
        self.write_paused = True

    def sink_resumed(self) -> None:
        self.write_paused = False
        stream = self.stream
        if stream is not None and stream.transport is not None:
            stream.transport.resume_reading()


class _LocalProtocol(asyncio.Protocol):
    """Adapts asyncio callbacks (TCP socket, or one of the stdio pipes) to ``LocalSide``."""

    def __init__(self, side: LocalSide, reading: bool, writing: bool) -> None:
        self.side = side
        self.reading = reading
        self.writing = writing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        set_nodelay(transport)
        if self.reading:
            self.side.read_transport = cast(asyncio.ReadTransport, transport)
            self.side.read_transport.pause_reading()  # until the stream is open
        if self.writing:
            self.side.write_transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self.side.received(data)

    def eof_received(self) -> bool:
        self.side.received_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        side = self.side
        if self.reading:
            side.read_transport = None
        if self.writing:
            side.write_transport = None
            if not side.output_closed.done():
                side.output_closed.set_result(None)
        if side.done.done():
            return  # the stream ended first and closed us
        if self.writing and not side.output_ended:
            side.lost()  # nowhere to deliver the device's bytes any more
        elif self.reading and not side.input_ended:
            side.lost()  # our input broke off without an EOF
        # Else both directions ended with EOF: the relay closes the stream (1000) once
        # the device's channel has ended too; closing it first could cut it short.

    def pause_writing(self) -> None:
        self.side.sink_paused()

    def resume_writing(self) -> None:
        self.side.sink_resumed()


class _StdoutProtocol(_LocalProtocol):
    """Standard output: once its transport is gone (the device's EOF, or the reader
    left), file descriptor 1 itself is closed, by pointing it at /dev/null, so that
    the reader sees the end while standard input still flows. (``sys.stdout``, which
    the transport closes, never closes the descriptor.)"""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.fd = sys.stdout.fileno()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.fd)
            os.close(null)
        except OSError:
            pass
        super().connection_lost(exc)


class StreamClient(WebSocketEndpoint):
    def __init__(self, ws: ClientProtocol, local: LocalSide) -> None:
        super().__init__(ws)
        self.local = local
        #: Why the stream broke ("" when it ended normally or the local side ended it).
        self.close_reason = ""

    def on_binary(self, data: bytes | memoryview) -> None:
        self.local.write(data)
        if self.local.write_paused and self.transport is not None:
            self.transport.pause_reading()

    def on_text(self, data: bytes) -> None:
        if data == EOF_MESSAGE:
            self.local.write_eof()

    def on_writable(self) -> None:
        self.local.resume_reading()

    def on_connection_lost(self, exc: Exception | None) -> None:
        # The relay closes with 1000 only once EOF went both ways; anything else (a
        # reset channel, a lost tunnel, a relay that vanished) truncated the stream.
        if self.local.stream is not self:
            return  # it never opened: open_stream raises why, its caller tells and closes
        rcvd = self.ws.close_rcvd
        if self.local.gone:
            pass  # we ended it
        elif rcvd is None:
            self.close_reason = "the connection to the relay was lost"
        elif rcvd.code != 1000:
            self.close_reason = rcvd.reason or f"the relay closed the stream (code {rcvd.code})"
        if self.close_reason:
            if self.local.report is not None:
                self.local.report(self.close_reason)
            self.local.reset()
        else:
            self.local.close()
        # Both ends are over. Letting go of this stream breaks the cycle the two make,
        # so both go now, not at the next full garbage collection.
        self.local.stream = None


@functools.lru_cache(maxsize=4)
def ssl_context_for(ca_file: str | None) -> ssl.SSLContext:
    """One context per process: building one costs about a millisecond per connection."""
    return client_context(Path(ca_file) if ca_file else None)


def check_relay(login: Login) -> None:
    """Fail now, with a sentence, on a relay URL or HTTPS_PROXY that cannot work,
    rather than on every connection."""
    relay_proxy(relay_websocket_url(login.server, "/"))


def relay_proxy(url: str) -> ProxyConfig | None:
    """The proxy to the relay at ``url``: HTTPS_PROXY unless NO_PROXY exempts the relay's
    host (and port), as for the client's API calls."""
    parts = urllib.parse.urlsplit(url)
    return proxy_from_environment(parts.hostname or "", parts.port or 443)


def stream_url(login: Login, device: str, service: str) -> str:
    query = urllib.parse.urlencode({"device": device, "service": service})
    return relay_websocket_url(login.server, "/api/v1/connect") + "?" + query


async def open_relay_websocket(
    login: Login,
    url: str,
    factory: Callable[[ClientProtocol], E],
    *,
    subprotocols: Sequence[str] = (),
    max_size: int,
) -> E:
    """A WebSocket to the relay with the user's token; RelayError with the relay's
    message when it refuses."""
    try:
        return await open_websocket(
            url,
            factory,
            ssl_context=ssl_context_for(login.ca_file),
            proxy=relay_proxy(url),
            headers=[("Authorization", f"Bearer {login.token}")],
            subprotocols=subprotocols,
            max_size=max_size,
            timeout=30.0,
        )
    except ConnectError as exc:
        if exc.status is not None:
            raise error_from_body(exc.status, exc.body) from None
        raise RelayError(0, "unreachable", str(exc)) from None


async def open_stream(login: Login, device: str, service: str, local: LocalSide) -> StreamClient:
    """Open the WebSocket; raise RelayError with the relay's message on refusal."""
    stream = await open_relay_websocket(
        login,
        stream_url(login, device, service),
        lambda ws: StreamClient(ws, local),
        max_size=STREAM_MAX_MESSAGE,
    )
    local.attach(stream)
    return stream


def _readable_stdin() -> Any:
    """Standard input as the event loop can wait on it: a pipe, a socket or a
    terminal. /dev/null (also what a standard input closed at start is given, see
    ``__main__``) is read as an empty pipe: the event loop cannot wait on it, and it
    means "nothing to send"."""
    fd = sys.stdin.fileno()
    st = os.fstat(fd)
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) or os.isatty(fd):
        return sys.stdin
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev:
        read_end, write_end = os.pipe()
        os.close(write_end)
        return os.fdopen(read_end, "rb")
    raise ConfigError("standard input must be a pipe, a socket or a terminal")


async def run_stdio(login: Login, device: str, service: str) -> str:
    """Join stdin/stdout to the service (OpenSSH ProxyCommand). Return why the stream
    broke ('' when it ended normally), already told on standard error: before standard
    output closes, since ssh stops its ProxyCommand once that happens."""
    stdin = _readable_stdin()
    mode = os.fstat(sys.stdout.fileno()).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        raise ConfigError("standard output must be a pipe, a socket or a terminal")
    loop = asyncio.get_running_loop()
    local = LocalSide()
    local.report = lambda reason: print(f"hatchway: {reason}", file=sys.stderr, flush=True)
    await loop.connect_read_pipe(lambda: _LocalProtocol(local, True, False), stdin)
    await loop.connect_write_pipe(lambda: _StdoutProtocol(local, False, True), sys.stdout)
    stream = await open_stream(login, device, service, local)
    await local.done
    await local.output_closed  # what the device sent is written out first
    return stream.close_reason


async def serve_forward_streams(
    login: Login,
    device: str,
    service: str,
    bind: str,
    port: int,
    on_listening: Callable[[str, int], None],
) -> None:
    """Listen on ``bind:port``; every accepted connection gets its own stream."""
    check_relay(login)

    def report(reason: str) -> None:
        print(f"hatchway: {device}/{service}: {reason}", file=sys.stderr, flush=True)

    def accept() -> tuple[asyncio.Protocol, Coroutine[Any, Any, None]]:
        local = LocalSide()
        local.report = report
        return _LocalProtocol(local, True, True), _forward_one(login, device, service, local)

    await serve_local(bind, port, on_listening, accept)


async def serve_local(
    bind: str,
    port: int,
    on_listening: Callable[[str, int], None],
    accept: Callable[[], tuple[asyncio.Protocol, Coroutine[Any, Any, None]]],
) -> None:
    """Listen on ``bind:port``; for each connection ``accept`` gives its protocol and
    the coroutine that connects it to the relay, run as a task."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def factory() -> asyncio.Protocol:
        protocol, opener = accept()
        task = loop.create_task(opener)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return protocol

    server = await loop.create_server(factory, bind, port, reuse_address=True)
    sockname = server.sockets[0].getsockname()
    on_listening(sockname[0], sockname[1])
    async with server:
        await server.serve_forever()


async def _forward_one(login: Login, device: str, service: str, local: LocalSide) -> None:
    try:
        await open_stream(login, device, service, local)
    except HatchwayError as exc:
        print(f"hatchway: {exc}", file=sys.stderr, flush=True)
        local.close()
        return
    await local.done
