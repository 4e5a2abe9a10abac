"""The relay's JSON API (version 1): login, device list, health.

The full REST API with its OpenAPI document comes with accounts and roles; this is
the part the CLI needs today. Every error body is ``{"error": CODE, "message": TEXT}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from hatchway import __version__
from hatchway.errors import ConfigError
from hatchway.store.base import TokenRecord, UserRecord

if TYPE_CHECKING:
    from hatchway.relay.frontdoor import HttpRequest
    from hatchway.relay.server import RelayServer

log = logging.getLogger("hatchway.relay.api")

TOKEN_TTL = timedelta(days=30)
#: Devices per page of ``GET /api/v1/devices`` (``?limit=``, ``?after=ID``).
DEVICE_PAGE = 1000
DEVICE_PAGE_MAX = 5000
#: Logins verified at once (argon2 is deliberately expensive: bound the CPU spent).
LOGIN_CONCURRENCY = 4


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


UNAUTHORIZED = ApiError(401, "unauthorized", "missing, invalid or expired token: log in again")

_login_slots: asyncio.Semaphore | None = None


def _json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise ApiError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


async def handle(
    server: RelayServer, method: str, path: str, query: str, request: HttpRequest, source: str
) -> tuple[int, Any]:
    if path == "/api/v1/health":
        _method(method, "GET")
        return 200, {"status": "ok", "version": __version__}
    if path == "/api/v1/login":
        _method(method, "POST")
        return await _login(server, request, source)
    if path == "/api/v1/devices":
        _method(method, "GET")
        user = await server.authenticate_bearer(request.header("authorization"), "read")
        params = urllib.parse.parse_qs(query)
        limit_text = (params.get("limit") or [str(DEVICE_PAGE)])[0]
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= DEVICE_PAGE_MAX:
            raise ApiError(400, "bad_request", f"limit: 1 to {DEVICE_PAGE_MAX}")
        after = (params.get("after") or [""])[0] or None
        devices, following = await asyncio.to_thread(
            server.visible_devices, user, after, int(limit_text)
        )
        return 200, {"devices": devices, "next": following}
    if path == "/api/v1/whoami":
        _method(method, "GET")
        user = await server.authenticate_bearer(request.header("authorization"), "read")
        return 200, {"user": user.name, "role": user.role}
    if path == "/api/v1/tokens" or path.startswith("/api/v1/tokens/"):
        return await _tokens(server, method, path, request, source)
    if path == "/api/v1/web-sessions":
        _method(method, "POST")
        return await _web_session(server, request)
    raise ApiError(404, "not_found", "no such endpoint")


def _method(actual: str, expected: str) -> None:
    if actual != expected:
        raise ApiError(405, "bad_method", f"use {expected}")


OTP_REQUIRED = ApiError(401, "otp_required", "a one-time code from the authenticator app is needed")


async def check_password(
    server: RelayServer,
    name: str,
    password: str,
    source: str,
    via: str,
    otp: str | None = None,
) -> UserRecord | None:
    """The user, if the password is right (a bounded number of checks run at once).
    Both outcomes go to the audit log."""
    global _login_slots
    wait = server.login_throttle.retry_after(source)
    if wait:
        log.warning("login from %s refused: too many failed logins", source)
        raise ApiError(
            429,
            "too_many_attempts",
            f"too many failed logins from {source}: try again in {wait} s",
        )
    if not name or len(name) > 64 or len(password) > 1024:
        server.login_throttle.failed(source)
        server.log_login_failure(name, source)
        server.audit("login_failed", name[:64] or "-", source=source, details={"via": via})
        return None
    if _login_slots is None:
        _login_slots = asyncio.Semaphore(LOGIN_CONCURRENCY)
    async with _login_slots:
        user: UserRecord | None = await asyncio.to_thread(
            server.store.authenticate_user, name, password
        )
    if user is not None:
        enabled, required = await asyncio.to_thread(server.store.totp_policy, user.name)
        if required and not enabled:
            server.audit(
                "login_failed", user.name, source=source, details={"via": via, "why": "totp"}
            )
            raise ApiError(
                403,
                "totp_setup_required",
                "your organisation requires two-factor login: ask an administrator to set "
                "it up for you (hatchway user totp)",
            )
        if enabled:
            if not otp:
                raise OTP_REQUIRED  # the password was right; not a failure
            if not await asyncio.to_thread(server.store.totp_check, user.name, otp[:16]):
                user = None
    if user is None:
        server.login_throttle.failed(source)
        server.log_login_failure(name, source)
        server.audit("login_failed", name, source=source, details={"via": via})
    else:
        server.audit("login", user.name, source=source, details={"via": via})
    return user


async def _login(server: RelayServer, request: HttpRequest, source: str) -> tuple[int, Any]:
    body = _json_body(request)
    name, password = body.get("user"), body.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise ApiError(400, "bad_request", "user and password are required")
    label = body.get("label")
    if not isinstance(label, str):
        label = "cli"
    otp = body.get("otp")
    if otp is not None and not isinstance(otp, str):
        raise ApiError(400, "bad_request", "otp must be a string")
    user = await check_password(server, name, password, source, "api", otp)
    if user is None:
        raise ApiError(401, "invalid_credentials", "wrong user name or password")
    token = await asyncio.to_thread(server.store.create_token, user.name, label[:64], TOKEN_TTL)
    return 200, {
        "token": token,
        "user": user.name,
        "role": user.role,
        "expires_in": int(TOKEN_TTL.total_seconds()),
    }


async def _web_session(server: RelayServer, request: HttpRequest) -> tuple[int, Any]:
    """A one-time URL that opens a device's web UI logged in (``hatchway open``)."""
    from hatchway.web.access import GRANT_TTL
    from hatchway.web.ui import grant_url

    header = request.header("authorization")
    user = await server.authenticate_bearer(header, "web")
    assert header is not None
    body = _json_body(request)
    device, service, next_path = body.get("device"), body.get("service"), body.get("next", "/")
    if not isinstance(device, str) or not isinstance(next_path, str):
        raise ApiError(400, "bad_request", "device is required")
    if service is not None and not isinstance(service, str):
        raise ApiError(400, "bad_request", "service must be a string")
    url = await grant_url(
        server, user, device, service, next_path, header[7:].strip(), request.header("host") or ""
    )
    return 200, {"url": url, "expires_in": int(GRANT_TTL.total_seconds())}


