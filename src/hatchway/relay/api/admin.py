"""Organisations, the relay's settings, and the audit log."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query

from hatchway.errors import ConfigError
from hatchway.relay.api import models as m
from hatchway.relay.api.core import ApiError
from hatchway.relay.api.deps import Admin, Caller, Reader, Relay, run

router = APIRouter()

Name = Annotated[str, Path(pattern=m.NAME)]
AUDIT_PAGE = 1000


def _superadmin(caller: Caller) -> None:
    if not caller.superadmin:
        raise ApiError(403, "not_permitted", "only a super-admin may do this")


@router.get("/orgs", tags=["organisations"], summary="Organisations: all, or your own")
async def list_orgs(caller: Reader, server: Relay) -> m.OrgList:
    names = await run(server.store.list_orgs) if caller.superadmin else [caller.access.org]
    manage = "org.manage" in caller.org_permissions()
    orgs = []
    for name in names:
        totp = await run(server.store.org_require_totp, name) if manage else None
        orgs.append(m.Org(name=name, require_totp=totp))
    return m.OrgList(orgs=orgs)


@router.post("/orgs", tags=["organisations"], summary="Create an organisation (super-admins)")
async def add_org(body: m.OrgCreate, caller: Admin, server: Relay) -> m.Org:
    _superadmin(caller)
    await run(server.store.add_org, body.name, actor=caller.name)
    return m.Org(name=body.name, require_totp=False)


@router.patch(
    "/orgs/{org}",
    tags=["organisations"],
    summary="Require two-factor login of every user of the organisation (owners)",
)
async def update_org(org: Name, body: m.OrgUpdate, caller: Admin, server: Relay) -> m.Org:
    name = caller.org(org)
    caller.require("org.manage")
    await run(server.store.set_org_require_totp, name, body.require_totp, actor=caller.name)
    return m.Org(name=name, require_totp=body.require_totp)


@router.delete(
    "/orgs/{org}", tags=["organisations"], summary="Remove an empty organisation (super-admins)"
)
async def remove_org(org: Name, caller: Admin, server: Relay) -> m.Done:
    _superadmin(caller)
    try:
        await run(server.store.remove_org, org, actor=caller.name)
    except ConfigError as exc:
        raise ApiError(409, "not_empty", str(exc)) from None
    return m.Done()


@router.get("/settings", tags=["settings"], summary="The relay's settings (super-admins)")
async def list_settings(caller: Admin, server: Relay) -> m.Settings:
    _superadmin(caller)
    return m.Settings(settings=await run(server.store.settings))


@router.put(
    "/settings/{name}",
    tags=["settings"],
    summary="Change a setting (super-admins), e.g. password.min_length",
)
async def set_setting(
    name: Annotated[str, Path(pattern=r"^[a-z][a-z0-9_.]{0,63}$")],
    body: m.SettingUpdate,
    caller: Admin,
    server: Relay,
) -> m.Settings:
    _superadmin(caller)
    await run(server.store.set_setting, name, body.value, actor=caller.name)
    return m.Settings(settings=await run(server.store.settings))


ISO_TIME = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}:\d{2})?$"


def _time(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 time; UTC when it names no zone."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(400, "bad_request", f"{name}: not a valid ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@router.get(
    "/audit",
    tags=["audit"],
    summary="Audit records in chain order, filtered, a page at a time",
    description="Needs `audit.read`. An organisation's auditors read its records; the "
    "relay's own (settings, unknown user names) are for super-admins.",
)
async def audit(
    caller: Reader,
    server: Relay,
    org: Annotated[str | None, Query(pattern=m.NAME, description="super-admins: any")] = None,
    since: Annotated[str | None, Query(pattern=ISO_TIME, description="ISO 8601")] = None,
    until: Annotated[str | None, Query(pattern=ISO_TIME, description="ISO 8601")] = None,
    user: Annotated[str | None, Query(max_length=64, description="the actor")] = None,
    device: Annotated[str | None, Query(max_length=63)] = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    after: Annotated[int, Query(ge=0, le=m.MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=AUDIT_PAGE)] = AUDIT_PAGE,
) -> m.AuditList:
    caller.require("audit.read")
    start, end = _time(since, "since"), _time(until, "until")
    scope = None if caller.superadmin and org is None else caller.org(org)
    records = await run(
        server.store.audit_records, since=start, until=end, actor=user, device=device,
        kind=kind, org=scope, after_id=after, limit=limit,
    )  # fmt: skip
    following = records[-1].id if len(records) == limit else None
    return m.AuditList(records=[m.AuditEntry(**r.as_json()) for r in records], next=following)


@router.get(
    "/audit/verify",
    tags=["audit"],
    summary="Recompute the audit log's hash chain (super-admins)",
)
async def audit_verify(caller: Reader, server: Relay) -> m.AuditVerify:
    _superadmin(caller)
    result = await run(server.store.audit_verify)
    return m.AuditVerify(
        ok=result.ok, records=result.records, head_id=result.head_id,
        head_hash=result.head_hash, problem=result.problem, bad_id=result.bad_id,
    )  # fmt: skip
