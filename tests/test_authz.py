"""The authorisation matrix: principals of two organisations with each role, against
every device and service, through the real relay and agents.

Each cell opens a channel with `hatchway proxy DEVICE SERVICE` (a client stream) and
must be allowed or refused as expected; a refused cell must deliver zero bytes: the
service behind the device never sees a connection. Device lists and web-UI links
(`hatchway open`) follow the same rules, and removing a grant closes an open channel.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.procs import HATCHWAY, Env, Proc, device_online, wait_for
from tests.test_integration import EchoServer

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


@dataclass
class World:
    env: Env
    relay: Proc
    url: str
    admin_password: str
    echo: dict[tuple[str, str], EchoServer] = field(default_factory=dict)
    config_dirs: dict[str, Path] = field(default_factory=dict)

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
    echo: dict[tuple[str, str], EchoServer] = {}
    try:
        relay, port, password = env.start_relay()
        assert password is not None
        url = f"https://localhost:{port}"
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
                echo[device, service] = EchoServer()
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
        world = World(env, relay, url, password, echo)
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
    result = world.run(principal, "proxy", device, service, stdin=b"ping")
    if expected(principal, device, service):
        assert result.returncode == 0, result.stderr
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
        assert conn.recv(100) == b""  # closed by the relay
        closed_after = time.monotonic() - removed
    assert closed_after < 10
    assert "access revoked" in world.relay.output()
    forward.stop()
