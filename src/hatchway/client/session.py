"""The client's multiplexed tunnel to the relay (``hatchway forward``).

One TLS WebSocket to ``/api/v1/client`` carries every forwarded connection as a channel
named ``DEVICE/SERVICE``: a new connection costs one OPEN round trip, not a TLS
handshake. The tunnel is opened on first use and again after it drops.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.client import ClientProtocol

from hatchway.client.config import Login
from hatchway.client.streams import abort_with_reset, open_relay_websocket, serve_local
from hatchway.errors import RelayError
from hatchway.mux.frames import ResetReason
from hatchway.mux.session import DEFAULT_MAX_CHANNELS, DEFAULT_WINDOW, PROTOCOL_VERSION, Role
from hatchway.tunnel.connect import (
    relay_websocket_url,
)
from hatchway.tunnel.endpoint import TUNNEL_MAX_MESSAGE, TunnelEndpoint
from hatchway.tunnel.local import TcpBinding

log = logging.getLogger("hatchway.client")

SUBPROTOCOL = "hatchway.v1"
WELCOME_TIMEOUT = 10.0
#: A channel the relay has not answered by then is given up: the relay answers within
#: its own 15 s (it gives up on the device then), so this only ends the wait for a
#: relay that keeps the tunnel alive but never answers.
OPEN_TIMEOUT = 20.0


class ClientTunnelEndpoint(TunnelEndpoint):
    def __init__(self, ws: ClientProtocol) -> None:
        super().__init__(ws, Role.AGENT, window=DEFAULT_WINDOW, max_channels=DEFAULT_MAX_CHANNELS)
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()

    def describe(self) -> str:
        return "client tunnel"

    def closed_text(self) -> str:
        return "the connection to the relay was lost"  # as `proxy` says it

    def on_hello(self, info: dict[str, Any]) -> None:
        if info.get("welcome") is not True or info.get("version") != PROTOCOL_VERSION:
            self.close(1002, "unexpected HELLO")
            return
        self.mux.mark_established()
        self.start_keepalive()
        if not self.ready.done():
            self.ready.set_result(None)

    def on_tunnel_closed(self) -> None:
        if not self.ready.done():
            self.ready.set_exception(RelayError(0, "closed", "the relay closed the connection"))
            self.ready.exception()  # retrieved: the opener may have gone


class ForwardBinding(TcpBinding):
    """A forwarded TCP connection: reads once the relay and device accepted it."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self._open_timer: asyncio.TimerHandle | None = None

    def expect_open(self) -> None:
        """The OPEN is on its way: give up on it after OPEN_TIMEOUT."""
        loop = asyncio.get_running_loop()
        self._open_timer = loop.call_later(OPEN_TIMEOUT, self._open_expired)

    def _stop_open_timer(self) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None

    def _open_expired(self) -> None:
        self._open_timer = None
        if self.finished:
            return
        print(
            f"hatchway: {self.target}: the relay did not answer within {OPEN_TIMEOUT:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        self.reset_channel(ResetReason.CANCEL, "open timed out")
        if self.transport is not None:
            self.transport.abort()

    def on_open_ok(self) -> None:
        self._stop_open_timer()
        self.start()

    def on_open_failed(self, reason: int, message: str) -> None:
        self._stop_open_timer()
        print(f"hatchway: {message}", file=sys.stderr, flush=True)
        super().on_open_failed(reason, message)

    def on_reset(self, reason: int, message: str) -> None:
        self._stop_open_timer()
        # The channel broke (the device or its tunnel went away, the relay reset it):
        # the application must see a reset, not an orderly end of a truncated stream.
        print(f"hatchway: {self.target}: {message or 'channel reset'}", file=sys.stderr, flush=True)
        if self.transport is not None:
            abort_with_reset(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_open_timer()
        super().connection_lost(exc)


class RelaySession:
    """Owns the client tunnel; ``tunnel()`` returns an established one."""

    def __init__(self, login: Login) -> None:
        self.login = login
        self._tunnel: ClientTunnelEndpoint | None = None
        self._lock = asyncio.Lock()

    async def tunnel(self) -> ClientTunnelEndpoint:
        async with self._lock:
            current = self._tunnel
            if current is None or current.closed or not current.is_open:
                current = self._tunnel = await self._connect()
            return current

    async def _connect(self) -> ClientTunnelEndpoint:
        endpoint = await open_relay_websocket(
            self.login,
            relay_websocket_url(self.login.server, "/api/v1/client"),
            ClientTunnelEndpoint,
            subprotocols=[SUBPROTOCOL],
            max_size=TUNNEL_MAX_MESSAGE,
        )
        try:
            await asyncio.wait_for(asyncio.shield(endpoint.ready), WELCOME_TIMEOUT)
        except TimeoutError:
            endpoint.abort()
            raise RelayError(0, "timeout", "the relay did not answer in time") from None
        return endpoint


async def serve_forward_mux(
    login: Login,
    device: str,
    service: str,
    bind: str,
    port: int,
    on_listening: Callable[[str, int], None],
) -> None:
    """Listen on ``bind:port``; every accepted connection becomes a channel."""
    session = RelaySession(login)
    await session.tunnel()  # fail now, with the relay's reason, rather than per connection
    target = f"{device}/{service}"

    def accept() -> tuple[asyncio.Protocol, Coroutine[Any, Any, None]]:
        binding = ForwardBinding(target)
        return binding, _open(session, target, binding)

    await serve_local(bind, port, on_listening, accept)


async def _open(session: RelaySession, target: str, binding: ForwardBinding) -> None:
    try:
        tunnel = await session.tunnel()
    except RelayError as exc:
        print(f"hatchway: {exc.message}", file=sys.stderr, flush=True)
        if binding.transport is not None:
            binding.transport.abort()
        return
    if binding.closed.done():
        return  # the local connection went away meanwhile
    if tunnel.open_binding(target, binding):
        binding.expect_open()
