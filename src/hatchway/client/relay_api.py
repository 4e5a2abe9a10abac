"""The relay's JSON API, from the CLI (blocking calls: the CLI does one at a time)."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hatchway.errors import RelayError
from hatchway.tlsutil import client_context
from hatchway.tunnel.connect import proxy_from_environment, validate_relay_url

TIMEOUT = 15.0


def error_from_body(status: int, body: bytes) -> RelayError:
    try:
        data = json.loads(body)
        return RelayError(status, str(data["error"]), str(data["message"]))
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
        return RelayError(status, "http", f"the relay answered {status}: {text}")


def _opener(server: str, ca_file: str | None) -> tuple[urllib.request.OpenerDirector, str | None]:
    """An opener that verifies the relay and goes through the proxy ``hatchway proxy``
    and ``forward`` would use (HTTPS_PROXY unless NO_PROXY exempts the relay), and the
    Proxy-Authorization value for it."""
    host = validate_relay_url(server).hostname or ""
    proxy = proxy_from_environment(host)
    proxies = {"https": f"http://{proxy.address()}"} if proxy is not None else {}
    context = client_context(Path(ca_file) if ca_file else None)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler(proxies), urllib.request.HTTPSHandler(context=context)
    )
    return opener, proxy.authorization if proxy is not None else None


def call(
    server: str,
    method: str,
    path: str,
    *,
    ca_file: str | None,
    token: str | None = None,
    body: dict[str, Any] | None = None,
) -> Any:
    """Call the API; RelayError (or ConfigError for a bad URL or proxy) with a sentence
    for a person when it fails."""
    opener, proxy_authorization = _opener(server, ca_file)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.rstrip("/") + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if proxy_authorization:  # urllib sends it on the CONNECT, not to the relay
        request.add_header("Proxy-Authorization", proxy_authorization)
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            raw = response.read(1024 * 1024 * 16)
    except urllib.error.HTTPError as exc:
        raise error_from_body(exc.code, exc.read(64 * 1024)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise RelayError(
                0,
                "tls",
                f"the relay's certificate was refused: {reason.verify_message} (use --ca-file?)",
            ) from None
        raise RelayError(0, "unreachable", f"cannot reach the relay {server}: {reason}") from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise RelayError(0, "unreachable", f"cannot reach the relay {server}: {exc}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise RelayError(0, "bad_response", "the relay sent a response that is not JSON") from None
