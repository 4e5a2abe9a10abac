"""The API's request and response bodies: validated on the way in, and the source of
the OpenAPI document's schemas."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Row ids (grants, tokens, audit records) fit a signed 63-bit integer.
MAX_ID = 2**62
DEVICE_ID = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
USER_NAME = r"^[A-Za-z0-9._@-]{1,64}$"
NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"  # organisations, teams, custom roles
TAG = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
SERVICE = r"^[a-z0-9][a-z0-9_-]{0,31}$"
PERMISSION = r"^(devices\.view|devices\.manage|users\.manage|audit\.read|org\.manage|connect:\*|connect:[a-z0-9][a-z0-9_-]{0,31})$"  # noqa: E501
Role = Literal["owner", "admin", "operator", "viewer", "user"]
Tag = Annotated[str, Field(pattern=TAG)]
Permission = Annotated[str, Field(pattern=PERMISSION)]
Scope = Literal["all", "read", "connect", "web", "tokens", "admin"]


class Request(BaseModel):
    """A request body: unknown fields and loose types (``0`` for ``false``) are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorBody(BaseModel):
    """Every error: a stable code for programs and a sentence for people."""

    error: str
    message: str


class Health(BaseModel):
    status: Literal["ok"]
    version: str


# --- session ----------------------------------------------------------------------------


class LoginRequest(Request):
    user: str = Field(max_length=256)
    password: str = Field(max_length=1024)
    label: str = Field("cli", max_length=64, description="a name for the token")
    otp: str | None = Field(None, max_length=16, description="two-factor code, if enabled")
    new_password: str | None = Field(
        None, max_length=1024, description="sets a new password when one is required"
    )


class LoginResponse(BaseModel):
    token: str
    user: str
    role: str
    expires_in: int


class WhoAmI(BaseModel):
    user: str
    role: str
    org: str
    superadmin: bool
    permissions: list[str] = Field(description="organisation-wide (grants add per device)")


class PasswordChange(Request):
    password: str = Field(max_length=1024, description="the current password")
    new_password: str = Field(max_length=1024)


class Done(BaseModel):
    ok: Literal[True] = True


def _all_scopes() -> list[Scope]:
    return ["all"]


class TokenCreate(Request):
    name: str = Field(min_length=1, max_length=64)
    expires_in_days: int = Field(90, ge=1, le=365)
    scopes: list[Scope] = Field(default_factory=_all_scopes, min_length=1, max_length=6)


class TokenInfo(BaseModel):
    id: int
    name: str
    scopes: list[str]
    created_at: str | None
    expires_at: str | None
    last_used_at: str | None


class TokenCreated(TokenInfo):
    token: str = Field(description="shown once")


class TokenList(BaseModel):
    tokens: list[TokenInfo]


class Revoked(BaseModel):
    revoked: int


class WebSessionRequest(Request):
    device: str = Field(max_length=63)
    service: str | None = Field(None, max_length=32)
    next: str = Field("/", max_length=2048)


class WebSessionResponse(BaseModel):
    url: str
    expires_in: int


# --- devices ----------------------------------------------------------------------------


def _absent(value: object) -> bool:
    return value is None


class Device(BaseModel):
    """What is known of a device: its state fields only while it is online."""

    id: str
    online: bool
    org: str | None = Field(None, exclude_if=_absent)
    tags: list[str] | None = Field(None, exclude_if=_absent)
    since: str | None = Field(None, exclude_if=_absent)
    address: str | None = Field(None, exclude_if=_absent)
    services: list[str] | None = Field(None, exclude_if=_absent)
    hostname: str | None = Field(None, exclude_if=_absent)
    agent_version: str | None = Field(None, exclude_if=_absent)


class DeviceList(BaseModel):
    devices: list[Device]
    next: str | None = Field(description="pass as ?after= for the next page; null: the end")


class DeviceCreate(Request):
    id: str = Field(pattern=DEVICE_ID, max_length=63)
    tags: list[Tag] = Field(default_factory=list, max_length=16)
    org: str | None = Field(None, pattern=NAME, description="super-admins only")


class DeviceCreated(BaseModel):
    device: str
    secret: str = Field(description="the agent's secret, shown once")


class DeviceUpdate(Request):
    tags: list[Tag] = Field(max_length=16)


# --- users, teams, roles, grants -----------------------------------------------------------


class User(BaseModel):
    name: str
    role: str
    org: str
    superadmin: bool
    source: str
    must_change_password: bool
    created_at: str
    locked_until: str | None = None


class UserList(BaseModel):
    users: list[User]
    next: str | None


class UserCreate(Request):
    name: str = Field(pattern=USER_NAME)
    role: Role = "user"
    password: str = Field(max_length=1024)
    org: str | None = Field(None, pattern=NAME, description="super-admins only")
    superadmin: bool = Field(False, description="super-admins only")
    must_change_password: bool = Field(False, description="at first login")


class UserUpdate(Request):
    role: Role | None = None
    password: str | None = Field(None, max_length=1024)


class Team(BaseModel):
    name: str
    org: str
    members: list[str]


class TeamList(BaseModel):
    teams: list[Team]


class TeamCreate(Request):
    name: str = Field(pattern=NAME)
    org: str | None = Field(None, pattern=NAME)


class RoleInfo(BaseModel):
    name: str
    permissions: list[str]
    builtin: bool


class RoleList(BaseModel):
    roles: list[RoleInfo]


class RoleCreate(Request):
    name: str = Field(pattern=NAME, max_length=32)
    permissions: list[Permission] = Field(min_length=1, max_length=32)
    org: str | None = Field(None, pattern=NAME)


class GrantInfo(BaseModel):
    id: int
    role: str
    user: str | None
    team: str | None
    device: str | None
    tag: str | None


class GrantList(BaseModel):
    grants: list[GrantInfo]
    next: int | None


class GrantCreate(Request):
    role: str = Field(max_length=32)
    user: str | None = Field(None, pattern=USER_NAME)
    team: str | None = Field(None, pattern=NAME)
    device: str | None = Field(None, pattern=DEVICE_ID, max_length=63)
    tag: str | None = Field(None, pattern=TAG)
    org: str | None = Field(None, pattern=NAME, description="the team's (super-admins only)")


class GrantCreated(BaseModel):
    id: int


# --- organisations, settings, audit -----------------------------------------------------


class Org(BaseModel):
    name: str
    require_totp: bool | None = None


class OrgList(BaseModel):
    orgs: list[Org]


class OrgCreate(Request):
    name: str = Field(pattern=NAME)


class OrgUpdate(Request):
    require_totp: bool


class Settings(BaseModel):
    settings: dict[str, str]


class SettingUpdate(Request):
    value: str = Field(max_length=256)


class AuditEntry(BaseModel):
    id: int
    at: str
    kind: str
    actor: str
    device: str | None
    source: str | None
    details: dict[str, Any]
    org: str | None
    prev_hash: str
    hash: str


class AuditList(BaseModel):
    records: list[AuditEntry]
    next: int | None = Field(description="pass as ?after= for the next page; null: the end")


class AuditVerify(BaseModel):
    ok: bool
    records: int
    head_id: int
    head_hash: str
    problem: str | None
    bad_id: int | None
