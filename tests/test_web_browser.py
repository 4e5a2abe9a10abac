"""Web access in a real browser: Debian's chromium driven by Playwright, against the
``web`` environment (relay on relay.localhost, dev1 behind nginx + uvicorn, dev2 offline).

The issue's "done when": a person logs in and opens a device's web UI through the relay
in a browser as they would on the LAN. No browser download: the system chromium is used
(scripts/test.sh installs it); the relay's certificate is trusted by its public key only.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Browser, Page, Response, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.webclient import DOMAIN
from tests.webenv import DEVICE_COOKIE, RELAY_COOKIE, Web, web

__all__ = ["web"]  # the fixture

CHROMIUM = "/usr/bin/chromium"
NAV_TIMEOUT_MS = 15_000

if shutil.which(CHROMIUM) is None:
    pytest.skip(
        f"{CHROMIUM} is missing (apt-get install chromium; scripts/test.sh does)",
        allow_module_level=True,
    )


def _spki_sha256(cert_pem: Path) -> str:
    """Base64 SHA-256 of the SubjectPublicKeyInfo of the first certificate in the file."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def browser(web: Web) -> Iterator[Browser]:
    spki = _spki_sha256(web.env.data_dir / "tls" / "server.pem")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            timeout=30_000,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1, MAP {DOMAIN} 127.0.0.1",
                # Trust exactly the relay's key; every other certificate error still fails.
                f"--ignore-certificate-errors-spki-list={spki}",
            ],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh context (no cookies) and a page in it."""
    context = browser.new_context()
    context.set_default_navigation_timeout(NAV_TIMEOUT_MS)
    context.set_default_timeout(NAV_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def _origin(web: Web, device: str | None = None) -> str:
    host = f"{device}.{DOMAIN}" if device else DOMAIN
    return f"https://{host}:{web.client.port}"


def _login_url(web: Web) -> re.Pattern[str]:
    return re.compile(re.escape(f"{_origin(web)}/login") + r"(\?.*)?$")


def _submit(page: Page, button: str) -> Response:
    """Click a form's button; the response to the POST it sends (which must redirect)."""
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name=button).click()
    resp = posted.value
    if resp.status != 303:
        page.wait_for_load_state()
        origin = resp.request.header_value("origin")
        pytest.fail(
            f"POST {resp.url} (Origin: {origin}) answered {resp.status}: "
            f"{page.locator('body').inner_text()!r}"
        )
    return resp


def _log_in(page: Page, web: Web, then: str) -> None:
    """On the relay's login page: fill in the form, send it and wait to arrive at ``then``."""
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    page.get_by_label("User").fill("admin")
    page.get_by_label("Password").fill(web.password)
    _submit(page, "Log in")
    try:
        page.wait_for_url(then)
    except PlaywrightTimeoutError:
        pytest.fail(f"logged in, but stuck at {page.url} instead of {then}; console: {console}")


def _websocket_echo(page: Page, message: str) -> str:
    result: str = page.evaluate(
        """(message) => new Promise((resolve, reject) => {
            const ws = new WebSocket("wss://" + location.host + "/app/ws");
            const timer = setTimeout(() => { ws.close(); reject(new Error("no echo")); }, 10000);
            ws.onopen = () => ws.send(message);
            ws.onmessage = (event) => { clearTimeout(timer); ws.close(); resolve(event.data); };
            ws.onerror = () => { clearTimeout(timer); reject(new Error("websocket error")); };
        })""",
        message,
    )
    return result


def test_log_in_open_device_websocket_and_log_out(page: Page, web: Web) -> None:
    device = _origin(web, "dev1")
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))

    # 1. No session: the device's page sends the browser to the relay's login page.
    page.goto(f"{device}/")
    page.wait_for_url(_login_url(web))
    assert page.title() == "Log in · Hatchway"

    # 2. Log in: through /open/dev1 and the one-time link, back on the device's page.
    _log_in(page, web, then=f"{device}/")
    assert "grant=" not in page.url
    assert page.title() == "device home"
    assert page.locator("h1").inner_text() == "device home"
    # The image, the stylesheet and the script all came through the relay.
    assert page.evaluate("document.querySelector('img').naturalWidth") == 32
    assert page.evaluate("getComputedStyle(document.querySelector('h1')).color") == (
        "rgb(51, 51, 102)"
    )
    assert page.evaluate("getComputedStyle(document.body).marginTop") == "32px"
    assert "ready" in console

    # 3. The relay's session cookie stays with the relay; the device's is host-only.
    assert "hatchway" not in page.evaluate("document.cookie")
    cookies = {(c["name"], c["domain"]): c for c in page.context.cookies()}
    assert set(cookies) == {(DEVICE_COOKIE, f"dev1.{DOMAIN}"), (RELAY_COOKIE, DOMAIN)}
    for cookie in cookies.values():
        assert cookie["httpOnly"] and cookie["secure"] and cookie["path"] == "/", cookie
    # Neither cookie reaches the device's web server.
    received = page.evaluate("fetch('/app/cookie/get').then((r) => r.json())")
    assert received == {}

    # 4. The device app behind nginx, and a WebSocket from its page.
    page.get_by_role("link", name="the device app").click()
    page.wait_for_url(f"{device}/app/")
    assert page.locator("h1").inner_text() == "hello from the device app"
    assert _websocket_echo(page, "hello through the relay ✓") == "hello through the relay ✓"

    # 5. The relay's device list; logging out there ends the device session too.
    page.goto(f"{_origin(web)}/")
    rows = page.evaluate(
        """Array.from(document.querySelectorAll("tr")).slice(1)
            .map((row) => [row.cells[0].textContent, row.cells[1].textContent])"""
    )
    assert dict(rows) == {"dev1": "online", "dev2": "offline"}
    _submit(page, "Log out")
    page.wait_for_url(_login_url(web))
    assert [c["name"] for c in page.context.cookies()] == [DEVICE_COOKIE]
    page.goto(f"{device}/app/")
    page.wait_for_url(_login_url(web))
    assert "open%2Fdev1" in page.url


def test_offline_device_page(page: Page, web: Web) -> None:
    device = _origin(web, "dev2")
    page.goto(f"{device}/")
    page.wait_for_url(_login_url(web))
    with page.expect_response(f"{device}/") as info:
        _log_in(page, web, then=f"{device}/")
    assert info.value.status == 502
    assert page.locator("h1").inner_text() == "dev2 is offline"
    assert "not connected to the relay" in page.locator("main").inner_text()
    # The relay's own styling (inline CSS) applies.
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == (
        "rgb(244, 245, 247)"
    )
    assert page.context.cookies(f"{device}/")[0]["name"] == DEVICE_COOKIE
