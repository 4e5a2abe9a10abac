"""Calls the API application for a request the front door has already read whole."""

from __future__ import annotations

import urllib.parse
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

if TYPE_CHECKING:
    from hatchway.relay.frontdoor import HttpRequest

#: The largest response the API produces (a page of 5,000 devices is ~1.5 MB).
MAX_RESPONSE = 32 * 1024 * 1024


async def call(
    app: FastAPI,
    method: str,
    path: str,
    query: str,
    request: HttpRequest,
    source: str,
    port: int,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the application's response."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": urllib.parse.unquote(path),
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": (source, 0),
        "server": ("relay", port),
        "state": {},
    }
    body = bytes(request.body)
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    size = 0

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, headers, size
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise RuntimeError("API response too large")
            chunks.append(chunk)

    await app(scope, receive, send)
    return status, headers, b"".join(chunks)
