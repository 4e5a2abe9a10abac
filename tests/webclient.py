"""Talk to the relay's web side the way browsers and curl do, for the web tests.

Device names ``DEVICE.relay.localhost`` are not in DNS here: every connection goes to
127.0.0.1 with the name as TLS server name and Host (curl gets ``--resolve``).
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "relay.localhost"


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_responses(data: bytes) -> list[Response]:
    """Split a byte stream into responses (Content-Length or close-delimited bodies,
    chunked bodies kept encoded; enough for what the relay and the test app send)."""
    out: list[Response] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            raise AssertionError(f"incomplete response head: {data[:200]!r}")
        head, rest = data[:end].decode("latin-1"), data[end + 4 :]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [(k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:])]
        resp = Response(status, headers, b"")
        length = resp.header("content-length")
        if 100 <= status < 200:
            body, data = b"", rest
        elif resp.header("transfer-encoding") == "chunked":
            term = rest.find(b"\r\n0\r\n\r\n")
            if rest.startswith(b"0\r\n\r\n"):
                term = -2
            body, data = rest[: term + 7], rest[term + 7 :]
        elif length is not None:
            body, data = rest[: int(length)], rest[int(length) :]
        else:
            body, data = rest, b""
        resp.body = body
        resp.raw = data
        out.append(resp)
    return out


class WebClient:
    def __init__(self, port: int, ca_file: Path) -> None:
        self.port = port
        self.ca_file = ca_file
        self.ctx = ssl.create_default_context(cafile=str(ca_file))

    def host(self, device: str | None) -> str:
        return f"{device}.{DOMAIN}" if device else DOMAIN

    def origin(self, device: str | None = None) -> str:
        return f"https://{self.host(device)}:{self.port}"

    def connect(self, name: str, timeout: float = 15.0) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return self.ctx.wrap_socket(sock, server_hostname=name)

    def exchange(
        self,
        data: bytes | list[bytes],
        device: str | None = "dev1",
        sni: str | None = None,
        timeout: float = 15.0,
        pause: float = 0.0,
    ) -> bytes:
        """Send raw bytes (pieces with a pause between them), read until the relay closes."""
        host = self.host(device)
        with self.connect(sni or host, timeout) as tls:
            for piece in data if isinstance(data, list) else [data]:
                tls.sendall(piece)
                if pause:
                    time.sleep(pause)
            return read_all(tls, timeout)

    def request(
        self,
        method: str,
        path: str,
        device: str | None = "dev1",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        cookie: str | None = None,
    ) -> Response:
        host = self.host(device)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{self.port}", "Connection: close"]
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}")
        if cookie:
            lines.append(f"Cookie: {cookie}")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        return parse_responses(self.exchange(raw, device))[0]

    def curl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
        resolve = []
        for name in (DOMAIN, f"dev1.{DOMAIN}", f"dev2.{DOMAIN}", f"dev3.{DOMAIN}"):
            resolve += ["--resolve", f"{name}:{self.port}:127.0.0.1"]
        return subprocess.run(
            ["curl", "-sS", "--cacert", str(self.ca_file), *resolve, *args],
            capture_output=True,
            timeout=timeout,
        )


def read_all(sock: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks = []
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        except TimeoutError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def set_cookie_value(response: Response, name: str) -> str:
    for value in response.header_all("set-cookie"):
        match = re.match(rf"{re.escape(name)}=([^;]*)", value)
        if match:
            return match.group(1)
    raise AssertionError(f"no Set-Cookie {name} in {response.headers}")
