"""What every way in shares: the API's error type and the password check that the API
login, the web login form and (later) other front ends all go through."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING

from hatchway.errors import AuthenticationError, ConfigError
from hatchway.store.base import UserRecord

if TYPE_CHECKING:
    from hatchway.relay.server import RelayServer

log = logging.getLogger("hatchway.relay.api")

#: Lifetime of the token ``POST /api/v1/login`` returns.
TOKEN_TTL = timedelta(days=30)
#: Logins verified at once (argon2 is deliberately expensive: bound the CPU spent).
LOGIN_CONCURRENCY = 4
#: Directory (LDAP) logins checked at once. They wait on the network, each in a thread of
#: their own: a directory that hangs holds neither the password slots (a local
#: administrator can still log in and fix the settings) nor the threads that the relay's
#: other work runs in. Each waits at most a few times ``ldap.timeout``.
DIRECTORY_LOGIN_CONCURRENCY = 8


class ApiError(Exception):
    """An answer other than success: ``{"error": code, "message": message}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


UNAUTHORIZED = ApiError(401, "unauthorized", "missing, invalid or expired token: log in again")
OTP_REQUIRED = ApiError(401, "otp_required", "a one-time code from the authenticator app is needed")
PASSWORD_CHANGE_REQUIRED = ApiError(
    403,
    "password_change_required",
    "this password was generated for the first login: choose a new one (new_password)",
)

_login_slots: asyncio.Semaphore | None = None
_directory_slots: asyncio.Semaphore | None = None
_directory_threads: ThreadPoolExecutor | None = None


async def check_password(
    server: RelayServer,
    name: str,
    password: str,
    source: str,
    via: str,
    otp: str | None = None,
    new_password: str | None = None,
) -> UserRecord | None:
    """The user, if the password (and second factor) are right; None if not.

    A bounded number of checks run at once, failures count towards the per-address
    throttle, and both outcomes go to the audit log. A user who must change their
    password (the bootstrap admin) gets ``password_change_required`` until the request
    carries an acceptable ``new_password``, which is then set.
    """
    global _login_slots, _directory_slots, _directory_threads
    wait = server.login_throttle.retry_after(source)
    if wait:
        log.warning("login from %s refused: too many failed logins", source)
        raise ApiError(
            429,
            "too_many_attempts",
            f"too many failed logins from {source}: try again in {wait} s",
        )
    if not name or len(name) > 64 or len(password) > 1024:
        server.login_throttle.failed(source)
        server.log_login_failure(name, source)
        server.audit("login_failed", name[:64] or "-", source=source, details={"via": via})
        return None
    if _login_slots is None or _directory_slots is None or _directory_threads is None:
        _login_slots = asyncio.Semaphore(LOGIN_CONCURRENCY)
        _directory_slots = asyncio.Semaphore(DIRECTORY_LOGIN_CONCURRENCY)
        _directory_threads = ThreadPoolExecutor(
            DIRECTORY_LOGIN_CONCURRENCY, thread_name_prefix="hatchway-ldap"
        )
    user: UserRecord | None
    if await asyncio.to_thread(server.uses_directory, name):
        async with _directory_slots:
            user = await asyncio.get_running_loop().run_in_executor(
                _directory_threads, server.authenticate_user, name, password
            )
    else:
        async with _login_slots:
            user = await asyncio.to_thread(server.authenticate_user, name, password)
    if user is not None:
        enabled, required = await asyncio.to_thread(server.store.totp_policy, user.name)
        if required and not enabled:
            server.audit(
                "login_failed", user.name, source=source, details={"via": via, "why": "totp"}
            )
            raise ApiError(
                403,
                "totp_setup_required",
                "your organisation requires two-factor login: ask an administrator to set "
                "it up for you (hatchway user totp)",
            )
        if enabled:
            if not otp:
                raise OTP_REQUIRED  # the password was right; not a failure
            if not await asyncio.to_thread(server.store.totp_check, user.name, otp[:16]):
                user = None
    if user is None:
        server.login_throttle.failed(source)
        server.log_login_failure(name, source)
        server.audit("login_failed", name, source=source, details={"via": via})
        return None
    if user.must_change_password:
        if not new_password:
            raise PASSWORD_CHANGE_REQUIRED
        try:
            await asyncio.to_thread(
                server.store.set_password, user.name, new_password, actor=user.name,
                current=password,
            )  # fmt: skip
        except (ConfigError, AuthenticationError) as exc:
            raise ApiError(400, "weak_password", str(exc)) from None
        user = await asyncio.to_thread(server.store.get_user, user.name)
        if user is None:
            return None
    server.audit("login", user.name, source=source, details={"via": via})
    return user
