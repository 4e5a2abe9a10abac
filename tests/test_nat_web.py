"""Web access across a real NAT: nginx and the uvicorn app on the device behind the
router, the relay on the "internet", curl and a Python client on the user's network.

Same topology as tests/test_nat_e2e.py (tests/netns.py).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.netns import RELAY_IP, RELAY_NAME, USER_IP, NatTopology
from tests.procs import Env, device_online, wait_for
from tests.test_nat_e2e import RELAY_PORT, RELAY_URL, logs_on_failure, start_relay, topo
from tests.webapp import download_sha256
from tests.webstack import start_web_stack, static_files

pytestmark = [pytest.mark.netns, pytest.mark.slow]

__all__ = ["topo"]  # the fixture

DEVICE = "dev1"
HOST = f"{DEVICE}.{RELAY_NAME}"

#: A Python HTTP client as the user: one-time URL in, JSON of what it saw out.
_CLIENT = """
import hashlib, http.client, json, socket, ssl, sys, urllib.parse
url, ca, relay_ip = sys.argv[1], sys.argv[2], sys.argv[3]
parts = urllib.parse.urlsplit(url)
ctx = ssl.create_default_context(cafile=ca)

def connection():
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=ctx, timeout=30)
    conn.sock = ctx.wrap_socket(socket.create_connection((relay_ip, parts.port), 30),
                                server_hostname=parts.hostname)
    return conn

conn = connection()
conn.request("GET", parts.path + "?" + parts.query)
resp = conn.getresponse(); resp.read()
cookie = resp.getheader("Set-Cookie").split(";")[0]
out = {"auth": resp.status, "location": resp.getheader("Location")}
conn = connection()
for path in ("/app/headers", "/static/index.html", "/app/download?size=5000000"):
    conn.request("GET", path, headers={"Cookie": cookie})
    resp = conn.getresponse()
    body = resp.read()
    out[path] = {"status": resp.status, "sha256": hashlib.sha256(body).hexdigest(),
                 "json": json.loads(body) if path == "/app/headers" else None}
print(json.dumps(out))
"""


@pytest.mark.timeout(240)
def test_web_ui_of_a_device_behind_nat(topo: NatTopology, env: Env, tmp_path: Path) -> None:
    dev, user = topo.prefix(topo.dev), topo.prefix(topo.user)
    with logs_on_failure(env):
        relay, password = start_relay(env, topo)
        assert password
        secret = env.add_device(DEVICE)
        stack = start_web_stack(tmp_path, prefix=dev)
        try:
            env.start_agent(
                RELAY_URL,
                DEVICE,
                secret,
                [
                    f"http=127.0.0.1:{stack.nginx_port}",
                    f"direct=127.0.0.1:{stack.app_port}",
                    "stuck=127.0.0.1:9",  # its SYNs are dropped below
                ],
                prefix=dev,
            )
            env.login(RELAY_URL, "admin", password, prefix=user)
            wait_for(lambda: device_online(env, DEVICE, prefix=user), 30, "dev1 online", 0.2)

            def open_url(*args: str) -> str:
                out = env.hatchway("open", DEVICE, "--print-url", *args, prefix=user)
                return out.stdout.decode().strip()

            def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
                return subprocess.run(
                    [*user, "curl", "-sS", "--cacert", str(env.ca_file),
                     "--resolve", f"{HOST}:{RELAY_PORT}:{RELAY_IP}", *args],
                    capture_output=True, timeout=120,
                )  # fmt: skip

            # curl follows the one-time URL to the device's home page, through nginx.
            jar = tmp_path / "jar"
            url = open_url()
            assert url.startswith(f"https://{HOST}:{RELAY_PORT}/__hatchway/auth?grant=")
            out = curl("-L", "-c", str(jar), "-b", str(jar), url)
            assert out.returncode == 0, out.stderr
            assert out.stdout == static_files()["index.html"]
            base = f"https://{HOST}:{RELAY_PORT}"
            # Upload and download through the tunnel, checked end to end.
            data = bytes(range(256)) * 80_000  # ~20 MB
            src = tmp_path / "up.bin"
            src.write_bytes(data)
            out = curl("-b", str(jar), "--data-binary", f"@{src}", f"{base}/app/upload")
            assert json.loads(out.stdout) == {
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            out = curl("-N", "-b", str(jar), f"{base}/app/sse?count=3&interval=0.2")
            assert out.stdout.count(b"data: event") == 3

            # A Python HTTP client: the app sees the user's real address, forwarded.
            result = subprocess.run(
                [*user, sys.executable, "-c", _CLIENT,
                 open_url("--service", "direct"), str(env.ca_file), RELAY_IP],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            seen = json.loads(result.stdout)
            assert seen["auth"] == 303 and seen["location"] == "/"
            headers = seen["/app/headers"]["json"]
            assert headers["x-forwarded-for"] == USER_IP
            assert headers["x-forwarded-proto"] == "https"
            assert headers["host"] == f"{HOST}:{RELAY_PORT}"
            download = seen["/app/download?size=5000000"]
            assert download["status"] == 200
            assert download["sha256"] == download_sha256(5_000_000)
            assert seen["/static/index.html"]["status"] == 404  # "direct" is uvicorn only

            # A service that never answers: the agent gives up after 10 s, the user gets
            # the relay's 504 page.
            topo.exec(topo.dev, "iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", "9",
                      "-j", "DROP")  # fmt: skip
            stuck = tmp_path / "stuck-jar"
            out = curl("-L", "-c", str(stuck), "-b", str(stuck), "-w", "%{http_code}",
                       open_url("--service", "stuck"))  # fmt: skip
            assert out.stdout.endswith(b"504"), out.stdout[-300:]
            assert b"timed out connecting to stuck" in out.stdout

            # The relay logged the channels with the user's address.
            assert f"user=admin device={DEVICE} service=http from={USER_IP}" in relay.output()
            parsed = urllib.parse.urlsplit(url)
            assert parsed.hostname == HOST
        finally:
            stack.close()
