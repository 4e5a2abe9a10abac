#!/usr/bin/env python3
"""Web benchmark: HTTP to nginx directly, through hatchway's web access, ``ssh -L`` and websocat.

Run by hand from the repository root with the project's venv::

    .venv/bin/python bench/web_bench.py --seconds 5

One nginx (one worker) serves a 615-byte page and a 1 MiB file on loopback. Every row
runs ``wrk -t1 -c50 -d{seconds}s --latency`` for each of them, ``wrk -t1 -c1`` for the
small page, and the small page at the ``--sweep`` connection counts, against:

- ``direct``: nginx itself;
- ``hatchway``: the relay's HTTPS virtual host ``dev1.relay.localhost`` with a device
  session cookie obtained through ``hatchway open``'s one-time link, the agent in front
  of nginx;
- ``floor``: ``floor_relay.py``, the least a Python relay of hatchway's shape does (TLS
  to the browser, one TLS tunnel to an agent, no HTTP parsing, no login check), as a
  yardstick; ``--floor-burn`` adds CPU per request to its relay;
- ``ssh``, ``websocat``: the peers of ``tunnel_bench.py``, set up by its own code.

It also reads the CPU time the processes of each row used during each wrk run, and the
relay's (and agent's) memory idle and with many keep-alive browser connections open.
Every process is started by this script and stopped at the end, even on Ctrl-C. See
bench/README.md ("Web access") for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# tunnel_bench (next to this file) puts the repository on sys.path for tests.*.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tunnel_bench as tb

from hatchway.relay.pki import ensure_tls_files
from hatchway.web.access import DEVICE_COOKIE
from tests.procs import Env, Proc, free_port, rss_kib
from tests.webclient import DOMAIN, WebClient, set_cookie_value
from tests.webstack import static_files

ROWS = ("direct", "hatchway", "floor", "ssh", "websocat")
#: bench/floor_relay.py: the least a Python relay of hatchway's shape does.
FLOOR_SCRIPT = Path(__file__).resolve().parent / "floor_relay.py"
#: wrk -c of the main tests (PERFORMANCE.md's method); --sweep adds other counts.
CONNECTIONS = 50
#: (key, label, path, wrk connections)
TESTS = (
    ("small", "small GET", "/index.html", CONNECTIONS),
    ("big", "1 MiB GET", "/big.bin", CONNECTIONS),
    ("one", "small GET, 1 connection", "/index.html", 1),
)
SMALL_PAGE_SIZE = 615  # nginx's own welcome page, as in /work/shared/PERFORMANCE.md
DEVICE_HOST = f"dev1.{DOMAIN}"
log = tb.log

#: One worker, no access log. tcp_nopush (as in Debian's nginx.conf) sends a response's
#: head and first part of its file together: without it nginx writes the head alone, and
#: ``ssh -L`` and websocat (Nagle left on towards wrk) wait ~40 ms for wrk's delayed ACK on
#: many one-connection requests. open_file_cache spares an open() per request (+40 % direct).
NGINX_CONF = """\
{user}worker_processes 1;
worker_rlimit_nofile 16384;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    types {{ text/html html; application/octet-stream bin; }}
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    open_file_cache max=16;
    keepalive_requests 100000;
    keepalive_timeout 300s;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {static};
    }}
}}
"""


def small_page() -> bytes:
    head = b"<!doctype html>\n<html><head><title>device status</title></head>\n<body>\n"
    line = b"<p>all services running, nothing to report</p>\n"
    tail = b"</body></html>\n"
    body = head
    while len(body) + len(line) + len(tail) <= SMALL_PAGE_SIZE:
        body += line
    return (body + tail).ljust(SMALL_PAGE_SIZE, b"\n")


def page_contents() -> dict[str, bytes]:
    return {"/index.html": small_page(), "/big.bin": static_files()["big.bin"]}


# --- wrk --------------------------------------------------------------------------------

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_BYTE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    bytes_per_s: float
    requests: int
    bytes_read: float
    socket_errors: dict[str, int] = field(default_factory=dict)
    non2xx: int = 0
    connections: int = 0
    #: CPU seconds per process during the run, and the run's wall-clock seconds
    cpu: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    #: CPU seconds of every other process on the machine during the run
    others: float = 0.0


def parse_wrk(text: str) -> WrkResult:
    """The figures of ``wrk --latency``'s report (latencies in ms)."""

    def need(pattern: str) -> re.Match[str]:
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise tb.BenchError(f"wrk output without {pattern!r}:\n{text[-800:]}")
        return match

    latency = {
        q: float(v) * _TIME_UNITS[u]
        for q, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    }
    if "50" not in latency or "99" not in latency:
        raise tb.BenchError(f"wrk output without a latency distribution:\n{text[-800:]}")
    done = need(r"(\d+) requests in [\d.]+\w+, ([\d.]+)([KMGT]?B) read")
    transfer = need(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)")
    result = WrkResult(
        rps=float(need(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=latency["50"],
        p99_ms=latency["99"],
        bytes_per_s=float(transfer.group(1)) * _BYTE_UNITS[transfer.group(2)],
        requests=int(done.group(1)),
        bytes_read=float(done.group(2)) * _BYTE_UNITS[done.group(3)],
    )
    errors = re.search(r"Socket errors: (.*)$", text, re.MULTILINE)
    if errors:
        for kind, n in re.findall(r"(\w+) (\d+)", errors.group(1)):
            if int(n):
                result.socket_errors[kind] = int(n)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        result.non2xx = int(non2xx.group(1))
    return result


def run_wrk(url: str, headers: Sequence[str], connections: int, seconds: int) -> str:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for header in headers:
        args += ["-H", header]
    limit = seconds + 30
    try:
        result = subprocess.run([*args, url], capture_output=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise tb.BenchError(f"wrk did not finish within {limit} s") from None
    if result.returncode != 0:
        raise tb.BenchError(f"wrk exited {result.returncode}: {result.stderr.decode()[-500:]}")
    return result.stdout.decode()


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # idle, iowait


def children_cpu_seconds() -> float:
    """CPU of the children this process has waited for (here: the wrk that just ran)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- the rows ---------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    label: str
    #: what wrk connects to (scheme://host:port), and the headers it adds
    base: str
    headers: list[str] = field(default_factory=list)
    #: curl's arguments to fetch the same pages (besides the URL)
    curl: list[str] = field(default_factory=list)
    curl_base: str = ""
    #: (label, pid): the process trees whose CPU is read during every wrk run
    cpu: list[tuple[str, int]] = field(default_factory=list)
    #: response bytes (head + body) per path, as curl saw them through this row
    sizes: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class Nginx:
    """nginx, one worker, serving the two pages; ``port`` is what the tunnels reach."""

    def __init__(self, env: Env) -> None:
        root = env.root / "nginx"
        static = root / "static"
        static.mkdir(parents=True)
        for path, content in page_contents().items():
            (static / path.lstrip("/")).write_bytes(content)
        self.port = free_port()
        conf = root / "nginx.conf"
        # Workers started by root run as "nobody", who cannot read a private tmp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(user=user, root=root, port=self.port, static=static))
        self.proc = env.spawn(
            "nginx",
            [
                *("nginx", "-c", str(conf), "-p", str(root)),
                *("-e", str(root / "error.log"), "-g", "daemon off;"),
            ],
        )
        tb.wait_listening(self.port, self.proc, 10, "nginx")

    def stop(self) -> None:  # called by tunnel_bench's cleanup (as the "banner" server)
        self.proc.stop()


def http_check(row: Row, root: Path) -> None:
    """Fetch both pages through the row with curl: 200 and the exact bytes, or BenchError.

    Records the size of each response (head + body), against which wrk's bytes read are
    checked: a row answering something else (a redirect to a login page, an error page)
    shows there even when the status is not an error for wrk."""
    out = root / f"curl-{row.name}.out"
    for path, content in page_contents().items():
        url = (row.curl_base or row.base) + path
        args = ["curl", "-sS", "--noproxy", "*", "--max-time", "20", *row.curl, "-o", str(out)]
        args += ["-w", "%{http_code} %{size_header} %{size_download}", url]
        try:
            result = subprocess.run(args, capture_output=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            raise tb.BenchError(f"curl {url} did not finish within 30 s") from None
        status, head, body = ([*result.stdout.decode().split(), "", "", ""])[:3]
        if result.returncode != 0 or status != "200":
            raise tb.BenchError(
                f"curl {url}: exit {result.returncode}, HTTP {status or '-'}, "
                f"{result.stderr.decode().strip()[-300:]}"
            )
        if out.read_bytes() != content:
            raise tb.BenchError(f"curl {url}: 200 but {body} bytes that are not the page")
        row.sizes[path] = int(head) + int(body)


class WebBench(tb.Bench):
    """tunnel_bench's Bench, whose ssh and websocat setups are reused to reach nginx."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        super().__init__(args, root)
        self.rows: dict[str, Row] = {}
        self.nginx: Nginx | None = None
        self.relay: Proc | None = None
        self.agent: Proc | None = None
        self.results: dict[tuple[str, str], list[WrkResult]] = {}
        self.web_memory: dict[str, Any] = {}
        self.rss_after_load: dict[str, int] = {}

    def _probe(self, tool: tb.Tool) -> None:
        """tunnel_bench probes its banner; here the tool's "iperf" port reaches nginx."""
        http_check(Row(tool.name, tool.label, f"http://127.0.0.1:{tool.iperf_port}"), self.root)

    # --- setup --------------------------------------------------------------------------

    def setup_rows(self, names: Sequence[str], loop: str) -> None:
        self.nginx = Nginx(self.infra)
        # tunnel_bench's ssh and websocat setups forward to its sink and banner ports.
        self.sink = self.banner = self.nginx
        log(f"nginx (1 worker) on port {self.nginx.port}, pid {self.nginx.proc.popen.pid}")
        for name in names:
            try:
                row = self._start_row(name, loop)
                http_check(row, self.root)
            except (tb.BenchError, AssertionError, OSError, subprocess.SubprocessError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                row = Row(name, name, "", error=first[:300])
                self.fail(f"setup of {name}", str(exc)[-1500:])
            self.rows[name] = row
            if row.error is None:
                log(f"{row.label}: wrk -> {row.base}")

    def _start_row(self, name: str, loop: str) -> Row:
        assert self.nginx is not None
        nginx = ("nginx", self.nginx.proc.popen.pid)
        if name == "direct":
            return Row(
                "direct", "direct (nginx)", f"http://127.0.0.1:{self.nginx.port}", cpu=[nginx]
            )
        if name == "hatchway":
            row = self._start_hatchway_web(loop)
        elif name.startswith("floor"):
            row = self._start_floor(name)
        else:
            tool = self._start_ssh() if name == "ssh" else self._start_websocat()
            row = Row(name, tool.label, f"http://127.0.0.1:{tool.iperf_port}", cpu=tool.cpu)
        row.cpu.append(nginx)
        return row

    def _start_hatchway_web(self, loop: str) -> Row:
        assert self.nginx is not None
        env = Env(self.root / "hatchway")
        env.root.mkdir(parents=True)
        self.envs.append(env)
        relay, port, password = env.start_relay(extra=["--domain", DOMAIN, "--loop", loop])
        if password is None:
            raise tb.BenchError("the relay printed no bootstrap password")
        url = f"https://127.0.0.1:{port}"
        secret = env.add_device("dev1")
        agent = env.start_agent(url, "dev1", secret, [f"http=127.0.0.1:{self.nginx.port}"])
        relay.wait_output(r"device dev1 connected", timeout=20)
        self.relay, self.agent = relay, agent
        env.login(url, "admin", password)
        grant = env.hatchway("open", "dev1", "--print-url").stdout.decode().strip()
        parts = urllib.parse.urlsplit(grant)
        if parts.netloc != f"{DEVICE_HOST}:{port}":
            raise tb.BenchError(f"hatchway open printed {grant!r}")
        answer = WebClient(port, env.ca_file).request("GET", f"{parts.path}?{parts.query}")
        if answer.status != 303:
            raise tb.BenchError(f"the one-time link answered {answer.status}, not 303")
        cookie = f"{DEVICE_COOKIE}={set_cookie_value(answer, DEVICE_COOKIE)}"
        self.hatchway = {"port": port, "ca": env.ca_file, "cookie": cookie}
        return Row(
            "hatchway",
            f"hatchway (relay --loop {loop})",
            url,
            headers=[f"Host: {DEVICE_HOST}:{port}", f"Cookie: {cookie}"],
            curl=[
                *("--cacert", str(env.ca_file), "-H", f"Cookie: {cookie}"),
                *("--resolve", f"{DEVICE_HOST}:{port}:127.0.0.1"),
            ],
            curl_base=f"https://{DEVICE_HOST}:{port}",
            cpu=[("relay", relay.popen.pid), ("agent", agent.popen.pid)],
        )

    def _start_floor(self, name: str) -> Row:
        """bench/floor_relay.py in front of nginx, with the relay's TLS files (``name`` is
        floor or floor+N: N µs of CPU added per browser read)."""
        assert self.nginx is not None
        burn = int(name.partition("+")[2] or 0)
        d = self.root / name
        d.mkdir()
        files = ensure_tls_files(d / "tls", "localhost")
        port, tunnel_port = free_port(), free_port()
        env = self.infra.environ()
        env["FLOOR_BURN_US"] = str(burn)
        python = [sys.executable, str(FLOOR_SCRIPT)]
        relay = self.infra.spawn(
            f"{name}-relay",
            [
                *python,
                "relay",
                str(port),
                str(tunnel_port),
                str(files.server_cert),
                str(files.server_key),
            ],
            env=env,
        )
        tb.wait_listening(tunnel_port, relay, 10, f"{name} relay")
        agent = self.infra.spawn(
            f"{name}-agent", [*python, "agent", str(tunnel_port), str(self.nginx.port)], env=env
        )
        tb.wait_listening(port, relay, 10, f"{name} relay (waiting for its agent)")
        label = "python floor" + (f" (+{burn} µs/request)" if burn else "")
        return Row(
            name,
            label,
            f"https://127.0.0.1:{port}",
            curl=["--cacert", str(files.ca_cert)],
            cpu=[("relay", relay.popen.pid), ("agent", agent.popen.pid)],
        )

    # --- measurements -------------------------------------------------------------------

    def run_load(self) -> None:
        args = self.args
        rows = [r for r in self.rows.values() if r.error is None]
        for run in range(1, args.runs + 1):
            for row in rows:
                for key, label, path, connections in TESTS:
                    try:
                        result = self._wrk_once(row, path, connections)
                    except tb.BenchError as exc:
                        self.fail(f"{row.name} {label} run {run}", str(exc))
                        continue
                    self._record(row, key, label, path, run, result)
                for level in args.sweep_levels:
                    key, label = f"c{level}", f"small GET -c{level}"
                    try:
                        result = self._wrk_once(row, "/index.html", level, args.sweep_seconds)
                    except tb.BenchError as exc:
                        self.fail(f"{row.name} {label} run {run}", str(exc))
                        continue
                    self._record(row, key, label, "/index.html", run, result)
        if self.relay is not None and self.agent is not None:
            self.rss_after_load = rss_of(
                {"relay": self.relay.popen.pid, "agent": self.agent.popen.pid}
            )

    def _record(
        self, row: Row, key: str, label: str, path: str, run: int, result: WrkResult
    ) -> None:
        self.results.setdefault((row.name, key), []).append(result)
        log(
            f"[{label}] run {run}/{self.args.runs} {row.label:<30} {result.rps:9.0f} req/s"
            f"  p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  "
            + (error_text(result, row.sizes.get(path)) or "no errors")
            + "  CPU s "
            + " ".join(f"{name} {s:.1f}" for name, s in result.cpu.items())
        )
        time.sleep(0.5)

    def _wrk_once(
        self, row: Row, path: str, connections: int, seconds: int | None = None
    ) -> WrkResult:
        cpu0 = {name: tb.tree_cpu_seconds(pid) for name, pid in row.cpu}
        busy0, wrk0, t0 = machine_busy_seconds(), children_cpu_seconds(), time.monotonic()
        text = run_wrk(row.base + path, row.headers, connections, seconds or self.args.seconds)
        wall, busy = time.monotonic() - t0, machine_busy_seconds() - busy0
        result = parse_wrk(text)
        result.cpu = {name: tb.tree_cpu_seconds(pid) - cpu0[name] for name, pid in row.cpu}
        result.cpu["wrk"] = children_cpu_seconds() - wrk0
        result.wall, result.connections = wall, connections
        result.others = max(0.0, busy - sum(result.cpu.values()))
        return result

    def run_profile(self) -> None:
        """One extra small-GET run through hatchway with py-spy on the relay and agent."""
        py_spy = tb.tool_path("py-spy")
        row = self.rows.get("hatchway")
        if py_spy is None:
            self.profile.append("py-spy is not installed: pip install py-spy")
            return
        if row is None or row.error is not None or self.relay is None or self.agent is None:
            return
        duration = self.args.seconds + 2
        targets = [("relay", self.relay.popen.pid), ("agent", self.agent.popen.pid)]
        spies = tb.start_spies(py_spy, targets, duration, self.root)
        time.sleep(1.0)
        try:
            result = self._wrk_once(row, "/index.html", CONNECTIONS)
            self.profile.append(
                f"small GET through hatchway under py-spy (100 Hz, --nonblocking): "
                f"{result.rps:.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
            )
        except tb.BenchError as exc:
            self.profile.append(f"small GET under py-spy failed: {exc}")
        self.profile += tb.collect_spies(spies, duration)

    def run_memory(self) -> None:
        """The relay's and agent's RSS idle, then with ``--clients`` keep-alive clients."""
        if self.relay is None or self.agent is None:
            return
        pids = {"relay": self.relay.popen.pid, "agent": self.agent.popen.pid}
        idle = {name: rss_kib(pid) for name, pid in pids.items()}
        hw = self.hatchway
        log(f"[memory] idle RSS: relay {idle['relay']} KiB, agent {idle['agent']} KiB")
        try:
            opened = run_client_loop(
                hold_clients(
                    hw["port"], hw["ca"], hw["cookie"], self.args.clients, lambda: rss_of(pids)
                )
            )
        except (tb.BenchError, OSError) as exc:
            self.fail("memory", str(exc))
            return
        self.web_memory = {"idle": idle, **opened}
        ok, held = opened["ok"], opened["rss"]
        log(
            f"[memory] {ok} clients open ({opened['failed']} failed, {opened['lost']} closed "
            f"early) in {opened['seconds']:.1f} s: relay {held['relay']} KiB "
            f"({(held['relay'] - idle['relay']) / max(ok, 1):.1f} KiB/client), agent "
            f"{held['agent']} KiB ({(held['agent'] - idle['agent']) / max(ok, 1):.1f} KiB/client)"
        )
        for error, n in opened["errors"].most_common(5):
            log(f"  x{n}: {error}")
        time.sleep(2.0)  # let the relay, agent and nginx close the channels

    # --- report -------------------------------------------------------------------------

    def report(self) -> None:
        args = self.args
        log("")
        log(
            f"## Results ({os.cpu_count()} cores, Python {platform.python_version()}, "
            f"wrk -t1 -d{args.seconds}s, median of {args.runs} run(s); load average now "
            f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])})"
        )
        log("")
        rows = []
        for row in self.rows.values():
            if row.error is not None:
                rows.append([row.label, f"setup failed: {row.error[:100]}", *[""] * 7])
                continue
            cells = [row.label]
            for key in ("small", "big"):
                cells += self._load_cells(row.name, key)
            one = self._median(row.name, "one", "p50_ms")
            base = self._median("direct", "one", "p50_ms")
            cells.append(
                "-"
                if one is None
                else f"{one * 1000:.0f}" + (f" ({one / base:.1f}x)" if base else "")
            )
            errors = [(label, self._errors(row, key, path)) for key, label, path, _ in TESTS]
            cells.append("; ".join(f"{label}: {text}" for label, text in errors if text) or "none")
            rows.append(cells)
        log(
            tb.markdown_table(
                [
                    "row",
                    "small GET req/s",
                    "ratio to direct",
                    "p50 / p99 ms",
                    "1 MiB GET req/s (MiB/s)",
                    "ratio to direct",
                    "p50 / p99 ms",
                    "1 connection p50 µs",
                    "errors",
                ],
                rows,
            )
        )
        self._report_sweep()
        self._report_cpu()
        self._report_memory()
        self._report_logs()
        if args.runs > 1 and self.results:
            per_run = (
                f"  {name:<9} {key:<6} " + "  ".join(f"{r.rps:.0f}" for r in results)
                for (name, key), results in self.results.items()
            )
            log("\nAll runs (req/s):\n" + "\n".join(per_run))
        if self.profile:
            log("\n## Profile\n\n" + "\n\n".join(self.profile))
        if self.failures:
            log("\n## Failures\n" + "\n".join(f"- {failure}" for failure in self.failures))

    def _report_sweep(self) -> None:
        """The small GET at each --sweep level and in the main test: rate, p99 (medians)."""
        args = self.args
        levels = [*args.sweep_levels, CONNECTIONS]
        if not args.sweep_levels or not self.results:
            return
        bound = args.p99_bound
        rows = []
        for row in self.rows.values():
            if row.error is not None:
                continue
            cells, best = [row.label], None
            for level in levels:
                key = "small" if level == CONNECTIONS else f"c{level}"
                rps, p99 = self._median(row.name, key, "rps"), self._median(row.name, key, "p99_ms")
                if rps is None or p99 is None:
                    cells.append("-")
                    continue
                cells.append(f"{rps:.0f} / {p99:.2f}")
                if p99 < bound and (best is None or rps > best[0]):
                    best = (rps, level, p99)
            cells.append(
                "none" if best is None else f"{best[0]:.0f} (-c{best[1]}, p99 {best[2]:.2f} ms)"
            )
            rows.append(cells)
        log(
            "\nSmall GET by connections (wrk -t1 -cN, closed loop: each connection sends its "
            f"next request when the answer is in; req/s / p99 ms, medians; -c{CONNECTIONS} is "
            "the table above):\n"
        )
        log(
            tb.markdown_table(
                ["row", *(f"-c{level}" for level in levels), f"most req/s with p99 < {bound:g} ms"],
                rows,
            )
        )

    def _median(self, name: str, key: str, attr: str) -> float | None:
        results = self.results.get((name, key))
        return statistics.median(getattr(r, attr) for r in results) if results else None

    def _load_cells(self, name: str, key: str) -> list[str]:
        rps = self._median(name, key, "rps")
        if rps is None:
            return ["-", "", ""]
        base = self._median("direct", key, "rps")
        value = f"{rps:.0f}"
        if key == "big":
            value += f" ({self._median(name, key, 'bytes_per_s') / (1 << 20):.0f})"
        p50, p99 = self._median(name, key, "p50_ms"), self._median(name, key, "p99_ms")
        return [value, f"{rps / base:.2f}" if base else "-", f"{p50:.2f} / {p99:.2f}"]

    def _errors(self, row: Row, key: str, path: str) -> str:
        return "; ".join(
            text
            for r in self.results.get((row.name, key), [])
            if (text := error_text(r, row.sizes.get(path)))
        )

    def _report_cpu(self) -> None:
        cpu_rows = []
        for row in self.rows.values():
            cells = [row.label]
            for key in ("small", "big"):
                results = self.results.get((row.name, key))
                if not results:
                    cells.append("-")
                    continue
                wall = statistics.median(r.wall for r in results)
                figures = {
                    name: statistics.median(r.cpu[name] for r in results) for name in results[0].cpu
                }
                figures["others"] = statistics.median(r.others for r in results)
                cells.append(
                    ", ".join(
                        f"{name} {s:.1f} ({100 * s / wall:.0f} %)" for name, s in figures.items()
                    )
                )
            if len(cells) > 1 and cells[1:] != ["-", "-"]:
                cpu_rows.append(cells)
        if cpu_rows:
            log("")
            log(
                f"CPU seconds during the wrk -c50 runs ({self.args.seconds} s each; % of one "
                f"core; {os.cpu_count()} cores shared by everything; others: every other "
                "process on the machine, from /proc/stat):"
            )
            log("")
            log(tb.markdown_table(["row", "small GET", "1 MiB GET"], cpu_rows))

    def _report_memory(self) -> None:
        if not self.web_memory:
            if self.rss_after_load:
                log("")
                log(
                    "VmRSS after the wrk runs: "
                    + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in self.rss_after_load.items())
                )
            return
        m = self.web_memory
        ok = max(m["ok"], 1)
        log("")
        log(
            f"Memory (VmRSS) idle with the device tunnel up, then with {m['ok']} keep-alive "
            "HTTPS clients on the device's virtual host (each did one GET with the cookie)"
            + (f"; {m['failed']} clients failed" if m["failed"] else "")
            + (f"; {m['lost']} closed early" if m["lost"] else "")
            + ":"
        )
        log("")
        log(
            tb.markdown_table(
                [
                    "process",
                    "idle MiB",
                    f"with {m['ok']} clients MiB",
                    "KiB per client",
                    "after the wrk runs MiB",
                ],
                [
                    [
                        name,
                        f"{m['idle'][name] / 1024:.1f}",
                        f"{m['rss'][name] / 1024:.1f}",
                        f"{(m['rss'][name] - m['idle'][name]) / ok:.1f}",
                        f"{self.rss_after_load[name] / 1024:.1f}" if self.rss_after_load else "-",
                    ]
                    for name in ("relay", "agent")
                ],
            )
        )

    def _report_logs(self) -> None:
        for proc in (self.relay, self.agent):
            if proc is None:
                continue
            text = proc.output()
            tracebacks = text.count("Traceback (most recent call last)")
            notable = Counter(
                re.sub(r"^\S+ \S+ ", "", line)[:160]  # without the timestamp
                for line in text.splitlines()
                if re.search(r" (WARNING|ERROR|CRITICAL) ", line)
            )
            if not tracebacks and not notable:
                continue
            log("")
            log(f"{proc.name} log ({proc.log}): {tracebacks} traceback(s)")
            for line, n in notable.most_common(8):
                log(f"  x{n}: {line}")


