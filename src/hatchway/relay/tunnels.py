"""The relay's end of a device tunnel: authentication, registration, replacement."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING
from websockets.server import ServerProtocol

from hatchway import __version__
from hatchway.auth.device import new_nonce, validate_device_id, verify_device_proof
from hatchway.errors import ConfigError
from hatchway.mux.frames import MAX_CONTROL_PAYLOAD, GoAwayReason
from hatchway.mux.session import PROTOCOL_VERSION, Role
from hatchway.relay.registry import OnlineDevice
from hatchway.text import printable
from hatchway.tunnel.endpoint import CLOSE_POLICY, TUNNEL_MAX_MESSAGE, TunnelEndpoint

if TYPE_CHECKING:
    from hatchway.relay.server import RelayServer

log = logging.getLogger("hatchway.relay.tunnel")

SUBPROTOCOL = "hatchway.v1"
#: A Host header value a device may ask the relay to send to one of its web services.
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
#: From the TCP accept to an authenticated tunnel (TLS handshake, upgrade request and
#: HELLO exchange together).
HANDSHAKE_TIMEOUT = 10.0
#: The largest WebSocket message a device may send before it proved itself: its HELLO
#: (one frame of at most MAX_CONTROL_PAYLOAD) and keep-alives. TUNNEL_MAX_MESSAGE after.
PREAUTH_MAX_MESSAGE = 2 * MAX_CONTROL_PAYLOAD


class RelayTunnel(TunnelEndpoint):
    def __init__(
        self,
        ws: ServerProtocol,
        server: RelayServer,
        release_source: Callable[[], None] | None = None,
        deadline: float | None = None,
    ) -> None:
        super().__init__(
            ws, Role.RELAY, window=server.config.window, max_channels=server.config.max_channels
        )
        self.server = server
        # Gives back the source address's slot of unauthenticated connections (called
        # once the device proved itself, or when the connection is gone).
        self._release_source = release_source
        self.device_id: str | None = None
        self.nonce = new_nonce()
        self._handshake_timer: asyncio.TimerHandle | None = None
        # The loop time by which the device must have proved itself (HANDSHAKE_TIMEOUT
        # from the TCP accept); without one, from when the tunnel starts here.
        self._deadline = deadline
        self._auth_task: asyncio.Task[None] | None = None
        self.server.unauthenticated.add(self)

    def describe(self) -> str:
        return f"device {self.device_id or '?'} ({self.peer_address()})"

    def closed_text(self) -> str:
        # As a stream that finds the tunnel gone is told (relay/streams.py).
        return f"the tunnel to {self.device_id} closed" if self.device_id else "the tunnel closed"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        deadline = self._deadline if self._deadline is not None else loop.time() + HANDSHAKE_TIMEOUT
        self._handshake_timer = loop.call_at(deadline, self._handshake_expired)

    def _handshake_expired(self) -> None:
        if not self.mux.established:
            log.warning("%s: tunnel handshake timed out", self.describe())
            self.shutdown(GoAwayReason.TIMEOUT, "handshake timed out", CLOSE_POLICY)
            asyncio.get_running_loop().call_later(1.0, self.abort)

    def on_handshake(self, event: Request | Response) -> None:
        assert isinstance(self.ws, ServerProtocol) and isinstance(event, Request)
        if self.ws.state is not CONNECTING:
            return
        # accept() refuses (400) a request without our subprotocol.
        response = self.ws.accept(event)
        self.ws.send_response(response)
        self.flush()
        if response.status_code != 101:
            log.info("%s: WebSocket handshake refused (%d)", self.describe(), response.status_code)
            return
        self.mux.send_hello(
            {
                "version": PROTOCOL_VERSION,
                "role": "relay",
                "nonce": base64.b64encode(self.nonce).decode(),
                "capabilities": [],
                "server": f"hatchway/{__version__}",
            }
        )
        self.request_flush()

    def on_hello(self, info: dict[str, Any]) -> None:
        if self._auth_task is not None:
            self.shutdown(GoAwayReason.PROTOCOL_ERROR, "duplicate HELLO", CLOSE_POLICY)
            return
        if info.get("version") != PROTOCOL_VERSION:
            self.shutdown(GoAwayReason.VERSION, f"relay speaks version {PROTOCOL_VERSION}")
            return
        device, proof = info.get("device"), info.get("proof")
        if not isinstance(device, str) or not isinstance(proof, str):
            self.shutdown(GoAwayReason.AUTH_FAILED, "device and proof are required", CLOSE_POLICY)
            return
        props = info.get("properties")
        self._auth_task = asyncio.get_running_loop().create_task(
            self._authenticate(device, proof, props if isinstance(props, dict) else {})
        )

    async def _authenticate(self, device: str, proof_text: str, props: dict[str, Any]) -> None:
        try:
            device = validate_device_id(device)
            proof = base64.b64decode(proof_text, validate=True)
        except (ConfigError, ValueError):
            key = None
        else:
            key = await asyncio.to_thread(self.server.store.device_key, device)
        if self.closed or not self.is_open or self.mux.goaway_sent or self.mux.goaway_received:
            return  # closing meanwhile (its deadline, a second HELLO, a GOAWAY, a close)
        if key is None or not verify_device_proof(key, device, self.nonce, proof):
            log.warning(
                "device %r from %s: authentication failed",
                printable(device, 64),  # the peer's say-so: inert and short in the log
                self.peer_address(),
            )
            self.shutdown(GoAwayReason.AUTH_FAILED, "authentication failed", CLOSE_POLICY)
            return
        self.device_id = device
        self.server.unauthenticated.discard(self)
        self._give_back_slot()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.mux.mark_established()
        self.limit_messages(TUNNEL_MAX_MESSAGE)
        self.start_keepalive()
        # The welcome goes out alone, before anyone can open a channel on this tunnel:
        # the agent takes an OPEN only once it has handled the welcome, and it handles
        # a message's frames only once it has parsed all of them.
        self.mux.send_hello({"welcome": True, "device": device})
        self._flush_mux()
        entry = OnlineDevice(device, self, self.peer_address(), properties=_clean_props(props))
        previous = self.server.registry.register(entry)
        if previous is not None:
            log.info(
                "device %s: new tunnel from %s replaces the one from %s",
                device,
                entry.address,
                previous.address,
            )
            previous.tunnel.shutdown(GoAwayReason.REPLACED, "replaced by a newer tunnel")
        self.server.audit(
            "device_connected",
            device,
            device=device,
            source=entry.address,
            details={
                "agent_version": entry.properties.get("agent_version"),
                "services": entry.properties.get("services", []),
            },
        )
        log.info(
            "device %s connected from %s (agent %s, services %s)",
            device,
            entry.address,
            entry.properties.get("agent_version", "?"),
            entry.properties.get("services", []),
        )

    def _give_back_slot(self) -> None:
        release, self._release_source = self._release_source, None
        if release is not None:
            release()

    def on_tunnel_closed(self) -> None:
        self.server.unauthenticated.discard(self)
        self._give_back_slot()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if self._auth_task is not None:
            self._auth_task.cancel()
        if self.device_id is not None and self.server.registry.unregister(self.device_id, self):
            self.server.device_offline(self.device_id)
            log.info("device %s disconnected", self.device_id)
            self.server.audit(
                "device_disconnected",
                self.device_id,
                device=self.device_id,
                source=self.peer_address(),
            )


def _clean_props(props: dict[str, Any]) -> dict[str, Any]:
    """Keep only the known device properties, with bounded sizes."""
    out: dict[str, Any] = {}
    for key in ("hostname", "agent_version"):
        value = props.get(key)
        if isinstance(value, str):
            out[key] = printable(value, 128)  # logged and shown: no line breaks, escapes
    uptime = props.get("uptime")
    if isinstance(uptime, int) and uptime >= 0:
        out["uptime"] = uptime
    services = props.get("services")
    if isinstance(services, list):
        out["services"] = [printable(s, 64) for s in services[:64] if isinstance(s, str)]
    options = props.get("service_options")
    if isinstance(options, dict):
        kept: dict[str, dict[str, str]] = {}
        for name, opts in list(options.items())[:64]:
            host = opts.get("host") if isinstance(opts, dict) else None
            if isinstance(name, str) and isinstance(host, str) and _HOST_RE.fullmatch(host):
                kept[name[:64]] = {"host": host}
        out["service_options"] = kept
    return out
