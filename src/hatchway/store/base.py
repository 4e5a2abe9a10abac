"""The storage interface: records and the ``Store`` protocol.

Kept small on purpose so that a PostgreSQL store can plug in beside
``SqlStore`` later. Every method is synchronous; the relay calls them from
worker threads (``asyncio.to_thread``), so implementations must be thread-safe.
All datetimes are timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from hatchway.auth.policy import PasswordPolicy
from hatchway.store.audit import AuditRecord, VerifyResult

# Organisation-wide roles (auth/permissions.py); "user" means none: grants only.
ROLES = ("owner", "admin", "operator", "viewer", "user")


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    created_at: datetime
    org: str = "default"
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class UserRecord:
    name: str
    role: str
    created_at: datetime
    org: str = "default"
    superadmin: bool = False
    #: The bootstrap admin must choose a password before anything else.
    must_change_password: bool = False
    #: Where the password is checked: ``local`` or ``ldap``.
    source: str = "local"


#: What an API token may be used for: ``read`` (device list, identity), ``connect``
#: (channels: forward, proxy, ssh), ``web`` (device web UIs: ``hatchway open``),
#: ``tokens`` (managing the user's own tokens), ``admin`` (changing users, devices,
#: grants, organisations and settings through the API, as the user's role allows);
#: ``all`` is everything.
TOKEN_SCOPES = ("all", "read", "connect", "web", "tokens", "admin")


@dataclass(frozen=True)
class TokenRecord:
    """An API token as listed (never the token itself)."""

    id: int
    label: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class ChannelRecord:
    """One finished channel, for the audit log."""

    user: str
    device: str
    service: str
    source: str
    started_at: datetime
    ended_at: datetime
    bytes_up: int
    bytes_down: int
    outcome: str
    #: The device's organisation, when the caller knows it (saves a lookup).
    org: str | None = None


#: Kinds of web session: a login to the relay's own pages, a login to one device's
#: web UI (host-only cookie on the device's subdomain), and the one-time grant that is
#: exchanged for the latter.
WEB_SESSION_KINDS = ("relay", "device", "grant")


@dataclass(frozen=True)
class WebSessionRecord:
    """A browser session. ``session_id`` is the stored hash, never the secret itself."""

    session_id: str
    kind: str
    user: UserRecord
    device: str | None
    service: str | None
    expires_at: datetime


class Store(Protocol):
    """Devices, users, API tokens and the channel log."""

    #: Web sessions unused this long are over; None: no idle limit.
    session_idle: timedelta | None

    def add_device(self, device_id: str, *, actor: str = "cli") -> str:
        """Create a device and return its secret (shown once; only a key is kept)."""
        ...

    def device_key(self, device_id: str) -> bytes | None: ...

    def list_devices(
        self, org: str | None = None, *, after: str | None = None, limit: int | None = None
    ) -> list[DeviceRecord]: ...

    def remove_device(self, device_id: str, *, actor: str = "cli") -> None: ...

    def add_user(
        self, name: str, role: str, password: str, *, actor: str = "cli"
    ) -> UserRecord: ...

    def list_users(
        self, org: str | None = None, *, after: str | None = None, limit: int | None = None
    ) -> list[UserRecord]: ...

    def get_user(self, name: str) -> UserRecord | None: ...

    def remove_user(self, name: str, *, actor: str = "cli") -> None: ...

    def count_users(self) -> int: ...

    def set_password(
        self,
        name: str,
        password: str,
        *,
        actor: str = "cli",
        current: str | None = None,
        keep: str | None = None,
    ) -> None:
        """Set a password and end the user's tokens and web sessions (but ``keep``, the
        credential a user changing their own password with ``current`` came with)."""
        ...

    def authenticate_user(self, name: str, password: str) -> UserRecord | None:
        """None for a wrong password, an unknown user, a locked account or a user whose
        password is not kept here (``source`` other than local) alike."""
        ...

    def locked_until(self, name: str) -> datetime | None: ...

    def login_failed(self, name: str) -> None:
        """Count a failed login (a password checked elsewhere) towards the lockout."""
        ...

    def sync_external_user(
        self, name: str, role: str, org: str, *, source: str = "ldap", actor: str = "ldap"
    ) -> UserRecord | None:
        """Create or update a user whose password a directory has just accepted; None
        (and no change) if the name belongs to a user of another source."""
        ...

    def totp_begin(self, name: str) -> str: ...

    def settings(self) -> dict[str, str]: ...

    def set_setting(self, name: str, value: str, *, actor: str = "cli") -> None: ...

    def password_policy(self) -> PasswordPolicy: ...

    def totp_confirm(self, name: str, code: str, *, actor: str = "cli") -> bool: ...

    def totp_disable(self, name: str, *, actor: str = "cli") -> None: ...

    def totp_required(self, name: str) -> bool: ...

    def totp_policy(self, user: str) -> tuple[bool, bool]: ...

    def totp_check(self, name: str, code: str) -> bool: ...

    def unlock(self, name: str, *, actor: str = "cli") -> None: ...

    def create_token(
        self,
        user: str,
        label: str,
        ttl: timedelta | None,
        scopes: tuple[str, ...] = ("all",),
        *,
        actor: str | None = None,
    ) -> str:
        """Create an API token and return it in plain text (shown once)."""
        ...

    def user_for_token(self, token: str) -> UserRecord | None: ...

    def token_scopes(self, token: str) -> tuple[str, ...]: ...

    def list_tokens(self, user: str) -> list[TokenRecord]: ...

    def revoke_token(self, user: str, token_id: int, *, actor: str | None = None) -> bool: ...

    def revoke_tokens(self, user: str, *, actor: str = "cli") -> int:
        """Revoke all of a user's tokens and end all their web sessions."""
        ...

    def create_web_session(
        self,
        user: str,
        kind: str,
        ttl: timedelta,
        *,
        device: str | None = None,
        service: str | None = None,
        parent: str | None = None,
    ) -> str:
        """Create a web session and return its secret. ``parent`` is the secret of the
        session or API token it derives from: it dies with its parent."""
        ...

    def web_session(self, secret: str, kind: str) -> WebSessionRecord | None:
        """The live session of that kind (its user and parent still valid), or None."""
        ...

    def consume_grant(self, secret: str) -> tuple[WebSessionRecord, str | None] | None:
        """Delete a one-time grant and return it with its parent's hash; None if it was
        not a live grant (used, expired or unknown)."""
        ...

    def create_child_session(
        self, user: str, kind: str, ttl: timedelta, *, device: str, service: str, parent_id: str
    ) -> str:
        """Like ``create_web_session`` with the parent given by its stored hash."""
        ...

    def touch_web_sessions(self, session_ids: list[str]) -> None:
        """Mark sessions (by hash), and those they derive from, as used now."""
        ...

    def live_web_sessions(self, session_ids: list[str]) -> dict[str, WebSessionRecord]:
        """Which of these sessions (by hash) are still valid."""
        ...

    def revoke_web_session(self, secret: str) -> None:
        """Log out: delete the session and every session derived from it."""
        ...

    def record_channel(self, rec: ChannelRecord) -> None:
        """Store a finished channel (and append it to the audit log)."""
        ...

    def record_channels(self, records: Sequence[ChannelRecord]) -> None:
        """Store finished channels in one transaction, in order."""
        ...

    # The audit log (``store/audit.py``): every change above appends to it in its own
    # transaction; the relay appends logins, sessions and device connections.

    def audit(
        self,
        kind: str,
        actor: str,
        *,
        device: str | None = None,
        source: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None: ...

    def audit_records(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        device: str | None = None,
        kind: str | None = None,
        org: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[AuditRecord]: ...

    def audit_verify(self, batch: int = 5000) -> VerifyResult: ...

    def audit_prune(self, before: datetime) -> int: ...

    def recent_channels(self, limit: int = 100) -> list[ChannelRecord]: ...

    def close(self) -> None: ...
