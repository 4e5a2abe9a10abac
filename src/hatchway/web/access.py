"""Who may open which device's web UI: cookies, sessions, grants and revocation.

Three kinds of web session live in the store (``Store.create_web_session``):

- ``relay``: a login to the relay's own pages, cookie ``__Host-hatchway`` (host-only on
  the bare relay domain, so device subdomains never receive it);
- ``grant``: a one-time, 60-second token in a link to a device's subdomain;
- ``device``: what a grant is exchanged for on ``/__hatchway/auth`` at the device's
  subdomain, cookie ``__Host-hatchway-device`` (host-only on that subdomain), bound to
  one user, one device and one service, and derived from the relay session or API token
  that made the grant: logging out of that ends it.

Every proxied request carries its device cookie; the check is a dictionary lookup in a
cache that is refreshed from the store every ``SWEEP_INTERVAL`` seconds for sessions
with open connections, and the same sweep closes connections whose session ended or
whose user lost the device. The relay's cookies and grants never reach a device.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from datetime import timedelta
from typing import TYPE_CHECKING

from hatchway.auth.device import DEVICE_ID_RE
from hatchway.store.base import WebSessionRecord
from hatchway.web import pages
from hatchway.web.cache import ResponseCache

if TYPE_CHECKING:
    from hatchway.relay.server import RelayServer
    from hatchway.web.proxy import WebProxy

log = logging.getLogger("hatchway.relay.web")

RELAY_COOKIE = "__Host-hatchway"
DEVICE_COOKIE = "__Host-hatchway-device"
#: Any cookie whose name starts with one of these (case-insensitively) belongs to the
#: relay: it is stripped from requests to devices and a device cannot set one.
RELAY_COOKIE_PREFIXES = (b"__host-hatchway", b"__secure-hatchway")
#: Path routing (``--web-routing path``): a device under ``https://RELAY/d/DEVICE/``.
PATH_PREFIX = "/d/"
#: Paths under this prefix on a device's subdomain are the relay's, never forwarded.
RESERVED_PREFIX = "/__hatchway/"
AUTH_PATH = "/__hatchway/auth"

GRANT_TTL = timedelta(seconds=60)
DEVICE_SESSION_TTL = timedelta(hours=12)
RELAY_SESSION_TTL = timedelta(hours=12)
#: A session checked against the store is trusted this long.
SESSION_CACHE_SECONDS = 5.0
SESSION_CACHE_SIZE = 50_000
#: Reads of one session in a row while sessions keep ending, before it is refused.
LOAD_ATTEMPTS = 3
#: How often open connections are re-checked (revocation) and timed out.
SWEEP_INTERVAL = 2.0


#: A Host value the relay serves: a DNS name or an IP literal, and a numeric port.
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9.])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)


def valid_host(host: str) -> bool:
    """Whether a Host header value is a name (or address) and an optional port, nothing
    else: it ends up in redirects and in the forwarding fields sent to devices."""
    return _HOST.fullmatch(host) is not None


def split_host(host: str) -> str:
    """The host name of a Host header value or SNI, lower-case, without port or final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


def host_port_suffix(host: str) -> str:
    """``:PORT`` of a Host header value, or empty."""
    host = host.strip()
    tail = host.rsplit("]", 1)[-1]
    if ":" in tail:
        port = tail.rsplit(":", 1)[1]
        if port.isdigit() and port not in ("443", ""):
            return f":{port}"
    return ""


def cookie_values(header: str | None, name: str) -> list[str]:
    """Every value of cookie ``name`` in a Cookie header (a forged duplicate can sit
    beside the real one: the caller tries each)."""
    if not header:
        return []
    out = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name and value:
            out.append(value.strip('"'))
    return out


def path_cookie_name(device: str) -> str:
    """The device session cookie under path routing: one per device on one origin, so
    ``__Secure-`` (``__Host-`` requires ``Path=/``)."""
    return f"__Secure-hatchway-d-{device}"


def strip_relay_cookies(header: bytes) -> bytes:
    """The Cookie header without the relay's cookies (empty if nothing else is left)."""
    lower = header.lower()
    if b"__host-hatchway" not in lower and b"__secure-hatchway" not in lower:
        return header
    kept = [
        part.strip()
        for part in header.split(b";")
        if part.strip() and not part.strip().lower().startswith(RELAY_COOKIE_PREFIXES)
    ]
    return b"; ".join(kept)


