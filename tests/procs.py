"""Start real Hatchway processes (relay, agent, client) for integration tests.

Every process is started with a timeout on its readiness, its output kept in a file
under the test's tmp_path, and is killed at the end of the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HATCHWAY = [sys.executable, "-m", "hatchway"]


def serve_connections(handle: Callable[[socket.socket], None]) -> socket.socket:
    """A loopback listener whose connections each go to ``handle`` in a thread of their
    own, until the listener is closed. Returns the listener (``getsockname()[1]``: its
    port)."""
    sock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return sock


def join_sockets(a: socket.socket, b: socket.socket) -> None:
    """Copy between two connected sockets both ways, each end's EOF passed on as a
    half-close, until both directions ended (a CONNECT proxy's tunnel)."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    other = threading.Thread(target=pump, args=(a, b))
    other.start()
    pump(b, a)
    other.join()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def relay_health(port: int, ca_file: Path) -> bool:
    """A full TLS connection and API request to the relay on 127.0.0.1 succeeds."""
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as tcp,
            context.wrap_socket(tcp, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            return tls.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_output(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def check() -> bool:
            match = regex.search(self.output())
            if match:
                found.append(match)
                return True
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}):\n{self.output()}"
                )
            return False

        wait_for(check, timeout, f"{self.name} to print {pattern!r}")
        return found[0]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


@dataclass
class Env:
    """A relay data dir, a client config dir, and the processes of one test."""

    root: Path
    procs: list[Proc] = field(default_factory=list)
    prefix: Sequence[str] = ()  # e.g. ["ip", "netns", "exec", "user"]

    @property
    def data_dir(self) -> Path:
        return self.root / "relay-data"

    @property
    def config_dir(self) -> Path:
        return self.root / "client-config"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HATCHWAY_CONFIG_DIR"] = str(self.config_dir)
        env["PYTHONUNBUFFERED"] = "1"
        for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            env.pop(var, None)
        return env

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        prefix: Sequence[str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
    ) -> Proc:
        log = self.root / f"{name}-{len(self.procs)}.log"
        fh = log.open("wb")
        popen = subprocess.Popen(
            [*(self.prefix if prefix is None else prefix), *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=stdin,
            env=env or self.environ(),
            start_new_session=True,
        )
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def run(
        self,
        args: Sequence[str],
        input: bytes | None = None,
        timeout: float = 60.0,
        prefix: Sequence[str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [*(self.prefix if prefix is None else prefix), *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            env=self.environ(),
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{args} failed ({result.returncode}):\n{result.stdout.decode()}\n{result.stderr.decode()}"
            )
        return result

    def hatchway(
        self,
        *args: str,
        input: bytes | None = None,
        timeout: float = 60.0,
        prefix: Sequence[str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        return self.run(
            [*HATCHWAY, *args], input=input, timeout=timeout, prefix=prefix, check=check
        )

    # --- the parts ------------------------------------------------------------------------

    def start_relay(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra: Sequence[str] = (),
        prefix: Sequence[str] | None = None,
        keep_bootstrap: bool = False,
    ) -> tuple[Proc, int, str | None]:
        """Start the relay; return it, its port and the admin password (if it was new):
        a password set offline, unless ``keep_bootstrap`` (the one the relay generated)."""
        port = port or free_port(host)
        proc = self.spawn(
            "relay",
            [
                *HATCHWAY,
                "server",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                f"{host}:{port}",
                *extra,
            ],
            prefix=prefix,
        )
        proc.wait_output(r"relay started")
        match = re.search(r"password: (\S+)", proc.output())
        if match is None or keep_bootstrap:
            return proc, port, match.group(1) if match else None
        # The bootstrap password must be changed before first use (test_accounts.py tests
        # that); the fixtures set a new one as an operator would, offline.
        password = "Hw." + match.group(1)
        self.hatchway(
            "user", "passwd", "admin", "--password-stdin", "--data-dir", str(self.data_dir),
            input=password.encode() + b"\n", prefix=(),
        )  # fmt: skip
        return proc, port, password

    def add_device(self, device: str) -> Path:
        out = self.hatchway(
            "device", "add", device, "--json", "--data-dir", str(self.data_dir), prefix=()
        )
        secret = json.loads(out.stdout)["secret"]
        path = self.root / f"{device}.secret"
        path.write_text(secret + "\n")
        path.chmod(0o600)
        return path

    def start_agent(
        self,
        server: str,
        device: str,
        secret: Path,
        services: Sequence[str],
        prefix: Sequence[str] | None = None,
        extra: Sequence[str] = (),
        ca_file: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        args = [
            *HATCHWAY,
            "agent",
            "--server",
            server,
            "--device",
            device,
            "--secret-file",
            str(secret),
            "--ca-file",
            str(ca_file or self.ca_file),
            *extra,
        ]
        for spec in services:
            args += ["--service", spec]
        return self.spawn(f"agent-{device}", args, prefix=prefix, env=env)

    def login(
        self, server: str, user: str, password: str, prefix: Sequence[str] | None = None
    ) -> None:
        self.hatchway(
            "login",
            server,
            "--user",
            user,
            "--password-stdin",
            "--ca-file",
            str(self.ca_file),
            input=password.encode() + b"\n",
            prefix=prefix,
        )

    def start_forward(
        self,
        device: str,
        service: str,
        prefix: Sequence[str] | None = None,
        extra: Sequence[str] = (),
    ) -> tuple[Proc, int]:
        proc = self.spawn(
            f"forward-{device}-{service}",
            [*HATCHWAY, "forward", device, service, *extra],
            prefix=prefix,
        )
        match = proc.wait_output(r"listening on [^\s:]+:(\d+)")
        return proc, int(match.group(1))

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def device_online(env: Env, device: str, prefix: Sequence[str] | None = None) -> bool:
    out = env.hatchway("devices", "--json", prefix=prefix, check=False)
    if out.returncode != 0:
        return False
    return any(d["id"] == device and d["online"] for d in json.loads(out.stdout))
