"""A real web stack for end-to-end tests: nginx in front of uvicorn running tests.webapp.

    with start_web_stack(tmp_path) as stack:
        curl http://127.0.0.1:{stack.nginx_port}/static/index.html   (static files)
        curl http://127.0.0.1:{stack.nginx_port}/app/headers          (proxied to uvicorn)

Both servers listen on free loopback ports, log into the given directory, and are
killed on close() (or when the `with` block ends), even if a test failed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.procs import Proc, free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 15.0


# --- static files -------------------------------------------------------------------------


def _png(width: int = 32, height: int = 32) -> bytes:
    """A small, valid, deterministic RGB gradient PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 8, y * 8, 128)) for x in range(width)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


@functools.cache
def static_files() -> dict[str, bytes]:
    """Name -> content of the files nginx serves under /static/ (index.html also at /)."""
    return {
        "index.html": (
            b"<!doctype html>\n<html><head><title>device home</title>\n"
            b'<link rel="stylesheet" href="/static/style.css">\n'
            b'<script src="/static/app.js"></script></head>\n'
            b'<body><h1>device home</h1><img src="/static/logo.png" alt="logo">\n'
            b'<p><a href="/app/">the device app</a></p></body></html>\n'
        ),
        "style.css": b"body { font-family: sans-serif; margin: 2em; }\nh1 { color: #336; }\n",
        "app.js": b'document.addEventListener("DOMContentLoaded", () => console.log("ready"));\n',
        "big.bin": random.Random(20240601).randbytes(1 << 20),
        "logo.png": _png(),
    }


def write_static_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in static_files().items():
        (directory / name).write_bytes(content)
    return directory


# --- processes ----------------------------------------------------------------------------


