"""Organisations, teams, custom roles and grants in the store, and the permissions they
give (the relay-level matrix is tests/test_authz.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatchway.auth.permissions import may_connect, may_view
from hatchway.errors import AlreadyExistsError, ConfigError, NotFoundError
from hatchway.store.sql import SqlStore
from tests.apiclient import Api
from tests.procs import Env

PASSWORD = "Vivid-Lantern-482!"


@pytest.fixture
def store(tmp_path: Path) -> SqlStore:
    store = SqlStore.open_data_dir(tmp_path)
    for org in ("acme", "globex"):
        store.add_org(org)
    store.add_device("a1", org="acme", tags=("plant1",))
    store.add_device("g1", org="globex", tags=("plant1",))
    store.add_user("ann", "user", PASSWORD, org="acme")
    store.add_user("gus", "user", PASSWORD, org="globex")
    return store


def perms(store: SqlStore, user: str, device: str) -> frozenset[str]:
    access = store.access(user)
    info = store.device_info(device)
    assert access is not None and info is not None
    return access.permissions(device, *info)


def test_team_grants_with_a_custom_role(store: SqlStore) -> None:
    assert perms(store, "ann", "a1") == frozenset()
    store.add_team("support", org="acme")
    store.add_role("ssh-only", ("devices.view", "connect:ssh"), org="acme")
    grant = store.add_grant(None, "ssh-only", team="support", org="acme", tag="plant1")
    assert perms(store, "ann", "a1") == frozenset()  # not a member yet
    store.set_team_member("support", "ann")
    p = perms(store, "ann", "a1")
    assert may_connect(p, "ssh") and not may_connect(p, "http") and may_view(p)
    assert [g.team for g in store.list_grants("ann")] == ["support"]
    assert store.list_teams("acme") == [("acme", "support", ["ann"])]
    # The same tag in another organisation gives nothing.
    assert perms(store, "ann", "g1") == frozenset()
    store.set_team_member("support", "ann", member=False)
    assert perms(store, "ann", "a1") == frozenset()
    store.remove_grant(grant)
    assert store.list_grants() == []


def test_what_is_refused(store: SqlStore) -> None:
    with pytest.raises(ConfigError, match="built-in"):
        store.add_role("admin", ("devices.view",), org="acme")
    with pytest.raises(ConfigError, match="unknown permission"):
        store.add_role("odd", ("root",), org="acme")
    store.add_role("odd", ("connect:vnc",), org="acme")
    with pytest.raises(AlreadyExistsError):
        store.add_role("odd", ("connect:vnc",), org="acme")
    with pytest.raises(ConfigError, match="invalid role"):  # acme's role, not globex's
        store.add_grant("gus", "odd", device="g1")
    with pytest.raises(NotFoundError, match="in that organisation"):
        store.add_grant("ann", "operator", device="g1")  # another organisation's device
    with pytest.raises(ConfigError, match="one user or one team"):
        store.add_grant(None, "operator", device="a1")
    with pytest.raises(ConfigError, match="one device or on one tag"):
        store.add_grant("ann", "operator")
    store.add_team("ops", org="globex")
    with pytest.raises(NotFoundError, match="no team"):
        store.set_team_member("ops", "ann")  # a team of another organisation
    with pytest.raises(ConfigError, match="still has users"):
        store.remove_org("acme")
    kinds = {r.kind for r in store.audit_records()}
    assert {"org_added", "role_added", "team_added"} <= kinds


def test_grants_go_with_their_device_and_their_custom_role(store: SqlStore) -> None:
    """Device ids and role names can be used again: what is created under an old name
    starts without the old one's grants."""
    store.add_grant("ann", "operator", device="a1")
    store.add_role("look", ("devices.view",), org="acme")
    store.add_team("support", org="acme")
    store.add_grant(None, "look", team="support", org="acme", tag="plant1")
    store.add_grant("ann", "look", device="a1")
    store.remove_device("a1")
    assert [g.role for g in store.list_grants()] == ["look"]  # the tag grant stays
    store.add_device("a1", org="acme")
    assert store.list_grants("ann") == []
    assert perms(store, "ann", "a1") == frozenset()
    store.add_role("look", ("devices.view",), org="globex")  # another organisation's
    store.remove_role("look", org="acme")
    assert store.list_grants() == []
    store.add_role("look", ("devices.view", "devices.manage", "connect:*"), org="acme")
    store.set_team_member("support", "ann")
    assert perms(store, "ann", "a1") == frozenset()
    removed = store.audit_records(kind="device_removed")[-1]
    assert removed.details == {"grants_removed": 2}
    (role_removed,) = store.audit_records(kind="role_removed")
    assert role_removed.details["grants_removed"] == 1


def test_the_relay_forgets_grants_of_removed_devices_and_roles(env: Env) -> None:
    _, port, password = env.start_relay()
    assert password is not None
    api = Api(f"https://127.0.0.1:{port}", env.ca_file)

    api.token = api.ok("POST", "/api/v1/login", {"user": "admin", "password": password}, "")[
        "token"
    ]
    for name in ("customer", "partner"):
        api.ok("POST", "/api/v1/users", {"name": name, "role": "user", "password": PASSWORD})
    customer, partner = (
        api.ok("POST", "/api/v1/login", {"user": name, "password": PASSWORD}, "")["token"]
        for name in ("customer", "partner")
    )
    api.ok("POST", "/api/v1/devices", {"id": "cam1"})
    api.ok("POST", "/api/v1/grants", {"role": "operator", "user": "customer", "device": "cam1"})
    assert [d["id"] for d in api.ok("GET", "/api/v1/devices", token=customer)["devices"]] == [
        "cam1"
    ]
    api.ok("DELETE", "/api/v1/devices/cam1")
    assert api.ok("GET", "/api/v1/grants")["grants"] == []
    api.ok("POST", "/api/v1/devices", {"id": "cam1", "tags": ["hq"]})  # someone else's, later
    assert api.ok("GET", "/api/v1/devices", token=customer)["devices"] == []  # at once
    status, answer = api.call(
        "POST", "/api/v1/web-sessions", {"device": "cam1", "service": "http"}, customer
    )
    assert status == 404, answer
    # A custom role: removed with its grants; created again, it gives nothing back.
    api.ok("POST", "/api/v1/roles", {"name": "look", "permissions": ["devices.view"]})
    api.ok("POST", "/api/v1/grants", {"role": "look", "user": "partner", "device": "cam1"})
    assert [d["id"] for d in api.ok("GET", "/api/v1/devices", token=partner)["devices"]] == ["cam1"]
    api.ok("DELETE", "/api/v1/roles/look")
    assert api.ok("GET", "/api/v1/grants")["grants"] == []
    api.ok(
        "POST",
        "/api/v1/roles",
        {"name": "look", "permissions": ["devices.view", "devices.manage", "connect:*"]},
    )
    status, answer = api.call("DELETE", "/api/v1/devices/cam1", token=partner)
    assert (status, answer["error"]) == (404, "not_found")
    assert api.ok("GET", "/api/v1/devices", token=partner)["devices"] == []
