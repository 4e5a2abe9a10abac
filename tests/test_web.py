"""Web access end to end: a real relay, agent, nginx and uvicorn app, curl and a TLS
client as the browser.

Topology (all loopback): client -> relay (TLS, Host/SNI DEVICE.relay.localhost) ->
device tunnel -> agent -> nginx (static files, /app/ proxied to uvicorn) or straight to
uvicorn (service "direct"), or to a recorder that keeps every byte it receives
(service "record": proves that refused requests reach nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from tests.procs import Env, rss_kib
from tests.webapp import download_sha256
from tests.webclient import DOMAIN, parse_responses, read_all, set_cookie_value
from tests.webenv import DEVICE_COOKIE, RELAY_COOKIE, Web, web
from tests.webstack import static_files

__all__ = ["web"]  # the fixture


def _status(raw: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    assert match, raw[:200]
    return int(match.group(1))


# --- the login handshake ------------------------------------------------------------------


def test_open_print_url_then_curl_follows_it(web: Web, tmp_path: Path) -> None:
    url = web.grant_url()
    assert url.startswith(f"https://dev1.{DOMAIN}:{web.client.port}/__hatchway/auth?grant=hwg_")
    jar = tmp_path / "jar"
    out = web.client.curl("-L", "-c", str(jar), "-b", str(jar), url)
    assert out.returncode == 0, out.stderr
    assert out.stdout == static_files()["index.html"]
    # The cookie is host-only (no leading dot, subdomains FALSE), Secure, HttpOnly.
    lines = [line for line in jar.read_text().splitlines() if DEVICE_COOKIE in line]
    assert len(lines) == 1
    fields = lines[0].split("\t")
    assert fields[0] == f"#HttpOnly_dev1.{DOMAIN}"
    assert fields[1] == "FALSE" and fields[3] == "TRUE"
    # The grant was single-use.
    again = web.client.curl("-i", url)
    assert b"403" in again.stdout.split(b"\r\n", 1)[0]
    assert b"expired or was already used" in again.stdout


def test_open_next_path_and_service(web: Web, tmp_path: Path) -> None:
    url = web.grant_url("dev1", "--service", "direct", "--path", "/app/headers?x=1")
    jar = tmp_path / "jar"
    out = web.client.curl("-L", "-c", str(jar), "-b", str(jar), url)
    seen = json.loads(out.stdout)
    assert seen["path"] == "/app/headers" and seen["query"] == "x=1"
    # A redirect target that leaves the device is refused: it goes to / instead.
    url = web.grant_url("dev1", "--path", "//evil.example/")
    assert "next=%2F&" in url + "&" or url.endswith("next=%2F")


def test_a_next_path_beyond_latin_1_goes_on_percent_encoded(web: Web) -> None:
    for given in ("/caf\u00e9/\u20ac?q=\u00fc", "/caf%C3%A9/%E2%82%AC?q=%C3%BC"):
        link = urllib.parse.urlsplit(web.grant_url("dev1", "--path", given))
        resp = web.client.request("GET", f"{link.path}?{link.query}")
        assert resp.status == 303, resp
        assert resp.header("location") == "/caf%C3%A9/%E2%82%AC?q=%C3%BC"
        assert set_cookie_value(resp, DEVICE_COOKIE)


def test_without_a_session_get_goes_to_login_and_post_is_refused(web: Web) -> None:
    resp = web.client.request("GET", "/static/style.css?v=2")
    assert resp.status == 303
    location = resp.header("location")
    assert location == (
        f"https://{DOMAIN}:{web.client.port}/open/dev1?next=%2Fstatic%2Fstyle.css%3Fv%3D2"
    )
    resp = web.client.request("POST", "/app/upload", body=b"x")
    assert resp.status == 401
    # Unknown device: the same answer as a known one (nothing to learn before login).
    resp = web.client.request("GET", "/", device="nosuchdevice")
    assert resp.status == 303
    assert (
        resp.header("location") == f"https://{DOMAIN}:{web.client.port}/open/nosuchdevice?next=%2F"
    )
    assert web.recorder.take() == b""


def test_browser_flow_form_login_open_and_logout(web: Web) -> None:
    client = web.client
    origin = client.origin()
    # The login form, then a POST from our own origin.
    page = client.request("GET", "/login?next=/open/dev1", device=None)
    assert page.status == 200 and b'name="next"' not in page.body  # unquoted attribute
    assert b'value="/open/dev1"' in page.body
    form = urllib.parse.urlencode(
        {"user": "admin", "password": web.password, "next": "/open/dev1?next=/app/"}
    ).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    refused = client.request("POST", "/login", device=None, headers=headers, body=form)
    assert refused.status == 403  # no Origin: could be a device page posting cross-origin
    bad = client.request(
        "POST",
        "/login",
        device=None,
        headers={**headers, "Origin": origin},
        body=form.replace(b"password=", b"password=x"),
    )
    assert bad.status == 401 and b"Wrong user name or password" in bad.body
    resp = client.request(
        "POST", "/login", device=None, headers={**headers, "Origin": origin}, body=form
    )
    assert resp.status == 303 and resp.header("location") == "/open/dev1?next=/app/"
    set_cookie = resp.header("set-cookie") or ""
    assert set_cookie.startswith(f"{RELAY_COOKIE}=hws_")
    for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=Lax"):
        assert attribute in set_cookie
    assert "Domain" not in set_cookie
    relay_cookie = f"{RELAY_COOKIE}={set_cookie_value(resp, RELAY_COOKIE)}"
    # The device list, then /open/dev1 -> one-time link on the device's subdomain.
    listing = client.request("GET", "/", device=None, cookie=relay_cookie)
    assert listing.status == 200 and b"dev1" in listing.body and b"online" in listing.body
    assert listing.header("x-frame-options") == "DENY"
    opened = client.request("GET", "/open/dev1?next=/app/", device=None, cookie=relay_cookie)
    assert opened.status == 303
    link = urllib.parse.urlsplit(opened.header("location") or "")
    assert link.netloc == f"dev1.{DOMAIN}:{client.port}"
    auth = client.request("GET", f"{link.path}?{link.query}")
    assert auth.status == 303 and auth.header("location") == "/app/"
    assert auth.header("referrer-policy") == "same-origin"
    device_cookie = f"{DEVICE_COOKIE}={set_cookie_value(auth, DEVICE_COOKIE)}"
    page = client.request("GET", "/app/", cookie=device_cookie)
    assert page.status == 200 and b"hello from the device app" in page.body
    # Logging out of the relay ends the device session derived from it.
    assert client.request("POST", "/logout", device=None, cookie=relay_cookie).status == 403
    out = client.request(
        "POST", "/logout", device=None, cookie=relay_cookie, headers={"Origin": origin}
    )
    assert out.status == 303 and "Max-Age=0" in (out.header("set-cookie") or "")
    gone = client.request("GET", "/app/", cookie=device_cookie)
    assert gone.status == 303 and "/open/dev1" in (gone.header("location") or "")
    assert client.request("GET", "/", device=None, cookie=relay_cookie).status == 303


def test_not_permitted_and_unknown_devices_look_the_same(web: Web) -> None:
    env = web.env
    env.hatchway(
        "user",
        "add",
        "bob",
        "--password-stdin",
        "--data-dir",
        str(env.data_dir),
        input=b"Quiet-Harbor-1937!\n",
        prefix=(),
    )
    form = urllib.parse.urlencode({"user": "bob", "password": "Quiet-Harbor-1937!"}).encode()
    resp = web.client.request(
        "POST",
        "/login",
        device=None,
        headers={
            "Origin": web.client.origin(),
            "Content-Type": "application/x-www-form-urlencoded",
        },
        body=form,
    )
    cookie = f"{RELAY_COOKIE}={set_cookie_value(resp, RELAY_COOKIE)}"
    known = web.client.request("GET", "/open/dev1", device=None, cookie=cookie)
    unknown = web.client.request("GET", "/open/nosuch", device=None, cookie=cookie)
    assert known.status == unknown.status == 404
    assert known.body.replace(b"dev1", b"X") == unknown.body.replace(b"nosuch", b"X")


# --- proxy correctness ----------------------------------------------------------------------


def test_forwarding_headers_are_set_and_hop_by_hop_dropped(web: Web) -> None:
    cookie = web.cookie(service="direct")
    resp = web.client.request(
        "GET",
        "/app/headers?a=1&b=%20",
        headers={
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "http",
            "Forwarded": "for=6.6.6.6",
            "X-Real-IP": "6.6.6.6",
            "Connection": "close, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Authorization": "Bearer hwt_not-for-the-device",
            "X-Custom": "kept",
        },
        cookie=f"theme=dark; {cookie}; {RELAY_COOKIE}=hws_forged; lang=en",
    )
    assert resp.status == 200
    seen = json.loads(resp.body)
    host = f"dev1.{DOMAIN}:{web.client.port}"
    assert seen["host"] == host
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == host
    assert seen["forwarded"] == f'for=127.0.0.1;proto=https;host="{host}"'
    assert seen["cookie"] == "theme=dark; lang=en"
    assert seen["x-custom"] == "kept"
    assert seen["query"] == "a=1&b=%20"
    for dropped in (
        "x-real-ip",
        "x-secret-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "authorization",
    ):
        assert dropped not in seen, dropped
    # The device's own credentials (HTTP basic auth) do reach it.
    resp = web.client.request(
        "GET", "/app/headers", headers={"Authorization": "Basic dXNlcjpwdw=="}, cookie=cookie
    )
    assert json.loads(resp.body)["authorization"] == "Basic dXNlcjpwdw=="


def test_device_cookies_cannot_touch_the_relay_session(web: Web, tmp_path: Path) -> None:
    cookie = web.cookie(service="direct")
    # A cookie for the parent domain is made host-only; the relay's names are dropped.
    resp = web.client.request(
        "GET", f"/app/cookie/set?name=tracker&value=1&domain={DOMAIN}", cookie=cookie
    )
    assert resp.status == 200
    assert resp.header_all("set-cookie") == ["tracker=1; Path=/"]
    for name in (DEVICE_COOKIE, RELAY_COOKIE, "__HOST-Hatchway-device"):
        resp = web.client.request("GET", f"/app/cookie/set?name={name}&value=evil", cookie=cookie)
        assert resp.status == 200 and resp.header_all("set-cookie") == []
    # With curl's cookie engine: the device's attempt leaves the session intact.
    jar = tmp_path / "jar"
    url = web.grant_url("dev1", "--service", "direct")
    assert web.client.curl("-L", "-c", str(jar), "-b", str(jar), url).returncode == 0
    base = web.client.origin("dev1")
    web.client.curl(
        "-c", str(jar), "-b", str(jar), f"{base}/app/cookie/set?name={DEVICE_COOKIE}&value=evil"
    )
    web.client.curl(
        "-c", str(jar), "-b", str(jar), f"{base}/app/cookie/set?name=x&value=1&domain={DOMAIN}"
    )
    out = web.client.curl("-c", str(jar), "-b", str(jar), f"{base}/app/cookie/get")
    assert json.loads(out.stdout) == {"x": "1"}
    assert f"\t.{DOMAIN}\t" not in jar.read_text()  # nothing was set for the parent domain


def test_a_device_cannot_make_the_browser_clear_the_relays_cookies(web: Web) -> None:
    """Clear-Site-Data would clear every cookie of the site, the relay's included: a
    device page could log its user out. The relay drops it."""
    cookie = web.cookie()
    resp = web.client.request("GET", "/clear-site-data/style.css", cookie=cookie)
    assert resp.status == 200 and resp.body == static_files()["style.css"]
    assert resp.header("clear-site-data") is None
    assert resp.header("content-type") == "text/css"  # the rest of the head is kept


def test_hop_by_hop_fields_of_a_response_stay_with_the_device(web: Web) -> None:
    """RFC 9110 §7.6.1: the fields a response's Connection names, Keep-Alive,
    Proxy-Connection, TE and (but in a 101) Upgrade are for the hop they came on."""
    cookie = web.cookie(service="direct")
    raw = web.client.exchange(
        f"GET /app/hop HTTP/1.1\r\nHost: dev1.{DOMAIN}\r\nCookie: {cookie}\r\n\r\n"
        f"GET /app/hop HTTP/1.1\r\nHost: dev1.{DOMAIN}\r\nCookie: {cookie}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    for resp in parse_responses(raw):
        assert resp.status == 200 and resp.body == b"hop\n"
        names = {name.lower() for name, _ in resp.headers}
        assert {"x-hop", "keep-alive", "proxy-connection", "upgrade", "te"}.isdisjoint(names)
        assert resp.header("x-end-to-end") == "1"
        assert resp.header_all("connection") in ([], ["keep-alive"], ["close"])


def test_a_device_session_is_no_relay_login(web: Web) -> None:
    """A device session (one user, one device: what a one-time link hands out) sent as
    the relay's own cookie opens nothing: not the relay's pages, not its API, even
    right after the relay checked it for the device."""
    cookie = web.cookie()
    assert web.client.request("GET", "/static/style.css", cookie=cookie).status == 200
    as_relay = f"{RELAY_COOKIE}={cookie.partition('=')[2]}"
    home = web.client.request("GET", "/", device=None, cookie=as_relay)
    assert home.status == 303 and home.header("location").startswith("/login"), home
    opened = web.client.request("GET", "/open/dev1", device=None, cookie=as_relay)
    assert opened.status == 303 and opened.header("location").startswith("/login"), opened
    token = web.client.request(
        "POST",
        "/api/v1/tokens",
        device=None,
        cookie=as_relay,
        headers={"Origin": web.client.origin(), "Content-Type": "application/json"},
        body=json.dumps({"name": "x", "scopes": ["all"]}).encode(),
    )
    assert token.status == 401 and b"hwt_" not in token.body, token
    # The device session itself still works.
    assert web.client.request("GET", "/static/style.css", cookie=cookie).status == 200


def test_keepalive_and_pipelining_in_order(web: Web) -> None:
    cookie = web.cookie(service="direct")
    host = f"dev1.{DOMAIN}:{web.client.port}"
    # The device's own cookies change from one request to the next (the relay's stay).
    requests = b"".join(
        f"GET /app/headers?n={n} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}"
        f"{'; n=' + str(n // 2) if n else ''}\r\n"
        f"{'Connection: close' if n == 4 else 'X-N: {n}'}\r\n\r\n".encode()
        for n in range(5)
    )
    seen = [json.loads(r.body) for r in parse_responses(web.client.exchange(requests))]
    assert [s["query"] for s in seen] == [f"n={n}" for n in range(5)]
    assert [s.get("cookie") for s in seen] == [None, "n=0", "n=1", "n=1", "n=2"]
    # Sequential requests reuse one connection (one channel, one agent connection).
    with web.client.connect(f"dev1.{DOMAIN}") as tls:
        clients = set()
        for _ in range(3):
            tls.sendall(
                f"GET /app/headers HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n".encode()
            )
            data = b""
            while not data.endswith(b"}\n"):
                data += tls.recv(65536)
            clients.add(json.loads(parse_responses(data)[0].body)["client"])
        assert len(clients) == 1


def test_http10_client(web: Web) -> None:
    cookie = web.cookie()
    raw = web.client.exchange(
        f"GET /static/style.css HTTP/1.0\r\nHost: dev1.{DOMAIN}\r\nCookie: {cookie}\r\n\r\n".encode()
    )
    (resp,) = parse_responses(raw)
    assert resp.status == 200 and resp.body == static_files()["style.css"]


def test_http10_keep_alive_client(web: Web) -> None:
    cookie = web.cookie()
    host = f"dev1.{DOMAIN}"
    raw = web.client.exchange(
        f"GET /static/style.css HTTP/1.0\r\nHost: {host}\r\nCookie: {cookie}\r\n"
        "Connection: keep-alive\r\n\r\n"
        f"GET /static/app.js HTTP/1.0\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n".encode()
    )
    first, second = parse_responses(raw)
    assert first.status == 200 and first.body == static_files()["style.css"]
    assert second.status == 200 and second.body == static_files()["app.js"]


def test_a_body_that_goes_bad_after_its_head_went_out_is_cut_off_at_once(web: Web) -> None:
    """The device has the head and waits for the rest of the body: the channel goes and
    the client gets its 400 now, not a timeout later."""
    cookie = web.cookie(service="direct")
    head = (
        f"POST /app/upload HTTP/1.1\r\nHost: dev1.{DOMAIN}\r\nCookie: {cookie}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    started = time.monotonic()
    raw = web.client.exchange([head.encode(), b"zz\r\nbad\r\n"], pause=1.0, timeout=40)
    assert _status(raw) == 400
    assert time.monotonic() - started < 10


def test_expect_100_continue(web: Web) -> None:
    cookie = web.cookie(service="direct")
    body = b"z" * 100_000
    head = (
        f"POST /app/upload HTTP/1.1\r\nHost: dev1.{DOMAIN}\r\nCookie: {cookie}\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with web.client.connect(f"dev1.{DOMAIN}") as tls:
        tls.sendall(head)
        interim = tls.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        tls.sendall(body)
        final = parse_responses(read_all(tls, 15))[0]
    assert final.status == 200
    assert json.loads(final.body) == {
        "bytes": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }


def test_chunked_upload_and_download(web: Web, tmp_path: Path) -> None:
    cookie = web.cookie(service="direct")
    data = bytes(range(256)) * 40_000  # ~10 MB
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    base = web.client.origin("dev1")
    out = web.client.curl(
        "-H",
        f"Cookie: {cookie}",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{src}",
        f"{base}/app/upload",
    )
    assert json.loads(out.stdout) == {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    out = web.client.curl(
        "-D", "-", "-H", f"Cookie: {cookie}", f"{base}/app/download?size=3000000&chunked=1"
    )
    head, body = out.stdout.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head.lower()
    assert hashlib.sha256(body).hexdigest() == download_sha256(3_000_000)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_200mb_both_ways_with_bounded_memory(web: Web, tmp_path: Path) -> None:
    cookie = web.cookie(service="direct")
    size = 200 * 1024 * 1024
    src = tmp_path / "big.bin"
    with src.open("wb") as fh:
        block = bytes(range(256)) * 4096
        for _ in range(size // len(block)):
            fh.write(block)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    relay_pid = web.relay.popen.pid
    before = _rss_kib(relay_pid)
    peak = [before]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _rss_kib(relay_pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        base = web.client.origin("dev1")
        started = time.monotonic()
        up = web.client.curl(
            "-H", f"Cookie: {cookie}", "--data-binary", f"@{src}", f"{base}/app/upload"
        )
        up_s = time.monotonic() - started
        assert json.loads(up.stdout) == {"bytes": size, "sha256": digest}
        started = time.monotonic()
        down = web.client.curl(
            "-H",
            f"Cookie: {cookie}",
            "-o",
            str(tmp_path / "down.bin"),
            "-w",
            "%{size_download}",
            f"{base}/app/download?size={size}",
        )
        down_s = time.monotonic() - started
    finally:
        stop.set()
        watcher.join()
    assert down.stdout == str(size).encode()
    assert hashlib.sha256((tmp_path / "down.bin").read_bytes()).hexdigest() == download_sha256(size)
    growth_mib = (peak[0] - before) / 1024
    print(
        f"200 MiB up {size / up_s / 1e6:.0f} MB/s, down {size / down_s / 1e6:.0f} MB/s, "
        f"relay RSS +{growth_mib:.1f} MiB"
    )
    assert growth_mib < 48


def test_server_sent_events_stream_through(web: Web) -> None:
    cookie = web.cookie()
    host = f"dev1.{DOMAIN}"
    with web.client.connect(host) as tls:
        tls.sendall(
            f"GET /app/sse?count=3&interval=0.5 HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        started = time.monotonic()
        first = b""
        while b"data: event 0" not in first:
            chunk = tls.recv(65536)
            assert chunk
            first += chunk
        first_at = time.monotonic() - started
        rest = read_all(tls, 10)
        total = time.monotonic() - started
    assert b"data: event 2" in rest
    assert first_at < total - 0.5  # the first event arrived while the stream went on


def test_websocket_upgrade_is_spliced_and_closed_on_revocation(web: Web) -> None:
    env = web.env
    env.hatchway(
        "user",
        "add",
        "carol",
        "--role",
        "admin",
        "--password-stdin",
        "--data-dir",
        str(env.data_dir),
        input=b"Amber-Falcon-2048?\n",
        prefix=(),
    )
    carol = Env(env.root / "carol")
    carol.hatchway(
        "login",
        web.relay_url,
        "--user",
        "carol",
        "--password-stdin",
        "--ca-file",
        str(env.ca_file),
        input=b"Amber-Falcon-2048?\n",
    )
    out = carol.hatchway("open", "dev1", "--print-url", "--service", "direct")
    link = urllib.parse.urlsplit(out.stdout.decode().strip())
    auth = web.client.request("GET", f"{link.path}?{link.query}")
    cookie = f"{DEVICE_COOKIE}={set_cookie_value(auth, DEVICE_COOKIE)}"

    async def run() -> tuple[list[object], float]:
        ctx = ssl.create_default_context(cafile=str(env.ca_file))
        async with ws_connect(
            f"wss://dev1.{DOMAIN}:{web.client.port}/app/ws",
            ssl=ctx,
            host="127.0.0.1",
            port=web.client.port,
            server_hostname=f"dev1.{DOMAIN}",
            additional_headers={"Cookie": cookie},
            open_timeout=10,
        ) as ws:
            echoed: list[object] = []
            for message in ("hello", b"\x00\x01binary" * 1000):
                await ws.send(message)
                echoed.append(await asyncio.wait_for(ws.recv(), 10))
            # Removing the user revokes everything: the open WebSocket is closed.
            await asyncio.to_thread(
                env.hatchway, "user", "remove", "carol", "--data-dir", str(env.data_dir), prefix=()
            )
            removed_at = time.monotonic()
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
            return echoed, time.monotonic() - removed_at

    echoed, closed_after = asyncio.run(run())
    assert echoed == ["hello", b"\x00\x01binary" * 1000]
    assert closed_after < 10
    assert "access revoked" in web.relay.output()


def test_bytes_after_an_upgrade_request_wait_for_the_devices_101(web: Web) -> None:
    host = f"dev1.{DOMAIN}"

    def upgrade(path: str, cookie: str) -> bytes:
        return (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ).encode()

    # Refused (the record service answers 200): what followed never reaches the device.
    cookie = web.cookie(service="record")
    web.recorder.take()
    smuggled = f"GET /admin HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n".encode()
    raw = web.client.exchange(upgrade("/ws", cookie) + smuggled)
    assert [r.status for r in parse_responses(raw)] == [200]
    received = web.recorder.take()
    assert b"GET /ws " in received and b"/admin" not in received
    # Accepted: the same early bytes (here a WebSocket frame) go through after the 101.
    cookie = web.cookie(service="direct")
    key = b"\x01\x02\x03\x04"
    frame = b"\x81\x82" + key + bytes(c ^ key[i % 4] for i, c in enumerate(b"hi"))
    with web.client.connect(host) as sock:
        sock.sendall(upgrade("/app/ws", cookie) + frame)
        data = b""
        while not data.endswith(b"\x81\x02hi"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 101 ")


# --- errors ----------------------------------------------------------------------------------


def test_offline_device_gets_a_page_saying_since_when(web: Web) -> None:
    cookie = web.cookie("dev2")
    resp = web.client.request("GET", "/", device="dev2", cookie=cookie)
    assert resp.status == 502
    assert resp.header("content-type") == "text/html; charset=utf-8"
    assert b"dev2 is offline" in resp.body and b"offline since 20" in resp.body


def test_refused_service_gets_502(web: Web) -> None:
    cookie = web.cookie(service="closed")
    resp = web.client.request("GET", "/", cookie=cookie)
    assert resp.status == 502 and b"refused the connection" in resp.body


def test_relay_paths_on_a_device_host_are_not_forwarded(web: Web) -> None:
    cookie = web.cookie(service="record")
    assert web.client.request("GET", "/__hatchway/other", cookie=cookie).status == 404
    # A grant made for dev2 does not log in on dev1.
    link = urllib.parse.urlsplit(web.grant_url("dev2"))
    assert web.client.request("GET", f"{link.path}?{link.query}").status == 403
    assert web.recorder.take() == b""


def test_sni_must_agree_with_host(web: Web) -> None:
    cookie = web.cookie(service="record")
    raw = web.client.exchange(
        f"GET / HTTP/1.1\r\nHost: dev1.{DOMAIN}\r\nCookie: {cookie}\r\n\r\n".encode(),
        sni=f"dev2.{DOMAIN}",
    )
    assert _status(raw) == 421
    raw = web.client.exchange(
        f"GET / HTTP/1.1\r\nHost: dev1.{DOMAIN}\r\nCookie: {cookie}\r\n\r\n".encode(), sni=DOMAIN
    )
    assert _status(raw) == 421
    # The relay's own pages too: a server name and a Host that differ, either way round.
    ctx = ssl.create_default_context(cafile=str(web.env.ca_file))
    ctx.check_hostname = False  # the relay's certificate does not name foreign.example
    with socket.create_connection(("127.0.0.1", web.client.port), timeout=15) as sock:
        with ctx.wrap_socket(sock, server_hostname="foreign.example") as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
            assert _status(read_all(tls, 15)) == 421
    raw = web.client.exchange(
        b"GET / HTTP/1.1\r\nHost: foreign.example\r\n\r\n", device=None, sni=DOMAIN
    )
    assert _status(raw) == 421
    # Another host on a connection made for dev1.
    host = f"dev1.{DOMAIN}"
    raw = web.client.exchange(
        f"GET / HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n"
        f"GET / HTTP/1.1\r\nHost: dev2.{DOMAIN}\r\nCookie: {cookie}\r\n\r\n".encode()
    )
    first, second = parse_responses(raw)
    assert first.status == 200 and second.status == 421
    assert web.recorder.take().count(b"GET / HTTP/1.1") == 1


def test_a_host_with_more_than_a_name_and_port_is_refused_on_a_kept_connection(
    web: Web,
) -> None:
    """The Host of every request on a connection is checked, not only the first: what
    follows its port would land in the Forwarded field sent to the device."""
    cookie = web.cookie(service="record")
    web.recorder.take()
    host = f"dev1.{DOMAIN}"
    raw = web.client.exchange(
        f"GET /a HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n"
        f'GET /b HTTP/1.1\r\nHost: {host}:1",for=6.6.6.6\r\nCookie: {cookie}\r\n\r\n'.encode()
    )
    first, second = parse_responses(raw)
    assert first.status == 200 and second.status == 400
    received = web.recorder.take()
    assert b"GET /a " in received and b"GET /b " not in received and b"6.6.6.6" not in received


def test_pipelined_heads_stop_the_reading_while_the_channel_opens(web: Web) -> None:
    """Request heads waiting for the channel count towards what the relay holds for a
    connection: past it, the relay stops reading (the client's sends block)."""
    cookie = web.cookie(service="hang")
    host = f"dev1.{DOMAIN}"
    relay_before = rss_kib(web.relay.popen.pid)
    block = f"GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() * 1000
    sent = 0
    with web.client.connect(host, timeout=20) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n".encode())
        tls.settimeout(2)
        deadline = time.monotonic() + 8  # the channel waits up to 15 s for the device
        with pytest.raises(TimeoutError):
            while time.monotonic() < deadline:
                tls.sendall(block)
                sent += len(block)
        grown = rss_kib(web.relay.popen.pid) - relay_before
    # Socket buffers take a few MiB; 8 s of unchecked heads were hundreds.
    assert sent < 24 << 20 and grown < 64 << 10, (sent, grown)


def test_request_head_timeout(web: Web) -> None:
    started = time.monotonic()
    raw = web.client.exchange(
        [b"GET / HTTP/1.1\r\n", b"Host: dev1.relay.localhost\r\n"], timeout=30
    )
    assert _status(raw) == 408
    assert 9 < time.monotonic() - started < 20


# --- the bad-request corpus ------------------------------------------------------------------

CORPUS = Path(__file__).parent / "data" / "web_bad_requests.txt"


def _load_corpus() -> list[tuple[str, int, str]]:
    cases: list[tuple[str, int, str]] = []
    lines: list[str] = []
    for line in [*CORPUS.read_text().splitlines(), "== end 0"]:
        if line.startswith("#"):
            continue
        if line.startswith("== "):
            if cases:
                name, status, _ = cases[-1]
                cases[-1] = (name, status, "".join(lines))
            _, name, status = line.split()
            cases.append((name, int(status), ""))
            lines = []
        elif line.strip():
            lines.append(line)
    return cases[:-1]


def _expand(template: str, host: str, cookie: str) -> bytes:
    text = template.replace("{host}", host).replace("{cookie}", cookie)
    text = re.sub(r"\{([^{}]*)\*(\d+)\}", lambda m: m.group(1) * int(m.group(2)), text)
    return text.encode("latin-1").decode("unicode_escape").encode("latin-1")


@pytest.mark.parametrize(
    ("name", "status", "template"),
    _load_corpus(),
    ids=lambda v: v if isinstance(v, str) and "\\" not in v else "",
)
def test_bad_request_corpus(web: Web, name: str, status: int, template: str) -> None:
    cookie = web.cookie(service="record")
    web.recorder.take()
    raw = _expand(template, f"dev1.{DOMAIN}", cookie)
    started = time.monotonic()
    answer = web.client.exchange(raw, timeout=15)
    assert time.monotonic() - started < 12, "the relay did not close the connection"
    assert _status(answer) == status, answer[:300]
    time.sleep(0.2)
    assert web.recorder.take() == b"", "a refused request reached the device"


# --- HTTPS devices and Host rewriting ------------------------------------------------------


def test_https_service_verified_with_host_rewritten(web: Web) -> None:
    cookie = web.cookie(service="https")
    resp = web.client.request("GET", "/whoami", cookie=cookie)
    assert resp.status == 200
    host = f"dev1.{DOMAIN}:{web.client.port}"
    assert resp.body == f"camera host=camera.local scheme=https xfh={host}\n".encode()
    assert (
        web.client.request("GET", "/static/style.css", cookie=cookie).body
        == (static_files()["style.css"])
    )
    # The device redirects to its own name: the browser is sent back through the relay.
    resp = web.client.request("GET", "/redirect", cookie=cookie)
    assert resp.status == 302
    assert resp.header("location") == f"https://{host}/static/style.css"


def test_https_service_without_ca_is_encrypted_but_unverified(web: Web) -> None:
    cookie = web.cookie(service="https-unverified")
    resp = web.client.request("GET", "/whoami", cookie=cookie)
    assert resp.status == 200 and resp.body.startswith(b"camera host=camera.local")
    # Without a Host rewrite the device's name-based server does not know the host.
    cookie = web.cookie(service="http-nohost")
    resp = web.client.request("GET", "/whoami", cookie=cookie)
    assert resp.status == 404 and resp.body.startswith(b"wrong host dev1.")


def test_https_service_with_a_certificate_that_does_not_verify(web: Web) -> None:
    cookie = web.cookie(service="https-wrongname")
    resp = web.client.request("GET", "/whoami", cookie=cookie)
    assert resp.status == 502
    assert b"TLS failed" in resp.body and b"mismatch" in resp.body.lower()


# --- the cache for slow links ----------------------------------------------------------------


def _device_hits(web: Web, path: str) -> int:
    access = Path(web.stack.static_dir).parent / "nginx" / "access.log"
    return sum(f'"GET {path} ' in line for line in access.read_text().splitlines())


def test_cache_serves_what_the_device_marks_cacheable(web: Web) -> None:
    cookie = web.cookie()
    path = "/cached/app.js"
    first = web.client.request("GET", path, cookie=cookie)
    second = web.client.request("GET", path, cookie=cookie)
    assert first.status == second.status == 200
    assert first.body == second.body == static_files()["app.js"]
    assert first.header("age") is None and second.header("age") is not None
    assert second.header("cache-control") == "max-age=3600"
    assert _device_hits(web, path) == 1
    # HEAD from the cache: the head only.
    head = web.client.request("HEAD", path, cookie=cookie)
    assert head.status == 200 and head.body == b"" and head.header("age") is not None
    # The client asks for a fresh copy: the device is asked.
    web.client.request("GET", path, cookie=cookie, headers={"Cache-Control": "no-cache"})
    assert _device_hits(web, path) == 2
    # Still only for users with access: without a session, the login redirect.
    assert web.client.request("GET", path).status == 303


def test_cache_keeps_away_from_private_cookies_and_honours_vary(web: Web) -> None:
    cookie = web.cookie()
    for path in ("/cached-cookie/style.css", "/cached-private/style.css"):
        for _ in range(2):
            assert web.client.request("GET", path, cookie=cookie).status == 200
        assert _device_hits(web, path) == 2, path
    path = "/cached-vary/style.css"
    for lang, expected_hits in (("en", 1), ("de", 2), ("en", 2), ("de", 2)):
        resp = web.client.request("GET", path, cookie=cookie, headers={"Accept-Language": lang})
        assert resp.status == 200
        assert _device_hits(web, path) == expected_hits, lang


def test_cache_varies_on_the_cookies_the_device_sees(web: Web) -> None:
    """``Vary: Cookie``: each Cookie header the device would get has its own entry (the
    relay's own cookies, taken out before forwarding, do not count)."""
    cookie = web.cookie()
    path = "/cached-vary-cookie/style.css"
    for theme, expected_hits in (("dark", 1), ("light", 2), ("dark", 2), (None, 3)):
        sent = f"{cookie}; theme={theme}" if theme else cookie
        resp = web.client.request("GET", path, cookie=sent)
        assert resp.status == 200 and resp.body == static_files()["style.css"]
        assert _device_hits(web, path) == expected_hits, theme
    # Another device session of the same browser state: the same entry.
    assert web.client.request("GET", path, cookie=web.cookie()).status == 200
    assert _device_hits(web, path) == 3


def test_a_response_the_cache_cannot_read_does_not_break_the_tunnel(web: Web) -> None:
    cookie = web.cookie()
    path = "/cached-odd-expires/style.css"
    dropped = web.relay.output().count("device dev1 disconnected")
    for hits in (1, 2):  # not stored (already expired), each time from the device
        resp = web.client.request("GET", path, cookie=cookie)
        assert resp.status == 200 and resp.body == static_files()["style.css"]
        assert _device_hits(web, path) == hits
    assert web.relay.output().count("device dev1 disconnected") == dropped
    assert web.client.request("GET", "/static/style.css", cookie=cookie).status == 200


@pytest.mark.slow
def test_request_body_timeout(web: Web) -> None:
    cookie = web.cookie(service="direct")
    started = time.monotonic()
    raw = web.client.exchange(
        [
            f"POST /app/upload HTTP/1.1\r\nHost: dev1.{DOMAIN}\r\nCookie: {cookie}\r\n"
            "Content-Length: 100\r\n\r\nonly-a-part".encode()
        ],
        timeout=60,
    )
    assert _status(raw) == 408 and b"The request body stalled" in raw
    assert 29 < time.monotonic() - started < 40
