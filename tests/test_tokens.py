"""API tokens: named, scoped, expiring, revocable, shown once, stored hashed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from hatchway.errors import ConfigError
from hatchway.store.sql import DB_FILE_NAME, SqlStore
from tests.procs import HATCHWAY
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
