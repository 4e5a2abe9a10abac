#!/usr/bin/env python3
"""The cheapest Python chain of hatchway's shape, one way: a yardstick for bulk.

Not part of hatchway. Five processes in a line on loopback, each a plain blocking loop
of ``recv_into`` and ``sendall`` on a preallocated buffer (no event loop, no
WebSocket, no multiplexer, no windows; ``ssl.SSLSocket`` reads and writes its socket
directly, so there is no memory BIO to copy through)::

    sender -> client -> relay -> agent -> sink
           TCP      TLS      TLS      TCP

The client frames what it reads as ``[u32 length][payload]`` on its TLS connection; the
relay parses the frames and writes them on to the agent (as hatchway's relay re-frames
a channel's data for the device); the agent writes the payloads to the sink. A byte
crosses four loopback TCP hops and two TLS legs (four AES-GCM passes), as through
hatchway. The ``plain`` row is the same chain without TLS. The last row runs the relay
as an event loop does it (uvloop, ``asyncio.Protocol``, asyncio's TLS layer through a
memory BIO, hatchway's allocator setting), the rest of the chain unchanged. The
baseline is the same sender writing straight to the sink, measured in the same run.

    .venv/bin/python bench/blocking_chain.py --seconds 5 --runs 3

Prints one table: Gbit/s (median of the runs), ratio to direct, and the CPU each
process of the chain used (% of one core). Everything listens on 127.0.0.1 and every
process stops by itself when the sender is done (or after a timeout).
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

LENGTH = struct.Struct("!I")
#: What the sender writes per call (iperf3's default) and what every hop reads at most.
SEND = 128 * 1024
READ = 256 * 1024
#: No process of the chain waits longer than this (seconds) for a connection or a byte.
LIFETIME = 120.0
TICKS = os.sysconf("SC_CLK_TCK")


def _listen(port: int) -> socket.socket:
    sock = socket.create_server(("127.0.0.1", port))
    sock.settimeout(LIFETIME)
    return sock


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=LIFETIME)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _accept(listener: socket.socket) -> socket.socket:
    conn, _ = listener.accept()
    conn.settimeout(LIFETIME)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.close()
    return conn


def _contexts(cert: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    return server, client


def frame_stream(src: socket.socket, dst: socket.socket) -> None:
    """Plain bytes in, ``[length][payload]`` frames out (the client)."""
    buf = bytearray(4 + READ)
    view = memoryview(buf)
    while n := src.recv_into(view[4:], READ):
        LENGTH.pack_into(buf, 0, n)
        dst.sendall(view[: 4 + n])


def pass_frames(src: socket.socket, dst: socket.socket, keep_header: bool) -> None:
    """Frames in; whole frames (the relay) or their payloads (the agent) out."""
    buf = bytearray(4 * READ)
    view = memoryview(buf)
    have = 0
    while n := src.recv_into(view[have:]):
        have += n
        pos = 0
        while have - pos >= 4:
            (size,) = LENGTH.unpack_from(buf, pos)
            if size > READ:
                raise ValueError(f"frame of {size} bytes")
            if have - pos - 4 < size:
                break
            start = pos if keep_header else pos + 4
            dst.sendall(view[start : pos + 4 + size])
            pos += 4 + size
        if pos:
            view[: have - pos] = view[pos:have]
            have -= pos


def loop_relay(listen_port: int, next_port: int, cert: str) -> None:
    """The relay as an event loop does it: uvloop, ``asyncio.Protocol`` on both sides,
    asyncio's TLS layer (a memory BIO) instead of ``SSLSocket``; frames parsed and
    written on whole, the upstream paused while the downstream's buffer is full."""
    import asyncio

    import uvloop

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from hatchway import allocator

    allocator.tune()  # as every hatchway process does
    server_ctx, client_ctx = _contexts(cert)
    loop = uvloop.new_event_loop()
    done = loop.create_future()

    class Down(asyncio.Protocol):
        def __init__(self, up: asyncio.Transport) -> None:
            self.up = up

        def pause_writing(self) -> None:
            self.up.pause_reading()

        def resume_writing(self) -> None:
            self.up.resume_reading()

    class Up(asyncio.Protocol):
        down: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.buf = bytearray()
            up = cast(asyncio.Transport, transport)
            up.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.pause_reading()
            loop.create_task(self._connect(up))

        async def _connect(self, up: asyncio.Transport) -> None:
            down, _ = await loop.create_connection(
                lambda: Down(up),
                "127.0.0.1",
                next_port,
                ssl=client_ctx,
                server_hostname="localhost",
            )
            down.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.down = down
            up.resume_reading()

        def data_received(self, data: bytes) -> None:
            buf = self.buf
            buf += data
            pos, have = 0, len(buf)
            while have - pos >= 4:
                (size,) = LENGTH.unpack_from(buf, pos)
                if have - pos - 4 < size:
                    break
                assert self.down is not None  # reading starts once it is there
                self.down.write(buf[pos : pos + 4 + size])  # a copy: buf changes below
                pos += 4 + size
            del buf[:pos]

        def connection_lost(self, exc: Exception | None) -> None:
            if self.down is not None:
                self.down.close()
            loop.call_later(0.5, done.set_result, None)

    server = loop.run_until_complete(
        loop.create_server(Up, "127.0.0.1", listen_port, ssl=server_ctx)
    )
    print("ready", flush=True)
    loop.run_until_complete(asyncio.wait_for(done, LIFETIME))
    server.close()