def safe_next(path: str | None) -> str:
    """A local path to go on to after a login: never another site."""
    if not path or not path.startswith("/") or path.startswith(("//", "/\\")):
        return "/"
    if any(ord(c) < 0x21 or c in "\\\x7f" for c in path):
        return "/"
    # Non-ASCII (a path with "é", a link made by hand) goes on percent-encoded: it ends
    # up in a Location header.
    return "".join(c if ord(c) < 0x80 else urllib.parse.quote(c) for c in path[:2048])


class WebAccess:
    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.domain = server.config.domain.lower().rstrip(".")
        pages.configure(self.domain)
        # (kind, secret) -> (session or None, trusted until): a secret found as one kind of
        # session is never taken for another (a device session is not a relay login).
        self._cache: dict[tuple[str, str], tuple[WebSessionRecord | None, float]] = {}
        # One lookup in the store per (kind, secret) at a time, whoever asks: a browser
        # (or a benchmark) opening many connections at once with one cookie waits for one
        # query, not one each. Sessions that end bump the generation: a lookup that began
        # before reads the store again.
        self._loading: dict[tuple[str, str], asyncio.Task[WebSessionRecord | None]] = {}
        self._generation = 0
        self.proxies: set[WebProxy] = set()
        self.caches: dict[str, ResponseCache] = {}
        # Sessions used since the last sweep, and when each was last written as used.
        self._used: set[str] = set()
        self._touched: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        # One sweep at a time; one asked for during another runs after it, on fresh
        # data (a logout must not be undone by a sweep that read the store before it).
        self._sweep_lock = asyncio.Lock()

    # --- routing --------------------------------------------------------------------------

    def device_for_host(self, host: str) -> str | None:
        """The device a Host (or SNI) names, or None for the relay itself.

        Raises ``LookupError`` for a name under the relay's domain that cannot be a
        device (several labels): answered like an unknown device.
        """
        name = split_host(host)
        suffix = "." + self.domain
        if not name.endswith(suffix):
            return None
        label = name[: -len(suffix)]
        if not DEVICE_ID_RE.fullmatch(label):
            raise LookupError(name)
        return label

    @property
    def path_routing(self) -> bool:
        return self.server.config.web_routing in ("path", "both")

    @property
    def host_routing(self) -> bool:
        return self.server.config.web_routing in ("host", "both")

    def device_for_path(self, path: str) -> tuple[str, str] | None:
        """Path routing: (device, prefix) for ``/d/DEVICE[/...]``; LookupError for a
        name that cannot be a device."""
        if not self.path_routing or not path.startswith(PATH_PREFIX):
            return None
        device = path[len(PATH_PREFIX) :].split("/", 1)[0]
        if not DEVICE_ID_RE.fullmatch(device):
            raise LookupError(device)
        return device, PATH_PREFIX + device

    def device_origin(self, device: str, host_header: str) -> str:
        """Where a device's web UI lives, as the browser sees the relay:
        ``https://DEVICE.DOMAIN[:PORT]``, or ``https://DOMAIN[:PORT]/d/DEVICE`` when
        only path routing is on."""
        port = host_port_suffix(host_header)
        if not self.host_routing:
            return f"https://{self.domain}{port}{PATH_PREFIX}{device}"
        return f"https://{device}.{self.domain}{port}"

    def cache_for(self, device: str) -> ResponseCache | None:
        """The device's cache of static resources, if the relay keeps one."""
        size = self.server.config.web_cache_size
        if not size:
            return None
        cache = self.caches.get(device)
        if cache is None:
            if len(self.caches) >= 10_000:
                self.caches.pop(next(iter(self.caches)))
            cache = self.caches[device] = ResponseCache(size)
        return cache

    # --- sessions -------------------------------------------------------------------------

    def cached(self, secret: str, kind: str) -> tuple[bool, WebSessionRecord | None]:
        """(known, session of this kind): a cache hit answers without touching the
        store."""
        hit = self._cache.get((kind, secret))
        if hit is not None and hit[1] > time.monotonic():
            return True, hit[0]
        return False, None

    async def load(self, secret: str, kind: str) -> WebSessionRecord | None:
        """The session from the store (and into the cache); callers asking for the same
        one while it is being read share that read."""
        if len(secret) > 128:
            return None
        key = (kind, secret)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key))
            self._loading[key] = task
            task.add_done_callback(lambda done: self._loaded(key, done))
            self.server.track(task)
        # A caller that gives up (its connection closed) leaves the read to the others.
        return await asyncio.shield(task)

    async def _load(self, key: tuple[str, str]) -> WebSessionRecord | None:
        kind, secret = key
        for _ in range(LOAD_ATTEMPTS):
            generation = self._generation
            record = await asyncio.to_thread(self.server.store.web_session, secret, kind)
            if generation == self._generation:
                if len(self._cache) >= SESSION_CACHE_SIZE:
                    self._cache.clear()
                self._cache[key] = (record, time.monotonic() + SESSION_CACHE_SECONDS)
                return record
        return None  # sessions kept ending while it read: trust none of it

    def _loaded(self, key: tuple[str, str], task: asyncio.Task[WebSessionRecord | None]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have given up

    def used(self, session_id: str) -> None:
        """A session was used (a request, WebSocket traffic, a relay page)."""
        self._used.add(session_id)

    async def _touch(self, now: float) -> None:
        """Write which sessions were used (each at most every ``touch_interval``)."""
        idle = self.server.store.session_idle
        interval = min(60.0, idle.total_seconds() / 4) if idle else 60.0
        for proxy in self.proxies:
            if proxy.active and proxy.session is not None:
                proxy.active = False
                self._used.add(proxy.session.session_id)
        due = [s for s in self._used if now - self._touched.get(s, -1e9) >= interval]
        self._used.clear()
        if not due:
            return
        if len(self._touched) > SESSION_CACHE_SIZE:
            self._touched.clear()
        for session_id in due:
            self._touched[session_id] = now
        await asyncio.to_thread(self.server.store.touch_web_sessions, due)

    async def revoke(self, secret: str) -> None:
        """Log out: end the session and those derived from it, and close their
        connections now."""
        await asyncio.to_thread(self.server.store.revoke_web_session, secret)
        await self.sessions_ended()

    async def sessions_ended(self) -> None:
        """Sessions ended in the store (a logout, tokens revoked, a password set): trust
        no cached check (derived sessions are cached under their own secrets) and close
        their connections now."""
        self._generation += 1
        self._cache.clear()
        await self.sweep()

    # --- open connections -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sweep_loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for proxy in list(self.proxies):
            proxy.abort("relay shutting down")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except Exception:  # keep sweeping whatever one round hit
                log.exception("web session sweep failed")

    async def sweep(self) -> None:
        """Time out idle connections; close those whose session ended or whose user may
        no longer reach the device; refresh the cache for the live ones."""
        async with self._sweep_lock:
            await self._sweep()

    async def _sweep(self) -> None:
        now = time.monotonic()
        for proxy in list(self.proxies):
            proxy.check_timeouts(now)
        await self._touch(now)
        by_secret: dict[str, list[WebProxy]] = {}
        for proxy in self.proxies:
            if proxy.session_secret is not None:
                by_secret.setdefault(proxy.session_secret, []).append(proxy)
        if not by_secret:
            return
        ids = {secret: rec.session_id for secret, rec in self._session_records(by_secret)}
        live = await asyncio.to_thread(
            self.server.store.live_web_sessions, sorted(set(ids.values()))
        )
        until = time.monotonic() + SESSION_CACHE_SECONDS
        for secret, proxies in by_secret.items():
            record = live.get(ids.get(secret, ""))
            if (
                record is None
                or record.device is None
                or not self.server.permits(record.user, record.device, record.service or "http")
            ):
                self._cache["device", secret] = (None, until)
                for proxy in proxies:
                    proxy.revoked()
            else:
                self._cache["device", secret] = (record, until)

    def _session_records(
        self, by_secret: dict[str, list[WebProxy]]
    ) -> list[tuple[str, WebSessionRecord]]:
        out = []
        for secret, proxies in by_secret.items():
            record = proxies[0].session
            if record is not None:
                out.append((secret, record))
        return out
