"""The hash-chained audit log: what is recorded, verification, tampering, retention."""

from __future__ import annotations

import itertools
import json
import socket
import sqlite3
import ssl
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hatchway.store.base import ChannelRecord
from hatchway.store.sql import DB_FILE_NAME, SqlStore
from tests.apiclient import Api
from tests.procs import Env, wait_for
from tests.test_integration import Setup, relay_token, roundtrip, setup

__all__ = ["setup"]  # the fixture


@pytest.fixture
def store(tmp_path: Path) -> SqlStore:
    return SqlStore.open_data_dir(tmp_path / "data")


def _db(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "data" / DB_FILE_NAME)


def _scripted(store: SqlStore) -> None:
    store.add_device("dev1")
    store.add_user("alice", "admin", "Granite-Meadow-51!", actor="cli")
    token = store.create_token("alice", "laptop", timedelta(days=1))
    assert store.user_for_token(token) is not None  # token_used, once a minute at most
    assert store.user_for_token(token) is not None
    store.audit("login", "alice", source="192.0.2.7", details={"via": "api"})
    store.audit("login_failed", "mallory", source="198.51.100.9", details={"via": "web"})
    now = datetime.now(UTC)
    store.record_channel(
        ChannelRecord("alice", "dev1", "ssh", "192.0.2.7", now, now, 10, 20, "closed")
    )
    store.set_password("alice", "Granite-Meadow-52!")
    store.remove_device("dev1")


def test_a_scripted_sequence_verifies(store: SqlStore) -> None:
    _scripted(store)
    records = store.audit_records()
    assert [r.kind for r in records] == [
        "device_added",
        "user_added",
        "token_created",
        "token_used",
        "login",
        "login_failed",
        "channel",
        "password_changed",
        "device_removed",
    ]
    assert [r.id for r in records] == list(range(1, 10))
    channel = records[6]
    assert (channel.actor, channel.device, channel.source) == ("alice", "dev1", "192.0.2.7")
    assert channel.details["bytes_up"] == 10 and channel.details["bytes_down"] == 20
    assert records[1].details == {
        "user": "alice",
        "role": "admin",
        "org": "default",
        "superadmin": False,
    }
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    result = store.audit_verify()
    assert result.ok and result.records == 9 and result.head_id == 9
    assert result.head_hash == records[-1].hash
    # Filters.
    assert [r.kind for r in store.audit_records(actor="alice")] == [
        "token_created",
        "token_used",
        "login",
        "channel",
    ]
    assert len(store.audit_records(device="dev1")) == 3
    assert store.audit_records(since=datetime.now(UTC) + timedelta(minutes=1)) == []


@pytest.mark.parametrize(
    ("statement", "bad_id", "problem"),
    [
        ("UPDATE audit_log SET details = '{\"bytes_up\":0}' WHERE id = 6", 6, "was changed"),
        ("UPDATE audit_log SET actor = 'bob' WHERE id = 4", 4, "was changed"),
        ("UPDATE audit_log SET at = '2020-01-01 00:00:00.000000' WHERE id = 2", 2, "was changed"),
        ("DELETE FROM audit_log WHERE id = 5", 6, "does not follow"),
        (
            # Rewriting one record's hash too only moves the break to the next record.
            "UPDATE audit_log SET kind = 'login', hash = 'ab' || substr(hash, 3) WHERE id = 3",
            3,
            "was changed",
        ),
    ],
)
def test_tampering_is_detected(
    store: SqlStore, tmp_path: Path, statement: str, bad_id: int, problem: str
) -> None:
    _scripted(store)
    with _db(tmp_path) as db:
        db.execute(statement)
    result = store.audit_verify()
    assert not result.ok
    assert result.bad_id == bad_id
    assert result.problem is not None and problem in result.problem


def test_retention_keeps_the_chain_verifiable(store: SqlStore, tmp_path: Path) -> None:
    _scripted(store)
    with _db(tmp_path) as db:  # the first five records are "old"
        db.execute("UPDATE audit_log SET at = '2020-01-01 00:00:00.000000' WHERE id <= 5")
    # (Back-dating broke them, but they are about to go: verification runs after.)
    assert store.audit_prune(datetime(2021, 1, 1, tzinfo=UTC)) == 5
    result = store.audit_verify()
    assert result.ok and result.records == 4 and result.head_id == 9
    store.audit("login", "alice")
    assert store.audit_verify().ok
    # Removing the first remaining record is still noticed (the anchor says where to start).
    with _db(tmp_path) as db:
        db.execute("DELETE FROM audit_log WHERE id = 6")
    result = store.audit_verify()
    assert not result.ok and result.bad_id == 7


