"""Organisations, teams, custom roles and grants in the store, and the permissions they
give (the relay-level matrix is tests/test_authz.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hatchway.auth.permissions import may_connect, may_view
from hatchway.errors import AlreadyExistsError, ConfigError, NotFoundError
from hatchway.store.sql import SqlStore

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
