"""A small raw-ASGI web application: the upstream "device app" of the web end-to-end tests.

Served by uvicorn (see tests/webstack.py). Every route lives under /app/:

    GET  /app/                      HTML page "hello from the device app"
    GET  /app/headers               JSON: the request headers, method, path, query, ...
    GET  /app/cookie/set?name=&value=[&domain=][&path=]   Set-Cookie
    GET  /app/cookie/get            JSON: the cookies received
    GET  /app/redirect?to=URL       302 to URL
    GET  /app/redirect-relative     302 to /app/
    POST /app/upload                JSON {"bytes": N, "sha256": HEX} of the (streamed) body
    GET  /app/download?size=N[&chunked=1]   N bytes of repeated bytes(range(256)), X-Sha256
    GET  /app/sse?count=N&interval=S        N server-sent events, S seconds apart
    GET  /app/slow?delay=S          "slow done" after S seconds
    GET  /app/status?code=N         that status
    GET  /app/hop                   200 with hop-by-hop fields (Connection naming X-Hop,
                                    Keep-Alive, Proxy-Connection, Upgrade, TE)
    WS   /app/ws                    echo every message

Anything else is a 404; a known route with the wrong method a 405 (HEAD works like GET).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATTERN = bytes(range(256))
DOWNLOAD_CHUNK = PATTERN * 256  # 64 KiB, a whole number of patterns
HELLO_PAGE = (
    b"<!doctype html>\n<html><head><title>device app</title></head>\n"
    b"<body><h1>hello from the device app</h1></body></html>\n"
)
NO_BODY_STATUSES = {204, 304}
ROUTES = {
    "/app/",
    "/app/headers",
    "/app/cookie/set",
    "/app/cookie/get",
    "/app/redirect",
    "/app/redirect-relative",
    "/app/upload",
    "/app/download",
    "/app/sse",
    "/app/slow",
    "/app/status",
    "/app/hop",
}


def download_body(size: int) -> Iterable[bytes]:
    """The body of /app/download?size=N, in chunks."""
    full, rest = divmod(size, len(DOWNLOAD_CHUNK))
    for _ in range(full):
        yield DOWNLOAD_CHUNK
    if rest:
        yield DOWNLOAD_CHUNK[:rest]


@functools.lru_cache(maxsize=32)
def download_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in download_body(size):
        digest.update(chunk)
    return digest.hexdigest()


async def start(
    send: Send,
    status: int,
    content_type: str | None = None,
    length: int | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers]
    if content_type is not None:
        raw.append((b"content-type", content_type.encode()))
    if length is not None:
        raw.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    if status in NO_BODY_STATUSES:
        await start(send, status, headers=headers)
        await send({"type": "http.response.body", "body": b""})
        return
    await start(send, status, content_type, len(body), headers)
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, value: object, status: int = 200) -> None:
    body = json.dumps(value, sort_keys=True).encode() + b"\n"
    await respond(send, status, body, "application/json")


def request_headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def query(scope: Scope) -> dict[str, str]:
    parsed = parse_qs(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    return {name: values[0] for name, values in parsed.items()}


def cookies(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        if raw_name.lower() != b"cookie":
            continue
        for part in raw_value.decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name:
                found[name] = value
    return found


async def upload(receive: Receive, send: Send) -> None:
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        size += len(chunk)
        digest.update(chunk)
        if not message.get("more_body", False):
            break
    await respond_json(send, {"bytes": size, "sha256": digest.hexdigest()})


async def download(send: Send, params: dict[str, str]) -> None:
    size = int(params.get("size", "0"))
    chunked = params.get("chunked", "0") not in ("", "0")
    await start(
        send,
        200,
        "application/octet-stream",
        None if chunked else size,
        [("x-sha256", download_sha256(size))],
    )
    for chunk in download_body(size):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def sse(send: Send, params: dict[str, str]) -> None:
    count = int(params.get("count", "3"))
    interval = float(params.get("interval", "0.1"))
    await start(
        send,
        200,
        "text/event-stream",
        headers=[("cache-control", "no-cache"), ("x-accel-buffering", "no")],
    )
    for i in range(count):
        if i:
            await asyncio.sleep(interval)
        event = f"data: event {i}\n\n".encode()
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def http(scope: Scope, receive: Receive, send: Send) -> None:
    method, path = scope["method"], scope["path"]
    params = query(scope)
    if path == "/app/upload" and method == "POST":
        await upload(receive, send)
        return
    if method not in ("GET", "HEAD") or path == "/app/upload":
        known = path in ROUTES
        await respond(send, 405 if known else 404, b"wrong method\n" if known else b"not found\n")
        return
    match path:
        case "/app/":
            await respond(send, 200, HELLO_PAGE, "text/html; charset=utf-8")
        case "/app/headers":
            client = scope.get("client")
            info = {
                **request_headers(scope),
                "method": method,
                "path": path,
                "query": scope["query_string"].decode("latin-1"),
                "http_version": scope["http_version"],
                "client": f"{client[0]}:{client[1]}" if client else None,
            }
            await respond_json(send, info)
        case "/app/cookie/set" if params.get("name"):
            cookie = f"{params['name']}={params.get('value', '')}; Path={params.get('path', '/')}"
            if params.get("domain"):
                cookie += f"; Domain={params['domain']}"
            await respond(send, 200, b"cookie set\n", headers=[("set-cookie", cookie)])
        case "/app/cookie/get":
            await respond_json(send, cookies(scope))
        case "/app/redirect" if params.get("to"):
            await respond(send, 302, b"redirecting\n", headers=[("location", params["to"])])
        case "/app/redirect-relative":
            await respond(send, 302, b"redirecting\n", headers=[("location", "/app/")])
        case "/app/download":
            await download(send, params)
        case "/app/sse":
            await sse(send, params)
        case "/app/slow":
            await asyncio.sleep(float(params.get("delay", "1")))
            await respond(send, 200, b"slow done\n")
        case "/app/status" if params.get("code", "").isdigit() and 200 <= int(params["code"]) < 600:
            code = int(params["code"])
            await respond(send, code, f"status {code}\n".encode())
        case "/app/hop":
            hop = [
                ("connection", "keep-alive, X-Hop"),
                ("x-hop", "1"),
                ("x-end-to-end", "1"),
                ("keep-alive", "timeout=3600"),
                ("proxy-connection", "keep-alive"),
                ("upgrade", "h2c"),
                ("te", "trailers"),
            ]
            await respond(send, 200, b"hop\n", headers=hop)
        case "/app/cookie/set" | "/app/redirect" | "/app/status":
            await respond(send, 400, b"bad request\n")
        case _:
            await respond(send, 404, b"not found\n")


async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()  # websocket.connect
    if scope["path"] != "/app/ws" or message["type"] != "websocket.connect":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await http(scope, receive, send)
    elif scope["type"] == "websocket":
        await websocket(scope, receive, send)
    elif scope["type"] == "lifespan":
        await lifespan(receive, send)
