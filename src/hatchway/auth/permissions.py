"""Who may do what to which device: organisations, roles and grants.

Every user and every device belongs to one organisation; nothing crosses organisations
(a super-admin excepted, who may do everything everywhere). Within its organisation a
user has an organisation-wide role (``users.role``) and any number of grants, each a
role on one device or on every device with a tag. A user's permissions on a device are
the union of what those roles give. Roles are made of permissions:

- ``devices.view``: see the device and its state;
- ``connect:SERVICE`` (``connect:*`` for every service): open channels to it, through a
  client stream, a client tunnel or the device's web UI;
- ``devices.manage``, ``users.manage``, ``audit.read``, ``org.manage``: administration.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_ADMINISTRATION = frozenset({"devices.manage", "users.manage", "audit.read"})
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "owner": frozenset({"devices.view", "connect:*", "org.manage"}) | _ADMINISTRATION,
    "admin": frozenset({"devices.view", "connect:*"}) | _ADMINISTRATION,
    "operator": frozenset({"devices.view", "connect:*"}),
    # A customer: sees the device and opens its web UI, nothing else.
    "viewer": frozenset({"devices.view", "connect:http", "connect:https"}),
    "user": frozenset(),  # no organisation-wide role: grants only
}
#: Roles a user can hold organisation-wide (``user``: none).
USER_ROLES = tuple(ROLE_PERMISSIONS)
#: Built-in roles a grant can give (an organisation can add custom ones).
GRANT_ROLES = ("admin", "operator", "viewer")
#: The permissions custom roles are made of (``connect:SERVICE`` for any service name).
PERMISSIONS = (
    "devices.view",
    "connect:*",
    "devices.manage",
    "users.manage",
    "audit.read",
    "org.manage",
)
_SERVICE_PERMISSION = re.compile(r"^connect:[a-z0-9][a-z0-9_-]{0,31}$")


def check_permission(permission: str) -> str:
    if permission not in PERMISSIONS and not _SERVICE_PERMISSION.fullmatch(permission):
        raise ValueError(
            f"unknown permission {permission!r}: one of {', '.join(PERMISSIONS)}, "
            "or connect:SERVICE"
        )
    return permission


@dataclass(frozen=True)
class Grant:
    """A role on one device or tag, for a user or for every member of a team."""

    id: int
    user: str | None
    role: str
    device: str | None = None
    tag: str | None = None
    team: str | None = None


@dataclass(frozen=True)
class Access:
    """Everything that decides what one user may do: their role, their grants and their
    teams' grants, and their organisation's custom roles."""

    user: str
    org: str
    role: str
    superadmin: bool = False
    grants: tuple[Grant, ...] = field(default_factory=tuple)
    custom_roles: dict[str, frozenset[str]] = field(default_factory=dict)

    def role_permissions(self, role: str) -> frozenset[str]:
        builtin = ROLE_PERMISSIONS.get(role)
        return builtin if builtin is not None else self.custom_roles.get(role, frozenset())

    def permissions(self, device: str, org: str, tags: Iterable[str]) -> frozenset[str]:
        if self.superadmin:
            return ROLE_PERMISSIONS["owner"]
        if org != self.org:
            return frozenset()
        tag_set = set(tags)
        out = set(self.role_permissions(self.role))
        for grant in self.grants:
            if grant.device == device or (grant.tag is not None and grant.tag in tag_set):
                out |= self.role_permissions(grant.role)
        return frozenset(out)


def may_connect(permissions: frozenset[str], service: str) -> bool:
    return "connect:*" in permissions or f"connect:{service}" in permissions


def may_view(permissions: frozenset[str]) -> bool:
    return "devices.view" in permissions or any(p.startswith("connect:") for p in permissions)
