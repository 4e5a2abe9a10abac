"""A client's stream: one WebSocket from the CLI, spliced onto one tunnel channel.

Wire contract (docs/PROTOCOL.md, "Client streams"): binary messages carry the
stream's bytes; a text message ``eof`` ends the sender's direction (TCP half-close);
the relay closes the WebSocket with 1000 once both directions ended, or with 1011 and
the reason when the channel was reset. The WebSocket upgrade is only answered once the
device accepted the channel, so open errors arrive as HTTP error responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING
from websockets.server import ServerProtocol

from hatchway.mux.frames import OpenFailure, ResetReason
from hatchway.store.base import ChannelRecord
from hatchway.text import printable
from hatchway.tunnel.endpoint import ChannelBinding
from hatchway.tunnel.websocket import WebSocketEndpoint

if TYPE_CHECKING:
    from hatchway.relay.server import RelayServer
    from hatchway.relay.tunnels import RelayTunnel

log = logging.getLogger("hatchway.relay.channel")

#: A client stream's write buffer above which the channel's credit is held back.
STREAM_HIGH_WATER = 128 * 1024
OPEN_TIMEOUT = 15.0
CLOSE_INTERNAL_ERROR = 1011
EOF_MESSAGE = b"eof"

_FAILURES: dict[int, tuple[int, str, str]] = {
    OpenFailure.UNKNOWN_SERVICE: (
        404,
        "unknown_service",
        "service {service} is not exposed by {device}",
    ),
    OpenFailure.REFUSED: (502, "refused", "{device} refused the connection to {service}: {detail}"),
    OpenFailure.UNREACHABLE: (502, "unreachable", "{device} cannot reach {service}: {detail}"),
    OpenFailure.TIMEOUT: (504, "timeout", "{device} timed out connecting to {service}"),
    OpenFailure.NOT_PERMITTED: (403, "not_permitted", "not permitted"),
    OpenFailure.TOO_MANY_CHANNELS: (503, "busy", "{device} has too many open channels"),
    OpenFailure.SHUTTING_DOWN: (503, "offline", "device {device} is going offline"),
}


def describe_failure(reason: int, message: str, device: str, service: str) -> tuple[int, str, str]:
    """The HTTP status, error code and sentence for a device's OPEN_FAILED."""
    status, code, template = _FAILURES.get(reason, (502, "failed", "{detail}"))
    detail = message.split(": ", 1)[-1]
    return status, code, template.format(device=device, service=service, detail=detail)


def channel_record(
    binding: ChannelBinding,
    user: str,
    device: str,
    service: str,
    source: str,
    started_at: datetime,
    outcome: str,
) -> ChannelRecord:
    """The audit record of a channel that has just ended."""
    duration = time.monotonic() - binding.started
    return ChannelRecord(
        user=user,
        device=device,
        service=service,
        source=source,
        started_at=started_at,
        ended_at=started_at + timedelta(seconds=duration),
        bytes_up=binding.bytes_to_tunnel,
        bytes_down=binding.bytes_from_tunnel,
        outcome=outcome,
    )


def log_channel(channel: int, record: ChannelRecord, duration: float) -> None:
    """The channel log's line for a channel that has just ended (or was refused)."""
    log.info(
        "channel %s user=%s device=%s service=%s from=%s: %s, %d bytes up, %d bytes down, %.3f s",
        channel,
        record.user,
        record.device,
        record.service,
        record.source,
        record.outcome,
        record.bytes_up,
        record.bytes_down,
        duration,
    )


def error_response(status: int, code: str, message: str) -> Response:
    body = json.dumps({"error": code, "message": message}).encode() + b"\n"
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    reasons = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        426: "Upgrade Required",
        502: "Bad Gateway",
        503: "Service Unavailable",
        504: "Gateway Timeout",
    }
    return Response(status, reasons.get(status, "Error"), headers, body)


