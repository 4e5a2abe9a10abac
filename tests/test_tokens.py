"""API tokens: named, scoped, expiring, revocable, shown once, stored hashed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import urllib.parse
from datetime import timedelta
from pathlib import Path

import pytest

from hatchway.errors import ConfigError
from hatchway.store.sql import DB_FILE_NAME, SqlStore
from tests.apiclient import Api
from tests.procs import HATCHWAY, Env
from tests.test_integration import Setup, roundtrip, setup

__all__ = ["setup"]  # the fixture


def test_store_tokens(tmp_path: Path) -> None:
    store = SqlStore.open_data_dir(tmp_path)
    store.add_user("erin", "user", "Vivid-Lantern-482!")
    token = store.create_token("erin", "ci", timedelta(days=1), ("read", "connect"))
    assert store.token_scopes(token) == ("connect", "read")
    (listed,) = store.list_tokens("erin")
    assert (listed.label, listed.scopes) == ("ci", ("connect", "read"))
    with sqlite3.connect(tmp_path / DB_FILE_NAME) as db:  # stored hashed only
        assert token not in str(db.execute("SELECT * FROM api_tokens").fetchall())
    with pytest.raises(ConfigError, match="unknown token scope"):
        store.create_token("erin", "bad", None, ("root",))
    store.add_user("fay", "user", "Quiet-Harbor-1937!")
    assert not store.revoke_token("fay", listed.id)  # not hers
    assert store.revoke_token("erin", listed.id)
    assert store.user_for_token(token) is None and store.token_scopes(token) == ()
    kinds = [r.kind for r in store.audit_records()]
    assert "token_created" in kinds and "token_revoked" in kinds


def test_scoped_tokens_through_the_relay(setup: Setup) -> None:
    env = setup.env

    def hatchway(*args: str, token: str | None = None, check: bool = True) -> str:
        environ = env.environ()
        if token:
            environ["HATCHWAY_TOKEN"] = token
        result = subprocess.run([*HATCHWAY, *args], capture_output=True, timeout=60, env=environ)
        if check:
            assert result.returncode == 0, result.stderr.decode()
        return (result.stdout + result.stderr).decode()

    read_token = hatchway("token", "create", "dashboard", "--scope", "read").splitlines()[0]
    assert read_token.startswith("hwt_")
    listed = json.loads(hatchway("token", "list", "--json"))
    assert [t["name"] for t in listed] == ["cli", "dashboard"]
    assert listed[1]["scopes"] == ["read"] and listed[1]["expires_at"]
    # The read token lists devices but cannot open a channel or make tokens.
    assert "dev1" in hatchway("devices", token=read_token)
    out = hatchway("proxy", "dev1", "echo", token=read_token, check=False)
    assert "may not be used for connect" in out
    out = hatchway("token", "list", token=read_token, check=False)
    assert "may not be used for tokens" in out
    connect_token = hatchway("token", "create", "ci", "--scope", "connect").splitlines()[0]
    environ_forward = env.environ()
    environ_forward["HATCHWAY_TOKEN"] = connect_token
    forward = env.spawn("forward", [*HATCHWAY, "forward", "dev1", "echo"], env=environ_forward)
    port = int(forward.wait_output(r"listening on [^\s:]+:(\d+)").group(1))
    assert roundtrip(port, b"scoped") == b"scoped"
    forward.stop()
    # Revoked: refused at once.
    hatchway("token", "revoke", str(listed[1]["id"]))
    out = hatchway("devices", token=read_token, check=False)
    assert "log in again" in out


def test_a_token_creates_only_tokens_with_scopes_it_has(env: Env) -> None:
    """A token limited to managing tokens cannot make itself a broader one (an `all`
    token, then admin work); a logged-in browser holds every scope its user has."""
    _, port, password = env.start_relay()
    assert password is not None
    url = f"https://127.0.0.1:{port}"
    api = Api(url, env.ca_file)
    status, body = api.call("POST", "/api/v1/login", {"user": "admin", "password": password})
    assert status == 200
    full = body["token"]

    def create(token: str, *scopes: str) -> tuple[int, dict[str, object]]:
        return api.call(
            "POST", "/api/v1/tokens", {"name": "-".join(scopes), "scopes": list(scopes)}, token
        )

    status, body = create(full, "tokens")
    assert status == 200 and body["scopes"] == ["tokens"]
    narrow = str(body["token"])
    for scopes in (("all",), ("admin",), ("tokens", "read")):
        status, body = create(narrow, *scopes)
        assert (status, body["error"]) == (403, "insufficient_scope"), body
        assert "scopes it has itself" in str(body["message"])
    assert create(narrow, "tokens")[0] == 200  # rotating itself is fine
    status, body = create(full, "read", "tokens")
    assert status == 200
    two = str(body["token"])
    assert create(two, "read")[0] == 200 and create(two, "tokens", "read")[0] == 200
    assert create(two, "connect")[0] == 403
    status, body = api.call("GET", "/api/v1/tokens", token=full)
    assert [t["scopes"] for t in body["tokens"]] == [
        ["all"], ["tokens"], ["tokens"], ["read", "tokens"], ["read"], ["read", "tokens"]
    ]  # fmt: skip
    # The relay's session cookie (a logged-in browser) counts as holding every scope.
    form = urllib.parse.urlencode({"user": "admin", "password": password}).encode()
    status, headers, _ = api.raw(
        "POST", "/login", form, {"Origin": url, "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 303
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, raw = api.raw(
        "POST", "/api/v1/tokens", json.dumps({"name": "page", "scopes": ["all"]}).encode(),
        {"Content-Type": "application/json", "Cookie": cookie, "Origin": url},
    )  # fmt: skip
    assert status == 200 and json.loads(raw)["scopes"] == ["all"]