def role(argv: list[str]) -> None:
    """One process of the chain: ROLE LISTEN_PORT NEXT_PORT CERT|-"""
    name, listen_port, next_port, cert = argv[0], int(argv[1]), int(argv[2]), argv[3]
    if name == "loop-relay":
        loop_relay(listen_port, next_port, cert)
        return
    tls = cert != "-"
    server_ctx, client_ctx = _contexts(cert) if tls else (None, None)
    listener = _listen(listen_port)
    print("ready", flush=True)
    if name == "sink":
        conn = _accept(listener)
        buf = bytearray(READ)
        total, first = 0, 0.0
        while n := conn.recv_into(buf):
            if not total:
                first = time.perf_counter()
            total += n
        print(f"{total} {time.perf_counter() - first}", flush=True)
        return
    up = _accept(listener)
    down = _connect(next_port)
    if tls and name in ("relay", "agent"):
        assert server_ctx is not None
        up = server_ctx.wrap_socket(up, server_side=True)
    if tls and name in ("client", "relay"):
        assert client_ctx is not None
        down = client_ctx.wrap_socket(down, server_hostname="localhost")
    if name == "client":
        frame_stream(up, down)
    else:
        pass_frames(up, down, keep_header=name == "relay")
    down.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_once(chain: list[str], cert: str, seconds: float) -> tuple[float, dict[str, float]]:
    """Start the chain (from the sink back), send for ``seconds``; Gbit/s and CPU %."""
    ports = free_ports(len(chain) + 1)
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for i in reversed(range(len(chain))):
            name = chain[i]
            next_port = ports[i + 1] if i + 1 < len(chain) else 0
            proc = subprocess.Popen(
                [sys.executable, __file__, "--role", name, str(ports[i]), str(next_port), cert],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs[name] = proc
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{name} did not start")
        start_cpu = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        sender = _connect(ports[0])
        chunk = b"\0" * SEND
        started = time.perf_counter()
        end = started + seconds
        while time.perf_counter() < end:
            sender.sendall(chunk)
        cpu = {
            name: 100 * (cpu_seconds(p.pid) - start_cpu[name]) / seconds
            for name, p in procs.items()
            if name != "sink"
        }
        sender.close()
        out, _ = procs["sink"].communicate(timeout=30)
        total, elapsed = out.split()
        return int(total) * 8 / float(elapsed) / 1e9, cpu
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def make_cert(directory: Path) -> str:
    pem = directory / "chain.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(pem), "-out", str(directory / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    pem.write_text(pem.read_text() + (directory / "cert.pem").read_text())
    return str(pem)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        role(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = {
        "direct": (["sink"], "-"),
        "blocking chain, plain TCP": (["client", "relay", "agent", "sink"], "-"),
        "blocking chain, TLS": (["client", "relay", "agent", "sink"], "TLS"),
        "same, relay on uvloop": (["client", "loop-relay", "agent", "sink"], "TLS"),
    }
    results: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in rows}
    with tempfile.TemporaryDirectory(prefix="blocking-chain-") as tmp:
        cert = make_cert(Path(tmp))
        for run in range(args.runs):
            for name, (chain, tls) in rows.items():  # interleaved: drift hits every row
                gbit, cpu = run_once(chain, cert if tls == "TLS" else "-", args.seconds)
                results[name].append((gbit, cpu))
                print(f"run {run + 1}/{args.runs} {name}: {gbit:.2f} Gbit/s", file=sys.stderr)
    direct = statistics.median(g for g, _ in results["direct"])
    print("| row | Gbit/s (median; runs) | ratio to direct | CPU % client / relay / agent |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        gbits = [g for g, _ in runs]
        median = statistics.median(gbits)
        cpu = "-"
        if name != "direct":
            relay = "relay" if "relay" in runs[0][1] else "loop-relay"
            parts = [statistics.median(c[p] for _, c in runs) for p in ("client", relay, "agent")]
            cpu = " / ".join(f"{v:.0f}" for v in parts)
        each = " / ".join(f"{g:.2f}" for g in gbits)
        print(f"| {name} | {median:.2f} ({each}) | {median / direct:.2f} | {cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
