"""Logging in with a password the directory checks: a real relay, a real slapd
(tests/ldapserver.py), the operator's commands; and the store and relay parts beneath.

One relay and one slapd serve the whole module. Each test that fails logins does so
from its own loopback address (127.0.0.N), so that the relay's per-address throttle
(20 failures) never mixes tests up.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import sqlite3
import ssl
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hatchway.auth.passwords import DUMMY_HASH, verify_password
from hatchway.errors import ConfigError, NotFoundError
from hatchway.relay import server as relay_server
from hatchway.relay.server import RelayConfig, RelayServer
from hatchway.store.sql import DB_FILE_NAME, LOCKOUT_FAILURES, SqlStore
from tests import ldapserver
from tests.ldapserver import GROUP_BASE, PASSWORDS, USER_DN, Slapd, user_ldif
from tests.procs import Env, Proc, wait_for
from tests.test_ldap import FakeServer

slapd = ldapserver.slapd  # the module-scoped fixture: one slapd for this file

ORG = "acme"
LOCAL_PASSWORD = "Vivid-Lantern-482!"
#: Added to the directory by the relay fixture. The relay also has a local dave.
MORE_PASSWORDS = {"dave": "Dave-Secret-Passw0rd!", "erin": "Erin-Secret-Passw0rd!"}
ROLES = "support=admin,partners=operator"
_SOURCES = (f"127.0.0.{n}" for n in itertools.count(10))


def new_source() -> str:
    """A loopback address no other test logs in from."""
    return next(_SOURCES)


def ldap_settings(url: str) -> list[tuple[str, str]]:
    # ldap.url first: each key is checked on its own, the whole when it is used.
    return [
        ("ldap.url", url),
        ("ldap.user_dn", USER_DN),
        ("ldap.group_base", GROUP_BASE),
        ("ldap.roles", ROLES),
        ("ldap.org", ORG),
        ("ldap.timeout", "3"),
    ]


def members(group: str, *users: str) -> str:
    """LDIF that makes ``users`` the members of a groupOfNames (whatever they were)."""
    lines = "".join(f"member: {USER_DN.format(user=user)}\n" for user in users)
    return f"dn: cn={group},{GROUP_BASE}\nchangetype: modify\nreplace: member\n{lines}"


#: The groups that give a role, as the relay fixture leaves them.
SUPPORT = ("alice", "dave")
PARTNERS = ("bob", "erin")


@dataclass
class Relay:
    env: Env
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        source: str = "127.0.0.1",
    ) -> tuple[int, Any]:
        """A JSON call to the REST API from the loopback address ``source``."""
        context = ssl.create_default_context(cafile=str(self.env.ca_file))
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=context, timeout=30, source_address=(source, 0)
        )
        headers = {"Host": f"localhost:{self.port}", "Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, None if body is None else json.dumps(body), headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def login(self, user: str, password: str, source: str) -> tuple[int, Any]:
        return self.call(
            "POST", "/api/v1/login", {"user": user, "password": password}, source=source
        )

    def token(self, user: str, password: str, source: str = "127.0.0.1") -> str:
        status, body = self.login(user, password, source)
        assert status == 200, body
        return str(body["token"])

    def whoami(self, token: str) -> dict[str, Any]:
        status, body = self.call("GET", "/api/v1/whoami", token=token)
        assert status == 200, body
        return dict(body)

    def offline(self, *args: str, check: bool = True) -> tuple[int, str]:
        """An admin command on the relay's data directory (exit status, output)."""
        result = self.env.hatchway(
            *args, "--data-dir", str(self.env.data_dir), prefix=(), check=check
        )
        return result.returncode, (result.stdout + result.stderr).decode()

    def store(self) -> SqlStore:
        return SqlStore.open_data_dir(self.env.data_dir)

    def failures(self, user: str) -> int:
        """Failed logins counted towards the user's lockout."""
        with closing(sqlite3.connect(self.env.data_dir / DB_FILE_NAME)) as db:
            row = db.execute(
                "SELECT failures FROM login_state JOIN users ON users.id = login_state.user_id"
                " WHERE users.name = ?",
                (user,),
            ).fetchone()
        return 0 if row is None else int(row[0])


