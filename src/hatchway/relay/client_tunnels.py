"""Client tunnels: one multiplexed WebSocket from a user's CLI carrying many channels.

``hatchway forward`` keeps one of these open instead of a TLS connection per forwarded
TCP connection. The client opens a channel named ``DEVICE/SERVICE``; the relay checks
the user may reach it, opens a channel to SERVICE on DEVICE's tunnel, and accepts the
client's channel only once the device accepted its own; the two are then spliced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING
from websockets.server import ServerProtocol

from hatchway import __version__
from hatchway.mux.frames import GoAwayReason, OpenFailure, ResetReason
from hatchway.mux.session import PROTOCOL_VERSION, Role
from hatchway.relay.api import ApiError
from hatchway.relay.splice import SpliceBinding
from hatchway.relay.streams import OPEN_TIMEOUT, describe_failure, log_channel
from hatchway.store.base import ChannelRecord, UserRecord
from hatchway.text import printable
from hatchway.tunnel.endpoint import TunnelEndpoint

if TYPE_CHECKING:
    from hatchway.relay.server import RelayServer

log = logging.getLogger("hatchway.relay.channel")

_API_FAILURES = {
    "not_permitted": OpenFailure.NOT_PERMITTED,
    "offline": OpenFailure.OFFLINE,
    "unknown_device": OpenFailure.OFFLINE,
    "bad_request": OpenFailure.BAD_REQUEST,
    "busy": OpenFailure.TOO_MANY_CHANNELS,
}


class ClientTunnel(TunnelEndpoint):
    def __init__(self, ws: ServerProtocol, server: RelayServer, user: UserRecord) -> None:
        super().__init__(
            ws, Role.RELAY, window=server.config.window, max_channels=server.config.max_channels
        )
        self.server = server
        self.user = user
        self.token = ""  # the bearer token it was opened with (re-checked by the sweep)

    def describe(self) -> str:
        return f"client {self.user.name} ({self.peer_address()})"

    def on_handshake(self, event: Request | Response) -> None:
        assert isinstance(self.ws, ServerProtocol) and isinstance(event, Request)
        if self.ws.state is not CONNECTING:
            return
        response = self.ws.accept(event)  # refuses (400) a request without our subprotocol
        self.ws.send_response(response)
        self.flush()
        if response.status_code != 101:
            return
        self.mux.mark_established()
        self.start_keepalive()
        self.server.client_tunnels.add(self)  # its token is re-checked by the sweep
        self.mux.send_hello(
            {
                "version": PROTOCOL_VERSION,
                "role": "relay",
                "welcome": True,
                "server": f"hatchway/{__version__}",
                "user": self.user.name,
            }
        )
        self.request_flush()

    def on_hello(self, info: dict[str, Any]) -> None:
        """The client sends none; the established mux refuses any that arrives."""

    def on_tunnel_closed(self) -> None:
        self.server.client_tunnels.discard(self)

    def token_revoked(self) -> None:
        """The token this tunnel was opened with is no longer valid: its channels end
        with the tunnel, and the client has to log in again."""
        log.info("%s: its token was revoked or expired, closing the tunnel", self.describe())
        self.server.client_tunnels.discard(self)
        self.shutdown(GoAwayReason.AUTH_FAILED, "the login token was revoked or has expired")

    def on_channel_requested(self, channel: int, target: str) -> None:
        # The token is checked on every open: from the cache while a check of it is
        # fresh, else in the store (the cache is dropped whenever a token is revoked).
        if self.server.token_cached(self.token, "connect"):
            self._open(channel, target)
            return
        task = asyncio.get_running_loop().create_task(self._check_token_and_open(channel, target))
        self.server.track(task)

    async def _check_token_and_open(self, channel: int, target: str) -> None:
        try:
            await self.server.authenticate_bearer(f"Bearer {self.token}", "connect")
        except ApiError as exc:
            if not self.closed and self.mux.is_requested(channel):
                self._refuse(channel, target, OpenFailure.NOT_PERMITTED, exc.message)
            if exc.status == 401 and self in self.server.client_tunnels:
                self.token_revoked()
            return
        except Exception:
            log.exception("%s: cannot check its token", self.describe())
            if not self.closed and self.mux.is_requested(channel):
                self._refuse(channel, target, OpenFailure.SHUTTING_DOWN, "relay error")
            return
        if not self.closed and self.mux.is_requested(channel):
            self._open(channel, target)

    def _open(self, channel: int, target: str) -> None:
        device, _, service = target.partition("/")
        try:
            device_tunnel = self.server.authorize_stream(self.user, device, service)
        except ApiError as exc:
            failure = _API_FAILURES.get(exc.code, OpenFailure.NOT_PERMITTED)
            self._refuse(channel, target, failure, exc.message)
            return
        opening = _Opening(self, channel, device, service)
        device_tunnel.open_binding(service, opening.device_side)

    def _refuse(self, channel: int, target: str, reason: OpenFailure, text: str) -> None:
        """Refuse a channel the relay did not let through, and log and audit that."""
        self.reject(channel, reason, text)
        device, _, service = target.partition("/")
        now = datetime.now(UTC)
        record = ChannelRecord(
            user=self.user.name,
            device=printable(device, 128),
            service=printable(service, 64),
            source=self.peer_address(),
            started_at=now,
            ended_at=now,
            bytes_up=0,
            bytes_down=0,
            outcome=f"open-failed: {text}",
        )
        log_channel(channel, record, 0.0)
        self.server.record_channel(record)


class _Opening:
    """One spliced channel: the client's is accepted only once the device's is."""

    def __init__(self, tunnel: ClientTunnel, channel: int, device: str, service: str) -> None:
        self.tunnel = tunnel
        self.channel = channel
        self.device = device
        self.service = service
        self.client_side = _ClientSide(self)
        self.device_side = _DeviceSide(self)
        self.client_side.peer, self.device_side.peer = self.device_side, self.client_side
        self.started_at = datetime.now(UTC)
        self.started = time.monotonic()  # the duration: not stepped by clock changes
        self.timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT, self.expired)
        self.outcome = "opening"

    def _still_requested(self) -> bool:
        return not self.tunnel.closed and self.tunnel.mux.is_requested(self.channel)

    def _refuse(self, reason: OpenFailure, text: str) -> None:
        self.timer.cancel()
        if self._still_requested():
            self.tunnel.reject(self.channel, reason, text)
        self.outcome = f"open-failed: {text}"
        self._record()

    def device_accepted(self) -> None:
        self.timer.cancel()
        if not self._still_requested():  # the client gave up, or its tunnel is gone
            self.device_side.reset_channel(ResetReason.CANCEL, "the client gave up")
            self.outcome = "client-gone"
            self._record()
            return
        self.tunnel.attach(self.channel, self.client_side)
        self.outcome = "open"
        self.tunnel.server.client_channels.add(self)

    def device_refused(self, reason: int, message: str) -> None:
        _, _, text = describe_failure(reason, message, self.device, self.service)
        known = reason in OpenFailure._value2member_map_
        self._refuse(OpenFailure(reason) if known else OpenFailure.UNREACHABLE, text)

    def expired(self) -> None:
        self.device_side.reset_channel(ResetReason.CANCEL, "open timed out")
        self._refuse(OpenFailure.TIMEOUT, f"{self.device} timed out connecting to {self.service}")

    def device_reset(self, message: str) -> None:
        if self.outcome == "opening":
            self._refuse(OpenFailure.OFFLINE, f"the tunnel to {self.device} closed")
        elif self.outcome == "open":
            self.outcome = f"reset by the device side: {message}"
            self._record()

    def client_reset(self, message: str) -> None:
        if self.outcome == "open":
            self.outcome = f"reset by the client: {message}"
            self._record()

    def closed_cleanly(self) -> None:
        if self.outcome == "open":
            self.outcome = "closed"
            self._record()

    @property
    def user_name(self) -> str:
        return self.tunnel.user.name

    @property
    def token(self) -> str:
        return self.tunnel.token

    def revoke(self, reason: str) -> None:
        """The user may no longer use this channel: reset both sides."""
        self.outcome = f"revoked: {reason}"
        self.client_side.reset_channel(ResetReason.REVOKED, reason)
        self.device_side.reset_channel(ResetReason.REVOKED, reason)
        self._record()

    def _record(self) -> None:
        self.tunnel.server.client_channels.discard(self)
        duration = time.monotonic() - self.started
        record = ChannelRecord(
            user=self.tunnel.user.name,
            device=self.device,
            service=self.service,
            source=self.tunnel.peer_address(),
            started_at=self.started_at,
            ended_at=self.started_at + timedelta(seconds=duration),
            bytes_up=self.client_side.bytes_from_tunnel,
            bytes_down=self.client_side.bytes_to_tunnel,
            outcome=self.outcome,
        )
        log_channel(self.channel, record, duration)
        self.tunnel.server.record_channel(record)


class _ClientSide(SpliceBinding):
    def __init__(self, opening: _Opening) -> None:
        super().__init__()
        self.opening = opening

    def on_reset(self, reason: int, message: str) -> None:
        super().on_reset(reason, message)
        self.opening.client_reset(message)

    def on_closed(self) -> None:
        super().on_closed()
        self.opening.closed_cleanly()


class _DeviceSide(SpliceBinding):
    def __init__(self, opening: _Opening) -> None:
        super().__init__()
        self.opening = opening

    def on_open_ok(self) -> None:
        self.opening.device_accepted()

    def on_open_failed(self, reason: int, message: str) -> None:
        self.opening.device_refused(reason, message)

    def on_reset(self, reason: int, message: str) -> None:
        super().on_reset(reason, message)
        self.opening.device_reset(message)
