"""End to end across a real NAT: relay on the "internet", device behind a home router.

The topology (tests/netns.py): the device ``dev`` sits on a private LAN behind
``router`` (MASQUERADE, WAN->LAN dropped unless ESTABLISHED,RELATED); the relay runs in
``inet``, which has no route to the LAN; the user is on a third network. Real
processes: ``hatchway server``, ``hatchway agent``, OpenSSH's sshd, ssh and scp.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.netns import (
    DEVICE_IP,
    RELAY_IP,
    RELAY_NAME,
    ROUTER_WAN_IP,
    NatTopology,
    nat_topology,
    require_netns_tools,
)
from tests.procs import HATCHWAY, Env, Proc, device_online, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RELAY_PORT = 8443
RELAY_URL = f"https://{RELAY_NAME}:{RELAY_PORT}"
DEVICE = "dev1"
DEVICE_HOSTNAME = f"hatchway-dev-{os.getpid()}"
SCP_BYTES = 50 * 1024 * 1024
#: The agent's backoff must bring a device back this soon after its relay restarts.
RECONNECT_LIMIT = 35.0

_PROBE = """
import errno, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    socket.create_connection((host, port), timeout).close()
    print("connected")
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print("unreachable" if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH) else exc)
"""


def tcp_probe(prefix: Sequence[str], host: str, port: int, timeout: float = 2.0) -> str:
    """Connect from inside a namespace: connected, refused, timeout or unreachable."""
    out = subprocess.run(
        [*prefix, sys.executable, "-c", _PROBE, host, str(port), str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 20,
    )
    return out.stdout.strip() or out.stderr.strip()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def topo() -> Iterator[NatTopology]:
    require_netns_tools()
    missing = [t for t in ("ssh", "scp", "ssh-keygen", "unshare") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the NAT test needs {', '.join(missing)} (not found on PATH)")
    with nat_topology() as topology:
        yield topology


@contextlib.contextmanager
def logs_on_failure(env: Env) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for proc in env.procs:
            print(f"\n----- {proc.log.name} -----\n{proc.output()[-4000:]}", file=sys.stderr)
        raise


def start_sshd(env: Env, topo: NatTopology, tmp_path: Path) -> tuple[Proc, Path]:
    """OpenSSH's sshd on the device, in its own UTS namespace; return it and the user key."""
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hatchway-{name}",
             "-f", str(keys / name)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    config = keys / "sshd_config"
    config.write_text(
        f"ListenAddress {DEVICE_IP}\n"
        "ListenAddress 127.0.0.1\n"
        "Port 22\n"
        f"HostKey {keys / 'host_key'}\n"
        f"AuthorizedKeysFile {keys / 'user_key.pub'}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        f"PidFile {keys / 'sshd.pid'}\n"
        "Subsystem sftp internal-sftp\n"
        "LogLevel INFO\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    sshd = shutil.which("sshd")
    assert sshd is not None
    # Its own hostname, so that the remote command proves where it ran.
    script = 'echo "$1" > /proc/sys/kernel/hostname && exec "$2" -D -e -f "$3"'
    proc = env.spawn(
        "sshd",
        ["unshare", "--uts", "sh", "-c", script, "sh", DEVICE_HOSTNAME, sshd, str(config)],
        prefix=topo.prefix(topo.dev),
    )
    proc.wait_output(rf"Server listening on {DEVICE_IP.replace('.', '[.]')} port 22")
    proc.wait_output(r"Server listening on 127[.]0[.]0[.]1 port 22")
    return proc, keys / "user_key"


def start_relay(env: Env, topo: NatTopology) -> tuple[Proc, str | None]:
    relay, port, password = env.start_relay(
        port=RELAY_PORT,
        host="0.0.0.0",
        extra=["--domain", RELAY_NAME],
        prefix=topo.prefix(topo.inet),
    )
    assert port == RELAY_PORT
    return relay, password


def devices(env: Env, prefix: Sequence[str]) -> dict[str, dict[str, object]]:
    out = env.hatchway("devices", "--json", prefix=prefix, timeout=30)
    return {item["id"]: item for item in json.loads(out.stdout)}


@pytest.mark.timeout(240)
def test_ssh_and_scp_to_a_device_behind_nat(topo: NatTopology, env: Env, tmp_path: Path) -> None:
    dev, inet, user = (topo.prefix(ns) for ns in (topo.dev, topo.inet, topo.user))
    router = topo.prefix(topo.router)
    started = time.monotonic()
    with logs_on_failure(env):
        # --- the relay on the internet, the device behind the NAT, the user elsewhere -----
        relay, password = start_relay(env, topo)
        assert password, f"no bootstrap admin password printed:\n{relay.output()}"
        secret = env.add_device(DEVICE)
        _, key = start_sshd(env, topo, tmp_path)
        env.start_agent(RELAY_URL, DEVICE, secret, ["ssh=127.0.0.1:22"], prefix=dev)
        env.login(RELAY_URL, "admin", password, prefix=user)
        wait_for(lambda: device_online(env, DEVICE, prefix=user), 30, f"{DEVICE} online", 0.2)

        # --- the relay sees the device coming from the router's WAN address ---------------
        relay.wait_output(rf"device {DEVICE} connected from {ROUTER_WAN_IP.replace('.', '[.]')}:")
        listed = devices(env, user)[DEVICE]
        assert str(listed["address"]).startswith(f"{ROUTER_WAN_IP}:"), listed
        assert listed["services"] == ["ssh"], listed

        # --- nobody on the internet reaches the device directly ---------------------------
        assert tcp_probe(dev, DEVICE_IP, 22) == "connected"  # sshd does listen on the LAN
        assert tcp_probe(router, DEVICE_IP, 22) == "connected"  # and the LAN reaches it
        assert tcp_probe(inet, DEVICE_IP, 22) in ("timeout", "unreachable")
        assert tcp_probe(inet, ROUTER_WAN_IP, 22) in ("refused", "timeout", "unreachable")
        assert tcp_probe(dev, RELAY_IP, RELAY_PORT) == "connected"  # outbound is fine
        # Even with a route to the LAN through the router, its firewall drops the SYN.
        topo.exec(topo.inet, "ip", "route", "add", "10.77.1.0/24", "via", ROUTER_WAN_IP)
        try:
            assert tcp_probe(inet, DEVICE_IP, 22, timeout=1.5) == "timeout"
        finally:
            topo.exec(topo.inet, "ip", "route", "del", "10.77.1.0/24", check=False)

        # --- hatchway ssh ----------------------------------------------------------------
        ssh_opts = [
            "-i", str(key),
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        remote_command = "echo hello-from-$(cat /proc/sys/kernel/hostname)"

        def hatchway_ssh() -> str:
            out = env.hatchway(
                "ssh", f"root@{DEVICE}", *ssh_opts, remote_command, prefix=user, timeout=30
            )
            return out.stdout.decode().strip()

        assert hatchway_ssh() == f"hello-from-{DEVICE_HOSTNAME}"

        # --- scp 50 MB there and back through 'hatchway proxy' ----------------------------
        proxy_command = " ".join([*HATCHWAY, "proxy", DEVICE, "ssh"])
        scp = ["scp", "-q", "-o", f"ProxyCommand={proxy_command}", *ssh_opts]
        local = tmp_path / "upload.bin"
        with local.open("wb") as fh:
            for _ in range(SCP_BYTES >> 20):
                fh.write(os.urandom(1 << 20))
        on_device = tmp_path / "device-files" / "upload.bin"
        on_device.parent.mkdir()
        back = tmp_path / "download.bin"
        rates = []
        for what, src, dst in (
            ("upload", str(local), f"root@{DEVICE}:{on_device}"),
            ("download", f"root@{DEVICE}:{on_device}", str(back)),
        ):
            t0 = time.monotonic()
            env.run([*scp, src, dst], prefix=user, timeout=100)
            elapsed = time.monotonic() - t0
            rates.append(SCP_BYTES / elapsed / 1e6)
            print(f"\nscp {what} of {SCP_BYTES >> 20} MiB: {elapsed:.2f} s, {rates[-1]:.1f} MB/s")
        assert sha256(on_device) == sha256(local)
        assert sha256(back) == sha256(local)

        # --- the relay dies and comes back: the agent reconnects, the token still works --
        relay.stop(signal.SIGKILL)
        killed = time.monotonic()
        relay, password = start_relay(env, topo)
        assert password is None  # same data dir: no new bootstrap
        wait_for(
            lambda: device_online(env, DEVICE, prefix=user),
            RECONNECT_LIMIT,
            f"{DEVICE} online again after the relay restart",
            0.2,
        )
        reconnect = time.monotonic() - killed
        print(f"\ndevice back online {reconnect:.1f} s after the relay was killed")
        assert reconnect <= RECONNECT_LIMIT
        relay.wait_output(rf"device {DEVICE} connected from {ROUTER_WAN_IP.replace('.', '[.]')}:")
        assert hatchway_ssh() == f"hello-from-{DEVICE_HOSTNAME}"
    print(f"\nNAT end-to-end test: {time.monotonic() - started:.1f} s (firewall: {topo.firewall})")
