"""The caller's own business: health, login and logout, identity, password, API tokens,
and one-time links into device web UIs."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from hatchway import __version__
from hatchway.auth.throttle import source_key
from hatchway.errors import AuthenticationError, ConfigError
from hatchway.relay.api import models as m
from hatchway.relay.api.core import TOKEN_TTL, ApiError, check_password
from hatchway.relay.api.deps import Reader, Relay, TokenOwner, WebUser, run
from hatchway.store.base import TokenRecord

router = APIRouter(tags=["session"])


PUBLIC: dict[str, Any] = {"security": []}  # no authentication (the OpenAPI document says so)


@router.get("/health", summary="Is the relay up", openapi_extra=PUBLIC)
async def health() -> m.Health:
    return m.Health(status="ok", version=__version__)


@router.post(
    "/login",
    openapi_extra=PUBLIC,
    summary="Log in with a password: returns an API token",
    description="Throttled per source address; 10 wrong passwords lock the account for "
    "10 minutes (a locked account answers like a wrong password). `otp_required`: send "
    "`otp` too. `password_change_required`: send `new_password` too. The token lasts "
    "30 days, a directory (LDAP) user's `ldap.token_hours` (12 by default).",
)
async def login(body: m.LoginRequest, server: Relay, request: Request) -> m.LoginResponse:
    source = request.client.host if request.client else "-"
    user = await check_password(
        server, body.user, body.password, source, "api", body.otp, body.new_password
    )
    if user is None:
        raise ApiError(401, "invalid_credentials", "wrong user name or password")
    ttl = await run(server.token_ttl, user, TOKEN_TTL)
    token = await run(server.store.create_token, user.name, body.label, ttl)
    return m.LoginResponse(
        token=token, user=user.name, role=user.role, expires_in=int(ttl.total_seconds())
    )


@router.post("/logout", summary="Revoke the token (or session) this request carries")
async def logout(caller: Reader, server: Relay) -> m.Done:
    if caller.via == "session":
        await server.web.revoke(caller.secret)
    else:
        await run(server.store.revoke_token_secret, caller.secret, actor=caller.name)
        server.forget_tokens()
    server.audit("logout", caller.name, source=caller.source, details={"via": caller.via})
    return m.Done()


@router.get("/whoami", summary="Who the token belongs to, and what they may do")
async def whoami(caller: Reader) -> m.WhoAmI:
    return m.WhoAmI(
        user=caller.name,
        role=caller.user.role,
        org=caller.access.org,
        superadmin=caller.superadmin,
        permissions=sorted(caller.org_permissions()),
    )


@router.post(
    "/password",
    summary="Change your own password",
    description="Needs the current password: a wrong one counts towards the account's "
    "lockout and the address's throttle like a failed login (and is audited as one), and "
    "a locked account is refused whatever it sends. Your other API tokens and web "
    "sessions end; the token or session this request carries stays, with the device "
    "sessions made from it.",
)
async def change_password(body: m.PasswordChange, caller: TokenOwner, server: Relay) -> m.Done:
    # Counted like a login (api/core.py): by source (an address, an IPv6 /64), with the
    # attempts still being checked.
    key, throttle = source_key(caller.source), server.login_throttle
    wait = throttle.reserve(key)
    if wait:
        raise ApiError(429, "too_many_attempts", f"too many failed attempts: wait {wait} s", wait)
    try:
        await run(
            server.store.set_password, caller.name, body.new_password, actor=caller.name,
            current=body.password, keep=caller.secret,
        )  # fmt: skip
    except AuthenticationError:
        throttle.failed(key, reserved=True)
        server.log_login_failure(caller.name, caller.source)
        server.audit("login_failed", caller.name, source=caller.source, details={"via": "password"})
        raise ApiError(403, "wrong_password", "the current password is wrong") from None
    except ConfigError as exc:
        throttle.release(key)
        raise ApiError(400, "weak_password", str(exc)) from None
    except BaseException:
        throttle.release(key)
        raise
    throttle.release(key)
    await server.sessions_ended()
    return m.Done()


TOKEN_MAX_DAYS = 365


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def token_info(token: TokenRecord) -> m.TokenInfo:
    return m.TokenInfo(
        id=token.id,
        name=token.label,
        scopes=list(token.scopes),
        created_at=_when(token.created_at),
        expires_at=_when(token.expires_at),
        last_used_at=_when(token.last_used_at),
    )


@router.get("/tokens", summary="Your API tokens (never the tokens themselves)")
async def list_tokens(caller: TokenOwner, server: Relay) -> m.TokenList:
    tokens = await run(server.store.list_tokens, caller.name)
    return m.TokenList(tokens=[token_info(t) for t in tokens])


@router.post(
    "/tokens",
    summary="Create a named, scoped, expiring token (shown once)",
    description="A token creates only tokens with scopes it has itself (`all` only from "
    "an `all` token; a logged-in browser's session counts as `all`): "
    "`insufficient_scope` otherwise. A directory (LDAP) user's token lasts at most "
    "`ldap.token_hours` (12 by default), whatever `expires_in_days` asks: see "
    "`expires_at`.",
)
async def create_token(body: m.TokenCreate, caller: TokenOwner, server: Relay) -> m.TokenCreated:
    if not caller.holds_scopes(body.scopes):
        raise ApiError(
            403,
            "insufficient_scope",
            "a token can only create tokens with scopes it has itself "
            f"(its scopes: {' '.join(caller.scopes)})",
        )
    ttl = await run(server.token_ttl, caller.user, timedelta(days=body.expires_in_days))
    try:
        token = await run(
            server.store.create_token, caller.name, body.name, ttl, tuple(body.scopes)
        )
    except ConfigError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    created = (await run(server.store.list_tokens, caller.name))[-1]
    return m.TokenCreated(token=token, **token_info(created).model_dump())


@router.delete("/tokens/{token_id}", summary="Revoke one of your tokens")
async def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=m.MAX_ID)], caller: TokenOwner, server: Relay
) -> m.Revoked:
    if not await run(server.store.revoke_token, caller.name, token_id):
        raise ApiError(404, "not_found", f"you have no token {token_id}")
    await server.sessions_ended()  # and the device sessions made with it
    return m.Revoked(revoked=token_id)


@router.post(
    "/web-sessions",
    summary="A one-time URL that opens a device's web UI logged in",
    description="Valid for 60 s, once. `curl -L -c jar -b jar URL` follows it.",
)
async def web_session(
    body: m.WebSessionRequest, caller: WebUser, server: Relay, request: Request
) -> m.WebSessionResponse:
    from hatchway.web.access import GRANT_TTL
    from hatchway.web.ui import grant_url

    url = await grant_url(
        server, caller.user, body.device, body.service, body.next, caller.secret,
        request.headers.get("host") or "",
    )  # fmt: skip
    return m.WebSessionResponse(url=url, expires_in=int(GRANT_TTL.total_seconds()))
