"""The relay's own pages on its bare domain: log in, list devices, open one, log out.

``/open/DEVICE`` is where every way into a device's web UI goes through: it makes a
one-time grant and redirects the browser to ``https://DEVICE.DOMAIN/__hatchway/auth``,
where the proxy exchanges it for the device's own host-only cookie. State-changing
requests (POST) must come from the relay's own origin (``Origin`` checked): device
pages are same-site with the relay, so SameSite cookies alone would not stop them.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import TYPE_CHECKING

from hatchway.auth.device import DEVICE_ID_RE
from hatchway.relay import api
from hatchway.store.base import UserRecord, WebSessionRecord
from hatchway.web.access import (
    AUTH_PATH,
    GRANT_TTL,
    RELAY_COOKIE,
    RELAY_SESSION_TTL,
    cookie_values,
    safe_next,
)
from hatchway.web.pages import devices_page, error_page, http_response, login_page

if TYPE_CHECKING:
    from hatchway.relay.frontdoor import HttpRequest
    from hatchway.relay.server import RelayServer

log = logging.getLogger("hatchway.relay.ui")

UI_PATHS = ("/", "/login", "/logout")
OPEN_PREFIX = "/open/"


def is_ui_path(path: str) -> bool:
    return path in UI_PATHS or path.startswith(OPEN_PREFIX)


def _redirect(location: str, cookie: str | None = None) -> bytes:
    headers = [("Location", location)]
    if cookie is not None:
        headers.append(("Set-Cookie", cookie))
    return http_response(303, b"", headers=headers)


def _page(status: int, title: str, message: str) -> bytes:
    return http_response(status, error_page(status, title, message))


async def relay_session(
    server: RelayServer, cookie_header: str | None
) -> tuple[str, WebSessionRecord] | None:
    """The live relay session named by a ``Cookie`` header (its secret and record)."""
    for secret in cookie_values(cookie_header, RELAY_COOKIE)[:4]:
        known, record = server.web.cached(secret, "relay")
        if not known:
            record = await server.web.load(secret, "relay")
        if record is not None and record.kind == "relay":
            server.web.used(record.session_id)
            return secret, record
    return None


def _same_origin(request: HttpRequest) -> bool:
    origin = request.header("origin")
    host = request.header("host")
    return bool(origin and host and origin == f"https://{host}")


async def handle(
    server: RelayServer, method: str, path: str, query: str, request: HttpRequest, source: str
) -> bytes:
    session = await relay_session(server, request.header("cookie"))
    if path == "/":
        if method not in ("GET", "HEAD"):
            return _page(405, "Method not allowed", "Use GET.")
        if session is None:
            return _redirect("/login")
        user = session[1].user
        devices, _ = await asyncio.to_thread(server.visible_devices, user, None, 500)
        return http_response(200, devices_page(user.name, devices), head_only=method == "HEAD")
    if path == "/login":
        params = urllib.parse.parse_qs(query)
        if method == "GET":
            next_path = safe_next((params.get("next") or ["/"])[0])
            return http_response(200, login_page(next_path))
        if method != "POST":
            return _page(405, "Method not allowed", "Use GET or POST.")
        return await _login(server, request, source)
    if path == "/logout":
        if method != "POST":
            return _page(405, "Method not allowed", "Use POST.")
        if not _same_origin(request):
            return _page(403, "Not permitted", "Cross-site request refused.")
        if session is not None:
            await server.web.revoke(session[0])
            log.info("user %s logged out of the web UI", session[1].user.name)
            server.audit("logout", session[1].user.name, source=source, details={"via": "web"})
        return _redirect("/login", f"{RELAY_COOKIE}=; Path=/; Secure; HttpOnly; Max-Age=0")
    assert path.startswith(OPEN_PREFIX)
    if method not in ("GET", "HEAD"):
        return _page(405, "Method not allowed", "Use GET.")
    if session is None:
        here = path + (f"?{query}" if query else "")
        return _redirect("/login?" + urllib.parse.urlencode({"next": here}))
    secret, record = session
    params = urllib.parse.parse_qs(query)
    device = path[len(OPEN_PREFIX) :]
    try:
        url = await grant_url(
            server,
            record.user,
            device,
            (params.get("service") or [""])[0] or None,
            (params.get("next") or ["/"])[0],
            secret,
            request.header("host") or "",
        )
    except api.ApiError as exc:
        return _page(exc.status, "Cannot open the device", exc.message)
    return http_response(303, b"", headers=[("Location", url)])


async def grant_url(
    server: RelayServer,
    user: UserRecord,
    device: str,
    service: str | None,
    next_path: str,
    parent: str,
    host_header: str,
) -> str:
    """A one-time link that logs ``user`` in to ``device``'s web UI."""
    if not DEVICE_ID_RE.fullmatch(device):
        raise api.ApiError(404, "not_found", f"no device {device} you may reach")
    if service is None:
        service = server.default_web_service(device)
    if not server.permits(user, device, service):
        raise api.ApiError(404, "not_found", f"no device {device} you may reach")
    if not service or len(service) > 32 or not service.replace("-", "").isalnum():
        raise api.ApiError(400, "bad_request", "invalid service name")
    grant = await asyncio.to_thread(
        server.store.create_web_session,
        user.name,
        "grant",
        GRANT_TTL,
        device=device,
        service=service,
        parent=parent,
    )
    query = urllib.parse.urlencode({"grant": grant, "next": safe_next(next_path)})
    return f"{server.web.device_origin(device, host_header)}{AUTH_PATH}?{query}"


async def _login(server: RelayServer, request: HttpRequest, source: str) -> bytes:
    if not _same_origin(request):
        return _page(403, "Not permitted", "Cross-site request refused.")
    form = urllib.parse.parse_qs(bytes(request.body).decode("utf-8", "replace"))
    name = (form.get("user") or [""])[0]
    password = (form.get("password") or [""])[0]
    next_path = safe_next((form.get("next") or ["/"])[0])
    otp = (form.get("otp") or [""])[0] or None
    new_password = (form.get("new_password") or [""])[0] or None
    if new_password is not None and new_password != (form.get("new_password2") or [""])[0]:
        return http_response(400, login_page(next_path, "The new passwords differ.", change=True))
    try:
        user = await api.check_password(server, name, password, source, "web", otp, new_password)
    except api.ApiError as exc:
        change = exc.code in ("password_change_required", "weak_password")
        return http_response(exc.status, login_page(next_path, exc.message + ".", change=change))
    if user is None:
        return http_response(401, login_page(next_path, "Wrong user name or password."))
    secret = await asyncio.to_thread(
        server.store.create_web_session, user.name, "relay", RELAY_SESSION_TTL
    )
    log.info("user %s logged in to the web UI from %s", user.name, source)
    max_age = int(RELAY_SESSION_TTL.total_seconds())
    cookie = f"{RELAY_COOKIE}={secret}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age}"
    return _redirect(next_path, cookie)