@pytest.fixture(scope="module")
def relay(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    env = Env(tmp_path_factory.mktemp("ldap-login"))
    try:
        proc, port, _ = env.start_relay()
        relay = Relay(env, proc, port)
        store = relay.store()
        store.add_org(ORG)
        store.add_device("acme-cam", org=ORG)
        store.add_device("other-cam")  # in the default organisation: not for acme's users
        store.add_user("dave", "viewer", LOCAL_PASSWORD)
        store.close()
        slapd.modify(
            "\n\n".join(user_ldif(user, pw) for user, pw in MORE_PASSWORDS.items())
            + "\n\n"
            + members("support", *SUPPORT)
            + "\n"
            + members("partners", *PARTNERS)
        )
        # The relay is running and has read its (empty) LDAP settings when LDAP is
        # configured with the offline command: it must pick them up within seconds.
        source = new_source()
        assert relay.login("alice", PASSWORDS["alice"], source)[0] == 401
        for name, value in ldap_settings(slapd.url):
            relay.offline("settings", "set", name, value)
        wait_for(
            lambda: relay.login("alice", PASSWORDS["alice"], source)[0] == 200,
            relay_server.LDAP_CONFIG_SECONDS + 10,
            "the relay to use the new LDAP settings",
            interval=0.5,
        )
        yield relay
    finally:
        env.stop_all()


# --- the relay and the directory, end to end ---------------------------------------------


def test_alice_logs_in_with_the_cli_as_admin_of_the_directory_org(relay: Relay) -> None:
    env = relay.env
    env.login(relay.url, "alice", PASSWORDS["alice"])
    devices = json.loads(env.hatchway("devices", "--json").stdout)
    assert [d["id"] for d in devices] == ["acme-cam"]  # her organisation's, no other
    whoami = relay.whoami(relay.token("alice", PASSWORDS["alice"]))
    assert (whoami["user"], whoami["role"], whoami["org"]) == ("alice", "admin", ORG)
    assert not whoami["superadmin"]
    assert "devices.manage" in whoami["permissions"]
    store = relay.store()
    try:
        alice = store.get_user("alice")
        assert alice is not None
        assert (alice.source, alice.role, alice.org) == ("ldap", "admin", ORG)
        assert not alice.must_change_password
    finally:
        store.close()


def test_bob_is_an_operator(relay: Relay) -> None:
    status, body = relay.login("bob", PASSWORDS["bob"], new_source())
    assert status == 200, body
    assert (body["user"], body["role"]) == ("bob", "operator")
    whoami = relay.whoami(body["token"])
    assert (whoami["role"], whoami["org"]) == ("operator", ORG)


def test_a_directory_users_tokens_are_short_lived(relay: Relay) -> None:
    """The relay cannot ask the directory whether a user still exists: a directory
    user's API tokens expire after ldap.token_hours (12 by default), a local user's do
    not change."""
    status, body = relay.login("bob", PASSWORDS["bob"], new_source())
    assert status == 200 and body["expires_in"] == 12 * 3600
    status, created = relay.call(
        "POST", "/api/v1/tokens", {"name": "ci", "expires_in_days": 30}, token=body["token"]
    )
    assert status == 200, created
    lifetime = datetime.fromisoformat(created["expires_at"]) - datetime.fromisoformat(
        created["created_at"]
    )
    assert timedelta(hours=11, minutes=59) < lifetime <= timedelta(hours=12)
    status, body = relay.login("dave", LOCAL_PASSWORD, new_source())
    assert status == 200 and body["expires_in"] == 30 * 24 * 3600


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("carol", PASSWORDS["carol"]),  # the directory knows her; no group gives a role
        ("alice", PASSWORDS["bob"]),  # wrong password
        ("alice", ""),  # empty: an anonymous bind to this directory, refused before it
        ("mallory", "Some-Passw0rd!"),  # in neither the directory nor the relay
        ("Alice", PASSWORDS["alice"]),  # directory names are lower case here
        ("alice)(uid=*", PASSWORDS["alice"]),
    ],
)
def test_refused(relay: Relay, user: str, password: str) -> None:
    status, body = relay.login(user, password, new_source())
    assert (status, body["error"]) == (401, "invalid_credentials")
    store = relay.store()
    try:
        assert user == "alice" or store.get_user(user) is None  # nobody new was stored
    finally:
        store.close()


def test_a_user_in_no_mapped_group_is_logged(relay: Relay) -> None:
    assert relay.login("carol", PASSWORDS["carol"], new_source())[0] == 401
    assert "LDAP user 'carol' is in no group of ldap.roles (groups: nobody-group)" in (
        relay.proc.output()
    )