def test_relay_and_cli_record_and_verify(setup: Setup, tmp_path: Path) -> None:
    env = setup.env
    data = ["--data-dir", str(env.data_dir)]
    forward, port = env.start_forward("dev1", "echo")
    assert roundtrip(port, b"audit me" * 100) == b"audit me" * 100
    forward.stop()
    bad = env.hatchway(
        "login", setup.url, "--user", "admin", "--password-stdin", "--ca-file",
        str(env.ca_file), input=b"wrong\n", check=False,
    )  # fmt: skip
    assert bad.returncode == 1

    def kinds() -> list[str]:
        out = env.hatchway("audit", "list", "--json", "--limit", "1000", *data, prefix=())
        return [json.loads(line)["kind"] for line in out.stdout.decode().splitlines()]

    wait_for(lambda: "channel" in kinds() and "login_failed" in kinds(), 15, "audit records")
    seen = kinds()
    for kind in ("user_added", "device_added", "device_connected", "login", "channel"):
        assert kind in seen, (kind, seen)
    out = env.hatchway("audit", "export", "--kind", "channel", "--device", "dev1", *data, prefix=())
    channel = json.loads(out.stdout.decode().splitlines()[-1])
    assert channel["actor"] == "admin" and channel["details"]["service"] == "echo"
    assert channel["details"]["bytes_up"] == 800 and channel["details"]["bytes_down"] == 800
    out = env.hatchway("audit", "list", "--user", "admin", "--since", "1h", *data, prefix=())
    assert "channel" in out.stdout.decode() and "device=dev1" in out.stdout.decode()
    verified = env.hatchway("audit", "verify", *data, prefix=()).stdout.decode()
    assert verified.startswith("audit log intact: ")
    head = verified.split("head: ", 1)[1].strip()
    # Tampering with a record, then cutting off the last one.
    db = sqlite3.connect(env.data_dir / DB_FILE_NAME)
    with db:
        db.execute("UPDATE audit_log SET source = '203.0.113.1' WHERE kind = 'channel'")
    broken = env.hatchway("audit", "verify", *data, prefix=(), check=False)
    assert broken.returncode == 1 and b"was changed" in broken.stderr + broken.stdout
    with db:
        db.execute("UPDATE audit_log SET source = ? WHERE kind = 'channel'", (channel["source"],))
    assert env.hatchway("audit", "verify", *data, prefix=()).returncode == 0
    head_id = int(head.split(":")[0])
    with db:
        db.execute("DELETE FROM audit_log WHERE id >= ?", (head_id,))
    db.close()
    assert env.hatchway("audit", "verify", *data, prefix=()).returncode == 0  # a prefix is fine
    cut = env.hatchway("audit", "verify", "--expect-head", head, *data, prefix=(), check=False)
    assert cut.returncode == 1 and b"missing" in cut.stderr + cut.stdout


def test_audit_cli_errors(env: Env) -> None:
    out = env.hatchway(
        "audit", "list", "--since", "yesterday", "--data-dir", str(env.data_dir),
        prefix=(), check=False,
    )  # fmt: skip
    assert out.returncode == 1 and b"ISO-8601" in out.stderr


def test_channels_still_waiting_to_be_written_are_written_at_shutdown(setup: Setup) -> None:
    """Finished channels are written in batches; stopping the relay writes the last one."""
    env = setup.env
    forward, port = env.start_forward("dev1", "echo")
    assert roundtrip(port, b"last words") == b"last words"
    forward.stop()
    time.sleep(0.1)  # the relay sees the channel end, well within its batching delay
    setup.relay.stop()
    store = SqlStore.open_data_dir(env.data_dir)
    try:
        channels = store.recent_channels(10)
        assert [c.service for c in channels if c.device == "dev1"] == ["echo"]
        assert channels[0].bytes_up == len(b"last words")
        assert store.audit_records(kind="channel")[-1].org == "default"
        assert store.audit_verify().ok
    finally:
        store.close()


