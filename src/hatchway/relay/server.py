"""The relay server: one TLS port for device tunnels, client streams and the API."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from hatchway import __version__, allocator
from hatchway.agent.config import SERVICE_NAME_RE
from hatchway.auth.device import DEVICE_ID_RE
from hatchway.auth.ldap import (
    DEFAULT_TOKEN_HOURS,
    LdapConfig,
    LdapUnavailable,
    ldap_authenticate,
)
from hatchway.auth.passwords import new_password
from hatchway.auth.permissions import ROLE_PERMISSIONS, Access, may_connect, may_view
from hatchway.auth.throttle import LoginThrottle, source_key
from hatchway.errors import ConfigError, NotFoundError
from hatchway.mux.frames import GoAwayReason
from hatchway.mux.session import DEFAULT_MAX_CHANNELS, DEFAULT_WINDOW
from hatchway.relay.api import UNAUTHORIZED, ApiError
from hatchway.relay.frontdoor import FrontDoor
from hatchway.relay.pki import certificate_fingerprint, ensure_tls_files
from hatchway.relay.registry import LocalRegistry
from hatchway.relay.tunnels import HANDSHAKE_TIMEOUT, RelayTunnel
from hatchway.store.base import ChannelRecord, UserRecord
from hatchway.store.sql import SqlStore
from hatchway.tlsutil import reload_server_context, server_context
from hatchway.tunnel.websocket import tune_socket
from hatchway.web.access import WebAccess

log = logging.getLogger("hatchway.relay")


#: Connections per source address that have not yet finished their request/handshake.
MAX_PENDING_PER_SOURCE = 64
#: TLS handshakes in progress at once, all sources together.
MAX_PENDING_HANDSHAKES = 4096
#: A source refused for too many pending connections is logged at most this often
#: (seconds), with a count of the refusals in between; at most this many sources are
#: remembered for that.
REFUSAL_LOG_INTERVAL = 10.0
MAX_REFUSAL_SOURCES = 10_000
#: How long a closing TLS connection waits for the peer's close_notify.
TLS_SHUTDOWN_TIMEOUT = 5.0
#: How often the built-in CA's server certificate is checked for renewal.
TLS_RENEW_CHECK = 86400.0
#: Permissions (a user's roles and grants, a device's organisation and tags) read from the
#: store are trusted this long.
ACCESS_CACHE_SECONDS = 5.0
#: How often open client channels are re-checked against tokens, users and grants.
CHANNEL_SWEEP_INTERVAL = 2.0
ACCESS_CACHE_SIZE = 50_000
#: A token checked against the store is trusted this long without asking again: a
#: revoked token or removed user stops working within this many seconds.
TOKEN_CACHE_SECONDS = 5.0
TOKEN_CACHE_SIZE = 10_000
#: Finished channels are written to the database together, at most this long after
#: they end (or once this many wait): one transaction for many, and no worker thread
#: taking the GIL from the event loop after every channel, which delayed the next
#: channel's open by milliseconds.
CHANNEL_LOG_DELAY = 0.5
CHANNEL_LOG_BATCH = 500
#: The LDAP settings are read again after this long: changes apply without a restart.
LDAP_CONFIG_SECONDS = 5.0


@dataclass(frozen=True)
class RelayConfig:
    data_dir: Path = Path("hatchway-data")
    host: str = "0.0.0.0"
    port: int = 8443
    domain: str = "localhost"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    window: int = DEFAULT_WINDOW
    max_channels: int = DEFAULT_MAX_CHANNELS
    #: Largest request body proxied to a device's web UI (0: no limit).
    web_max_body: int = 0
    #: Bytes of static resources cached per device for its web UI (0: no cache).
    web_cache_size: int = 0
    #: Device web UIs by subdomain ("host"), under /d/DEVICE/ ("path"), or both.
    web_routing: str = "host"
    #: Web sessions unused this many seconds are over (0: no idle limit).
    session_idle: float = 900.0
    #: Audit records older than this many days are removed (0: kept forever).
    audit_retention_days: int = 365


class RelayServer:
    def __init__(self, config: RelayConfig) -> None:
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        self.config = config
        self.store = SqlStore.open_data_dir(config.data_dir)
        self.store.session_idle = (
            timedelta(seconds=config.session_idle) if config.session_idle else None
        )
        self.registry = LocalRegistry()
        self.unauthenticated: set[RelayTunnel] = set()
        self._pending: defaultdict[str, int] = defaultdict(int)
        self._tasks: set[asyncio.Task[Any]] = set()
        # Audit and channel-log writes in flight, and finished channels not yet written.
        self._writes: set[asyncio.Task[Any]] = set()
        self._channel_log: list[ChannelRecord] = []
        self._channel_log_timer: asyncio.TimerHandle | None = None
        self._channel_log_write: asyncio.Task[Any] | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handshaking = 0
        # Sources refused for too many pending connections: (when last logged, how many
        # refused since).
        self._refusals: dict[str, tuple[float, int]] = {}
        # token -> (user, valid until): saves a database round trip per channel open.
        self._token_cache: dict[str, tuple[UserRecord, tuple[str, ...], float]] = {}
        self._access_cache: dict[str, tuple[Any, float]] = {}
        # Open client channels (streams and spliced client-tunnel channels), re-checked
        # by the sweep: objects with user_name, token, device, service and revoke().
        self.client_channels: set[Any] = set()
        # Open client tunnels (relay/client_tunnels.py): the sweep closes those whose
        # token went, even while they carry no channel.
        self.client_tunnels: set[Any] = set()
        self._device_cache: dict[str, tuple[Any, float]] = {}
        self._api_app: Any = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.cert_file, self.key_file = config.tls_cert, config.tls_key
            self.ca_file: Path | None = None
        else:
            files = ensure_tls_files(config.data_dir / "tls", config.domain)
            self.cert_file, self.key_file, self.ca_file = (
                files.server_cert,
                files.server_key,
                files.ca_cert,
            )
        self.ssl_context: ssl.SSLContext = server_context(self.cert_file, self.key_file)
        self.ssl_context.sni_callback = _remember_sni
        self.web = WebAccess(self)
        self.login_throttle = LoginThrottle()
        self.started_at = datetime.now(UTC)
        self._offline_since: dict[str, datetime] = {}
        # The LDAP settings, parsed (ldap_config): trusted until _ldap_expires.
        self._ldap_lock = threading.Lock()
        self._ldap_config: LdapConfig | None = None
        self._ldap_state = ""  # what was logged about them last
        self._ldap_expires = 0.0

    # --- lifecycle ----------------------------------------------------------------------

    def bootstrap(self) -> str | None:
        """Create the first admin on an empty database; return its password once."""
        if self.store.count_users():
            return None
        password = new_password()
        while self.store.password_policy().problems(password, "admin"):
            password = new_password()
        self.store.add_user(
            "admin", "owner", password, actor="relay", superadmin=True, must_change_password=True
        )
        return password

    async def start(self) -> None:
        """Listen. Connections are accepted here, not by ``loop.create_server``, so that
        the per-address limit applies before the TLS handshake costs anything."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.config.host, self.config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family = infos[0][0]
        listener = socket.create_server(
            (self.config.host, self.config.port), family=family, backlog=4096
        )
        listener.setblocking(False)
        self._listener = listener
        self._accept_task = loop.create_task(self._accept_loop(listener))
        self.web.start()
        self.track(loop.create_task(self._sweep_channels()))
        if self.config.audit_retention_days:
            self.track(loop.create_task(self._audit_retention()))
        if self.ca_file is not None:
            self.track(loop.create_task(self._renew_tls()))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.error("accept failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            source = str(addr[0])
            if self._handshaking >= MAX_PENDING_HANDSHAKES or not self.admit(source):
                conn.close()
                self._log_refusal(source)
                continue
            tune_socket(conn)
            self._handshaking += 1
            self.track(loop.create_task(self._handshake(conn, source, loop.time())))

    def _log_refusal(self, source: str) -> None:
        """One line per source per REFUSAL_LOG_INTERVAL, with how many were refused
        since the last: a source that connects in a loop cannot flood the log."""
        now = time.monotonic()
        last, unlogged = self._refusals.get(source, (-REFUSAL_LOG_INTERVAL, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusals[source] = (last, unlogged + 1)
            return
        if len(self._refusals) >= MAX_REFUSAL_SOURCES:
            self._refusals.clear()
        self._refusals[source] = (now, 0)
        more = f" ({unlogged} more since the last message)" if unlogged else ""
        log.warning("%s: too many pending connections, refused%s", source, more)

    async def _handshake(self, conn: socket.socket, source: str, accepted: float) -> None:
        loop = asyncio.get_running_loop()
        door = FrontDoor(self, source, accepted)
        try:
            await loop.connect_accepted_socket(
                lambda: door,
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("%s: TLS handshake failed: %s", source, exc)
            door.release()
            conn.close()
        finally:
            self._handshaking -= 1

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.domain
        return f"https://{host}:{self.port}" if self.port != 443 else f"https://{host}"

    def reload_tls(self) -> None:
        try:
            if self.ca_file is not None:
                ensure_tls_files(self.config.data_dir / "tls", self.config.domain)
            reload_server_context(self.ssl_context, self.cert_file, self.key_file)
        except (ConfigError, OSError, ValueError) as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
        else:
            log.info("TLS certificate reloaded from %s", self.cert_file)

    async def shutdown(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listener is not None:
            self._listener.close()
        for entry in self.registry.all():
            entry.tunnel.shutdown(GoAwayReason.SHUTDOWN, "relay shutting down")
        for tunnel in list(self.unauthenticated):
            tunnel.abort()
        self.web.stop()
        await asyncio.sleep(0.1)
        # What the audit log is still waiting for is written before the store closes.
        self._flush_channel_log()
        deadline = time.monotonic() + 10
        while self._writes and time.monotonic() < deadline:
            # A channel-log write that ends starts the next one with what waited.
            await asyncio.wait(set(self._writes), timeout=deadline - time.monotonic())
        for task in self._tasks:
            task.cancel()
        self.store.close()

    async def _sweep_channels(self) -> None:
        """Every few seconds: end client channels whose token, user or permission went,
        and client tunnels whose token went."""
        while True:
            await asyncio.sleep(CHANNEL_SWEEP_INTERVAL)
            channels = list(self.client_channels)
            tunnels = list(self.client_tunnels)
            if not channels and not tunnels:
                continue
            try:
                allowed = await asyncio.to_thread(self._still_allowed, channels)
                dead = await asyncio.to_thread(self._dead_tokens, {t.token for t in tunnels})
            except Exception:
                log.exception("channel sweep failed")
                continue
            for tunnel in tunnels:
                if tunnel.token in dead and tunnel in self.client_tunnels:
                    tunnel.token_revoked()
            for channel, ok in zip(channels, allowed, strict=True):
                if not ok and channel in self.client_channels:
                    log.info(
                        "channel of user=%s device=%s service=%s: access revoked",
                        channel.user_name,
                        channel.device,
                        channel.service,
                    )
                    self.client_channels.discard(channel)
                    channel.revoke("access revoked")

    def _dead_tokens(self, tokens: set[str]) -> set[str]:
        """Those of ``tokens`` that are no longer valid (a worker thread)."""
        return {token for token in tokens if not self.store.token_scopes(token)}

    def _still_allowed(self, channels: list[Any]) -> list[bool]:
        """Fresh from the store (a worker thread): token live, user allowed."""
        tokens: dict[str, bool] = {}
        accesses: dict[str, Access | None] = {}
        devices: dict[str, tuple[str, tuple[str, ...]] | None] = {}
        out = []
        for ch in channels:
            if ch.token not in tokens:
                tokens[ch.token] = bool(self.store.token_scopes(ch.token))
            if ch.user_name not in accesses:
                accesses[ch.user_name] = self.store.access(ch.user_name)
            if ch.device not in devices:
                devices[ch.device] = self.store.device_info(ch.device)
            access, info = accesses[ch.user_name], devices[ch.device]
            out.append(
                tokens[ch.token]
                and access is not None
                and info is not None
                and may_connect(access.permissions(ch.device, *info), ch.service)
            )
        return out

    async def _audit_retention(self) -> None:
        """Remove expired audit records at start and once a day."""
        keep = timedelta(days=self.config.audit_retention_days)
        while True:
            try:
                removed = await asyncio.to_thread(self.store.audit_prune, datetime.now(UTC) - keep)
            except Exception:
                log.exception("audit retention failed")
            else:
                if removed:
                    log.info("audit retention: removed %d records", removed)
            await asyncio.sleep(86400)

    async def _renew_tls(self) -> None:
        """The built-in CA's server certificate is renewed before it expires, on a relay
        that runs for longer than that without a restart or SIGHUP."""
        while True:
            await asyncio.sleep(TLS_RENEW_CHECK)
            before = self.cert_file.stat().st_mtime_ns if self.cert_file.exists() else None
            try:
                ensure_tls_files(self.config.data_dir / "tls", self.config.domain)
                if self.cert_file.stat().st_mtime_ns != before:
                    self.reload_tls()
            except (ConfigError, OSError) as exc:
                log.error("TLS renewal failed, keeping the current certificate: %s", exc)

    # --- front door helpers ---------------------------------------------------------------

    def admit(self, source: str) -> bool:
        key = source_key(source)
        if self._pending[key] >= MAX_PENDING_PER_SOURCE:
            return False
        self._pending[key] += 1
        return True

    def release(self, source: str) -> None:
        key = source_key(source)
        self._pending[key] -= 1
        if self._pending[key] <= 0:
            del self._pending[key]

    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- access -------------------------------------------------------------------------

    async def authenticate_bearer(self, header: str | None, scope: str) -> UserRecord:
        """The token's user, if the token is live and has ``scope`` (or ``all``)."""
        user, _ = await self.authenticate_token(header, scope)
        return user

    async def authenticate_token(
        self, header: str | None, scope: str
    ) -> tuple[UserRecord, tuple[str, ...]]:
        """The token's user and all of the token's scopes, if the token is live and has
        ``scope`` (or ``all``)."""
        if not header or not header.lower().startswith("bearer "):
            raise UNAUTHORIZED
        token = header[7:].strip()
        if not token or len(token) > 256:
            raise UNAUTHORIZED
        now = time.monotonic()
        cached = self._token_cache.get(token)
        if cached is not None and cached[2] > now:
            user, scopes = cached[0], cached[1]
        else:
            found = await asyncio.to_thread(self.store.user_for_token, token)
            scopes = await asyncio.to_thread(self.store.token_scopes, token) if found else ()
            if found is None or not scopes:
                self._token_cache.pop(token, None)
                raise UNAUTHORIZED
            user = found
            if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                self._token_cache.clear()
            self._token_cache[token] = (user, scopes, now + TOKEN_CACHE_SECONDS)
        if scope not in scopes and "all" not in scopes:
            raise ApiError(
                403,
                "insufficient_scope",
                f"this token may not be used for {scope} (its scopes: {' '.join(scopes)})",
            )
        return user, scopes

    def token_cached(self, token: str, scope: str) -> bool:
        """Whether a fresh check of ``token`` found it valid for ``scope``."""
        cached = self._token_cache.get(token)
        return (
            cached is not None
            and cached[2] > time.monotonic()
            and (scope in cached[1] or "all" in cached[1])
        )

    def forget_tokens(self) -> None:
        """A token was revoked here: trust no cached token check."""
        self._token_cache.clear()

    async def sessions_ended(self) -> None:
        """A user's tokens or web sessions were ended in the store (tokens revoked, a
        password set, the user removed): trust no cached check of a token or session,
        and close the web connections of the ended sessions now, not within seconds."""
        self.forget_tokens()
        await self.web.sessions_ended()

    def forget_access(self) -> None:
        """Users, roles or grants changed here: take effect now, not within seconds."""
        self._access_cache.clear()
        self._token_cache.clear()

    def forget_device(self, device: str) -> None:
        self._device_cache.pop(device, None)

    # Who may do what (auth/permissions.py), from short-lived caches of the store: a
    # change by an admin takes effect within ACCESS_CACHE_SECONDS, and the sweeps close
    # what it no longer allows.

    def _cached(self, cache: dict[str, tuple[Any, float]], key: str, load: Any) -> Any:
        now = time.monotonic()
        hit = cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        value = load(key)
        if len(cache) >= ACCESS_CACHE_SIZE:
            cache.clear()
        cache[key] = (value, now + ACCESS_CACHE_SECONDS)
        return value

    def access(self, user: UserRecord) -> Access | None:
        return cast("Access | None", self._cached(self._access_cache, user.name, self.store.access))

    def device_info(self, device: str) -> tuple[str, tuple[str, ...]] | None:
        if not DEVICE_ID_RE.fullmatch(device):
            return None
        return cast(
            "tuple[str, tuple[str, ...]] | None",
            self._cached(self._device_cache, device, self.store.device_info),
        )

    def permissions(self, user: UserRecord, device: str) -> frozenset[str]:
        access, info = self.access(user), self.device_info(device)
        if access is None or info is None:
            return frozenset()
        return access.permissions(device, *info)

    def permits(self, user: UserRecord, device: str, service: str) -> bool:
        """May ``user`` open a channel to ``service`` on ``device``?"""
        return may_connect(self.permissions(user, device), service)

    def manages_devices(self, user: UserRecord) -> bool:
        """An organisation-wide device manager may learn that a device does not exist."""
        access = self.access(user)
        return access is not None and (
            access.superadmin or "devices.manage" in ROLE_PERMISSIONS.get(access.role, ())
        )

    def authorize_stream(self, user: UserRecord, device: str, service: str) -> RelayTunnel:
        if not SERVICE_NAME_RE.fullmatch(service):
            raise ApiError(400, "bad_request", f"invalid service name {service!r}")
        if not self.permits(user, device, service):
            if self.device_info(device) is None and self.manages_devices(user):
                raise ApiError(404, "unknown_device", f"device {device} does not exist")
            raise ApiError(403, "not_permitted", "not permitted")
        entry = self.registry.get(device)
        if entry is None or not entry.tunnel.is_open:
            raise ApiError(404, "offline", f"device {device} is offline")
        if len(entry.tunnel.bindings) >= self.config.max_channels:
            # The agent would refuse the OPEN anyway; do not queue it.
            raise ApiError(503, "busy", f"{device} has too many open channels")
        return entry.tunnel

    def device_offline(self, device: str) -> None:
        if len(self._offline_since) >= 100_000:
            self._offline_since.clear()
        self._offline_since[device] = datetime.now(UTC)

    def offline_since(self, device: str) -> datetime | None:
        """When the device's tunnel went away (at the latest: when the relay started)."""
        if self.registry.get(device) is not None:
            return None
        return self._offline_since.get(device, self.started_at)

    def default_web_service(self, device: str) -> str:
        """``http`` unless the device exposes only ``https``."""
        entry = self.registry.get(device)
        services = entry.properties.get("services", []) if entry is not None else []
        if "http" not in services and "https" in services:
            return "https"
        return "http"

    def visible_devices(
        self, user: UserRecord, after: str | None = None, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The devices ``user`` may see, in id order, from after ``after``: at most
        ``limit`` of them, and the id to continue after (None: that was all).
        Reads the store: call it in a worker thread."""
        out: list[dict[str, Any]] = []
        access = self.store.access(user.name)
        if access is None:
            return out, None
        org = None if access.superadmin else access.org
        batch = 1000 if limit is None else max(limit, 100)
        cursor = after
        while limit is None or len(out) < limit:
            records = self.store.list_devices(org, after=cursor, limit=batch)
            for record in records:
                cursor = record.device_id
                if limit is not None and len(out) >= limit:
                    return out, out[-1]["id"]
                if may_view(access.permissions(record.device_id, record.org, record.tags)):
                    item = self.device_item(record.device_id)
                    item.update(org=record.org, tags=list(record.tags))
                    out.append(item)
            if len(records) < batch:
                return out, None
        return out, (out[-1]["id"] if out else cursor)

    def device_item(self, device: str) -> dict[str, Any]:
        entry = self.registry.get(device)
        item: dict[str, Any] = {"id": device, "online": entry is not None}
        if entry is not None:
            item.update(
                since=entry.since.isoformat(),
                address=entry.address,
                services=entry.properties.get("services", []),
                hostname=entry.properties.get("hostname"),
                agent_version=entry.properties.get("agent_version"),
            )
        return item

    @property
    def api_app(self) -> Any:
        """The REST API application (``relay/api/app.py``), made on first use."""
        if self._api_app is None:
            from hatchway.relay.api.app import create_app

            self._api_app = create_app(self)
        return self._api_app

    def authenticate_user(self, name: str, password: str) -> UserRecord | None:
        """The user if the password is right (worker thread; see ``api.check_password``).

        A local user's password is checked by the store, even when a directory user has
        the same name. Everyone else is checked by the LDAP directory when one is
        configured (``docs/LDAP.md``); a user it accepts is created or updated with the
        role their groups give. Without a (valid) LDAP configuration the store answers,
        which refuses directory users after the same work as for a wrong password.

        A locked directory user is refused without asking the directory: their guesses
        are not passed on (where they could lock the account in the directory too), and
        the lockout says "no" whatever the password. An unreachable directory refuses
        the login without counting it towards the user's lockout.
        """
        existing = self.store.get_user(name)
        config = self._directory_for(name, existing)
        if config is None:
            return self.store.authenticate_user(name, password)
        if existing is not None and self.store.locked_until(name) is not None:
            return None
        try:
            found = ldap_authenticate(config, name, password)
        except LdapUnavailable as exc:
            log.warning("LDAP directory unreachable or failing, login of %r refused: %s", name, exc)
            return None
        if found is None:
            if existing is not None:
                self.store.login_failed(name)
            return None
        if found.role is None:
            log.warning(
                "LDAP user %r is in no group of ldap.roles (groups: %s): login refused",
                name,
                ", ".join(found.groups) or "none",
            )
            if existing is not None and existing.role != "user":
                # The directory no longer gives a role: neither do tokens issued before.
                self._sync_ldap_user(name, "user", config.org, existing)
            return None
        user = self._sync_ldap_user(name, found.role, config.org, existing)
        if user is None:
            log.warning("LDAP user %r: a local user has that name, login refused", name)
        return user

    def _sync_ldap_user(
        self, name: str, role: str, org: str, existing: UserRecord | None
    ) -> UserRecord | None:
        try:
            user = self.store.sync_external_user(name, role, org)
        except (ConfigError, NotFoundError) as exc:  # e.g. ldap.org's organisation was removed
            log.error("LDAP user %r could not be stored, login refused: %s", name, exc)
            return None
        if user is not None and (existing is None or (existing.role, existing.org) != (role, org)):
            self.forget_access()
        return user

    def token_ttl(self, user: UserRecord, wanted: timedelta) -> timedelta:
        """The lifetime of an API token for ``user`` who asks for ``wanted``: a directory
        user's is capped at ``ldap.token_hours`` (worker thread)."""
        if user.source != "ldap":
            return wanted
        config = self.ldap_config()
        cap = config.token_ttl if config is not None else timedelta(hours=DEFAULT_TOKEN_HOURS)
        return min(wanted, cap)

    def uses_directory(self, name: str) -> bool:
        """Whether ``authenticate_user`` asks the LDAP directory about ``name`` (worker
        thread): such logins wait on the network, not on the CPU, and are bounded apart
        (``api.check_password``)."""
        return self._directory_for(name, self.store.get_user(name)) is not None

    def _directory_for(self, name: str, existing: UserRecord | None) -> LdapConfig | None:
        """The LDAP configuration to check ``name`` against; None: the store checks it."""
        if existing is not None and existing.source != "ldap":
            return None  # a local account, even if the directory has the same name
        config = self.ldap_config()
        # Directory names are matched without regard to case; Hatchway's are not: only
        # lower-case names go to the directory, so that "Alice" cannot become a second
        # account of alice's.
        if config is None or name != name.lower():
            return None
        return config

    def ldap_config(self) -> LdapConfig | None:
        """The LDAP configuration in the settings, read again every few seconds; None when
        LDAP is not configured, or wrongly (logged once per change: fail closed)."""
        with self._ldap_lock:
            now = time.monotonic()
            if now < self._ldap_expires:
                return self._ldap_config
            settings = {k: v for k, v in self.store.settings().items() if k.startswith("ldap.")}
            config: LdapConfig | None = None
            try:
                config = LdapConfig.from_settings(settings)
            except ConfigError as exc:
                state = f"invalid: {exc}"
                if state != self._ldap_state:
                    log.error("LDAP configuration %s; LDAP logins are refused until fixed", state)
            else:
                state = repr(config)
                if state != self._ldap_state and config is not None:
                    roles = ", ".join(f"{group}={role}" for group, role in config.roles)
                    log.info(
                        "LDAP logins: directory %s, organisation %s, roles %s",
                        config.url,
                        config.org,
                        roles or "none (every login is refused)",
                    )
                elif state != self._ldap_state and self._ldap_state:
                    log.info("LDAP logins: off")
            self._ldap_config, self._ldap_state = config, state
            self._ldap_expires = now + LDAP_CONFIG_SECONDS
            return config

    def log_login_failure(self, name: str, source: str) -> None:
        log.warning("login failed for %r from %s", name[:64], source)

    def audit(
        self,
        kind: str,
        actor: str,
        *,
        device: str | None = None,
        source: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Append to the audit log (in a worker thread; the order is the commit order)."""
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(
                self.store.audit, kind, actor, device=device, source=source, details=details
            )
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        self.track(task)

    def record_channel(self, record: ChannelRecord) -> None:
        """Log a finished channel: written with others at most ``CHANNEL_LOG_DELAY`` later."""
        if record.org is None:
            cached = self._device_cache.get(record.device)
            if cached is not None and cached[0] is not None:
                record = dataclasses.replace(record, org=cached[0][0])
        self._channel_log.append(record)
        if len(self._channel_log) >= CHANNEL_LOG_BATCH:
            self._flush_channel_log()
        elif self._channel_log_timer is None:
            self._channel_log_timer = asyncio.get_running_loop().call_later(
                CHANNEL_LOG_DELAY, self._flush_channel_log
            )

    def _flush_channel_log(self) -> None:
        """Write what waits, unless a write is under way: then its end writes the rest.
        One write at a time, so a slow database makes batches larger, not writes more."""
        if self._channel_log_timer is not None:
            self._channel_log_timer.cancel()
            self._channel_log_timer = None
        if self._channel_log_write is not None or not self._channel_log:
            return
        batch, self._channel_log = self._channel_log, []
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.store.record_channels, batch)
        )
        self._channel_log_write = task
        self._writes.add(task)
        task.add_done_callback(self._channel_log_written)
        self.track(task)

    def _channel_log_written(self, task: asyncio.Task[Any]) -> None:
        self._writes.discard(task)
        self._channel_log_write = None
        if not task.cancelled() and task.exception() is not None:
            log.error("writing finished channels to the database failed: %s", task.exception())
        if self._channel_log:
            self._flush_channel_log()


def _remember_sni(ssl_object: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    """Keep the TLS server name: a device's web UI is served only when it agrees with
    the Host header."""
    try:
        ssl_object.hatchway_sni = server_name
    except AttributeError:
        pass


async def run_relay(config: RelayConfig, out: Any = sys.stdout) -> None:
    """Run until SIGINT/SIGTERM; SIGHUP reloads the TLS certificate."""
    server = RelayServer(config)
    password = server.bootstrap()
    await server.start()
    log.debug("%d objects of the start frozen", allocator.freeze_startup())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    print(f"hatchway relay {__version__} listening on {config.host}:{server.port}", file=out)
    print(f"relay URL: {server.url}", file=out)
    if server.ca_file is not None:
        print(f"CA certificate: {server.ca_file}", file=out)
        print(f"CA fingerprint (SHA-256): {certificate_fingerprint(server.ca_file)}", file=out)
    if password is not None:
        print("", file=out)
        print("First start: created the administrator account. This is shown only once:", file=out)
        print("  user:     admin", file=out)
        print(f"  password: {password}", file=out)
        ca = f" --ca-file {server.ca_file}" if server.ca_file else ""
        print(f"  log in:   hatchway login {server.url} --user admin{ca}", file=out)
        print("  It opens no session: the first login asks for a new password.", file=out)
    out.flush()
    log.info("relay started at %s", datetime.now(UTC).isoformat(timespec="seconds"))
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()