def test_a_local_user_keeps_their_name_and_password(relay: Relay) -> None:
    # The directory has a dave too (in support: admin); the relay's own dave wins.
    status, body = relay.login("dave", MORE_PASSWORDS["dave"], new_source())
    assert (status, body["error"]) == (401, "invalid_credentials")
    status, body = relay.login("dave", LOCAL_PASSWORD, new_source())
    assert (status, body["role"]) == (200, "viewer")
    store = relay.store()
    try:
        dave = store.get_user("dave")
        assert dave is not None
        assert (dave.source, dave.role, dave.org) == ("local", "viewer", "default")
        assert not [r for r in store.audit_records(actor="ldap") if r.details.get("user") == "dave"]
    finally:
        store.close()


def test_group_changes_in_the_directory_apply_at_the_next_login(relay: Relay, slapd: Slapd) -> None:
    token = relay.token("alice", PASSWORDS["alice"])
    assert relay.whoami(token)["role"] == "admin"
    try:
        slapd.modify(members("support", "dave"))
        # In no mapped group now: refused, and her earlier token loses the role too.
        assert relay.login("alice", PASSWORDS["alice"], new_source())[0] == 401
        assert relay.whoami(token)["role"] == "user"
        assert relay.whoami(token)["permissions"] == []
        slapd.modify(members("partners", *PARTNERS, "alice"))
        status, body = relay.login("alice", PASSWORDS["alice"], new_source())
        assert (status, body["role"]) == (200, "operator")
    finally:
        slapd.modify(members("support", *SUPPORT) + "\n" + members("partners", *PARTNERS))
    assert relay.whoami(relay.token("alice", PASSWORDS["alice"]))["role"] == "admin"
    store = relay.store()
    try:
        changes = [
            r.details["role"]
            for r in store.audit_records(kind="user_changed", actor="ldap")
            if r.details["user"] == "alice"
        ]
        assert changes[-3:] == ["user", "operator", "admin"]
    finally:
        store.close()


def test_directory_down_fails_closed(relay: Relay, slapd: Slapd) -> None:
    relay.token("alice", PASSWORDS["alice"])  # she exists in the relay
    source = new_source()
    slapd.stop()
    try:
        for _ in range(3):
            status, body = relay.login("alice", PASSWORDS["alice"], source)
            assert (status, body["error"]) == (401, "invalid_credentials")
        assert relay.login("mallory", "Some-Passw0rd!", source)[0] == 401
        assert relay.failures("alice") == 0  # not her fault: no step towards a lockout
        assert "LDAP directory unreachable or failing, login of 'alice' refused" in (
            relay.proc.output()
        )
        # Local accounts do not depend on the directory.
        assert relay.login("dave", LOCAL_PASSWORD, source)[0] == 200
    finally:
        slapd.start()
    assert relay.login("alice", PASSWORDS["alice"], source)[0] == 200


def test_a_directory_that_hangs_holds_up_no_local_login(env: Env) -> None:
    """Directory logins wait on the network in slots and threads of their own: while a
    directory that accepts connections and never answers holds more of them than there
    are password slots, the local administrator logs in and the API answers."""
    proc, port, password = env.start_relay()
    assert password is not None
    relay = Relay(env, proc, port)
    store = relay.store()
    store.add_org(ORG)
    store.close()
    with FakeServer(reply=None).running() as directory:
        for name, value in ldap_settings(directory.url):
            relay.offline("settings", "set", name, value)
        hanging = 12  # more than the password slots and the default thread pool
        answers: list[tuple[int, Any]] = []

        def directory_login(n: int) -> None:
            answers.append(relay.login(f"user{n}", "Some-Passw0rd!", new_source()))

        threads = [
            threading.Thread(target=directory_login, args=(n,), daemon=True) for n in range(hanging)
        ]
        for thread in threads:
            thread.start()
        wait_for(lambda: directory.connections >= 8, 10, "directory logins waiting")
        token = relay.token("admin", password, new_source())
        assert relay.whoami(token)["user"] == "admin"
        assert answers == []  # every directory login was still waiting meanwhile
        for thread in threads:
            thread.join(60)
        assert len(answers) == hanging
        assert {(status, body["error"]) for status, body in answers} == {
            (401, "invalid_credentials")
        }
    assert "LDAP directory unreachable or failing, login of 'user0' refused" in proc.output()


