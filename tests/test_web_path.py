"""Path routing (``--web-routing path``): device web UIs under https://RELAY/d/DEVICE/,
for sites without wildcard DNS. Same relay, agent and web stack as tests/test_web.py."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from tests.webclient import DOMAIN, parse_responses, set_cookie_value
from tests.webenv import Web, web_path
from tests.webstack import static_files

__all__ = ["web_path"]  # the fixture

COOKIE = "__Secure-hatchway-d-dev1"


def _cookie(web: Web, service: str = "http") -> str:
    url = urllib.parse.urlsplit(web.grant_url("dev1", "--service", service))
    assert url.netloc == f"{DOMAIN}:{web.client.port}" and url.path.startswith("/d/dev1/")
    resp = web.client.request("GET", f"{url.path}?{url.query}", device=None)
    assert resp.status == 303 and resp.header("location") == "/d/dev1/"
    set_cookie = resp.header("set-cookie") or ""
    assert "Path=/d/dev1/;" in set_cookie and "Secure" in set_cookie and "HttpOnly" in set_cookie
    return f"{COOKIE}={set_cookie_value(resp, COOKIE)}"


def test_open_and_follow_with_curl(web_path: Web, tmp_path: Path) -> None:
    url = web_path.grant_url()
    assert url.startswith(f"https://{DOMAIN}:{web_path.client.port}/d/dev1/__hatchway/auth?")
    jar = tmp_path / "jar"
    out = web_path.client.curl("-L", "-c", str(jar), "-b", str(jar), url)
    assert out.returncode == 0 and out.stdout == static_files()["index.html"]
    line = next(line for line in jar.read_text().splitlines() if COOKIE in line)
    assert line.split("\t")[2] == "/d/dev1/"
    # Without a session: to the relay's login, back to the same page afterwards.
    resp = web_path.client.request("GET", "/d/dev1/static/style.css", device=None)
    assert resp.status == 303
    assert resp.header(
        "location",
    ) == (f"https://{DOMAIN}:{web_path.client.port}/open/dev1?next=%2Fstatic%2Fstyle.css")


def test_prefix_is_stripped_and_relay_cookies_are_not_forwarded(web_path: Web) -> None:
    cookie = _cookie(web_path, "direct")
    resp = web_path.client.request(
        "GET", "/d/dev1/app/headers?q=1", device=None, cookie=f"{cookie}; mine=1"
    )
    seen = json.loads(resp.body)
    assert seen["path"] == "/app/headers" and seen["query"] == "q=1"
    assert seen["cookie"] == "mine=1"
    assert seen["host"] == f"{DOMAIN}:{web_path.client.port}"


def test_redirects_and_cookie_paths_are_rewritten(web_path: Web) -> None:
    cookie = _cookie(web_path, "direct")
    client = web_path.client
    resp = client.request("GET", "/d/dev1/app/redirect-relative", device=None, cookie=cookie)
    assert resp.status == 302 and resp.header("location") == "/d/dev1/app/"
    own = f"http://{DOMAIN}:{client.port}/app/x"
    resp = client.request(
        "GET", "/d/dev1/app/redirect?to=" + urllib.parse.quote(own), device=None, cookie=cookie
    )
    assert resp.header("location") == f"https://{DOMAIN}:{client.port}/d/dev1/app/x"
    other = "https://example.com/elsewhere"
    resp = client.request(
        "GET", "/d/dev1/app/redirect?to=" + urllib.parse.quote(other), device=None, cookie=cookie
    )
    assert resp.header("location") == other
    resp = client.request(
        "GET", "/d/dev1/app/cookie/set?name=a&value=1&path=/", device=None, cookie=cookie
    )
    assert resp.header_all("set-cookie") == ["a=1; Path=/d/dev1/"]
    resp = client.request(
        "GET", f"/d/dev1/app/cookie/set?name={COOKIE}&value=evil", device=None, cookie=cookie
    )
    assert resp.header_all("set-cookie") == []


def test_absolute_paths_in_device_pages_follow_the_referer(web_path: Web) -> None:
    cookie = _cookie(web_path)
    client = web_path.client
    referer = f"https://{DOMAIN}:{client.port}/d/dev1/"
    # On a fresh connection (the front door) and on a device connection alike.
    resp = client.request("GET", "/static/style.css", device=None, headers={"Referer": referer})
    assert resp.status == 307 and resp.header("location") == "/d/dev1/static/style.css"
    host = f"{DOMAIN}:{client.port}"
    raw = client.exchange(
        f"GET /d/dev1/static/app.js HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n"
        f"GET /static/style.css HTTP/1.1\r\nHost: {host}\r\nReferer: {referer}\r\n\r\n".encode(),
        device=None,
    )
    first, second = parse_responses(raw)
    assert first.status == 200 and first.body == static_files()["app.js"]
    assert second.status == 307 and second.header("location") == "/d/dev1/static/style.css"
    # A relay page on a device connection: sent again on a new connection.
    raw = client.exchange(
        f"GET /d/dev1/static/app.js HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n"
        f"GET /login HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
        device=None,
    )
    first, second = parse_responses(raw)
    assert second.status == 307 and second.header("location") == "/login"
    assert client.request("GET", "/d/dev1", device=None).header("location") == "/d/dev1/"
    # A target that would read as another origin in a Location stays a path here.
    for target in ("//evil.example/x", "/\\evil.example/x"):
        raw = client.exchange(
            f"GET /d/dev1/static/app.js HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n"
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
            device=None,
        )
        second = parse_responses(raw)[1]
        assert second.status == 307, target
        assert second.header("location") == f"https://{host}{target}"


def test_subdomains_are_not_served(web_path: Web) -> None:
    resp = web_path.client.request("GET", "/", device="dev1")
    assert resp.status == 404
