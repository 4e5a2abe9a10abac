"""Who is calling: the bearer token or the relay's session cookie, turned into a
``Caller`` that answers what the caller may administer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from hatchway.auth.permissions import ROLE_PERMISSIONS, Access
from hatchway.relay.api.core import UNAUTHORIZED, ApiError
from hatchway.store.base import UserRecord
from hatchway.web.ui import relay_session

if TYPE_CHECKING:
    from hatchway.relay.server import RelayServer

#: What a caller learns about anything outside their reach: the same as "not there".
NOT_FOUND = "not_found"


def relay(request: Request) -> RelayServer:
    server: RelayServer = request.app.state.server
    return server


Relay = Annotated["RelayServer", Depends(relay)]


@dataclass(frozen=True)
class Caller:
    """An authenticated user, what they authenticated with, and their access."""

    user: UserRecord
    access: Access
    secret: str  # the token or session secret: web sessions made from it die with it
    via: str  # "token" or "session"
    source: str
    #: What the credential may be used for: a token's scopes; a relay session (a
    #: logged-in browser) holds ``all``, every scope its user has.
    scopes: tuple[str, ...] = ("all",)

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def superadmin(self) -> bool:
        return self.access.superadmin

    def org_permissions(self) -> frozenset[str]:
        """What the caller may do organisation-wide (grants add per device only)."""
        if self.access.superadmin:
            return ROLE_PERMISSIONS["owner"]
        return ROLE_PERMISSIONS.get(self.access.role, frozenset())

    def holds_scopes(self, scopes: Iterable[str]) -> bool:
        """Whether the caller's credential holds every one of ``scopes`` (a token may only
        make tokens with scopes it has itself)."""
        return "all" in self.scopes or set(scopes) <= set(self.scopes)

    def require(self, permission: str) -> None:
        if permission not in self.org_permissions():
            raise ApiError(403, "not_permitted", f"this needs the {permission} permission")

    def org(self, requested: str | None) -> str:
        """The organisation an administrative call acts in: the caller's own; another
        only for a super-admin."""
        if requested is None or requested == self.access.org:
            return self.access.org
        if not self.superadmin:
            raise ApiError(404, NOT_FOUND, f"no organisation {requested}")
        return requested

    def may_hand_out(self, permissions: frozenset[str]) -> bool:
        """Nobody gives what they do not have (no privilege escalation)."""
        have = self.org_permissions()
        return self.superadmin or all(
            p in have or (p.startswith("connect:") and "connect:*" in have) for p in permissions
        )

    def hand_out(self, permissions: frozenset[str]) -> None:
        if not self.may_hand_out(permissions):
            raise ApiError(
                403, "not_permitted", "you cannot give permissions you do not have yourself"
            )


def _origin_ok(request: Request) -> bool:
    origin, host = request.headers.get("origin"), request.headers.get("host")
    return bool(origin and host and origin == f"https://{host}")


async def authenticate(request: Request, scope: str) -> Caller:
    server = relay(request)
    source = request.client.host if request.client else "-"
    header = request.headers.get("authorization")
    scopes: tuple[str, ...] = ("all",)
    if header is not None:
        user, scopes = await server.authenticate_token(header, scope)
        secret, via = header[7:].strip(), "token"
    else:
        # The relay's own pages (a browser with the session cookie). Changes must come
        # from the relay's origin: a cookie alone is no proof of intent (CSRF).
        session = await relay_session(server, request.headers.get("cookie"))
        if session is None:
            raise UNAUTHORIZED
        if request.method not in ("GET", "HEAD") and not _origin_ok(request):
            raise ApiError(403, "cross_site", "cross-site request refused")
        secret, via, user = session[0], "session", session[1].user
    access = await asyncio.to_thread(server.store.access, user.name)
    if access is None:
        raise UNAUTHORIZED
    return Caller(user, access, secret, via, source, scopes)


def caller(scope: str) -> Callable[[Request], Awaitable[Caller]]:
    """A dependency: the authenticated caller, whose token has ``scope``."""

    async def dependency(request: Request) -> Caller:
        return await authenticate(request, scope)

    dependency.__name__ = f"caller_{scope}"
    return dependency


Reader = Annotated[Caller, Depends(caller("read"))]
Admin = Annotated[Caller, Depends(caller("admin"))]
TokenOwner = Annotated[Caller, Depends(caller("tokens"))]
WebUser = Annotated[Caller, Depends(caller("web"))]


async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A store call, in a worker thread (the store is synchronous)."""
    return await asyncio.to_thread(fn, *args, **kwargs)
