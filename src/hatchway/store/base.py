"""The storage interface: records and the ``Store`` protocol.

Kept small on purpose so that a PostgreSQL store can plug in beside
``SqlStore`` later. Every method is synchronous; the relay calls them from
worker threads (``asyncio.to_thread``), so implementations must be thread-safe.
All datetimes are timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

# "admin" may reach all devices; nobody else reaches any until access rules arrive.
ROLES = ("admin", "user")


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    created_at: datetime


@dataclass(frozen=True)
class UserRecord:
    name: str
    role: str
    created_at: datetime


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


class Store(Protocol):
    """Devices, users, API tokens and the channel log."""

    def add_device(self, device_id: str) -> str:
        """Create a device and return its secret (shown once; only a key is kept)."""
        ...

    def device_key(self, device_id: str) -> bytes | None: ...

    def list_devices(self) -> list[DeviceRecord]: ...

    def remove_device(self, device_id: str) -> None: ...

    def add_user(self, name: str, role: str, password: str) -> UserRecord: ...

    def list_users(self) -> list[UserRecord]: ...

    def remove_user(self, name: str) -> None: ...

    def count_users(self) -> int: ...

    def set_password(self, name: str, password: str) -> None: ...

    def authenticate_user(self, name: str, password: str) -> UserRecord | None: ...

    def create_token(self, user: str, label: str, ttl: timedelta | None) -> str:
        """Create an API token and return it in plain text (shown once)."""
        ...

    def user_for_token(self, token: str) -> UserRecord | None: ...

    def revoke_tokens(self, user: str) -> int: ...

    def record_channel(self, rec: ChannelRecord) -> None: ...

    def recent_channels(self, limit: int = 100) -> list[ChannelRecord]: ...

    def close(self) -> None: ...
