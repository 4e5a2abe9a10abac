"""Web sessions end when unused for the idle timeout (here 4 s), open connections too;
use keeps them going."""

from __future__ import annotations

import time

from tests.webclient import DOMAIN, read_all
from tests.webenv import Web, web_idle

__all__ = ["web_idle"]  # the fixture


def test_use_keeps_a_session_and_idleness_ends_it(web_idle: Web) -> None:
    cookie = web_idle.cookie()
    for _ in range(8):  # 8 s of use, twice the idle timeout
        assert web_idle.client.request("GET", "/static/style.css", cookie=cookie).status == 200
        time.sleep(1)
    time.sleep(9)  # idle past the timeout (and the relay's 5 s session cache)
    resp = web_idle.client.request("GET", "/static/style.css", cookie=cookie)
    assert resp.status == 303 and "/open/dev1" in (resp.header("location") or "")


def test_an_idle_open_connection_is_closed(web_idle: Web) -> None:
    cookie = web_idle.cookie()
    host = f"dev1.{DOMAIN}"
    with web_idle.client.connect(host, timeout=30) as tls:
        tls.sendall(
            f"GET /static/style.css HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n".encode()
        )
        first = tls.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        rest = read_all(tls, 25)  # returns when the relay closes the connection
        closed_after = time.monotonic() - started
    assert b"HTTP/1.1" not in rest
    assert 3 < closed_after < 15
    assert "access revoked" in web_idle.relay.output()
