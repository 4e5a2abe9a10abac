"""Dead-peer detection: a link that silently stops carrying packets (a NAT router that
forgot the mapping, a mobile link gone dead) is noticed by both ends within ~40 s."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.netns import RELAY_NAME, NatTopology, nat_topology, require_netns_tools
from tests.procs import Env, device_online, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(240)]

RELAY_URL = f"https://{RELAY_NAME}:8443"


@pytest.fixture
def topology() -> Iterator[NatTopology]:
    require_netns_tools()
    with nat_topology() as topo:
        yield topo


def test_half_open_tunnel_is_noticed_by_both_ends(env: Env, topology: NatTopology) -> None:
    relay, _, password = env.start_relay(
        port=8443,
        host="0.0.0.0",
        extra=["--domain", RELAY_NAME],
        prefix=topology.prefix(topology.inet),
    )
    assert password is not None
    secret = env.add_device("dev1")
    agent = env.start_agent(
        RELAY_URL, "dev1", secret, ["echo=127.0.0.1:7"], prefix=topology.prefix(topology.dev)
    )
    env.login(RELAY_URL, "admin", password, prefix=topology.prefix(topology.user))
    wait_for(lambda: device_online(env, "dev1", topology.prefix(topology.user)), 30, "dev1 online")

    # The router silently drops everything: no RST, no FIN, just silence both ways.
    topology.exec(topology.router, "iptables", "-I", "FORWARD", "1", "-j", "DROP")
    cut = time.monotonic()
    relay.wait_output(r"device dev1 .*nothing received for 35 s", timeout=50)
    relay_noticed = time.monotonic() - cut
    agent.wait_output(r"nothing received for 35 s", timeout=50)
    agent_noticed = time.monotonic() - cut
    print(f"\nrelay noticed after {relay_noticed:.1f} s, agent after {agent_noticed:.1f} s")
    assert relay_noticed <= 45 and agent_noticed <= 45
    wait_for(
        lambda: not device_online(env, "dev1", topology.prefix(topology.user)), 10, "dev1 offline"
    )

    # The link comes back: the agent, retrying all along, is online again.
    topology.exec(topology.router, "iptables", "-D", "FORWARD", "1")
    wait_for(
        lambda: device_online(env, "dev1", topology.prefix(topology.user)), 40, "dev1 online again"
    )
    assert len(re.findall(r"connected to https://", agent.output())) == 2
