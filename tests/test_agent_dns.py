"""The agent looks the relay's name up afresh on every reconnect attempt.

A device that starts before the network (or whose relay moves to another address)
must not keep a stale answer: every attempt of the reconnect loop resolves the name
again and connects to what it gets. Two tests: the agent's real retry loop in this
process with the resolver observed (only the backoff is shortened), and a real agent
process whose ``/etc/hosts`` changes under it while a real relay waits.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hatchway.agent import runner
from hatchway.agent.config import AgentConfig
from hatchway.agent.runner import Agent
from tests.conftest import require_root_tools
from tests.procs import Env

#: RFC 6761: never resolves for real, should the observed resolver be bypassed.
HOST = "relay.hatchway.invalid"
ATTEMPTS = 5


async def test_every_reconnect_attempt_looks_the_relay_up_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real ``Agent.run`` loop and the real connect code; the resolver answers each
    lookup of the relay's name with another loopback address, where a listener notes the
    connection and closes it, and the backoff is 0 s. After N attempts, N lookups were
    made, and each attempt connected to the address of its own lookup."""
    with socket.socket() as probe:  # a free port (on 127.0.0.1; also free elsewhere)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    addresses = [f"127.0.0.{n}" for n in range(2, ATTEMPTS + 2)]
    reached: list[str] = []

    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(writer.get_extra_info("sockname")[0])
        writer.close()

    servers = [await asyncio.start_server(note, address, port) for address in addresses]
    real_getaddrinfo = socket.getaddrinfo
    answers: list[str] = []

    def resolve(host: Any, port_: Any, *args: Any, **kwargs: Any) -> Any:
        if host != HOST:
            return real_getaddrinfo(host, port_, *args, **kwargs)
        address = addresses[len(answers) % len(addresses)]
        answers.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port_)))]

    # asyncio's loop.getaddrinfo (what create_connection calls for a name) runs
    # socket.getaddrinfo in a thread, looked up at each call.
    monkeypatch.setattr(socket, "getaddrinfo", resolve)

    lookups_at_attempt: list[int] = []

    def no_backoff(
        attempt: int, uniform: Callable[[float, float], float] = random.uniform
    ) -> float:
        lookups_at_attempt.append(len(answers))
        if len(lookups_at_attempt) == ATTEMPTS:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # ends the loop at its sleep
        return 0.0

    monkeypatch.setattr(runner, "reconnect_delay", no_backoff)
    agent = Agent(AgentConfig(server=f"https://{HOST}:{port}", device="dev1", secret="s3cret"))
    caplog.set_level(logging.WARNING, logger="hatchway.agent")
    task = asyncio.create_task(agent.run())
    try:
        done, _ = await asyncio.wait([task], timeout=10)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise AssertionError(f"{len(lookups_at_attempt)} attempts in 10 s: {caplog.text}")
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    assert task.cancelled()

    failures = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot connect")
    ]
    assert len(failures) == ATTEMPTS, caplog.text
    # N attempts, N lookups: one more before each attempt (a cached answer adds none).
    assert lookups_at_attempt == list(range(1, ATTEMPTS + 1)), (lookups_at_attempt, answers)
    # And each attempt went to the answer of its own lookup, not to an older one.
    assert reached == answers == addresses, failures


@pytest.mark.timeout(60)
def test_agent_follows_a_changed_hosts_file(env: Env, tmp_path: Path) -> None:
    """No resolver patched: a real agent process in a mount namespace of its own, where
    a file of the test's is bind-mounted over ``/etc/hosts``, first naming an address
    where no relay listens. Once the agent failed there, the file names the relay's
    address: the agent's next attempt finds the relay."""
    require_root_tools("unshare", "mount")
    domain = "hatchway.test"
    hosts = tmp_path / "hosts"
    # 127.0.0.2: loopback, but the relay listens on 127.0.0.1 only (refused at once).
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.2 {domain}\n")
    relay, port, _ = env.start_relay(extra=["--domain", domain], keep_bootstrap=True)
    secret = env.add_device("dev1")
    # unshare --mount makes the mounts private to the agent: the bind mount goes away
    # with the process, nothing to clean up on the host.
    own_hosts = [
        shutil.which("unshare") or "unshare",
        "--mount",
        "--",
        "sh",
        "-c",
        'mount --bind "$0" /etc/hosts && exec "$@"',
        str(hosts),
    ]
    agent = env.start_agent(
        f"https://{domain}:{port}", "dev1", secret, ["ssh=127.0.0.1:22"], prefix=own_hosts
    )
    agent.wait_output(rf"cannot connect: cannot reach {re.escape(domain)}:{port}", timeout=15)
    assert "connected to" not in agent.output()
    # Written in place (the bind mount holds this inode, a rename would not show).
    with hosts.open("r+") as fh:
        fh.write(f"127.0.0.1 localhost\n127.0.0.1 {domain}\n")
        fh.truncate()
    agent.wait_output(rf"connected to https://{re.escape(domain)}:{port} as dev1", timeout=15)
    relay.wait_output(r"device dev1 connected", timeout=5)
