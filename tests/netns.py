"""A small NAT topology built from network namespaces, for end-to-end tests.

::

    dev 10.77.1.2 ── 10.77.1.1 router 10.77.2.2 ── 10.77.2.1 inet 10.77.3.1 ── 10.77.3.2 user
        (device)       (home router: MASQUERADE,     (the relay:        (the user's
                        WAN -> LAN dropped unless     no route to        laptop)
                        ESTABLISHED,RELATED)          10.77.1.0/24)

Every namespace and veth name holds the test process's pid, so parallel runs do not
collide; namespaces left behind by a dead test process are removed at the next build.
Teardown always runs: the processes inside are killed, the namespaces deleted and
their ``/etc/netns/<ns>`` directories removed. Each namespace gets an
``/etc/netns/<ns>/hosts`` naming ``relay.test`` (``ip netns exec`` bind-mounts it over
``/etc/hosts``).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
NAME_PREFIX = "hwnat"
RELAY_NAME = "relay.test"
RELAY_IP = "10.77.2.1"
DEVICE_IP = "10.77.1.2"
ROUTER_LAN_IP = "10.77.1.1"
ROUTER_WAN_IP = "10.77.2.2"
USER_IP = "10.77.3.2"
INET_USER_IP = "10.77.3.1"
LAN_NET = "10.77.1.0/24"
IFNAMSIZ = 15
REQUIRED_TOOLS = ("ip", "iptables", "sshd")

_counter = itertools.count()


class CommandError(RuntimeError):
    pass


def sh(
    args: Sequence[str], check: bool = True, timeout: float = 20.0, input: str | None = None
) -> str:
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and result.returncode != 0:
        raise CommandError(
            f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result.stdout


def _veth(tag: str, suffix: str) -> str:
    name = f"h{tag.removeprefix(NAME_PREFIX)}{suffix}"
    assert len(name) <= IFNAMSIZ, f"interface name {name!r} is longer than {IFNAMSIZ}"
    return name


@dataclass
class NatTopology:
    """Names of the namespaces and interfaces of one build, and how to run things in them."""

    tag: str
    dev: str
    router: str
    inet: str
    user: str
    lan_veth: str  # the router's LAN side
    wan_veth: str  # the router's WAN side
    firewall: str = ""  # the tool that set up the NAT
    namespaces: list[str] = field(default_factory=list)  # the ones actually created

    @classmethod
    def named(cls, tag: str) -> NatTopology:
        return cls(
            tag=tag,
            dev=f"{tag}-dev",
            router=f"{tag}-router",
            inet=f"{tag}-inet",
            user=f"{tag}-user",
            lan_veth=_veth(tag, "rl"),
            wan_veth=_veth(tag, "rw"),
        )

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def exec(self, ns: str, *args: str, check: bool = True) -> str:
        return sh([*self.prefix(ns), *args], check=check)

    def veth_name(self, suffix: str) -> str:
        return _veth(self.tag, suffix)

    # --- build ------------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        sh(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        etc = NETNS_ETC / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{RELAY_IP}\t{RELAY_NAME}\n"
        )

    def _link(
        self, ns_a: str, name_a: str, addr_a: str, ns_b: str, name_b: str, addr_b: str
    ) -> None:
        for name in (name_a, name_b):
            assert len(name) <= IFNAMSIZ, name
        sh(f"ip link add {name_a} netns {ns_a} type veth peer name {name_b} netns {ns_b}".split())
        for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
            sh(["ip", "-n", ns, "addr", "add", addr, "dev", name])
            sh(["ip", "-n", ns, "link", "set", name, "up"])

    def _firewall_iptables(self, tool: str) -> None:
        ipt = [*self.prefix(self.router), tool, "-w"]
        sh([*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", self.wan_veth, "-j", "MASQUERADE"])
        sh([*ipt, "-P", "FORWARD", "DROP"])
        established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"]
        sh([*ipt, "-A", "FORWARD", *established, "-j", "ACCEPT"])
        sh([*ipt, "-A", "FORWARD", "-i", self.lan_veth, "-o", self.wan_veth, "-j", "ACCEPT"])

    def _firewall_nft(self) -> None:
        ruleset = f"""
