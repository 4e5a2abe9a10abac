"""What every way in shares: the API's error type and the password check that the API
login, the web login form and (later) other front ends all go through."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING

from hatchway.auth.throttle import source_key
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
#: Logins that may wait for a check (password or directory, each its own queue), all
#: sources together: more are refused at once (503) rather than held with their
#: connections. A source (an address, an IPv6 /64) may have this many waiting: more are
#: refused (429). Either way the answer says to retry after ``LOGIN_BUSY_RETRY_AFTER`` s.
MAX_LOGINS_WAITING = 128
MAX_LOGINS_WAITING_PER_SOURCE = 8
LOGIN_BUSY_RETRY_AFTER = 5


class ApiError(Exception):
    """An answer other than success: ``{"error": code, "message": message}``."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        #: Seconds after which the request may succeed (``Retry-After``), if it says so.
        self.retry_after = retry_after


UNAUTHORIZED = ApiError(401, "unauthorized", "missing, invalid or expired token: log in again")
OTP_REQUIRED = ApiError(401, "otp_required", "a one-time code from the authenticator app is needed")
PASSWORD_CHANGE_REQUIRED = ApiError(
    403,
    "password_change_required",
    "this password was generated for the first login: choose a new one (new_password)",
)


class LoginSlots:
    """At most ``running`` checks at once, and a bounded queue in front of them: at most
    ``waiting`` logins wait, ``per_source`` of them from one source."""

    def __init__(self, running: int, waiting: int, per_source: int) -> None:
        self._semaphore = asyncio.Semaphore(running)
        self.max_waiting = waiting
        self.max_per_source = per_source
        self.waiting = 0
        self._waiting: dict[str, int] = {}

    def waiting_from(self, key: str) -> int:
        return self._waiting.get(key, 0)

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Hold a slot (``key``: the source, see ``source_key``); ApiError 429/503 if the
        queue is full."""
        mine = self._waiting.get(key, 0)
        if mine >= self.max_per_source:
            raise ApiError(
                429,
                "too_many_attempts",
                f"too many logins from {key} waiting: try again in {LOGIN_BUSY_RETRY_AFTER} s",
                LOGIN_BUSY_RETRY_AFTER,
            )
        if self.waiting >= self.max_waiting:
            raise ApiError(
                503,
                "busy",
                f"too many logins waiting: try again in {LOGIN_BUSY_RETRY_AFTER} s",
                LOGIN_BUSY_RETRY_AFTER,
            )
        self.waiting += 1
        self._waiting[key] = mine + 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
            left = self._waiting[key] - 1
            if left:
                self._waiting[key] = left
            else:
                del self._waiting[key]
        try:
            yield
        finally:
            self._semaphore.release()


_login_slots: LoginSlots | None = None
_directory_slots: LoginSlots | None = None
_directory_threads: ThreadPoolExecutor | None = None


def _too_many(key: str, wait: int) -> ApiError:
    return ApiError(
        429, "too_many_attempts", f"too many failed logins from {key}: try again in {wait} s", wait
    )


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

    A bounded number of checks run at once, behind a bounded queue (429 for a source
    with too many waiting, 503 when too many wait in all). Failures count towards the
    per-source throttle (an address, an IPv6 /64), and so do the source's logins still
    waiting or being checked: a burst of them gets no more checks than failures are
    allowed. Both outcomes go to the audit log. A user who must change their password
    (the bootstrap admin) gets ``password_change_required`` until the request carries an
    acceptable ``new_password``, which is then set.
    """
    key = source_key(source)
    throttle = server.login_throttle
    wait = throttle.reserve(key)
    if wait:
        log.warning("login from %s refused: too many failed logins", source)
        raise _too_many(key, wait)
    reserved = True
    try:
        user = await _check(server, name, password, key, otp)
        if user is None:
            throttle.failed(key, reserved=True)
            reserved = False
            server.log_login_failure(name, source)
            server.audit("login_failed", name[:64] or "-", source=source, details={"via": via})
            return None
        throttle.release(key)
        reserved = False
        if isinstance(user, str):  # the password was right, the second factor is missing
            server.audit("login_failed", user, source=source, details={"via": via, "why": "totp"})
            raise ApiError(
                403,
                "totp_setup_required",
                "your organisation requires two-factor login: ask an administrator to set "
                "it up for you (hatchway user totp)",
            )
    finally:
        if reserved:
            throttle.release(key)
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


async def _check(
    server: RelayServer, name: str, password: str, key: str, otp: str | None
) -> UserRecord | str | None:
    """The user if the password and second factor are right, None if not, or the user's
    name if the password is right but they must set up a second factor first.
    ``OTP_REQUIRED`` if the password is right and the code missing."""
    global _login_slots, _directory_slots, _directory_threads
    if not name or len(name) > 64 or len(password) > 1024:
        return None
    if _login_slots is None or _directory_slots is None or _directory_threads is None:
        _login_slots = LoginSlots(
            LOGIN_CONCURRENCY, MAX_LOGINS_WAITING, MAX_LOGINS_WAITING_PER_SOURCE
        )
        _directory_slots = LoginSlots(
            DIRECTORY_LOGIN_CONCURRENCY, MAX_LOGINS_WAITING, MAX_LOGINS_WAITING_PER_SOURCE
        )
        _directory_threads = ThreadPoolExecutor(
            DIRECTORY_LOGIN_CONCURRENCY, thread_name_prefix="hatchway-ldap"
        )
    user: UserRecord | None
    if await asyncio.to_thread(server.uses_directory, name):
        async with _directory_slots.slot(key):
            user = await asyncio.get_running_loop().run_in_executor(
                _directory_threads, server.authenticate_user, name, password
            )
    else:
        async with _login_slots.slot(key):
            user = await asyncio.to_thread(server.authenticate_user, name, password)
    if user is None:
        return None
    enabled, required = await asyncio.to_thread(server.store.totp_policy, user.name)
    if required and not enabled:
        return user.name
    if enabled:
        if not otp:
            raise OTP_REQUIRED  # the password was right; not a failure
        if not await asyncio.to_thread(server.store.totp_check, user.name, otp[:16]):
            return None
    return user
