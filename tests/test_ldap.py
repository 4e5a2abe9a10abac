"""LDAP bind authentication against a real slapd (tests/ldapserver.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hatchway.auth.ldap import (
    DEFAULT_GROUP_FILTER,
    LdapConfig,
    LdapUnavailable,
    LdapUser,
    check_setting,
    ldap_authenticate,
)
from hatchway.errors import ConfigError
from tests import ldapserver
from tests.ldapserver import GROUP_BASE, PASSWORDS, USER_DN, Slapd, make_ca, write_pem
from tests.procs import free_port

slapd = ldapserver.slapd  # the module-scoped fixture: one slapd for this file

ROLES = (("support", "admin"), ("partners", "operator"))


def config(url: str, **options: Any) -> LdapConfig:
    fields: dict[str, Any] = {"user_dn": USER_DN, "group_base": GROUP_BASE, "roles": ROLES}
    return LdapConfig(url=url, **{**fields, **options})


def dn(user: str) -> str:
    return USER_DN.format(user=user)


class FakeServer:
    """A loopback TCP server that counts connections, answers each with ``reply`` and
    closes it; when ``reply`` is None, keeps it open and says nothing."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._clients: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = f"ldap://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            if self.reply is None:
                self._clients.append(client)  # keep it open, say nothing
                continue
            with client:
                try:
                    client.recv(65536)
                    client.sendall(self.reply)
                except OSError:
                    pass

    @contextmanager
    def running(self) -> Iterator[FakeServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(5)
            for client in self._clients:
                client.close()
            self._listener.close()


# --- binding and roles ----------------------------------------------------------------------


def test_alice_gets_admin_from_support(slapd: Slapd) -> None:
    user = ldap_authenticate(config(slapd.url), "alice", PASSWORDS["alice"])
    assert user is not None
    assert user.dn == dn("alice")
    # support (groupOfNames member) and staff (posixGroup memberUid): the default filter's
    # member and memberUid branches.
    assert sorted(user.groups) == ["staff", "support"]
    assert user.role == "admin"


def test_bob_gets_operator_from_partners(slapd: Slapd) -> None:
    assert ldap_authenticate(config(slapd.url), "bob", PASSWORDS["bob"]) == LdapUser(
        dn=dn("bob"), groups=("partners",), role="operator"
    )


def test_carol_binds_but_no_group_maps(slapd: Slapd) -> None:
    assert ldap_authenticate(config(slapd.url), "carol", PASSWORDS["carol"]) == LdapUser(
        dn=dn("carol"), groups=("nobody-group",), role=None
    )


def test_no_roles_configured_still_lists_groups(slapd: Slapd) -> None:
    user = ldap_authenticate(config(slapd.url, roles=()), "bob", PASSWORDS["bob"])
    assert user == LdapUser(dn=dn("bob"), groups=("partners",), role=None)


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        ((("staff", "viewer"), ("support", "admin")), "viewer"),
        ((("support", "admin"), ("staff", "viewer")), "admin"),
        ((("SUPPORT", "owner"),), "owner"),  # CNs compare case-insensitively, as in LDAP
        ((("partners", "operator"),), None),
    ],
)
def test_first_mapped_group_in_config_order_wins(
    slapd: Slapd, roles: tuple[tuple[str, str], ...], expected: str | None
) -> None:
    user = ldap_authenticate(config(slapd.url, roles=roles), "alice", PASSWORDS["alice"])
    assert user is not None
    assert user.role == expected


def test_custom_group_filter(slapd: Slapd) -> None:
    only_posix = config(slapd.url, group_filter="(&(objectClass=posixGroup)(memberUid={user}))")
    user = ldap_authenticate(only_posix, "alice", PASSWORDS["alice"])
    assert user is not None
    assert user.groups == ("staff",)
    assert user.role is None


def test_wrong_password(slapd: Slapd) -> None:
    assert ldap_authenticate(config(slapd.url), "alice", PASSWORDS["bob"]) is None
    assert ldap_authenticate(config(slapd.url), "alice", PASSWORDS["alice"] + " ") is None


def test_unknown_user(slapd: Slapd) -> None:
    assert ldap_authenticate(config(slapd.url), "mallory", "Some-Passw0rd!") is None


def test_user_outside_the_configured_subtree(slapd: Slapd) -> None:
    elsewhere = config(slapd.url, user_dn="uid={user},ou=staff,dc=example,dc=org")
    assert ldap_authenticate(elsewhere, "alice", PASSWORDS["alice"]) is None


