"""The relay's own HTML: error pages, the login form and the device list.

Small server-rendered pages with inline CSS and no script; every value that came from
outside goes through ``html.escape``. The full web UI replaces the last two later.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

REASONS = {
    200: "OK",
    204: "No Content",
    302: "Found",
    303: "See Other",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

#: Headers on every page the relay itself serves (not on proxied device pages).
#: ``form-action`` covers the whole redirect chain after a form is sent: the login form
#: ends on a device's subdomain (see ``configure``). ``same-origin`` keeps the Origin
#: header on the relay's own form posts (it is checked) and sends nothing elsewhere.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = ()


def configure(domain: str) -> None:
    """Set the security headers for a relay serving ``domain`` and its subdomains."""
    global SECURITY_HEADERS
    SECURITY_HEADERS = (
        (
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; "
            f"form-action 'self' https://*.{domain}:*; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "same-origin"),
        ("Cache-Control", "no-store"),
    )


configure("localhost")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:42rem;margin:4rem auto;background:#fff;border-radius:8px;
padding:2rem 2.5rem;box-shadow:0 1px 4px #0002}
h1{font-size:1.4rem;margin-top:0}.code{color:#8a93a6;font-size:.9rem}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.4rem}
tr+tr{border-top:1px solid #e4e7ec}.on{color:#137333}.off{color:#a50e0e}
input{display:block;margin:.3rem 0 1rem;padding:.5rem;width:100%;box-sizing:border-box}
button{padding:.5rem 1.2rem}.err{color:#a50e0e}
"""


def page(title: str, body: str) -> bytes:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)} · Hatchway</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    ).encode()


def error_page(status: int, title: str, message: str) -> bytes:
    return page(
        title,
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        f"<p class=code>{status} {REASONS.get(status, 'Error')} · Hatchway relay</p>",
    )


def login_page(next_path: str, error: str | None = None, *, change: bool = False) -> bytes:
    """The login form; with ``change``, also a new password (required at first login)."""
    notice = f"<p class=err>{html.escape(error)}</p>" if error else ""
    new_password = (
        "<label>New password<input name=new_password type=password "
        "autocomplete=new-password required minlength=14></label>"
        "<label>New password again<input name=new_password2 type=password "
        "autocomplete=new-password required minlength=14></label>"
        if change
        else ""
    )
    return page(
        "Log in",
        "<h1>Log in to the relay</h1>"
        f"{notice}<form method=post action=/login>"
        f'<input type=hidden name=next value="{html.escape(next_path)}">'
        "<label>User<input name=user autocomplete=username required autofocus></label>"
        "<label>Password<input name=password type=password autocomplete=current-password "
        "required></label>"
        f"{new_password}"
        "<label>One-time code (if two-factor login is on)<input name=otp "
        "inputmode=numeric autocomplete=one-time-code pattern=[0-9]{6} maxlength=6></label>"
        "<button>Log in</button></form>",
    )


def devices_page(user: str, devices: Sequence[dict[str, Any]]) -> bytes:
    rows: list[str] = []
    for item in devices:
        name = html.escape(item["id"])
        if item.get("online"):
            state = "<span class=on>online</span>"
            links = " ".join(
                f'<a href="/open/{name}?service={html.escape(s)}">{html.escape(s)}</a>'
                for s in _web_services(item.get("services", []))
            )
        else:
            state, links = "<span class=off>offline</span>", ""
        rows.append(f"<tr><td>{name}</td><td>{state}</td><td>{links}</td></tr>")
    table = (
        "<table><tr><th>Device</th><th>State</th><th>Open</th></tr>" + "".join(rows) + "</table>"
        if rows
        else "<p>No devices.</p>"
    )
    return page(
        "Devices",
        f"<h1>Devices</h1><p>Logged in as {html.escape(user)}.</p>{table}"
        "<form method=post action=/logout><p><button>Log out</button></p></form>",
    )


def _web_services(services: Iterable[str]) -> list[str]:
    return [s for s in services if s in ("http", "https") or s.startswith(("http-", "https-"))]


def http_response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/html; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
    head_only: bool = False,
    close: bool = True,
) -> bytes:
    """A complete response from the relay itself (with the security headers)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines.extend(f"{name}: {value}" for name, value in SECURITY_HEADERS)
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
