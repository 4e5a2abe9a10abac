"""The device agent: keeps one tunnel to the relay and serves its channel requests."""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from websockets.client import ClientProtocol

from hatchway import __version__
from hatchway.agent.config import AgentConfig, ServiceTarget
from hatchway.auth.device import derive_device_key, device_proof
from hatchway.errors import ConfigError, HatchwayError, LocalProtocolError, network_error_text
from hatchway.mux.frames import GoAwayReason, OpenFailure
from hatchway.mux.session import DEFAULT_MAX_CHANNELS, DEFAULT_WINDOW, PROTOCOL_VERSION, Role
from hatchway.text import printable
from hatchway.tlsutil import client_context
from hatchway.tunnel.connect import ConnectError, open_websocket
from hatchway.tunnel.endpoint import CLOSE_GOING_AWAY, TUNNEL_MAX_MESSAGE, TunnelEndpoint
from hatchway.tunnel.local import TcpBinding

log = logging.getLogger("hatchway.agent")

SUBPROTOCOL = "hatchway.v1"
BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
HANDSHAKE_TIMEOUT = 10.0
LOCAL_CONNECT_TIMEOUT = 10.0
_STARTED = time.monotonic()


class AgentTunnel(TunnelEndpoint):
    def __init__(self, ws: ClientProtocol, config: AgentConfig, key: bytes) -> None:
        super().__init__(ws, Role.AGENT, window=DEFAULT_WINDOW, max_channels=DEFAULT_MAX_CHANNELS)
        self.config = config
        self.key = key
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.auth_refused = False
        #: Why the relay ended the tunnel (its GOAWAY), in words, for the one log line
        #: each attempt gets.
        self.ended_by_relay: str | None = None
        self._hello_sent = False
        self._tasks: set[asyncio.Task[None]] = set()

    def describe(self) -> str:
        return f"tunnel to {self.config.server}"

    def on_hello(self, info: dict[str, Any]) -> None:
        if info.get("welcome") is True:
            if not self._hello_sent:
                raise LocalProtocolError("the relay welcomed the device before it proved itself")
            self.mux.mark_established()
            self.start_keepalive()
            if not self.established.done():
                self.established.set_result(None)
            return
        version = info.get("version")
        if info.get("role") != "relay" or type(version) is not int or self._hello_sent:
            raise LocalProtocolError("unexpected HELLO from the relay")
        if version != PROTOCOL_VERSION:
            self.shutdown(GoAwayReason.VERSION, f"agent speaks version {PROTOCOL_VERSION}")
            return
        nonce_text = info.get("nonce")
        if not isinstance(nonce_text, str):
            raise LocalProtocolError("the relay's HELLO has no nonce")
        try:
            nonce = base64.b64decode(nonce_text, validate=True)
        except ValueError:
            raise LocalProtocolError("the relay's nonce is not base64") from None
        if len(nonce) < 16:
            raise LocalProtocolError("the relay's nonce is too short")
        proof = device_proof(self.key, self.config.device, nonce)
        self._hello_sent = True
        self.mux.send_hello(
            {
                "version": PROTOCOL_VERSION,
                "role": "agent",
                "device": self.config.device,
                "proof": base64.b64encode(proof).decode(),
                "capabilities": [],
                "properties": {
                    "hostname": socket.gethostname(),
                    "agent_version": __version__,
                    "uptime": int(time.monotonic() - _STARTED),
                    "services": sorted(self.config.services),
                    "service_options": {
                        name: target.advertised()
                        for name, target in sorted(self.config.services.items())
                        if target.advertised()
                    },
                },
            }
        )
        self.request_flush()

    def on_goaway(self, reason: int, message: str) -> None:
        # Not logged here: the reconnect loop says it, once, with what it does next.
        self.auth_refused = reason == GoAwayReason.AUTH_FAILED
        self.ended_by_relay = goaway_text(reason, printable(message, 200))
        self.close(CLOSE_GOING_AWAY, "going away")

    def on_channel_requested(self, channel: int, service: str) -> None:
        target = self.config.services.get(service)
        if target is None:
            log.warning("relay asked for unexposed service %r: refused", service)
            self.reject(channel, OpenFailure.UNKNOWN_SERVICE, f"service {service} is not exposed")
            return
        task = asyncio.get_running_loop().create_task(self._connect(channel, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, channel: int, target: ServiceTarget) -> None:
        """Connect to ``target`` and attach it to ``channel``, or reject the channel
        with the reason: whatever goes wrong, the relay's request is answered."""
        loop = asyncio.get_running_loop()
        try:
            if target.tls:
                connection = loop.create_connection(
                    TcpBinding,
                    target.host,
                    target.port,
                    ssl=service_tls_context(target),
                    server_hostname=target.server_name or target.host,
                    ssl_handshake_timeout=LOCAL_CONNECT_TIMEOUT,
                )
            else:
                connection = loop.create_connection(TcpBinding, target.host, target.port)
            _, binding = await asyncio.wait_for(connection, LOCAL_CONNECT_TIMEOUT)
        except TimeoutError:
            failure, text = OpenFailure.TIMEOUT, "timed out"
        except ConnectionRefusedError:
            failure, text = OpenFailure.REFUSED, "connection refused"
        except ssl.SSLError as exc:
            failure = OpenFailure.UNREACHABLE
            text = f"TLS failed: {getattr(exc, 'verify_message', None) or exc.reason or exc}"
        except OSError as exc:
            # "host not found" for a name that does not resolve (a gaierror's errno is
            # an EAI code: os.strerror made "Unknown error -2" of it).
            failure, text = OpenFailure.UNREACHABLE, network_error_text(exc)
        except ValueError:  # UnicodeError: a name IDNA cannot encode (checked at start)
            failure, text = OpenFailure.UNREACHABLE, "invalid host name"
        except HatchwayError as exc:  # the service's TLS context (loaded at start)
            failure, text = OpenFailure.UNREACHABLE, str(exc)
        except Exception:  # the relay waits for an answer: it gets one
            log.exception(
                "channel %d: %s (%s:%d): unexpected error",
                channel,
                target.name,
                target.host,
                target.port,
            )
            if not self.closed and self.mux.is_requested(channel):
                self.reject(channel, OpenFailure.UNREACHABLE, f"{target.name}: agent error")
            return
        else:
            if self.closed or not self.mux.is_requested(channel):
                # The tunnel closed, or the relay gave up on the channel meanwhile.
                if binding.transport is not None:
                    binding.transport.abort()
                return
            self.attach(channel, binding)
            binding.start()
            log.info(
                "channel %d: connected to %s (%s:%d)",
                channel,
                target.name,
                target.host,
                target.port,
            )
            return
        log.warning(
            "channel %d: %s (%s:%d): %s", channel, target.name, target.host, target.port, text
        )
        if not self.closed and self.mux.is_requested(channel):
            self.reject(channel, failure, f"{target.name}: {text}")

    def on_tunnel_closed(self) -> None:
        for task in self._tasks:
            task.cancel()
        if not self.done.done():
            self.done.set_result(None)


_SERVICE_CONTEXTS: dict[ServiceTarget, ssl.SSLContext] = {}


def service_tls_context(target: ServiceTarget) -> ssl.SSLContext:
    """TLS towards a device's own service: verified against its CA when one is
    configured, else encrypted without verification (self-signed device certificates)."""
    ctx = _SERVICE_CONTEXTS.get(target)
    if ctx is None:
        if target.ca_file is not None:
            ctx = client_context(target.ca_file)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _SERVICE_CONTEXTS[target] = ctx
    return ctx


class Agent:
    """Connects, serves until the tunnel drops, and tries again with backoff, forever."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        for target in config.services.values():
            if target.tls:
                # Loaded now: a CA file that is no PEM stops the agent with a sentence
                # (exit status 2), not every channel to the service later.
                try:
                    service_tls_context(target)
                except ConfigError as exc:
                    raise ConfigError(f"service {target.name}: {exc}") from None
            if target.tls and not target.verified:
                log.warning(
                    "service %s: TLS to %s:%d is encrypted but not verified (add ca=FILE)",
                    target.name,
                    target.host,
                    target.port,
                )
        self.key = derive_device_key(config.secret)
        self.ssl_context = client_context(config.ca_file)
        self.tunnel: AgentTunnel | None = None
        self.connected = asyncio.Event()

    async def connect_once(self) -> AgentTunnel:
        url = self.config.tunnel_url
        tunnel = await open_websocket(
            url,
            lambda ws: AgentTunnel(ws, self.config, self.key),
            ssl_context=self.ssl_context,
            proxy=self.config.proxy,
            subprotocols=[SUBPROTOCOL],
            max_size=TUNNEL_MAX_MESSAGE,
            timeout=HANDSHAKE_TIMEOUT,
        )
        done, _ = await asyncio.wait(
            [tunnel.established, tunnel.done],
            timeout=HANDSHAKE_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not done:
            tunnel.abort()
            raise ConnectError("the relay did not complete the tunnel handshake in time") from None
        if not tunnel.established.done():
            raise ConnectError(
                tunnel.ended_by_relay or "the relay closed the tunnel during the handshake",
                auth_refused=tunnel.auth_refused,
            )
        return tunnel

    async def run(self) -> None:
        """Connect, serve, and start again, forever: one log line per attempt that
        failed or tunnel that ended, saying why and when the next attempt is."""
        attempt = 0
        while True:
            level, why = logging.WARNING, ""
            try:
                tunnel = await self.connect_once()
            except ConnectError as exc:
                level = logging.ERROR if exc.auth_refused else logging.WARNING
                why = f"cannot connect: {exc}"
            except HatchwayError as exc:
                why = f"cannot connect: {exc}"
            except Exception:  # never give up: a device has nobody to restart it
                log.exception("unexpected error while connecting")
                why = "cannot connect"
            else:
                attempt = 0
                self.tunnel = tunnel
                self.connected.set()
                log.info("connected to %s as %s", self.config.server, self.config.device)
                await tunnel.done
                self.connected.clear()
                why = f"tunnel to {self.config.server} closed"
                if tunnel.ended_by_relay:
                    why += f": {tunnel.ended_by_relay}"
            delay = reconnect_delay(attempt)
            attempt = min(attempt + 1, 10)
            log.log(level, "%s; reconnecting in %.1f s", why, delay)
            await asyncio.sleep(delay)


#: What each GOAWAY reason means, in the words the agent logs.
_GOAWAY_TEXT: dict[int, str] = {
    GoAwayReason.AUTH_FAILED: "the relay refused this device's credentials",
    GoAwayReason.REPLACED: "the relay replaced this tunnel with a newer one of the same device",
    GoAwayReason.VERSION: "the relay does not speak this agent's protocol version",
    GoAwayReason.SHUTDOWN: "the relay is shutting down",
    GoAwayReason.TIMEOUT: "the relay timed the tunnel out",
    GoAwayReason.PROTOCOL_ERROR: "the relay reported a protocol error",
}


def goaway_text(reason: int, message: str) -> str:
    """What a relay's GOAWAY means, with its message, in the words the agent logs."""
    text = _GOAWAY_TEXT.get(reason, "the relay closed the tunnel")
    return f"{text} ({message})" if message else text


def reconnect_delay(
    attempt: int, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """The wait before reconnect number ``attempt`` (0 after a tunnel that worked):
    "equal jitter" on an exponential ceiling, uniform in [ceiling / 2, ceiling] with
    the ceiling 2 s, 4 s, 8 s ... 30 s, so every delay lies within [1 s, 30 s] and
    every one is random: agents that lost the same relay do not all return at once."""
    ceiling = min(BACKOFF_MAX, 2 * BACKOFF_MIN * 2 ** min(attempt, 10))
    return min(BACKOFF_MAX, max(BACKOFF_MIN, uniform(ceiling / 2, ceiling)))
