"""Devices: the fleet as the caller may see it, and its management."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from hatchway.auth.permissions import may_view
from hatchway.errors import AlreadyExistsError
from hatchway.mux.frames import GoAwayReason
from hatchway.relay.api import models as m
from hatchway.relay.api.core import ApiError
from hatchway.relay.api.deps import Admin, Caller, Reader, Relay, run
from hatchway.relay.server import RelayServer
from hatchway.tunnel.endpoint import CLOSE_POLICY

router = APIRouter(tags=["devices"])

#: Devices per page of ``GET /devices``.
DEVICE_PAGE = 1000
DEVICE_PAGE_MAX = 5000

DeviceId = Annotated[str, Path(pattern=m.DEVICE_ID, max_length=63)]


@router.get(
    "/devices",
    summary="The devices you may see, in id order, a page at a time",
    description="Follow `next` with `?after=` until it is null.",
)
async def list_devices(
    caller: Reader,
    server: Relay,
    limit: Annotated[int, Query(ge=1, le=DEVICE_PAGE_MAX)] = DEVICE_PAGE,
    after: Annotated[str | None, Query(max_length=63)] = None,
) -> m.DeviceList:
    devices, following = await run(server.visible_devices, caller.user, after or None, limit)
    return m.DeviceList(devices=[m.Device(**d) for d in devices], next=following)


def _unknown(device: str) -> ApiError:
    # The same answer for "does not exist" and "not yours": nothing is learned by asking.
    return ApiError(404, "not_found", f"no device {device} you may see")


async def _device(server: RelayServer, caller: Caller, device: str) -> m.Device:
    info = await run(server.store.device_info, device)
    if info is None or not may_view(caller.access.permissions(device, *info)):
        raise _unknown(device)
    item = server.device_item(device)
    return m.Device(**item, org=info[0], tags=list(info[1]))


@router.get(
    "/devices/{device}",
    summary="One device: its state, organisation and tags",
)
async def get_device(device: DeviceId, caller: Reader, server: Relay) -> m.Device:
    return await _device(server, caller, device)


@router.post(
    "/devices",
    summary="Add a device: returns the agent's secret, once",
    description="Needs `devices.manage` in the organisation.",
)
async def add_device(body: m.DeviceCreate, caller: Admin, server: Relay) -> m.DeviceCreated:
    caller.require("devices.manage")
    org = caller.org(body.org)
    try:
        secret = await run(
            server.store.add_device, body.id, actor=caller.name, org=org, tags=tuple(body.tags)
        )
    except AlreadyExistsError:
        if not caller.superadmin and (await run(server.store.device_info, body.id)) is not None:
            # Device ids are global: say it is taken, not by whom.
            raise ApiError(409, "exists", f"the device id {body.id} is taken") from None
        raise
    return m.DeviceCreated(device=body.id, secret=secret)


async def _manageable(server: RelayServer, caller: Caller, device: str) -> None:
    info = await run(server.store.device_info, device)
    if info is None:
        raise _unknown(device)
    permissions = caller.access.permissions(device, *info)
    if "devices.manage" not in permissions:
        if may_view(permissions):
            raise ApiError(403, "not_permitted", "this needs the devices.manage permission")
        raise _unknown(device)


@router.patch(
    "/devices/{device}",
    summary="Set a device's tags (grants on tags follow)",
)
async def update_device(
    device: DeviceId, body: m.DeviceUpdate, caller: Admin, server: Relay
) -> m.Device:
    await _manageable(server, caller, device)
    await run(server.store.set_device_tags, device, tuple(body.tags), actor=caller.name)
    server.forget_device(device)
    return await _device(server, caller, device)


@router.delete(
    "/devices/{device}",
    summary="Remove a device: its tunnel is closed, its secret no longer works and the "
    "grants on it are removed",
)
async def remove_device(device: DeviceId, caller: Admin, server: Relay) -> m.Done:
    await _manageable(server, caller, device)
    await run(server.store.remove_device, device, actor=caller.name)
    server.forget_device(device)
    server.forget_access()  # cached accesses hold the grants on it
    entry = server.registry.get(device)
    if entry is not None:
        entry.tunnel.shutdown(GoAwayReason.AUTH_FAILED, "the device was removed", CLOSE_POLICY)
    return m.Done()