table ip hatchway_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{self.wan_veth}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{self.lan_veth}" oifname "{self.wan_veth}" accept
    }}
}}
"""
        sh([*self.prefix(self.router), "nft", "-f", "-"], input=ruleset)

    def _reset_firewall(self) -> None:
        for tool in ("iptables", "iptables-legacy"):
            if shutil.which(tool):
                for args in (["-t", "nat", "-F"], ["-F"], ["-P", "FORWARD", "ACCEPT"]):
                    sh([*self.prefix(self.router), tool, "-w", *args], check=False)
        if shutil.which("nft"):
            sh([*self.prefix(self.router), "nft", "flush", "ruleset"], check=False)

    def _firewall(self) -> None:
        """The home router: LAN hosts go out masqueraded; nothing from the WAN comes in
        unless it belongs to a connection opened from the LAN. iptables (nft backend),
        else iptables-legacy, else nft: whichever works in this kernel."""
        errors = []
        attempts = [
            (tool, lambda t=tool: self._firewall_iptables(t))
            for tool in ("iptables", "iptables-legacy")
        ]
        attempts.append(("nft", self._firewall_nft))
        for tool, install in attempts:
            if shutil.which(tool) is None:
                continue
            try:
                install()
            except CommandError as exc:
                errors.append(str(exc))
                self._reset_firewall()
            else:
                self.firewall = tool
                return
        raise CommandError("cannot set up the router's NAT: " + "; ".join(errors))

    def build(self) -> None:
        try:
            self._add_ns(self.dev)
        except CommandError as exc:
            if "not permitted" in str(exc) or "Permission denied" in str(exc):
                pytest.skip(f"cannot create network namespaces here: {exc}")
            raise
        for ns in (self.router, self.inet, self.user):
            self._add_ns(ns)
        veth = self.veth_name
        links = [
            (self.dev, veth("d"), DEVICE_IP, self.router, self.lan_veth, ROUTER_LAN_IP),
            (self.router, self.wan_veth, ROUTER_WAN_IP, self.inet, veth("ir"), RELAY_IP),
            (self.inet, veth("iu"), INET_USER_IP, self.user, veth("u"), USER_IP),
        ]
        for ns_a, name_a, ip_a, ns_b, name_b, ip_b in links:
            self._link(ns_a, name_a, f"{ip_a}/24", ns_b, name_b, f"{ip_b}/24")
        sh(["ip", "-n", self.dev, "route", "add", "default", "via", ROUTER_LAN_IP])
        sh(["ip", "-n", self.router, "route", "add", "default", "via", RELAY_IP])
        sh(["ip", "-n", self.user, "route", "add", "default", "via", INET_USER_IP])
        for ns in (self.router, self.inet):
            self.exec(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

        self._firewall()
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        """veth carriers come up asynchronously: wait until every link is UP."""
        deadline = time.monotonic() + timeout
        while True:
            down = [
                f"{ns}/{line.split()[0]}"
                for ns in self.namespaces
                for line in sh(["ip", "-n", ns, "-br", "link"]).splitlines()
                if not line.startswith("lo ") and line.split()[1] != "UP"
            ]
            if not down:
                return
            if time.monotonic() > deadline:
                raise CommandError(f"links still down after {timeout} s: {', '.join(down)}")
            time.sleep(0.05)

    # --- teardown -----------------------------------------------------------------------

    def teardown(self) -> None:
        for ns in reversed(self.namespaces or [self.dev, self.router, self.inet, self.user]):
            destroy_namespace(ns)
        self.namespaces.clear()


def _ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def destroy_namespace(ns: str) -> None:
    """Kill whatever runs in ``ns``, delete it and its /etc/netns directory. Never raises."""
    try:
        if (NETNS_RUN / ns).exists():
            for _ in range(3):
                pids = _ns_pids(ns)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        pass
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def remove_stale_namespaces() -> None:
    """Namespaces of earlier test processes that died before their teardown."""
    pattern = re.compile(rf"^{NAME_PREFIX}(\d+)x\d+-\w+$")
    names = {p.name for p in NETNS_RUN.glob(f"{NAME_PREFIX}*")}
    names |= {p.name for p in NETNS_ETC.glob(f"{NAME_PREFIX}*")}
    for name in names:
        match = pattern.match(name)
        if (
            match
            and int(match.group(1)) != os.getpid()
            and not Path(f"/proc/{match.group(1)}").exists()
        ):
            destroy_namespace(name)


def require_netns_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("the NAT test needs root (it creates network namespaces)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the NAT test needs {', '.join(missing)} (not found on PATH)")


@contextmanager
def nat_topology() -> Iterator[NatTopology]:
    """Build the dev/router/inet/user topology; always tear it down."""
    remove_stale_namespaces()
    topo = NatTopology.named(f"{NAME_PREFIX}{os.getpid()}x{next(_counter)}")
    try:
        topo.build()
        yield topo
    finally:
        topo.teardown()
