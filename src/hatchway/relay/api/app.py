"""The REST API (``/api/v1``): a FastAPI application, called in-process by the front door.

FastAPI validates requests against the models in ``models.py`` and publishes the
OpenAPI document at ``/api/v1/openapi.json``. The front door has already parsed the
request (with its limits: head, body, timeouts), so the application is called directly
through ASGI, without a second HTTP server. Every error, validation included, has the
body ``{"error": CODE, "message": TEXT}``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from hatchway import __version__
from hatchway.errors import AlreadyExistsError, ConfigError, NotFoundError
from hatchway.relay.api import accounts, admin, devices, session
from hatchway.relay.api.core import ApiError
from hatchway.relay.api.models import ErrorBody

if TYPE_CHECKING:
    from hatchway.relay.server import RelayServer

log = logging.getLogger("hatchway.relay.api")

PREFIX = "/api/v1"
OPENAPI_PATH = f"{PREFIX}/openapi.json"

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Invalid request (the message says what)"),
        (401, "Not logged in, or the token expired"),
        (403, "Not permitted"),
        (404, "Not found, or not yours to see"),
        (409, "Already exists"),
        (429, "Too many failed logins, or logins waiting, from this address (Retry-After)"),
        (503, "Too many logins waiting on the relay (Retry-After)"),
    )
}


def _error(status: int, code: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(server: RelayServer) -> FastAPI:
    app = FastAPI(
        title="Hatchway relay API",
        version=__version__,
        description="Devices, users, organisations, roles, grants, tokens and the audit "
        "log of a Hatchway relay. Authenticate with `Authorization: Bearer TOKEN` (from "
        "`POST /api/v1/login` or `POST /api/v1/tokens`), or the relay's session cookie "
        "from its login page.",
        openapi_url=OPENAPI_PATH,
        docs_url=None,
        redoc_url=None,
        responses=_ERRORS,
    )
    app.state.server = server
    for module in (session, devices, accounts, admin):
        app.include_router(module.router, prefix=PREFIX)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "bad_request", _describe(exc))

    # The store's errors, as the API answers them.
    for error, status, code in (
        (NotFoundError, 404, "not_found"),
        (AlreadyExistsError, 409, "exists"),
        (ConfigError, 400, "bad_request"),
    ):

        async def store_error(
            _request: Request, exc: Exception, status: int = status, code: str = code
        ) -> JSONResponse:
            return _error(status, code, str(exc))

        app.add_exception_handler(error, store_error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(404, "not_found", "no such endpoint")
        if exc.status_code == 405:
            # Each method of a path is its own route: list them all (RFC 9110).
            methods: set[str] = set()
            for route in app.routes:
                if route.matches(request.scope)[0] != Match.NONE:
                    methods |= getattr(route, "methods", None) or set()
            response = _error(405, "bad_method", "this endpoint does not take that method")
            response.headers["Allow"] = ", ".join(sorted(methods))
            return response
        return _error(exc.status_code, "http", str(exc.detail))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                servers=[{"url": "/"}],
            )
            # Validation errors are 400 with the common body, not FastAPI's 422.
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            schema["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "__Host-hatchway"},
            }
            schema["security"] = [{"bearer": []}, {"session": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