def test_empty_password_is_refused_though_the_directory_would_accept_it(slapd: Slapd) -> None:
    # This directory answers a bind with alice's DN and no password with success (an
    # anonymous bind): "bind succeeded" must not be taken for "password checked".
    whoami = subprocess.run(
        ["ldapwhoami", "-x", "-H", slapd.url, "-D", dn("alice"), "-w", ""],
        capture_output=True,
        env={**os.environ, "LDAPNOINIT": "1"},
        timeout=10,
    )
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.strip() == b"anonymous"
    assert ldap_authenticate(config(slapd.url), "alice", "") is None


def test_empty_password_never_contacts_the_server() -> None:
    with FakeServer(reply=None).running() as server:
        assert ldap_authenticate(config(server.url), "alice", "") is None
        assert server.connections == 0
    # Nothing listening at all: still None, not LdapUnavailable.
    assert ldap_authenticate(config(f"ldap://127.0.0.1:{free_port()}"), "alice", "") is None


@pytest.mark.parametrize(
    "name",
    [
        "*",
        "alice)(uid=*",
        "alice*",
        "alice,ou=x",
        "uid=alice",
        "alice\\2a",
        "",
        "alice\n",
        "alice\x00",
        " alice",
        "alice bob",
        "-alice",
        ".alice",
        "a" * 65,
        "älice",
    ],
)
def test_unsafe_user_names_are_refused_without_contacting_the_server(name: str) -> None:
    with FakeServer(reply=None).running() as server:
        assert ldap_authenticate(config(server.url), name, "Some-Passw0rd!") is None
        assert server.connections == 0


@pytest.mark.parametrize("name", ["*", "alice)(uid=*", "alice,ou=x", ""])
def test_unsafe_user_names_against_the_directory(slapd: Slapd, name: str) -> None:
    assert ldap_authenticate(config(slapd.url), name, PASSWORDS["alice"]) is None


def test_longest_allowed_name_reaches_the_server(slapd: Slapd) -> None:
    assert ldap_authenticate(config(slapd.url), "a" + "b.c@d-e_" * 7, "Some-Passw0rd!") is None


# --- the directory unavailable -------------------------------------------------------------


def test_nothing_listening_is_unavailable_quickly() -> None:
    started = time.monotonic()
    with pytest.raises(LdapUnavailable, match="Connection refused"):
        ldap_authenticate(config(f"ldap://127.0.0.1:{free_port()}", timeout=2), "alice", "pw")
    assert time.monotonic() - started < 2


def test_silent_server_times_out() -> None:
    with FakeServer(reply=None).running() as server:
        started = time.monotonic()
        with pytest.raises(LdapUnavailable):
            ldap_authenticate(config(server.url, timeout=1), "alice", "pw")
        assert time.monotonic() - started < 4
        assert server.connections == 1


def test_silent_server_times_out_with_a_fractional_timeout() -> None:
    # ldap3 packs the receive timeout as an integer: 0.5 must not crash with struct.error.
    with FakeServer(reply=None).running() as server:
        started = time.monotonic()
        with pytest.raises(LdapUnavailable):
            ldap_authenticate(config(server.url, timeout=0.5), "alice", "pw")
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        b"\x30\x84\xff\xff\xff\xff",
        b"\x30\x03\x02\x01\x01",
        b"",  # closes the connection without a word
    ],
)
def test_server_that_does_not_speak_ldap_is_unavailable(reply: bytes) -> None:
    # ldap3's decoder raises KeyError, IndexError... on such replies.
    with FakeServer(reply=reply).running() as server:
        with pytest.raises(LdapUnavailable):
            ldap_authenticate(config(server.url, timeout=2), "alice", "pw")


def test_missing_group_base_is_unavailable_not_refused(slapd: Slapd) -> None:
    nowhere = config(slapd.url, group_base="ou=nowhere,dc=example,dc=org")
    with pytest.raises(LdapUnavailable, match="noSuchObject"):
        ldap_authenticate(nowhere, "alice", PASSWORDS["alice"])


# --- TLS --------------------------------------------------------------------------------------


def localhost(url: str) -> str:
    return url.replace("127.0.0.1", "localhost")


def test_ldaps_verified_against_ca_file(slapd: Slapd) -> None:
    user = ldap_authenticate(
        config(slapd.ldaps_url, ca_file=slapd.ca_file), "alice", PASSWORDS["alice"]
    )
    assert user is not None
    assert user.role == "admin"


def test_starttls_verified_against_ca_file(slapd: Slapd) -> None:
    tls = config(localhost(slapd.url), starttls=True, ca_file=slapd.ca_file)
    user = ldap_authenticate(tls, "bob", PASSWORDS["bob"])
    assert user is not None
    assert user.role == "operator"
    assert ldap_authenticate(tls, "bob", "wrong") is None


