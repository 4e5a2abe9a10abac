"""Users, teams, custom roles and grants, within the caller's organisation.

The rules, beyond "needs users.manage": nothing of another organisation is visible
(a super-admin excepted), and nobody hands out, or takes over an account holding,
permissions they do not have themselves.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from hatchway.auth.permissions import ROLE_PERMISSIONS
from hatchway.relay.api import models as m
from hatchway.relay.api.core import ApiError
from hatchway.relay.api.deps import Admin, Caller, Reader, Relay, run
from hatchway.relay.server import RelayServer
from hatchway.store.audit import format_time
from hatchway.store.base import UserRecord

router = APIRouter()

USER_PAGE = 500
UserName = Annotated[str, Path(pattern=m.USER_NAME)]
Name = Annotated[str, Path(pattern=m.NAME)]
OrgQuery = Annotated[str | None, Query(pattern=m.NAME, description="super-admins only")]


def _user_json(user: UserRecord, locked_until: str | None = None) -> m.User:
    return m.User(
        name=user.name,
        role=user.role,
        org=user.org,
        superadmin=user.superadmin,
        source=user.source,
        must_change_password=user.must_change_password,
        created_at=format_time(user.created_at),
        locked_until=locked_until,
    )


async def _target(server: RelayServer, caller: Caller, name: str) -> UserRecord:
    """A user the caller may manage: same organisation, no more powerful than them."""
    caller.require("users.manage")
    user = await run(server.store.get_user, name)
    if user is None or (user.org != caller.access.org and not caller.superadmin):
        raise ApiError(404, "not_found", f"no user {name}")
    if user.superadmin and not caller.superadmin:
        raise ApiError(403, "not_permitted", f"{name} is a super-admin")
    caller.hand_out(ROLE_PERMISSIONS.get(user.role, frozenset()))
    found: UserRecord = user
    return found


def _not_yourself(caller: Caller, name: str) -> None:
    if name == caller.name:
        raise ApiError(
            403, "yourself", "not on your own account (change your password with /password)"
        )


@router.get("/users", tags=["users"], summary="The organisation's users, a page at a time")
async def list_users(
    caller: Admin,
    server: Relay,
    org: OrgQuery = None,
    limit: Annotated[int, Query(ge=1, le=USER_PAGE)] = USER_PAGE,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> m.UserList:
    caller.require("users.manage")
    users = await run(server.store.list_users, caller.org(org), after=after, limit=limit + 1)
    following = users[limit - 1].name if len(users) > limit else None
    return m.UserList(users=[_user_json(u) for u in users[:limit]], next=following)


@router.post("/users", tags=["users"], summary="Create a user (the password policy applies)")
async def add_user(body: m.UserCreate, caller: Admin, server: Relay) -> m.User:
    caller.require("users.manage")
    org = caller.org(body.org)
    if body.superadmin and not caller.superadmin:
        raise ApiError(403, "not_permitted", "only a super-admin makes super-admins")
    caller.hand_out(ROLE_PERMISSIONS[body.role])
    user = await run(
        server.store.add_user, body.name, body.role, body.password, actor=caller.name,
        org=org, superadmin=body.superadmin, must_change_password=body.must_change_password,
    )  # fmt: skip
    return _user_json(user)


@router.get("/users/{name}", tags=["users"], summary="One user")
async def get_user(name: UserName, caller: Admin, server: Relay) -> m.User:
    caller.require("users.manage")
    user = await run(server.store.get_user, name)
    if user is None or (user.org != caller.access.org and not caller.superadmin):
        raise ApiError(404, "not_found", f"no user {name}")
    locked = await run(server.store.locked_until, name)
    return _user_json(user, None if locked is None else format_time(locked))


@router.patch(
    "/users/{name}",
    tags=["users"],
    summary="Change a user's organisation-wide role or reset their password",
    description="A password reset ends every API token and web session of the user.",
)
async def update_user(name: UserName, body: m.UserUpdate, caller: Admin, server: Relay) -> m.User:
    _not_yourself(caller, name)
    await _target(server, caller, name)
    if body.role is not None:
        caller.hand_out(ROLE_PERMISSIONS[body.role])
        await run(server.store.set_user_role, name, body.role, actor=caller.name)
    if body.password is not None:
        await run(server.store.set_password, name, body.password, actor=caller.name)
        await server.sessions_ended()
    server.forget_access()
    user = await run(server.store.get_user, name)
    if user is None:
        raise ApiError(404, "not_found", f"no user {name}")
    return _user_json(user)


@router.delete(
    "/users/{name}",
    tags=["users"],
    summary="Remove a user: their tokens and sessions end, their open tunnels close",
)
async def remove_user(name: UserName, caller: Admin, server: Relay) -> m.Done:
    _not_yourself(caller, name)
    await _target(server, caller, name)
    await run(server.store.remove_user, name, actor=caller.name)
    server.forget_access()
    await server.sessions_ended()
    return m.Done()


@router.post("/users/{name}/unlock", tags=["users"], summary="End a lockout now")
async def unlock_user(name: UserName, caller: Admin, server: Relay) -> m.Done:
    await _target(server, caller, name)
    await run(server.store.unlock, name, actor=caller.name)
    return m.Done()


@router.delete(
    "/users/{name}/tokens",
    tags=["users"],
    summary="Revoke every API token of a user and end their web sessions",
    description="`revoked` counts the tokens. The user's relay (browser) sessions and "
    "device web sessions end too, and their open connections close.",
)
async def revoke_user_tokens(name: UserName, caller: Admin, server: Relay) -> m.Revoked:
    _not_yourself(caller, name)
    await _target(server, caller, name)
    count = await run(server.store.revoke_tokens, name, actor=caller.name)
    await server.sessions_ended()
    return m.Revoked(revoked=count)


# --- teams ----------------------------------------------------------------------------------


@router.get("/teams", tags=["teams"], summary="The organisation's teams and their members")
async def list_teams(caller: Admin, server: Relay, org: OrgQuery = None) -> m.TeamList:
    caller.require("users.manage")
    teams = await run(server.store.list_teams, caller.org(org))
    return m.TeamList(teams=[m.Team(org=o, name=n, members=members) for o, n, members in teams])


@router.post("/teams", tags=["teams"], summary="Create a team")
async def add_team(body: m.TeamCreate, caller: Admin, server: Relay) -> m.Team:
    caller.require("users.manage")
    org = caller.org(body.org)
    await run(server.store.add_team, body.name, org=org, actor=caller.name)
    return m.Team(name=body.name, org=org, members=[])


@router.delete("/teams/{team}", tags=["teams"], summary="Remove a team and its grants")
async def remove_team(team: Name, caller: Admin, server: Relay, org: OrgQuery = None) -> m.Done:
    caller.require("users.manage")
    await run(server.store.remove_team, team, org=caller.org(org), actor=caller.name)
    server.forget_access()
    return m.Done()


async def _membership(
    server: RelayServer, caller: Caller, team: str, user: str, member: bool
) -> m.Done:
    target = await _target(server, caller, user)
    await run(server.store.set_team_member, team, target.name, member, actor=caller.name)
    server.forget_access()
    return m.Done()


@router.put("/teams/{team}/members/{user}", tags=["teams"], summary="Add a user to a team")
async def join_team(team: Name, user: UserName, caller: Admin, server: Relay) -> m.Done:
    return await _membership(server, caller, team, user, True)


@router.delete("/teams/{team}/members/{user}", tags=["teams"], summary="Remove a user from a team")
async def leave_team(team: Name, user: UserName, caller: Admin, server: Relay) -> m.Done:
    return await _membership(server, caller, team, user, False)


# --- roles ----------------------------------------------------------------------------------


@router.get("/roles", tags=["roles"], summary="Built-in roles and the organisation's own")
async def list_roles(caller: Reader, server: Relay, org: OrgQuery = None) -> m.RoleList:
    custom = await run(server.store.list_roles, caller.org(org))
    roles = [m.RoleInfo(name=n, permissions=sorted(p), builtin=True)
             for n, p in ROLE_PERMISSIONS.items()]  # fmt: skip
    roles += [m.RoleInfo(name=n, permissions=sorted(p), builtin=False)
              for n, p in sorted(custom.items())]  # fmt: skip
    return m.RoleList(roles=roles)


@router.post("/roles", tags=["roles"], summary="Create a custom role from permissions")
async def add_role(body: m.RoleCreate, caller: Admin, server: Relay) -> m.RoleInfo:
    caller.require("users.manage")
    org = caller.org(body.org)
    caller.hand_out(frozenset(body.permissions))
    await run(server.store.add_role, body.name, tuple(body.permissions), org=org, actor=caller.name)
    server.forget_access()  # cached accesses hold the organisation's custom roles
    return m.RoleInfo(name=body.name, permissions=sorted(set(body.permissions)), builtin=False)


@router.delete("/roles/{role}", tags=["roles"], summary="Remove a custom role and the grants of it")
async def remove_role(role: Name, caller: Admin, server: Relay, org: OrgQuery = None) -> m.Done:
    caller.require("users.manage")
    await run(server.store.remove_role, role, org=caller.org(org), actor=caller.name)
    server.forget_access()
    return m.Done()


# --- grants ---------------------------------------------------------------------------------

GRANT_PAGE = 1000


@router.get("/grants", tags=["grants"], summary="The organisation's grants, a page at a time")
async def list_grants(
    caller: Admin,
    server: Relay,
    org: OrgQuery = None,
    user: Annotated[str | None, Query(pattern=m.USER_NAME)] = None,
    limit: Annotated[int, Query(ge=1, le=GRANT_PAGE)] = GRANT_PAGE,
    after: Annotated[int, Query(ge=0, le=m.MAX_ID)] = 0,
) -> m.GrantList:
    caller.require("users.manage")
    grants = await run(
        server.store.list_grants, user, org=caller.org(org), after=after, limit=limit + 1
    )
    following = grants[limit - 1].id if len(grants) > limit else None
    items = [
        m.GrantInfo(id=g.id, role=g.role, user=g.user, team=g.team, device=g.device, tag=g.tag)
        for g in grants[:limit]
    ]
    return m.GrantList(grants=items, next=following)


@router.post(
    "/grants",
    tags=["grants"],
    summary="Give a user or a team a role on a device or on every device with a tag",
)
async def add_grant(body: m.GrantCreate, caller: Admin, server: Relay) -> m.GrantCreated:
    caller.require("users.manage")
    org = caller.org(body.org)
    if body.user is not None:
        target = await _target(server, caller, body.user)
        org = target.org
    permissions = ROLE_PERMISSIONS.get(body.role)
    if permissions is None:
        permissions = (await run(server.store.list_roles, org)).get(body.role, frozenset())
    caller.hand_out(permissions)
    grant_id = await run(
        server.store.add_grant, body.user, body.role, team=body.team, device=body.device,
        tag=body.tag, org=org, actor=caller.name,
    )  # fmt: skip
    server.forget_access()
    return m.GrantCreated(id=grant_id)


@router.delete(
    "/grants/{grant_id}",
    tags=["grants"],
    summary="Remove a grant: channels it allowed close within seconds",
)
async def remove_grant(
    grant_id: Annotated[int, Path(ge=1, le=m.MAX_ID)], caller: Admin, server: Relay
) -> m.Done:
    caller.require("users.manage")
    org = None if caller.superadmin else caller.access.org
    await run(server.store.remove_grant, grant_id, org=org, actor=caller.name)
    server.forget_access()
    return m.Done()
