#!/usr/bin/env python3
"""Round trips on one connection while a bulk upload fills another, through one tunnel.

What a user feels when a shell and a copy share a device: one-byte echo round trips
through ``hatchway forward`` to an echo service on the device, first alone, then while a
second ``forward`` process pushes bulk data to a sink service on the same device. The
two ``forward`` processes have a client tunnel each; the relay carries both channels on
the one device tunnel, so the echo's bytes queue behind the bulk data there. The
baseline is the same two loads straight to the echo and sink services, in the same
run::

    .venv/bin/python bench/loaded_latency.py                 # ~1 min
    .venv/bin/python bench/loaded_latency.py --seconds 8 --count 1000

Prints one table: round-trip times (ms) and what the bulk upload moved. Everything listens on 127.0.0.1; the bulk
stops after ``--seconds``; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.procs import Env  # noqa: E402

#: A connection that sees nothing for this long is given up (seconds).
IO_TIMEOUT = 30.0


def serve(handle: object) -> int:
    """A loopback server calling ``handle(conn)`` in a thread per connection; its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            conn.settimeout(IO_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def sink(conn: socket.socket) -> None:
    buf = bytearray(256 * 1024)
    with conn:
        while conn.recv_into(buf):
            pass


def round_trips(port: int, count: int) -> list[float]:
    """``count`` one-byte round trips, 5 ms apart (ms each)."""
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(b"x")
            if conn.recv(1) != b"x":
                raise RuntimeError("the echo service did not answer")
            times.append((time.perf_counter() - start) * 1000)
            time.sleep(0.005)
    return times


def under_load(
    echo_port: int, sink_port: int, count: int, seconds: float
) -> tuple[list[float], float]:
    """Round trips while a bulk upload to ``sink_port`` runs (it starts 1 s before), and
    the upload's Gbit/s."""
    stop = time.monotonic() + seconds
    sent = [0]

    def bulk() -> None:
        chunk = b"\0" * (128 * 1024)
        with socket.create_connection(("127.0.0.1", sink_port), timeout=IO_TIMEOUT) as conn:
            while time.monotonic() < stop:
                conn.sendall(chunk)
                sent[0] += len(chunk)

    pusher = threading.Thread(target=bulk)
    pusher.start()
    time.sleep(1.0)
    try:
        times = round_trips(echo_port, count)
    finally:
        pusher.join(seconds + IO_TIMEOUT)
    return times, sent[0] * 8 / seconds / 1e9


def row(name: str, times: list[float], gbit: float | None = None) -> str:
    ordered = sorted(times)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    bulk = "-" if gbit is None else f"{gbit:.2f}"
    return f"| {name} | {statistics.median(times):.3f} | {p99:.3f} | {ordered[-1]:.3f} | {bulk} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=600, help="round trips per row")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of the bulk upload")
    args = parser.parse_args()
    echo_port, sink_port = serve(echo), serve(sink)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loaded-latency-") as tmp:
        env = Env(Path(tmp))
        try:
            _, port, password = env.start_relay()
            assert password is not None
            url = f"https://localhost:{port}"
            services = [f"echo=127.0.0.1:{echo_port}", f"sink=127.0.0.1:{sink_port}"]
            agent = env.start_agent(url, "dev1", env.add_device("dev1"), services)
            agent.wait_output(r"connected to", timeout=20)
            env.login(url, "admin", password)
            _, fwd_echo = env.start_forward("dev1", "echo")
            _, fwd_sink = env.start_forward("dev1", "sink")
            for name, e, s in (("direct", echo_port, sink_port), ("hatchway", fwd_echo, fwd_sink)):
                print(f"{name}: alone", file=sys.stderr)
                rows.append(row(f"{name}, alone", round_trips(e, args.count)))
                print(f"{name}: beside a bulk upload", file=sys.stderr)
                loaded, gbit = under_load(e, s, args.count, args.seconds)
                rows.append(row(f"{name}, beside a bulk upload", loaded, gbit))
        finally:
            env.stop_all()
    print(f"One-byte round trips ({args.count} per row, 5 ms apart), ms:")
    print()
    print("| row | p50 | p99 | max | bulk upload Gbit/s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