def test_ldaps_refuses_a_server_the_system_cas_do_not_know(slapd: Slapd) -> None:
    with pytest.raises(LdapUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        ldap_authenticate(config(slapd.ldaps_url), "alice", PASSWORDS["alice"])


def test_tls_refuses_a_certificate_from_another_ca(slapd: Slapd, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    write_pem(other_ca, make_ca("Some other CA")[0])
    for tls in (
        config(slapd.ldaps_url, ca_file=str(other_ca)),
        config(localhost(slapd.url), starttls=True, ca_file=str(other_ca)),
    ):
        with pytest.raises(LdapUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            ldap_authenticate(tls, "alice", PASSWORDS["alice"])


def test_tls_refuses_a_certificate_for_another_host(slapd: Slapd) -> None:
    # The certificate names localhost only; 127.0.0.1 is not in it.
    by_ip = slapd.ldaps_url.replace("localhost", "127.0.0.1")
    for tls in (
        config(by_ip, ca_file=slapd.ca_file),
        config(slapd.url, starttls=True, ca_file=slapd.ca_file),
    ):
        with pytest.raises(LdapUnavailable, match="mismatch"):
            ldap_authenticate(tls, "alice", PASSWORDS["alice"])


# --- configuration ----------------------------------------------------------------------------

BASE_SETTINGS = {
    "ldap.url": "ldap://ldap.example.org",
    "ldap.user_dn": "uid={user},ou=people,dc=example,dc=org",
    "ldap.group_base": "ou=groups,dc=example,dc=org",
}


@pytest.mark.parametrize(
    "settings", [{}, {"ldap.url": ""}, {"ldap.url": "  "}, {"ldap.url": "", "ldap.roles": "x"}]
)
def test_from_settings_without_url_is_none(settings: dict[str, str]) -> None:
    assert LdapConfig.from_settings(settings) is None


def test_from_settings_defaults() -> None:
    assert LdapConfig.from_settings({**BASE_SETTINGS, "other.key": "ignored"}) == LdapConfig(
        url="ldap://ldap.example.org",
        user_dn="uid={user},ou=people,dc=example,dc=org",
        group_base="ou=groups,dc=example,dc=org",
        group_filter=DEFAULT_GROUP_FILTER,
        roles=(),
        org="default",
        starttls=False,
        ca_file=None,
        timeout=5.0,
    )


def test_from_settings_everything(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here\n")
    settings = {
        **BASE_SETTINGS,
        "ldap.url": "ldap://[::1]:1389/",
        "ldap.group_filter": "(memberUid={user})",
        "ldap.roles": " support = admin , partners=operator,,viewers=viewer ",
        "ldap.org": "acme",
        "ldap.starttls": "TRUE",
        "ldap.ca_file": str(ca),
        "ldap.timeout": "2.5",
    }
    assert LdapConfig.from_settings(settings) == LdapConfig(
        url="ldap://[::1]:1389/",
        user_dn=BASE_SETTINGS["ldap.user_dn"],
        group_base=BASE_SETTINGS["ldap.group_base"],
        group_filter="(memberUid={user})",
        roles=(("support", "admin"), ("partners", "operator"), ("viewers", "viewer")),
        org="acme",
        starttls=True,
        ca_file=str(ca),
        timeout=2.5,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ldap.url": "http://ldap.example.org"}, "ldap://"),
        ({"ldap.url": "ldapi:///var/run/slapd.sock"}, "ldap://"),
        ({"ldap.url": "ldap.example.org:389"}, "ldap://"),
        ({"ldap.url": "ldap://"}, "no host"),
        ({"ldap.url": "ldap://ldap.example.org:99999"}, "not a valid URL"),
        ({"ldap.url": "ldap://ldap.example.org/dc=example,dc=org"}, "host"),
        ({"ldap.url": "ldaps://ldap.example.org", "ldap.starttls": "true"}, "starttls"),
        ({"ldap.user_dn": "uid=alice,ou=people,dc=example,dc=org"}, "{user}"),
        ({"ldap.user_dn": "uid={user},ou={ou},dc=example,dc=org"}, "{user}"),
        ({"ldap.user_dn": "uid={user.__class__},dc=example,dc=org"}, "{user}"),
        ({"ldap.user_dn": "uid={user"}, "template"),
        ({"ldap.user_dn": "{user}"}, "not a valid DN"),
        ({"ldap.user_dn": ""}, "ldap.user_dn is required"),
        ({"ldap.group_base": "  "}, "ldap.group_base is required"),
        ({"ldap.group_base": "not a dn"}, "ldap.group_base is not a valid DN"),
        ({"ldap.group_filter": "(member={member})"}, "{dn} and {user}"),
        ({"ldap.roles": "support=superuser"}, "unknown role 'superuser'"),
        ({"ldap.roles": "support=user"}, "unknown role 'user'"),
        ({"ldap.roles": "support=Admin"}, "unknown role 'Admin'"),
        ({"ldap.roles": "support"}, "GROUP=ROLE"),
        ({"ldap.roles": "=admin"}, "empty group"),
        ({"ldap.starttls": "yes"}, "true or false"),
        ({"ldap.timeout": "soon"}, "number of seconds"),
        ({"ldap.timeout": "0"}, "positive"),
        ({"ldap.timeout": "-1"}, "positive"),
        ({"ldap.timeout": "nan"}, "positive"),
        ({"ldap.timeout": "inf"}, "positive"),
        ({"ldap.timeout": "60.5"}, "at most 60"),
        ({"ldap.ca_file": "ca.pem"}, "absolute path"),
        ({"ldap.group_filter": "(memberUid={user}"}, "not a valid LDAP filter"),
        ({"ldap.group_filter": "memberUid={user}"}, "not a valid LDAP filter"),
        ({"ldap.group_filter": "(a={user})(b={dn})"}, "not a valid LDAP filter"),
        ({"ldap.ca_file": "/nonexistent/ca.pem"}, "no such file"),
        ({"ldap.startls": "true"}, "unknown LDAP settings: ldap.startls"),
    ],
)
def test_from_settings_errors(changes: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        LdapConfig.from_settings({**BASE_SETTINGS, **changes})


def test_every_organisation_role_can_be_mapped() -> None:
    roles = (("a", "owner"), ("b", "admin"), ("c", "operator"), ("d", "viewer"))
    assert LdapConfig.from_settings(
        {**BASE_SETTINGS, "ldap.roles": ",".join(f"{g}={r}" for g, r in roles)}
    ) == LdapConfig(**{**config_fields(), "roles": roles})


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="unknown role"):
        LdapConfig(**{**config_fields(), "roles": (("support", "root"),)})


# Each setting on its own, as `hatchway settings set` checks it.


@pytest.mark.parametrize(
    ("name", "value", "stored"),
    [
        ("ldap.url", " ldaps://LDAP.example.org:636 ", "ldaps://LDAP.example.org:636"),
        ("ldap.user_dn", "uid={user},OU=People,dc=example,dc=org", None),
        ("ldap.group_base", "ou=Groups,dc=example,dc=org", None),
        ("ldap.group_filter", "(&(objectClass=posixGroup)(memberUid={user}))", None),
        ("ldap.roles", "Support=admin, partners=operator", None),
        ("ldap.org", "acme", None),
        ("ldap.starttls", "TRUE", "true"),
        ("ldap.starttls", "False", "false"),
        ("ldap.timeout", "2.5", None),
        ("ldap.timeout", "60", None),
    ],
)
def test_check_setting_keeps_or_normalises(name: str, value: str, stored: str | None) -> None:
    assert check_setting(name, value) == (value if stored is None else stored)


def test_check_setting_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here\n")
    assert check_setting("ldap.ca_file", f" {ca} ") == str(ca)


@pytest.mark.parametrize("name", list(LdapConfig.__dataclass_fields__))
def test_check_setting_empty_unsets(name: str) -> None:
    assert check_setting(f"ldap.{name}", "  ") == ""


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ldap.startls", "true", "unknown LDAP setting 'ldap.startls'"),
        ("ldap.bind_password", "secret", "unknown LDAP setting"),
        ("ldap.url", "http://ldap.example.org", "ldap://"),
        ("ldap.user_dn", "uid=alice,dc=example,dc=org", "{user}"),
        ("ldap.user_dn", "{user}", "not a valid DN"),
        ("ldap.group_base", "not a dn", "not a valid DN"),
        ("ldap.group_filter", "(member={member})", "{dn} and {user}"),
        ("ldap.group_filter", "(member={dn}", "not a valid LDAP filter"),
        ("ldap.roles", "support=superuser", "unknown role 'superuser'"),
        ("ldap.roles", "support", "GROUP=ROLE"),
        ("ldap.starttls", "yes", "true or false"),
        ("ldap.ca_file", "/nonexistent/ca.pem", "no such file"),
        ("ldap.ca_file", "ca.pem", "absolute path"),
        ("ldap.timeout", "soon", "number of seconds"),
        ("ldap.timeout", "0", "positive"),
        ("ldap.timeout", "3600", "at most 60"),
    ],
)
def test_check_setting_errors(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        check_setting(name, value)


def config_fields() -> dict[str, Any]:
    return {
        "url": BASE_SETTINGS["ldap.url"],
        "user_dn": BASE_SETTINGS["ldap.user_dn"],
        "group_base": BASE_SETTINGS["ldap.group_base"],
    }


# --- the test server itself -------------------------------------------------------------------


def test_slapd_helper_leaves_nothing_behind() -> None:
    with ldapserver.running_slapd() as server:
        pid, root = server.popen.pid, server.root
        assert root.is_dir()
        assert ldap_authenticate(config(server.url), "carol", PASSWORDS["carol"]) is not None
    assert server.popen.poll() is not None
    assert not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