def error_text(result: WrkResult, expected_size: int | None) -> str:
    """Socket errors, non-2xx answers and responses of the wrong size, or ''."""
    parts = [f"{kind} {n}" for kind, n in result.socket_errors.items()]
    if result.non2xx:
        parts.append(f"non-2xx {result.non2xx}")
    if expected_size and result.requests:
        # wrk also counts the bytes of the responses still arriving when it stops.
        low = 0.98 * expected_size * result.requests
        high = 1.02 * expected_size * (result.requests + result.connections)
        if not low <= result.bytes_read <= high:
            average = result.bytes_read / result.requests
            parts.append(f"{average:.0f} bytes per response, not {expected_size}")
    return ", ".join(parts)


def rss_of(pids: dict[str, int]) -> dict[str, int]:
    return {name: rss_kib(pid) for name, pid in pids.items()}


# --- keep-alive clients for the memory figure ------------------------------------------


async def one_client(
    port: int, ctx: ssl.SSLContext, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=DEVICE_HOST
    )
    try:
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = head.split(" ", 2)[1]
        length = re.search(r"(?im)^content-length:\s*(\d+)", head)
        if status != "200" or length is None:
            raise tb.BenchError(f"HTTP {status}" + ("" if length else " without Content-Length"))
        await reader.readexactly(int(length.group(1)))
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def hold_clients(
    port: int, ca: Path, cookie: str, n: int, measure: Callable[[], dict[str, int]]
) -> dict[str, Any]:
    """Open ``n`` clients (one GET each, kept alive), measure, close them."""
    ctx = ssl.create_default_context(cafile=str(ca))
    request = (
        f"GET /index.html HTTP/1.1\r\nHost: {DEVICE_HOST}:{port}\r\nCookie: {cookie}\r\n\r\n"
    ).encode()
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: Counter[str] = Counter()
    t0 = time.monotonic()
    try:
        # Batches below the relay's limit of 64 connections per address before routing.
        for i in range(0, n, tb.TUNNEL_BATCH):
            batch = [
                asyncio.wait_for(one_client(port, ctx, request), 15)
                for _ in range(min(tb.TUNNEL_BATCH, n - i))
            ]
            for result in await asyncio.gather(*batch, return_exceptions=True):
                if isinstance(result, BaseException):
                    errors[f"{type(result).__name__}: {result}"[:160]] += 1
                else:
                    clients.append(result)
            if time.monotonic() - t0 > 120:
                raise tb.BenchError(f"only {len(clients)} of {n} clients within 120 s")
        seconds = time.monotonic() - t0
        await asyncio.sleep(2.0)
        rss = measure()
        lost = sum(1 for reader, _ in clients if reader.at_eof())
    finally:
        for _, writer in clients:
            writer.close()
        await asyncio.sleep(0.5)
    return {
        "ok": len(clients),
        "failed": sum(errors.values()),
        "errors": errors,
        "lost": lost,
        "rss": rss,
        "seconds": seconds,
    }


