"""The web stack of tests/webstack.py on its own: nginx (static files) in front of uvicorn."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.webapp import download_sha256
from tests.webstack import HOST, WebStack, start_web_stack, static_files


def need_tools() -> None:
    missing = [tool for tool in ("nginx", "curl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    need_tools()
    with start_web_stack(tmp_path_factory.mktemp("web")) as web:
        yield web
        # Nothing went wrong on the server side either.
        app_log = web.app.proc.output()
        assert "Traceback" not in app_log, app_log
        assert "ERROR" not in app_log, app_log
        nginx_log = (web.nginx.proc.log.parent / "error.log").read_text()
        assert nginx_log == "", nginx_log


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names, repeated ones joined with ", "
    body: bytes

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


def curl(url: str, *args: str, timeout: float = 30.0) -> Response:
    result = subprocess.run(
        ["curl", "-sS", "-i", "--noproxy", "*", "--max-time", str(timeout), *args, url],
        capture_output=True,
        timeout=timeout + 5,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    rest = result.stdout
    while True:  # skip interim responses (100 Continue) and redirects followed with -L
        head, _, rest = rest.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if status >= 200 and not ("-L" in args and rest.startswith(b"HTTP/")):
            break
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Response(status, headers, rest)


# --- nginx: static files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("index.html", "text/html"),
        ("style.css", "text/css"),
        ("app.js", "application/javascript"),
        ("big.bin", "application/octet-stream"),
        ("logo.png", "image/png"),
    ],
)
def test_static_file(stack: WebStack, name: str, content_type: str) -> None:
    content = static_files()[name]
    assert (stack.static_dir / name).read_bytes() == content
    response = curl(f"{stack.url}/static/{name}")
    assert response.status == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["content-length"] == str(len(content))
    assert response.body == content


def test_static_sizes_and_root(stack: WebStack) -> None:
    assert len(static_files()["big.bin"]) == 1 << 20
    assert static_files()["logo.png"].startswith(b"\x89PNG\r\n\x1a\n")
    root = curl(f"{stack.url}/")
    assert root.status == 200
    assert root.body == static_files()["index.html"]
    assert curl(f"{stack.url}/static/missing.txt").status == 404
    assert curl(f"{stack.url}/elsewhere").status == 404


# --- the app through nginx ----------------------------------------------------------------


def test_app_page(stack: WebStack) -> None:
    response = curl(f"{stack.url}/app/")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert b"hello from the device app" in response.body


def test_headers_echo(stack: WebStack) -> None:
    response = curl(
        f"{stack.url}/app/headers?a=1&b=two%20words",
        *("-H", "X-Test: hello", "-H", "X-Multi: one", "-H", "X-Multi: two"),
    )
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    echo = response.json()
    assert echo["x-test"] == "hello"
    assert echo["x-multi"] == "one, two"
    assert echo["method"] == "GET"
    assert echo["path"] == "/app/headers"
    assert echo["query"] == "a=1&b=two%20words"
    assert echo["http_version"] == "1.1"
    assert echo["host"] == f"{HOST}:{stack.nginx_port}"
    assert echo["x-forwarded-for"] == HOST
    assert echo["x-forwarded-proto"] == "http"
    assert "connection" not in echo  # nginx keeps its upstream connections alive
    client = str(echo["client"])
    assert client.startswith(f"{HOST}:")
    assert int(client.rsplit(":", 1)[1]) > 0


def test_headers_direct_to_app(stack: WebStack) -> None:
    echo = curl(f"http://{HOST}:{stack.app_port}/app/headers", "-H", "X-Test: direct").json()
    assert echo["x-test"] == "direct"
    assert echo["host"] == f"{HOST}:{stack.app_port}"
    assert "x-forwarded-for" not in echo
    assert echo["client"] != f"{HOST}:0"


def test_cookie_set_header(stack: WebStack) -> None:
    plain = curl(f"{stack.url}/app/cookie/set?name=a&value=1")
    assert plain.status == 200
    assert plain.headers["set-cookie"] == "a=1; Path=/"
    scoped = curl(f"{stack.url}/app/cookie/set?name=b&value=2&path=/app&domain=example.test")
    assert scoped.headers["set-cookie"] == "b=2; Path=/app; Domain=example.test"
    assert curl(f"{stack.url}/app/cookie/set").status == 400


def test_cookie_round_trip(stack: WebStack, tmp_path: Path) -> None:
    jar = str(tmp_path / "jar.txt")
    curl(f"{stack.url}/app/cookie/set?name=session&value=xyz", "-c", jar)
    assert curl(f"{stack.url}/app/cookie/get", "-b", jar).json() == {"session": "xyz"}
    sent = curl(f"{stack.url}/app/cookie/get", "-b", "x=1; y=two").json()
    assert sent == {"x": "1", "y": "two"}
    assert curl(f"{stack.url}/app/cookie/get").json() == {}


def test_redirects(stack: WebStack) -> None:
    absolute = curl(f"{stack.url}/app/redirect?to=https%3A%2F%2Fexample.test%2Fx%3Fy%3D1")
    assert absolute.status == 302
    assert absolute.headers["location"] == "https://example.test/x?y=1"
    relative = curl(f"{stack.url}/app/redirect-relative")
    assert relative.status == 302
    assert relative.headers["location"] == "/app/"
    followed = curl(f"{stack.url}/app/redirect-relative", "-L")
    assert followed.status == 200
    assert b"hello from the device app" in followed.body


@pytest.mark.parametrize("direct", [False, True], ids=["nginx", "direct"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload(stack: WebStack, tmp_path: Path, chunked: bool, direct: bool) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    base = f"http://{HOST}:{stack.app_port}" if direct else stack.url
    response = curl(f"{base}/app/upload", "--data-binary", f"@{path}", *extra)
    assert response.status == 200
    assert response.json() == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_download(stack: WebStack, chunked: bool) -> None:
    size = 3 * 1024 * 1024 + 123
    response = curl(f"{stack.url}/app/download?size={size}{'&chunked=1' if chunked else ''}")
    assert response.status == 200
    assert len(response.body) == size
    assert response.body[:512] == bytes(range(256)) * 2
    digest = hashlib.sha256(response.body).hexdigest()
    assert response.headers["x-sha256"] == digest == download_sha256(size)
    if chunked:
        assert response.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in response.headers
    else:
        assert response.headers["content-length"] == str(size)


def test_sse_events_arrive_as_sent(stack: WebStack) -> None:
    conn = http.client.HTTPConnection(HOST, stack.nginx_port, timeout=10)
    try:
        conn.request("GET", "/app/sse?count=3&interval=0.3")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream"
        events: list[bytes] = []
        arrivals: list[float] = []
        while len(events) < 3:
            line = response.readline()
            assert line, f"stream ended after {events}"
            if line.startswith(b"data: "):
                events.append(line)
                arrivals.append(time.monotonic())
        assert events == [b"data: event 0\n", b"data: event 1\n", b"data: event 2\n"]
        # Not buffered: each event arrives when it is sent, not all at the end.
        assert arrivals[1] - arrivals[0] >= 0.2
        assert arrivals[2] - arrivals[1] >= 0.2
        assert response.read() == b"\n"
    finally:
        conn.close()


def test_slow(stack: WebStack) -> None:
    start = time.monotonic()
    response = curl(f"{stack.url}/app/slow?delay=0.3")
    assert time.monotonic() - start >= 0.3
    assert response.status == 200
    assert response.body == b"slow done\n"


@pytest.mark.parametrize("code", [200, 201, 204, 404, 418, 503])
def test_status(stack: WebStack, code: int) -> None:
    response = curl(f"{stack.url}/app/status?code={code}")
    assert response.status == code
    assert response.body == (b"" if code == 204 else f"status {code}\n".encode())


def test_not_found_and_wrong_method(stack: WebStack) -> None:
    missing = curl(f"{stack.url}/app/nope")
    assert missing.status == 404
    assert missing.body == b"not found\n"
    assert curl(f"{stack.url}/app/status?code=abc").status == 400
    assert curl(f"{stack.url}/app/headers", "-X", "POST").status == 405
    assert curl(f"{stack.url}/app/upload").status == 405


async def test_websocket_echo(stack: WebStack) -> None:
    blob = os.urandom(256 * 1024)
    async with asyncio.timeout(15):
        async with connect(
            f"ws://{HOST}:{stack.nginx_port}/app/ws", proxy=None, max_size=None
        ) as ws:
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            await ws.send(blob)
            assert await ws.recv() == blob
            messages = [f"message {i}" for i in range(20)]
            for message in messages:
                await ws.send(message)
            assert [await ws.recv() for _ in messages] == messages


async def test_websocket_unknown_path(stack: WebStack) -> None:
    async with asyncio.timeout(15):
        with pytest.raises(InvalidStatus) as error:
            async with connect(f"ws://{HOST}:{stack.nginx_port}/app/nope", proxy=None):
                pass
    assert error.value.response.status_code == 403


# --- lifecycle ----------------------------------------------------------------------------


def test_close_stops_both_servers(tmp_path: Path) -> None:
    need_tools()
    with start_web_stack(tmp_path) as web:
        assert web.nginx_port != web.app_port
        assert curl(f"{web.url}/app/").status == 200
        groups = [web.nginx.proc.popen.pid, web.app.proc.popen.pid]
    for port in (web.nginx_port, web.app_port):
        result = subprocess.run(
            ["curl", "-sS", "--noproxy", "*", "--max-time", "5", f"http://{HOST}:{port}/"],
            capture_output=True,
            timeout=10,
        )
        assert result.returncode == 7  # couldn't connect
    for group in groups:  # nginx workers included
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
