"""The authorisation matrix: principals of two organisations with each role, against
every device and service, every proxied HTTP path and every API endpoint, through the
real relay and agents.

Each channel cell opens a channel with `hatchway proxy DEVICE SERVICE` (a client
stream) and must be allowed or refused as expected; a refused cell must deliver zero
bytes: the service behind the device never sees a connection. Device web UIs
(`hatchway open`, then the device's own pages through the relay) follow the same rules,
and so does every REST API endpoint, where a refusal must change nothing. Removing a
grant closes an open channel.
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hatchway.auth.permissions import ROLE_PERMISSIONS
from hatchway.web.access import DEVICE_COOKIE
from tests.procs import HATCHWAY, Env, Proc, device_online, wait_for
from tests.test_integration import EchoServer
from tests.webclient import DOMAIN, WebClient, set_cookie_value

PASSWORD = "Vivid-Lantern-482!"
DEVICES = {"dev-a1": ("acme", "plant1"), "dev-a2": ("acme", "plant2"), "dev-g1": ("globex", "hq")}
SERVICES = ("ssh", "http")
#: principal -> (organisation, organisation-wide role, grants as (role, --device|--tag, X))
PRINCIPALS: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    "acme-owner": ("acme", "owner", []),
    "acme-admin": ("acme", "admin", []),
    "acme-operator": ("acme", "operator", []),
    "acme-viewer": ("acme", "viewer", []),
    "acme-partner": ("acme", "user", [("operator", "--tag", "plant1")]),
    "acme-customer": ("acme", "user", [("viewer", "--device", "dev-a2")]),
    "acme-nobody": ("acme", "user", []),
    "globex-admin": ("globex", "admin", []),
    "globex-partner": ("globex", "user", [("operator", "--tag", "plant1")]),  # acme's tag
    # Through the team "support" of acme: the custom role "ssh-only" on the tag plant2.
    "acme-support": ("acme", "user", []),
}
TEAM_GRANT = ("ssh-only", "--tag", "plant2")


def expected(principal: str, device: str, service: str) -> bool:
    if principal == "superadmin":
        return True
    org, role, grants = PRINCIPALS[principal]
    device_org, tag = DEVICES[device]
    if org != device_org:
        return False
    if principal == "acme-support":
        return tag == TEAM_GRANT[2] and service == "ssh"
    roles = [role] + [
        r for r, kind, target in grants if target == (device if kind == "--device" else tag)
    ]
    return any(
        r in ("owner", "admin", "operator") or (r == "viewer" and service == "http") for r in roles
    )


class DevicePages:
    """A device's web UI: a real HTTP server that counts the requests reaching it."""

    def __init__(self, device: str) -> None:
        pages = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                pages.connections += 1
                body = f"{device} page {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.connections = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    env: Env
    relay: Proc
    url: str
    admin_password: str
    web: WebClient
    echo: dict[tuple[str, str], EchoServer | DevicePages] = field(default_factory=dict)
    config_dirs: dict[str, Path] = field(default_factory=dict)

    def token(self, principal: str) -> str:
        login = json.loads((self.config_dirs[principal] / "login.json").read_text())
        return str(login["token"])

    def api(
        self, principal: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """Call the REST API with the principal's token: status and JSON body."""
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token(principal)}",
                     "Content-Type": "application/json"},
        )  # fmt: skip
        ctx = ssl.create_default_context(cafile=str(self.env.ca_file))
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def run(
        self, principal: str, *args: str, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        environ = self.env.environ()
        environ["HATCHWAY_CONFIG_DIR"] = str(self.config_dirs[principal])
        return subprocess.run(
            [*HATCHWAY, *args], input=stdin, capture_output=True, timeout=60, env=environ
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    env = Env(tmp_path_factory.mktemp("authz"))
    echo: dict[tuple[str, str], EchoServer | DevicePages] = {}
    try:
        relay, port, password = env.start_relay(extra=["--domain", DOMAIN])
        assert password is not None
        url = f"https://127.0.0.1:{port}"
        data = ["--data-dir", str(env.data_dir)]
        for org in ("acme", "globex"):
            env.hatchway("org", "add", org, *data, prefix=())
        for device, (org, tag) in DEVICES.items():
            out = env.hatchway(
                "device", "add", device, "--json", "--org", org, "--tag", tag, *data, prefix=()
            )
            secret = env.root / f"{device}.secret"
            secret.write_text(json.loads(out.stdout)["secret"])
            secret.chmod(0o600)
            services = []
            for service in SERVICES:
                echo[device, service] = DevicePages(device) if service == "http" else EchoServer()
                services.append(f"{service}=127.0.0.1:{echo[device, service].port}")
            env.start_agent(url, device, secret, services)
        for name, (org, role, grants) in PRINCIPALS.items():
            env.hatchway(
                "user", "add", name, "--org", org, "--role", role, "--password-stdin", *data,
                input=PASSWORD.encode() + b"\n", prefix=(),
            )  # fmt: skip
            for grant_role, kind, target in grants:
                out = env.hatchway("grant", "add", grant_role, "--user", name, kind, target,
                                   *data, prefix=(), check=False)  # fmt: skip
                # A grant on another organisation's device is refused; on a tag it is
                # allowed but only ever matches the user's own organisation's devices.
                assert out.returncode == 0, out.stderr
        for target in ("acme-target", "globex-target"):
            env.hatchway(
                "user", "add", target, "--org", target.split("-")[0], "--password-stdin",
                *data, input=PASSWORD.encode() + b"\n", prefix=(),
            )  # fmt: skip
        env.hatchway("team", "add", "support", "--org", "acme", *data, prefix=())
        env.hatchway("team", "join", "support", "acme-support", *data, prefix=())
        env.hatchway(
            "role", "add", "ssh-only", "--org", "acme", "--permission", "devices.view",
            "--permission", "connect:ssh", *data, prefix=(),
        )  # fmt: skip
        role, kind, target = TEAM_GRANT
        env.hatchway(
            "grant", "add", role, "--team", "support", "--org", "acme", kind, target, *data,
            prefix=(),
        )  # fmt: skip
        world = World(env, relay, url, password, WebClient(port, env.ca_file), echo)
        for name in [*PRINCIPALS, "superadmin"]:
            world.config_dirs[name] = env.root / f"config-{name}"
            user, secret_pw = (name, PASSWORD) if name != "superadmin" else ("admin", password)
            result = world.run(
                name, "login", url, "--user", user, "--password-stdin", "--ca-file",
                str(env.ca_file), stdin=secret_pw.encode() + b"\n",
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
        env.login(url, "admin", password)
        for device in DEVICES:
            wait_for(lambda d=device: device_online(env, d), 30, f"{device} online")
        yield world
    finally:
        env.stop_all()
        for server in echo.values():
            server.close()


CELLS = [
    (principal, device, service)
    for principal in [*PRINCIPALS, "superadmin"]
    for device in DEVICES
    for service in SERVICES
]


@pytest.mark.parametrize(("principal", "device", "service"), CELLS)
def test_channel_matrix(world: World, principal: str, device: str, service: str) -> None:
    echo = world.echo[device, service]
    before = echo.connections
    ping = b"GET /ping HTTP/1.0\r\n\r\n" if service == "http" else b"ping"
    result = world.run(principal, "proxy", device, service, stdin=ping)
    if expected(principal, device, service):
        assert result.returncode == 0, result.stderr
        if service == "http":
            assert result.stdout.startswith(b"HTTP/1.0 200"), result.stdout
            assert result.stdout.endswith(f"{device} page /ping".encode())
        else:
            assert result.stdout == b"ping"
    else:
        assert result.returncode == 1
        assert result.stdout == b""
        assert "not permitted" in result.stderr.decode()
        time.sleep(0.1)
        assert echo.connections == before, "a refused channel reached the service"


@pytest.mark.parametrize("principal", [*PRINCIPALS, "superadmin"])
def test_device_lists_and_web_links(world: World, principal: str) -> None:
    listed = json.loads(world.run(principal, "devices", "--json").stdout)
    visible = {d for d in DEVICES if any(expected(principal, d, s) for s in SERVICES)}
    assert {d["id"] for d in listed} == visible
    for device in DEVICES:
        result = world.run(principal, "open", device, "--service", "http", "--print-url")
        if expected(principal, device, "http"):
            assert result.returncode == 0 and b"/__hatchway/auth?grant=" in result.stdout
        else:
            assert result.returncode == 1 and b"you may reach" in result.stderr


WEB_PATHS = ("/", "/config/network?apply=1")
ALL = [*PRINCIPALS, "superadmin"]


def _device_cookie(world: World, principal: str, device: str) -> str:
    status, answer = world.api(
        principal, "POST", "/api/v1/web-sessions", {"device": device, "service": "http"}
    )
    assert status == 200, answer
    url = urllib.parse.urlsplit(answer["url"])
    resp = world.web.request("GET", f"{url.path}?{url.query}", device=device)
    assert resp.status == 303, resp
    return f"{DEVICE_COOKIE}={set_cookie_value(resp, DEVICE_COOKIE)}"


@pytest.mark.parametrize(("principal", "device"), [(p, d) for p in ALL for d in DEVICES])
def test_web_matrix(world: World, principal: str, device: str) -> None:
    """Every proxied path of a device's web UI: served to those who may open it; nothing
    reaches the device for anyone else, not even with a session for another device."""
    pages = world.echo[device, "http"]
    if expected(principal, device, "http"):
        cookie = _device_cookie(world, principal, device)
        before = pages.connections
        for path in WEB_PATHS:
            page = world.web.request("GET", path, device=device, cookie=cookie)
            assert page.status == 200 and page.body == f"{device} page {path}".encode()
        assert pages.connections == before + len(WEB_PATHS)
        return
    status, answer = world.api(
        principal, "POST", "/api/v1/web-sessions", {"device": device, "service": "http"}
    )
    assert (status, answer["error"]) == (404, "not_found")
    others = [d for d in DEVICES if d != device and expected(principal, d, "http")]
    borrowed = _device_cookie(world, principal, others[0]) if others else None
    before = pages.connections
    for path in WEB_PATHS:
        page = world.web.request("GET", path, device=device, cookie=borrowed)
        assert page.status != 200 and b" page " not in page.body, page
    time.sleep(0.1)
    assert pages.connections == before, "a refused request reached the device"


# --- the REST API -------------------------------------------------------------------------------


def _role(principal: str) -> str:
    return "owner" if principal == "superadmin" else PRINCIPALS[principal][1]


def has(permission: str) -> Callable[[str], bool]:
    """Allowed to whoever holds ``permission`` organisation-wide (in any organisation)."""
    return lambda p: p == "superadmin" or permission in ROLE_PERMISSIONS[_role(p)]


def in_acme(permission: str) -> Callable[[str], bool]:
    """Allowed to whoever holds ``permission`` organisation-wide in acme."""
    return lambda p: (
        p == "superadmin"
        or (PRINCIPALS[p][0] == "acme" and permission in ROLE_PERMISSIONS[_role(p)])
    )


def everyone(_principal: str) -> bool:
    return True


def superadmin_only(principal: str) -> bool:
    return principal == "superadmin"


@dataclass(frozen=True)
class Op:
    """One API call: who may make it, what to set up first (as the super-admin), and
    the super-admin's view that a refused call must leave as it was."""

    method: str
    path: str
    body: dict[str, Any] | None
    allowed: Callable[[str], bool]
    setup: tuple[str, str, dict[str, Any] | None] | None = None
    witness: str | None = None  # GET path whose answer must not change on refusal


OPS: list[Op] = [
    Op("GET", "/api/v1/whoami", None, everyone),
    Op("GET", "/api/v1/devices", None, everyone),
    Op("GET", "/api/v1/devices/dev-a1", None, lambda p: expected(p, "dev-a1", "http")
       or expected(p, "dev-a1", "ssh")),
    Op("GET", "/api/v1/devices/dev-g1", None, lambda p: expected(p, "dev-g1", "http")
       or expected(p, "dev-g1", "ssh")),
    Op("POST", "/api/v1/devices", {"id": "n-{p}"}, has("devices.manage"),
       witness="/api/v1/devices/n-{p}"),
    Op("PATCH", "/api/v1/devices/dev-a2", {"tags": ["plant2"]}, in_acme("devices.manage"),
       witness="/api/v1/devices/dev-a2"),
    Op("DELETE", "/api/v1/devices/d-{p}", None, in_acme("devices.manage"),
       setup=("POST", "/api/v1/devices", {"id": "d-{p}", "org": "acme"}),
       witness="/api/v1/devices/d-{p}"),
    Op("GET", "/api/v1/users", None, has("users.manage")),
    Op("POST", "/api/v1/users", {"name": "u-{p}", "password": PASSWORD}, has("users.manage"),
       witness="/api/v1/users/u-{p}"),
    Op("GET", "/api/v1/users/acme-target", None, in_acme("users.manage")),
    Op("PATCH", "/api/v1/users/acme-target", {"role": "user"}, in_acme("users.manage"),
       witness="/api/v1/users/acme-target"),
    Op("DELETE", "/api/v1/users/x-{p}", None, in_acme("users.manage"),
       setup=("POST", "/api/v1/users", {"name": "x-{p}", "password": PASSWORD, "org": "acme"}),
       witness="/api/v1/users/x-{p}"),
    Op("POST", "/api/v1/users/acme-target/unlock", None, in_acme("users.manage")),
    Op("DELETE", "/api/v1/users/acme-target/tokens", None, in_acme("users.manage")),
    Op("GET", "/api/v1/teams", None, has("users.manage")),
    Op("POST", "/api/v1/teams", {"name": "t-{p}"}, has("users.manage"),
       witness="/api/v1/teams?org=acme"),
    Op("DELETE", "/api/v1/teams/k-{p}?org=acme", None, in_acme("users.manage"),
       setup=("POST", "/api/v1/teams", {"name": "k-{p}", "org": "acme"}),
       witness="/api/v1/teams?org=acme"),
    Op("PUT", "/api/v1/teams/support/members/acme-target", None, in_acme("users.manage"),
       witness="/api/v1/teams?org=acme"),
    Op("DELETE", "/api/v1/teams/support/members/acme-target", None, in_acme("users.manage"),
       witness="/api/v1/teams?org=acme"),
    Op("GET", "/api/v1/roles", None, everyone),
    Op("POST", "/api/v1/roles", {"name": "r-{p}", "permissions": ["devices.view"]},
       has("users.manage"), witness="/api/v1/roles?org=acme"),
    Op("DELETE", "/api/v1/roles/q-{p}?org=acme", None, in_acme("users.manage"),
       setup=("POST", "/api/v1/roles", {"name": "q-{p}", "permissions": ["devices.view"],
                                        "org": "acme"}),
       witness="/api/v1/roles?org=acme"),
    Op("GET", "/api/v1/grants", None, has("users.manage")),
    Op("POST", "/api/v1/grants", {"role": "viewer", "user": "acme-target", "device": "dev-a1"},
       in_acme("users.manage"), witness="/api/v1/grants?org=acme"),
    Op("DELETE", "/api/v1/grants/{id}", None, in_acme("users.manage"),
       setup=("POST", "/api/v1/grants", {"role": "viewer", "user": "acme-target",
                                         "device": "dev-a2"}),
       witness="/api/v1/grants?org=acme"),
    Op("GET", "/api/v1/orgs", None, everyone),
    Op("POST", "/api/v1/orgs", {"name": "o-{p}"}, superadmin_only, witness="/api/v1/orgs"),
    Op("PATCH", "/api/v1/orgs/acme", {"require_totp": False}, in_acme("org.manage")),
    Op("DELETE", "/api/v1/orgs/e-{p}", None, superadmin_only,
       setup=("POST", "/api/v1/orgs", {"name": "e-{p}"}), witness="/api/v1/orgs"),
    Op("GET", "/api/v1/settings", None, superadmin_only),
    Op("PUT", "/api/v1/settings/password.min_length", {"value": "14"}, superadmin_only,
       witness="/api/v1/settings"),
    Op("GET", "/api/v1/audit", None, has("audit.read")),
    Op("GET", "/api/v1/audit/verify", None, superadmin_only),
    Op("POST", "/api/v1/web-sessions", {"device": "dev-a1", "service": "http"},
       lambda p: expected(p, "dev-a1", "http")),
    Op("GET", "/api/v1/tokens", None, everyone),
    Op("POST", "/api/v1/tokens", {"name": "m-{p}", "scopes": ["read"]}, everyone),
]  # fmt: skip
#: Endpoints every user may call on their own account, tested elsewhere.
SELF_SERVICE = {
    ("GET", "/api/v1/health"),
    ("POST", "/api/v1/login"),
    ("POST", "/api/v1/logout"),
    ("POST", "/api/v1/password"),
    ("DELETE", "/api/v1/tokens/{token_id}"),
}


def _template(path: str) -> str:
    """The OpenAPI path of a concrete one."""
    path = path.split("?")[0]
    replacements = {
        "/api/v1/devices/": "{device}", "/api/v1/users/": "{name}", "/api/v1/teams/": "{team}",
        "/api/v1/roles/": "{role}", "/api/v1/grants/": "{grant_id}", "/api/v1/orgs/": "{org}",
        "/api/v1/settings/": "{name}",
    }  # fmt: skip
    for prefix, name in replacements.items():
        if path.startswith(prefix) and path != "/api/v1/audit/verify":
            rest = path[len(prefix) :].split("/")
            rest[0] = name
            if len(rest) == 3 and rest[1] == "members":
                rest[2] = "{user}"
            return prefix + "/".join(rest)
    return path


def _fill(text: str, principal: str, ident: object = None) -> str:
    return text.replace("{p}", principal).replace("{id}", str(ident))


def test_the_api_matrix_covers_every_endpoint(world: World) -> None:
    status, document = world.api("superadmin", "GET", "/api/v1/openapi.json")
    assert status == 200
    published = {(method.upper(), path) for path, item in document["paths"].items()
                 for method in item}  # fmt: skip
    covered = {(op.method, _template(op.path)) for op in OPS} | SELF_SERVICE
    assert published == covered, f"not in the matrix: {published - covered}"


@pytest.mark.parametrize(
    ("principal", "op"),
    [(p, op) for op in OPS for p in ALL],
    ids=[f"{p}-{op.method}-{op.path}" for op in OPS for p in ALL],
)
def test_api_matrix(world: World, principal: str, op: Op) -> None:
    ident: object = None
    if op.setup is not None:
        method, path, body = op.setup
        body = None if body is None else {k: _fill(v, principal) if isinstance(v, str) else v
                                          for k, v in body.items()}  # fmt: skip
        status, answer = world.api("superadmin", method, _fill(path, principal), body)
        assert status == 200, answer
        ident = answer.get("id")
    witness = None if op.witness is None else _fill(op.witness, principal, ident)
    seen = world.api("superadmin", "GET", witness) if witness else None
    body = None if op.body is None else json.loads(_fill(json.dumps(op.body), principal))
    status, answer = world.api(principal, op.method, _fill(op.path, principal, ident), body)
    if op.allowed(principal):
        assert status == 200, answer
        return
    assert status in (403, 404), answer
    assert set(answer) == {"error", "message"}
    if witness:
        assert world.api("superadmin", "GET", witness) == seen, "a refused call changed state"


def test_audit_reading_is_scoped_to_the_organisation(world: World) -> None:
    for principal, org in (("acme-admin", "acme"), ("globex-admin", "globex")):
        status, answer = world.api(principal, "GET", "/api/v1/audit?limit=1000")
        assert status == 200 and answer["records"]
        assert {r["org"] for r in answer["records"]} == {org}
        status, answer = world.api(principal, "GET", "/api/v1/audit?org=default")
        assert status == 404
    status, answer = world.api("superadmin", "GET", "/api/v1/audit?limit=1000")
    assert {"acme", "globex"} <= {r["org"] for r in answer["records"]}


def test_nobody_hands_out_what_they_do_not_have(world: World) -> None:
    """An organisation admin cannot make owners or super-admins, take over an owner's
    account, or build a role with more than they hold."""
    attempts = [
        ("POST", "/api/v1/users", {"name": "esc-1", "password": PASSWORD, "role": "owner"}),
        ("POST", "/api/v1/users", {"name": "esc-2", "password": PASSWORD, "superadmin": True}),
        ("PATCH", "/api/v1/users/acme-owner", {"password": PASSWORD + "x"}),
        ("DELETE", "/api/v1/users/acme-owner", None),
        ("PATCH", "/api/v1/users/acme-operator", {"role": "owner"}),
        ("POST", "/api/v1/roles", {"name": "esc-3", "permissions": ["org.manage"]}),
        ("PATCH", "/api/v1/orgs/acme", {"require_totp": True}),
    ]
    for method, path, body in attempts:
        status, answer = world.api("acme-admin", method, path, body)
        assert status == 403, (path, answer)
    status, answer = world.api("acme-admin", "DELETE", "/api/v1/users/acme-admin")
    assert (status, answer["error"]) == (403, "yourself")
    status, answer = world.api("superadmin", "GET", "/api/v1/users/acme-operator")
    assert answer["role"] == "operator"


def test_removing_a_grant_closes_the_open_channel(world: World) -> None:
    env = world.env
    data = ["--data-dir", str(env.data_dir)]
    grant_id = (
        env.hatchway(
            "grant",
            "add",
            "operator",
            "--user",
            "acme-nobody",
            "--device",
            "dev-a1",
            *data,
            prefix=(),
        )
        .stdout.decode()
        .split()[1]
        .rstrip(":")
    )
    time.sleep(5.5)  # the relay trusts what it read for 5 s
    environ = env.environ()
    environ["HATCHWAY_CONFIG_DIR"] = str(world.config_dirs["acme-nobody"])
    forward = env.spawn("forward-nobody", [*HATCHWAY, "forward", "dev-a1", "ssh"], env=environ)
    port = int(forward.wait_output(r"listening on [^\s:]+:(\d+)").group(1))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"hello")
        assert conn.recv(100) == b"hello"
        env.hatchway("grant", "remove", grant_id, *data, prefix=())
        removed = time.monotonic()
        conn.settimeout(20)
        # Ended by the relay: forward resets the local connection (a revoked channel
        # is no clean end of the stream), so the application can tell.
        with pytest.raises(ConnectionResetError):
            conn.recv(100)
        closed_after = time.monotonic() - removed
    assert closed_after < 10
    assert "access revoked" in world.relay.output()
    forward.stop()
