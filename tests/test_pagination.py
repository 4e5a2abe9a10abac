"""Device lists page through large fleets: ?limit=N&after=ID, and the CLI follows."""

from __future__ import annotations

import json
import ssl
import urllib.request

from hatchway.store.sql import SqlStore
from tests.test_integration import Setup, setup

__all__ = ["setup"]  # the fixture

FLEET = 2_500


def test_large_fleet_pages(setup: Setup) -> None:
    env = setup.env
    store = SqlStore.open_data_dir(env.data_dir)
    store.add_org("acme")
    for n in range(FLEET):
        store.add_device(f"unit-{n:05d}", org="acme", tags=("tenth",) if n % 10 == 0 else ())
    store.add_user("pat", "user", "Vivid-Lantern-482!", org="acme")
    store.add_grant("pat", "viewer", tag="tenth")
    store.close()
    # The super-admin sees everything, in id order, 1000 at a time by default.
    listed = json.loads(env.hatchway("devices", "--json").stdout)
    assert len(listed) == FLEET + 2  # dev1 and dev3 of the default organisation too
    ids = [d["id"] for d in listed]
    assert ids == sorted(ids)
    token = json.loads((env.config_dir / "login.json").read_text())["token"]
    ctx = ssl.create_default_context(cafile=str(env.ca_file))

    def page(query: str, bearer: str = token) -> dict[str, object]:
        request = urllib.request.Request(
            f"{setup.url}/api/v1/devices?{query}", headers={"Authorization": f"Bearer {bearer}"}
        )
        with urllib.request.urlopen(request, context=ctx, timeout=30) as resp:
            return json.loads(resp.read())

    first = page("limit=100")
    assert len(first["devices"]) == 100 and first["next"] == "unit-00097"  # dev1, dev3 first
    second = page(f"limit=100&after={first['next']}")
    assert second["devices"][0]["id"] == "unit-00098"
    # A user with a grant on a tag sees only those devices, pages filled across gaps.
    env.login(setup.url, "pat", "Vivid-Lantern-482!")
    pat_token = json.loads((env.config_dir / "login.json").read_text())["token"]
    seen, after = [], None
    while True:
        answer = page("limit=100" + (f"&after={after}" if after else ""), pat_token)
        seen += [d["id"] for d in answer["devices"]]
        after = answer["next"]
        if not after:
            break
    assert seen == [f"unit-{n:05d}" for n in range(0, FLEET, 10)]