TOKEN_MAX_DAYS = 365


async def _tokens(
    server: RelayServer, method: str, path: str, request: HttpRequest, source: str
) -> tuple[int, Any]:
    """The user's own API tokens: list, create (shown once), revoke."""
    user = await server.authenticate_bearer(request.header("authorization"), "tokens")
    store = server.store
    if path == "/api/v1/tokens":
        if method == "GET":
            tokens = await asyncio.to_thread(store.list_tokens, user.name)
            return 200, {"tokens": [_token_json(t) for t in tokens]}
        _method(method, "POST")
        body = _json_body(request)
        name, days = body.get("name"), body.get("expires_in_days", 90)
        scopes = body.get("scopes", ["all"])
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ApiError(400, "bad_request", "name (1 to 64 characters) is required")
        if not isinstance(days, int) or isinstance(days, bool) or not 0 < days <= TOKEN_MAX_DAYS:
            raise ApiError(400, "bad_request", f"expires_in_days: 1 to {TOKEN_MAX_DAYS}")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ApiError(400, "bad_request", "scopes must be a list of strings")
        try:
            token = await asyncio.to_thread(
                store.create_token, user.name, name, timedelta(days=days), tuple(scopes)
            )
        except ConfigError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        created = (await asyncio.to_thread(store.list_tokens, user.name))[-1]
        return 200, {"token": token, **_token_json(created)}
    _method(method, "DELETE")
    token_id = path.rsplit("/", 1)[1]
    if not token_id.isdigit() or not await asyncio.to_thread(
        store.revoke_token, user.name, int(token_id)
    ):
        raise ApiError(404, "not_found", f"you have no token {token_id}")
    server.forget_tokens()
    return 200, {"revoked": int(token_id)}


def _token_json(token: TokenRecord) -> dict[str, Any]:
    def when(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat(timespec="seconds")

    return {
        "id": token.id,
        "name": token.label,
        "scopes": list(token.scopes),
        "created_at": when(token.created_at),
        "expires_at": when(token.expires_at),
        "last_used_at": when(token.last_used_at),
    }