def test_wrong_passwords_lock_a_directory_user(relay: Relay) -> None:
    source = new_source()
    assert relay.login("erin", MORE_PASSWORDS["erin"], source)[0] == 200
    for _ in range(LOCKOUT_FAILURES):
        assert relay.login("erin", "Wrong-Passw0rd!", source)[0] == 401
    status, body = relay.login("erin", MORE_PASSWORDS["erin"], source)
    assert (status, body["error"]) == (401, "invalid_credentials")  # locked looks the same
    _, out = relay.offline("audit", "list", "--kind", "lockout", "--user", "erin")
    assert "lockout" in out
    relay.offline("user", "unlock", "erin")
    assert relay.login("erin", MORE_PASSWORDS["erin"], source)[0] == 200


def test_audit_log(relay: Relay) -> None:
    relay.token("bob", PASSWORDS["bob"])
    source = new_source()
    assert relay.login("carol", PASSWORDS["carol"], source)[0] == 401
    assert relay.login("mallory", "Some-Passw0rd!", source)[0] == 401
    _, out = relay.offline("audit", "list", "--kind", "user_added", "--user", "ldap")
    added = {line.split("user=")[1].split()[0]: line for line in out.splitlines()}
    assert {"alice", "bob"} <= set(added)
    assert "role=admin" in added["alice"] and f"org={ORG}" in added["alice"]
    assert "source=ldap" in added["alice"]
    assert "carol" not in added and "dave" not in added
    store = relay.store()
    try:
        logins = {r.actor for r in store.audit_records(kind="login")}
        assert {"alice", "bob"} <= logins
        failed = {r.actor for r in store.audit_records(kind="login_failed")}
        assert {"carol", "mallory"} <= failed
        assert store.audit_verify().ok
    finally:
        store.close()


def test_settings_commands(relay: Relay, slapd: Slapd) -> None:
    _, out = relay.offline("settings", "list")
    assert f"ldap.url = {slapd.url}" in out
    assert f"ldap.roles = {ROLES}" in out
    for name, value, message in [
        ("ldap.startls", "true", "unknown LDAP setting 'ldap.startls'"),
        ("ldap.org", "nowhere", "no organisation 'nowhere'"),
        ("ldap.url", "http://ldap.example.org", "ldap://"),
        ("ldap.group_filter", "(member={dn}", "not a valid LDAP filter"),
    ]:
        status, out = relay.offline("settings", "set", name, value, check=False)
        assert status == 1 and message in out, out


# --- the store ----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    store = SqlStore.open_data_dir(tmp_path / "data")
    store.add_org(ORG)
    try:
        yield store
    finally:
        store.close()


def test_sync_external_user_creates_and_updates(store: SqlStore, tmp_path: Path) -> None:
    alice = store.sync_external_user("alice", "admin", ORG)
    assert alice is not None
    assert (alice.name, alice.role, alice.org, alice.source) == ("alice", "admin", ORG, "ldap")
    with closing(sqlite3.connect(tmp_path / "data" / DB_FILE_NAME)) as db:
        (password_hash,) = db.execute("SELECT password_hash FROM users").fetchone()
    for guess in ("", password_hash, "!", "Alice-Secret-Passw0rd!"):
        assert verify_password(password_hash, guess) is False
    assert store.sync_external_user("alice", "admin", ORG) == alice  # nothing to change
    changed = store.sync_external_user("alice", "viewer", "default")
    assert changed is not None and (changed.role, changed.org) == ("viewer", "default")
    records = [(r.kind, r.actor, r.details) for r in store.audit_records()][-2:]
    assert records == [
        ("user_added", "ldap", {"user": "alice", "role": "admin", "org": ORG,
                                "superadmin": False, "source": "ldap"}),
        ("user_changed", "ldap", {"user": "alice", "role": "viewer", "org": "default",
                                  "grants_removed": 0, "teams_left": 0}),
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="kept by the directory"):
        store.set_password("alice", "A-Brand-New-Passw0rd!")
    with pytest.raises(ConfigError):
        store.sync_external_user("alice", "superuser", ORG)
    with pytest.raises(NotFoundError):
        store.sync_external_user("bob", "admin", "nowhere")
    assert store.get_user("bob") is None


