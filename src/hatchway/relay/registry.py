"""The registry of online devices: which tunnel serves which device right now.

A small interface so that a clustered relay can keep it in Redis later; this module
holds the in-process implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from hatchway.relay.tunnels import RelayTunnel


@dataclass
class OnlineDevice:
    device_id: str
    tunnel: RelayTunnel
    address: str
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    properties: dict[str, Any] = field(default_factory=dict)


class DeviceRegistry(Protocol):
    def register(self, entry: OnlineDevice) -> OnlineDevice | None:
        """Make ``entry`` the device's tunnel; return the one it replaces, if any."""
        ...

    def unregister(self, device_id: str, tunnel: RelayTunnel) -> bool:
        """Forget the device if ``tunnel`` is still its current one."""
        ...

    def get(self, device_id: str) -> OnlineDevice | None: ...

    def all(self) -> list[OnlineDevice]: ...


class LocalRegistry:
    """Online devices of this relay process."""

    def __init__(self) -> None:
        self._devices: dict[str, OnlineDevice] = {}

    def register(self, entry: OnlineDevice) -> OnlineDevice | None:
        previous = self._devices.get(entry.device_id)
        self._devices[entry.device_id] = entry
        return previous

    def unregister(self, device_id: str, tunnel: RelayTunnel) -> bool:
        current = self._devices.get(device_id)
        if current is not None and current.tunnel is tunnel:
            del self._devices[device_id]
            return True
        return False

    def get(self, device_id: str) -> OnlineDevice | None:
        return self._devices.get(device_id)

    def all(self) -> list[OnlineDevice]:
        return list(self._devices.values())

    def __len__(self) -> int:
        return len(self._devices)