class ClientStream(WebSocketEndpoint, ChannelBinding):
    def __init__(
        self, ws: ServerProtocol, server: RelayServer, user: str, device: str, service: str
    ) -> None:
        WebSocketEndpoint.__init__(self, ws)
        ChannelBinding.__init__(self)
        self.server = server
        self.user = user
        # As the client sent them when it was refused (valid names once authorized):
        # logged and recorded, so kept inert.
        self.device = printable(device, 128)
        self.service = printable(service, 64)
        self.request: Request | None = None
        self._response: Response | None = None
        self.outcome = "open-failed"
        self.started_at = datetime.now(UTC)
        self._open_timer: asyncio.TimerHandle | None = None
        self.token = ""  # the bearer token it was opened with (re-checked by the sweep)
        # Logged and recorded as a channel when it ends; not for a caller whose token
        # was refused (nobody: what it named is its own say-so, and free to send).
        self.audited = True

    @property
    def user_name(self) -> str:
        return self.user

    def revoke(self, reason: str) -> None:
        """The user may no longer use this channel: end it now."""
        self.outcome = f"revoked: {reason}"
        self.reset_channel(ResetReason.REVOKED, reason)
        self.close(1008, reason)

    # --- opening ------------------------------------------------------------------------

    def on_handshake(self, event: Request | Response) -> None:
        assert isinstance(event, Request)
        self.request = event

    def open(self, tunnel: RelayTunnel) -> None:
        """Called once the request was read and the user is allowed."""
        assert self.transport is not None
        self.transport.pause_reading()  # nothing to read until the channel is open
        tunnel.open_binding(self.service, self)
        self._open_timer = asyncio.get_running_loop().call_later(OPEN_TIMEOUT, self._open_expired)

    def _open_expired(self) -> None:
        if self.tunnel is not None and not self.finished:
            self.tunnel.mux.reset_channel(self.channel, ResetReason.CANCEL, "open timed out")
            self.tunnel.bindings.pop(self.channel, None)
            self.tunnel.request_flush()
            self.finished = True
        self.on_open_failed(OpenFailure.TIMEOUT, "timed out")

    def reject(self, status: int, code: str, message: str) -> None:
        if self.ws.state is CONNECTING:
            assert isinstance(self.ws, ServerProtocol)
            self.ws.send_response(error_response(status, code, message))
            self.flush()

    def prepare(self) -> bool:
        """Check the upgrade request before anything reaches the device; the 101
        response is only sent once the device accepted the channel."""
        if self.request is None:
            return False
        assert isinstance(self.ws, ServerProtocol)
        response = self.ws.accept(self.request)
        if response.status_code != 101:
            return False
        self._response = response
        return True

    def on_open_ok(self) -> None:
        assert isinstance(self.ws, ServerProtocol) and self._response is not None
        if self._open_timer is not None:
            self._open_timer.cancel()
        self.ws.send_response(self._response)
        self.flush()
        self.outcome = "open"
        self.server.client_channels.add(self)
        assert self.transport is not None
        self.transport.resume_reading()
        log.info(
            "channel %s user=%s device=%s service=%s from=%s: open",
            self.channel,
            self.user,
            self.device,
            self.service,
            self.peer_address(),
        )

    def on_open_failed(self, reason: int, message: str) -> None:
        if self._open_timer is not None:
            self._open_timer.cancel()
        status, code, text = describe_failure(reason, message, self.device, self.service)
        log.info(
            "channel user=%s device=%s service=%s: open failed: %s",
            self.user,
            self.device,
            self.service,
            message,
        )
        self.reject(status, code, text)

    # --- WebSocket → channel ----------------------------------------------------------

    def on_binary(self, data: bytes | memoryview) -> None:
        if self.is_open:  # not once closing (an unexpected text message): nothing more
            self.forward(data)

    def on_text(self, data: bytes) -> None:
        if data == EOF_MESSAGE:
            self.forward_eof()
        else:
            self.close(1003, "unexpected text message")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.transport is not None:
            # Credit is held back once this much waits to be sent to the client: what a
            # client that stops reading makes the relay hold is about a window plus this
            # (a TLS transport's default is 512 KiB).
            self.transport.set_write_buffer_limits(high=STREAM_HIGH_WATER)

    def on_writable(self) -> None:
        self.sink_resumed()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.sink_paused()

    def write_buffer_limit(self) -> int:
        # Credit is held back once paused, but a window may still be on its way.
        window = self.tunnel.mux.window if self.tunnel is not None else 0
        return super().write_buffer_limit() + window

    def on_connection_lost(self, exc: Exception | None) -> None:
        self.server.client_channels.discard(self)
        if self._open_timer is not None:
            self._open_timer.cancel()
        if self.outcome == "open":
            self.outcome = "closed" if self.finished else "client-closed"
        self.local_closed()
        self._record()

    # --- channel → WebSocket ------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        self.send_binary(data)

    def deliver_eof(self) -> None:
        self.send_text(EOF_MESSAGE)

    def pause_source(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def on_reset(self, reason: int, message: str) -> None:
        self.outcome = f"reset: {message}"
        if self.ws.state is CONNECTING:  # still opening: answer the upgrade with an error
            if self._open_timer is not None:
                self._open_timer.cancel()
            self.reject(502, "tunnel_closed", f"the tunnel to {self.device} closed")
            return
        self.close(CLOSE_INTERNAL_ERROR, message or "channel reset")

    def on_closed(self) -> None:
        self.outcome = "closed"
        self.close(1000)

    # --- audit --------------------------------------------------------------------------

    def _record(self) -> None:
        if not self.audited:
            return
        record = channel_record(
            self, self.user, self.device, self.service, self.peer_address(), self.started_at,
            self.outcome,
        )  # fmt: skip
        log_channel(self.channel, record, (record.ended_at - record.started_at).total_seconds())
        self.server.record_channel(record)