def run_client_loop(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """On uvloop when installed: the stdlib loop's TLS costs this process ~350 KB a client."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="HTTP benchmark: nginx direct, through hatchway's web access, ssh -L "
        "and websocat (loopback)."
    )
    parser.add_argument("--seconds", type=int, default=8, help="wrk -d (default 8)")
    parser.add_argument("--runs", type=int, default=1, help="runs; medians are shown")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="ROW,...",
        help=f"rows among {', '.join(ROWS)}; repeatable or comma-separated; direct is "
        "always measured as the baseline",
    )
    parser.add_argument(
        "--loop", choices=["asyncio", "uvloop"], default="uvloop", help="the relay's event loop"
    )
    parser.add_argument(
        "--clients", type=int, default=1000, help="keep-alive clients for the memory figure"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one extra small-GET run with py-spy on the relay and agent (pip install py-spy)",
    )
    parser.add_argument(
        "--sweep",
        default="10,20,30,40",
        metavar="N,...",
        help="also run the small GET at these wrk -c connections (every row, every run; "
        "default 10,20,30,40; 'none' skips it): the rate each sustains and its p99",
    )
    parser.add_argument(
        "--sweep-seconds", type=int, default=5, help="wrk -d of each sweep test (default 5)"
    )
    parser.add_argument(
        "--p99-bound",
        type=float,
        default=3.0,
        metavar="MS",
        help="the sweep reports the highest rate whose p99 stays under this (default 3 ms)",
    )
    parser.add_argument(
        "--floor-burn",
        default="0",
        metavar="US,...",
        help="the floor row once per value: microseconds of CPU added to its relay per "
        "request (default 0; e.g. 0,10,15 to see what a relay's cost per request does)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    names = {n.strip() for item in args.only for n in item.split(",") if n.strip()}
    unknown = names - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    rows = [r for r in ROWS if r in names or r == "direct"] if names else list(ROWS)
    try:
        burns = sorted({int(n) for n in args.floor_burn.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--floor-burn: not a list of numbers: {args.floor_burn!r}")
    if not burns or any(not 0 <= n <= 1000 for n in burns):
        parser.error("--floor-burn: microseconds between 0 and 1000")
    floors = [f"floor+{n}" if n else "floor" for n in burns]
    args.rows = [f for r in rows for f in (floors if r == "floor" else [r])]
    if args.seconds < 1 or args.runs < 1 or args.clients < 0 or args.sweep_seconds < 1:
        parser.error("--seconds, --sweep-seconds and --runs must be positive")
    try:
        levels = [] if args.sweep == "none" else [int(n) for n in args.sweep.split(",") if n]
    except ValueError:
        parser.error(f"--sweep: not a list of numbers: {args.sweep!r}")
    if any(not 1 <= n <= 1000 for n in levels):
        parser.error("--sweep: connections must be between 1 and 1000")
    args.sweep_levels = sorted(set(levels) - {CONNECTIONS})  # the main small GET test
    return args


def raise_nofile(needed: int) -> None:
    """Children inherit it: the relay, agent and nginx hold a socket or two per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("wrk", "nginx", "curl") if tb.tool_path(t) is None]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    raise_nofile(4 * args.clients + 1024)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # KeyboardInterrupt
    root = Path(tempfile.mkdtemp(prefix="web-bench-"))
    bench = WebBench(args, root)
    interrupted = False
    log(f"web_bench: rows {', '.join(args.rows)}; relay --loop {args.loop}")
    log(f"work directory (logs): {root}")
    log(f"load average at start: {Path('/proc/loadavg').read_text().split()[:3]}")
    log(f"code: {tb.code_revision()}")
    try:
        bench.setup_rows(args.rows, args.loop)
        if args.clients:
            bench.run_memory()
        bench.run_load()
        if args.profile:
            bench.run_profile()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: reporting what was measured, stopping every process", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        try:
            bench.report()
        finally:
            bench.cleanup()
        kept = bench.failures or args.keep or interrupted
        if kept:
            log(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 130 if interrupted else 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