def _port_open(port: int, prefix: Sequence[str] = ()) -> bool:
    if prefix:  # inside a network namespace: ask from there
        probe = f"import socket; socket.create_connection(({HOST!r}, {port}), 1).close()"
        result = subprocess.run(
            [*prefix, sys.executable, "-c", probe], capture_output=True, timeout=10
        )
        return result.returncode == 0
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Server:
    """One running server process; close() stops it (and its process group)."""

    proc: Proc
    port: int
    tls_port: int = 0  # nginx: its HTTPS port (camera.local)
    device_ca: Path | None = None  # nginx: the CA of that HTTPS certificate
    prefix: Sequence[str] = ()  # e.g. ["ip", "netns", "exec", "dev"]

    def wait_ready(self, started: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        """Wait until started() (the server says it has bound its port) and the port answers."""

        def ready() -> bool:
            if self.proc.popen.poll() is not None:
                raise AssertionError(
                    f"{self.proc.name} exited ({self.proc.popen.returncode}):\n{self.proc.output()}"
                )
            return started() and _port_open(self.port, self.prefix)

        wait_for(ready, timeout, f"{self.proc.name} to listen on port {self.port}")

    def close(self) -> None:
        self.proc.stop()
        with contextlib.suppress(ProcessLookupError):  # e.g. nginx workers of a killed master
            os.killpg(self.proc.popen.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _spawn(
    name: str,
    args: list[str],
    log: Path,
    port: int,
    started: Callable[[], bool],
    prefix: Sequence[str] = (),
) -> Server:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*prefix, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
    server = Server(Proc(name, popen, log), port, prefix=prefix)
    try:
        server.wait_ready(started)
    except BaseException:
        server.close()
        raise
    return server


def start_uvicorn(log_dir: Path, port: int | None = None, prefix: Sequence[str] = ()) -> Server:
    """uvicorn serving tests.webapp:app on HOST:port (a free one by default)."""
    port = port or free_port(HOST)
    log_dir.mkdir(parents=True, exist_ok=True)
    args = [
        *(sys.executable, "-m", "uvicorn", "tests.webapp:app"),
        *("--app-dir", str(REPO_ROOT), "--host", HOST, "--port", str(port)),
        # websockets' own (sans-I/O) implementation; plain "websockets" is uvicorn's
        # deprecated legacy one.
        *("--ws", "websockets-sansio", "--no-access-log", "--log-level", "info"),
        # "client" in /app/headers is the real peer, not X-Forwarded-For.
        "--no-proxy-headers",
        # Outlive nginx's idle upstream connections (60 s) so that nginx closes them first.
        *("--timeout-keep-alive", "75", "--timeout-graceful-shutdown", "3"),
    ]
    log = log_dir / "uvicorn.log"
    return _spawn(
        "uvicorn", args, log, port, lambda: "Uvicorn running on" in log.read_text(), prefix
    )


NGINX_CONF = """\
{user}worker_processes 1;
worker_rlimit_nofile 16384;
pid {root}/nginx.pid;
error_log {root}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {root}/access.log;
    client_body_temp_path {root}/temp/client_body;
    proxy_temp_path {root}/temp/proxy;
    fastcgi_temp_path {root}/temp/fastcgi;
    uwsgi_temp_path {root}/temp/uwsgi;
    scgi_temp_path {root}/temp/scgi;

    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    client_max_body_size 0;
    log_not_found off;

    # WebSocket upgrades pass "Connection: upgrade"; other requests send no Connection
    # header, so the upstream connections stay alive.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';
    }}

    upstream device_app {{
        server {host}:{app_port};
        keepalive 32;
        keepalive_requests 100000;
        keepalive_timeout 60s;
    }}

    server {{
        listen {host}:{port};
        server_name localhost;

        location = / {{
            root {static};
            try_files /index.html =404;
        }}

        location / {{
            return 404;
        }}

        location /static/ {{
            alias {static}/;
        }}

        # The same files with caching headers (for the relay's cache).
        location /cached/ {{
            alias {static}/;
            expires 1h;
        }}

        location /cached-vary/ {{
            alias {static}/;
            expires 1h;
            add_header Vary Accept-Language;
        }}

        location /cached-vary-cookie/ {{
            alias {static}/;
            expires 1h;
            add_header Vary Cookie;
        }}

        # An Expires that is no HTTP-date (a zone of -0000): "already expired".
        location /cached-odd-expires/ {{
            alias {static}/;
            add_header Expires "Mon, 30 Nov 2026 07:43:46 -0000";
        }}

        # A device page that asks the browser to clear the site's cookies.
        location /clear-site-data/ {{
            alias {static}/;
            add_header Clear-Site-Data '"cookies", "storage"';
        }}

        location /cached-cookie/ {{
            alias {static}/;
            expires 1h;
            add_header Set-Cookie "seen=1; Path=/";
        }}

        location /cached-private/ {{
            alias {static}/;
            add_header Cache-Control "private, max-age=3600";
        }}

        location /app/ {{
            proxy_pass http://device_app;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}

    # The device's own HTTPS server: answers only to its own name (camera.local).
    server {{
        listen {host}:{tls_port} ssl default_server;
        ssl_certificate {root}/device.pem;
        ssl_certificate_key {root}/device-key.pem;
        return 404 "wrong host $host\n";
    }}

    server {{
        listen {host}:{tls_port} ssl;
        server_name camera.local;
        ssl_certificate {root}/device.pem;
        ssl_certificate_key {root}/device-key.pem;

        location = /whoami {{
            default_type text/plain;
            return 200 "camera host=$host scheme=$scheme xfh=$http_x_forwarded_host\n";
        }}

        location = /redirect {{
            return 302 http://camera.local/static/style.css;
        }}

        location /static/ {{
            alias {static}/;
        }}
    }}
}}
"""


def write_device_tls(root: Path, name: str = "camera.local") -> Path:
    """A CA (returned) and a certificate for ``name`` signed by it, for nginx's HTTPS."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (root / "device.pem").write_bytes(cert.public_bytes(pem))
    (root / "device-key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ca_file = root / "device-ca.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    return ca_file


def start_nginx(
    root: Path,
    app_port: int,
    static_dir: Path,
    port: int | None = None,
    tls_port: int | None = None,
    prefix: Sequence[str] = (),
) -> Server:
    """nginx (config, pid, logs and temp files under root) on HOST:port.

    Serves static_dir at /static/ (and its index.html at /) and proxies /app/ to
    HOST:app_port; on tls_port, HTTPS for the name camera.local only (certificate from
    root/device-ca.pem).
    """
    tls_port = tls_port or free_port(HOST)
    port = port or free_port(HOST)
    (root / "temp").mkdir(parents=True, exist_ok=True)
    write_device_tls(root)
    conf = root / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            # As root, the workers would run as "nobody", who cannot read a private tmp dir.
            user="user root;\n" if os.geteuid() == 0 else "",
            root=root,
            host=HOST,
            port=port,
            tls_port=tls_port,
            app_port=app_port,
            static=static_dir,
        )
    )
    args = ["nginx", "-c", str(conf), "-p", str(root), "-e", str(root / "error.log")]
    pid_file = root / "nginx.pid"  # written once nginx has bound its port
    pid_file.unlink(missing_ok=True)
    server = _spawn(
        "nginx", [*args, "-g", "daemon off;"], root / "nginx.log", port, pid_file.exists, prefix
    )
    server.tls_port = tls_port
    server.device_ca = root / "device-ca.pem"
    return server


@dataclass
class WebStack:
    nginx: Server
    app: Server
    static_dir: Path

    @property
    def nginx_port(self) -> int:
        return self.nginx.port

    @property
    def app_port(self) -> int:
        return self.app.port

    @property
    def url(self) -> str:
        """Base URL of nginx, e.g. http://127.0.0.1:12345 (no trailing slash)."""
        return f"http://{HOST}:{self.nginx_port}"

    def close(self) -> None:
        try:
            self.nginx.close()
        finally:
            self.app.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_web_stack(tmp_path: Path, prefix: Sequence[str] = ()) -> WebStack:
    """uvicorn + nginx in front of it, all files under tmp_path/webstack; ``prefix``
    runs both inside a network namespace (``ip netns exec NS``)."""
    root = tmp_path / "webstack"
    static_dir = write_static_dir(root / "static")
    app = start_uvicorn(root, prefix=prefix)
    try:
        nginx = start_nginx(root / "nginx", app.port, static_dir, prefix=prefix)
    except BaseException:
        app.close()
        raise
    return WebStack(nginx, app, static_dir)