def test_channels_written_in_a_batch_continue_the_chain(store: SqlStore, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    batch = [
        ChannelRecord(f"u{i}", "dev1", "ssh", "192.0.2.7", now, now, i, 2 * i, "closed",
                      org="default" if i % 2 else None)
        for i in range(50)
    ]  # fmt: skip
    store.record_channels(batch[:3])  # into an empty log: one by one
    store.add_device("dev1")
    store.record_channels(batch[3:])  # after existing records: one multi-row insert
    store.audit("login", "u1")
    records = store.audit_records()
    assert [r.actor for r in records if r.kind == "channel"] == [f"u{i}" for i in range(50)]
    assert [r.id for r in records] == list(range(1, len(records) + 1))
    # Written once dev1 existed: its organisation, given or looked up.
    assert {r.org for r in records if r.kind == "channel" and r.actor not in ("u0", "u2")} == {
        "default"
    }
    assert records[-1].kind == "login" and store.audit_verify().ok
    assert len(store.recent_channels(100)) == 50
    # An edited record in the batch is still caught.
    with _db(tmp_path) as db:
        db.execute("UPDATE audit_log SET actor = 'mallory' WHERE id = 30")
    result = store.audit_verify()
    assert not result.ok and result.bad_id == 30


def test_a_super_admin_s_changes_belong_to_the_organisation_they_are_about(env: Env) -> None:
    """A super-admin's changes in another organisation are that organisation's records,
    not the super-admin's own organisation's; the relay's settings are in none (only
    super-admins read them)."""
    _, port, password = env.start_relay()
    assert password is not None
    api = Api(f"https://127.0.0.1:{port}", env.ca_file)

    api.token = api.ok("POST", "/api/v1/login", {"user": "admin", "password": password}, "")[
        "token"
    ]
    api.ok("POST", "/api/v1/orgs", {"name": "globex"})
    api.ok("POST", "/api/v1/teams", {"name": "gx-team", "org": "globex"})
    api.ok(
        "POST",
        "/api/v1/roles",
        {"name": "gx-role", "permissions": ["devices.view"], "org": "globex"},
    )
    grant = api.ok(
        "POST",
        "/api/v1/grants",
        {"role": "gx-role", "team": "gx-team", "tag": "hq", "org": "globex"},
    )
    api.ok("DELETE", f"/api/v1/grants/{grant['id']}")
    api.ok("PATCH", "/api/v1/orgs/globex", {"require_totp": False})
    api.ok("DELETE", "/api/v1/roles/gx-role?org=globex")
    api.ok("DELETE", "/api/v1/teams/gx-team?org=globex")
    api.ok("PUT", "/api/v1/settings/password.min_length", {"value": "15"})
    about_globex = ["org_added", "team_added", "role_added", "grant_added", "grant_removed",
                    "org_changed", "role_removed", "team_removed"]  # fmt: skip
    for name, org in (("dflt-admin", "default"), ("gx-admin", "globex")):
        user = {"name": name, "role": "admin", "password": "Vivid-Lantern-482!", "org": org}
        api.ok("POST", "/api/v1/users", user)
    dflt, gx = (
        api.ok("POST", "/api/v1/login", {"user": name, "password": "Vivid-Lantern-482!"}, "")[
            "token"
        ]
        for name in ("dflt-admin", "gx-admin")
    )
    seen = {r["kind"] for r in api.ok("GET", "/api/v1/audit", token=dflt)["records"]}
    assert not seen & {*about_globex, "setting_changed"}, seen
    records = api.ok("GET", "/api/v1/audit", token=gx)["records"]
    assert [r["kind"] for r in records if r["kind"] in about_globex] == about_globex
    assert {r["org"] for r in records} == {"globex"}
    assert "setting_changed" not in {r["kind"] for r in records}
    # The super-admin reads everything, the settings in no organisation.
    (setting,) = api.ok("GET", "/api/v1/audit?kind=setting_changed")["records"]
    assert setting["org"] is None and setting["details"] == {"password.min_length": "15"}


def test_what_a_client_names_cannot_forge_log_lines_or_records(setup: Setup) -> None:
    """A refused token leaves no channel record at all; an authorized user's refused
    stream is recorded, with what it named made inert (no line breaks, no escapes)."""
    context = ssl.create_default_context(cafile=str(setup.env.ca_file))
    forged = "x\r\n2099-01-01 00:00:00,000 INFO hatchway.relay: user admin logged in"
    query = urllib.parse.urlencode({"device": forged, "service": "ssh\x1b[2J"})

    def upgrade(token: str) -> bytes:
        request = (
            f"GET /api/v1/connect?{query} HTTP/1.1\r\nHost: localhost:{setup.port}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", setup.port), timeout=10) as tcp:
            with context.wrap_socket(tcp, server_hostname="localhost") as tls:
                tls.sendall(request.encode())
                return tls.recv(65536)

    assert upgrade("hwt_" + "x" * 43).startswith(b"HTTP/1.1 401")
    assert upgrade(relay_token(setup.env)).startswith(b"HTTP/1.1 400")  # a bad service
    setup.relay.stop()  # writes the channels still batched
    log = setup.relay.output()
    assert "\n2099-01-01" not in log and "\x1b" not in log
    store = SqlStore.open_data_dir(setup.env.data_dir)
    try:
        records = store.audit_records(kind="channel")
        assert [r.actor for r in records] == ["admin"]
        assert "\n" not in records[0].device and "\\r\\n2099" in records[0].device
    finally:
        store.close()