def test_sync_external_user_never_takes_a_local_account(store: SqlStore) -> None:
    store.add_user("alice", "viewer", LOCAL_PASSWORD)
    before = len(store.audit_records())
    assert store.sync_external_user("alice", "owner", ORG) is None
    alice = store.get_user("alice")
    assert alice is not None
    assert (alice.source, alice.role, alice.org) == ("local", "viewer", "default")
    assert len(store.audit_records()) == before
    assert store.authenticate_user("alice", LOCAL_PASSWORD) is not None


def test_moving_to_another_org_drops_grants_and_teams(store: SqlStore) -> None:
    store.add_device("cam", org=ORG, tags=("lab",))
    store.add_team("ops", org=ORG)
    store.sync_external_user("alice", "viewer", ORG)
    store.add_grant("alice", "operator", tag="lab")
    store.set_team_member("ops", "alice")
    store.add_grant(None, "operator", team="ops", org=ORG, device="cam")
    store.sync_external_user("alice", "viewer", "default")
    # A tag grant from acme must not follow her: "lab" may name devices elsewhere too.
    assert store.list_grants("alice") == []
    assert store.list_teams(ORG) == [(ORG, "ops", [])]
    changed = store.audit_records(kind="user_changed")[-1].details
    assert (changed["grants_removed"], changed["teams_left"]) == (1, 1)


def test_directory_users_never_pass_the_stores_password_check(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.sync_external_user("alice", "admin", ORG)
    checked: list[str] = []

    def spy(password_hash: str, password: str) -> bool:
        checked.append(password_hash)
        return True  # even if the stored value did verify

    monkeypatch.setattr("hatchway.store.sql.verify_password", spy)
    assert store.authenticate_user("alice", "anything") is None
    assert checked == [DUMMY_HASH]  # the same work as for an unknown name
    assert store.locked_until("alice") is None


def test_login_failed_counts_towards_the_lockout(store: SqlStore) -> None:
    store.sync_external_user("alice", "admin", ORG)
    store.login_failed("mallory")  # unknown: nothing to count, no error
    for _ in range(LOCKOUT_FAILURES - 1):
        store.login_failed("alice")
    assert store.locked_until("alice") is None
    store.sync_external_user("alice", "admin", ORG)  # a good password resets the count
    for _ in range(LOCKOUT_FAILURES - 1):
        store.login_failed("alice")
    assert store.locked_until("alice") is None
    store.login_failed("alice")
    assert store.locked_until("alice") is not None
    assert [r.actor for r in store.audit_records(kind="lockout")] == ["alice"]


def test_ldap_settings(store: SqlStore) -> None:
    # Any order; each checked alone; stored as given (DNs and paths keep their case).
    store.set_setting("ldap.org", ORG)
    store.set_setting("ldap.url", " ldap://LDAP.example.org:389 ")
    store.set_setting("ldap.user_dn", "uid={user},OU=People,dc=example,dc=org")
    store.set_setting("ldap.starttls", "TRUE")
    store.set_setting("password.require_special", "FALSE")
    assert store.settings() == {
        "ldap.org": ORG,
        "ldap.url": "ldap://LDAP.example.org:389",
        "ldap.user_dn": "uid={user},OU=People,dc=example,dc=org",
        "ldap.starttls": "true",
        "password.require_special": "false",
    }
    store.set_setting("ldap.starttls", "")  # empty: unset
    store.set_setting("ldap.timeout", "")  # unset already: fine
    assert "ldap.starttls" not in store.settings()
    for name, value, message in [
        ("ldap.bind_password", "secret", "unknown LDAP setting 'ldap.bind_password'"),
        ("ldap.org", "nowhere", "no organisation 'nowhere'"),
        ("ldap.url", "ldapi:///run/slapd.sock", "ldap://"),
        ("ldap.user_dn", "uid=alice,dc=example,dc=org", "{user}"),
        ("ldap.group_base", "not a dn", "not a valid DN"),
        ("ldap.group_filter", "(memberUid={user}", "not a valid LDAP filter"),
        ("ldap.roles", "support=root", "unknown role 'root'"),
        ("ldap.starttls", "yes", "true or false"),
        ("ldap.ca_file", "/nonexistent/ca.pem", "no such file"),
        ("ldap.timeout", "600", "at most 60"),
        ("ldap.token_hours", "0", "from 1 to 720"),
        ("ldap.token_hours", "721", "from 1 to 720"),
        ("ldap.token_hours", "1.5", "whole number of hours"),
        ("colour", "blue", "unknown setting"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
            store.set_setting(name, value)
    changes = [r.details for r in store.audit_records(kind="setting_changed")]
    assert changes[0] == {"ldap.org": ORG}
    assert {"ldap.starttls": ""} in changes
    assert len(changes) == 7


# --- the relay's part, in this process ----------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RelayServer]:
    monkeypatch.setattr(relay_server, "LDAP_CONFIG_SECONDS", 0.0)  # read settings every time
    server = RelayServer(RelayConfig(data_dir=tmp_path / "relay"))
    server.store.add_org(ORG)
    server.store.add_user("dave", "viewer", LOCAL_PASSWORD)
    try:
        yield server
    finally:
        server.store.close()


def configure(server: RelayServer, url: str) -> None:
    for name, value in ldap_settings(url):
        server.store.set_setting(name, value)


def test_relay_without_ldap_uses_the_store(server: RelayServer, slapd: Slapd) -> None:
    assert server.ldap_config() is None
    assert server.authenticate_user("alice", PASSWORDS["alice"]) is None
    assert server.authenticate_user("dave", LOCAL_PASSWORD) is not None
    configure(server, slapd.url)
    user = server.authenticate_user("alice", PASSWORDS["alice"])
    assert user is not None and (user.role, user.org, user.source) == ("admin", ORG, "ldap")
    server.store.set_setting("ldap.url", "")  # LDAP off again: directory users are refused
    assert server.authenticate_user("alice", PASSWORDS["alice"]) is None
    assert server.authenticate_user("dave", LOCAL_PASSWORD) is not None


def test_invalid_configuration_fails_closed_and_is_logged_once(
    server: RelayServer, slapd: Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hatchway.relay")
    configure(server, slapd.url)
    server.store.set_setting("ldap.user_dn", "")  # incomplete: user_dn is required
    for _ in range(3):
        assert server.authenticate_user("alice", PASSWORDS["alice"]) is None
    assert server.authenticate_user("dave", LOCAL_PASSWORD) is not None  # local still works
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "LDAP configuration invalid: ldap.user_dn is required when ldap.url is set; "
        "LDAP logins are refused until fixed"
    ]
    server.store.set_setting("ldap.user_dn", USER_DN)
    assert server.authenticate_user("alice", PASSWORDS["alice"]) is not None
    assert (
        f"LDAP logins: directory {slapd.url}, organisation {ORG}, "
        "roles support=admin, partners=operator"
    ) in caplog.text


def test_locked_directory_user_is_refused_without_asking_the_directory(
    server: RelayServer,
) -> None:
    with FakeServer(reply=b"").running() as directory:  # closes every connection at once
        configure(server, directory.url)
        server.store.sync_external_user("alice", "admin", ORG)
        # Unavailable: refused, and not counted towards her lockout.
        assert server.authenticate_user("alice", PASSWORDS["alice"]) is None
        assert directory.connections == 1
        assert server.store.locked_until("alice") is None
        for _ in range(LOCKOUT_FAILURES):
            server.store.login_failed("alice")
        assert server.authenticate_user("alice", PASSWORDS["alice"]) is None
        assert directory.connections == 1  # locked: the directory was not asked


def test_wrong_password_counts_only_for_known_users(server: RelayServer, slapd: Slapd) -> None:
    configure(server, slapd.url)
    assert server.authenticate_user("alice", "Wrong-Passw0rd!") is None
    assert server.store.get_user("alice") is None  # nothing stored for a refused name
    assert server.authenticate_user("alice", PASSWORDS["alice"]) is not None
    assert server.authenticate_user("alice", "Wrong-Passw0rd!") is None
    with closing(sqlite3.connect(server.config.data_dir / DB_FILE_NAME)) as db:
        assert db.execute("SELECT failures FROM login_state").fetchall() == [(1,)]


def test_missing_organisation_refuses_the_login(
    server: RelayServer, slapd: Slapd, caplog: pytest.LogCaptureFixture
) -> None:
    configure(server, slapd.url)
    server.store.remove_org(ORG)  # nobody in it yet: allowed, though ldap.org names it
    assert server.authenticate_user("alice", PASSWORDS["alice"]) is None
    assert "LDAP user 'alice' could not be stored, login refused: no organisation" in caplog.text
    assert server.store.get_user("alice") is None
