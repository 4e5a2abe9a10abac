"""Account lockout after failed logins (persisted) and throttling per source address."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hatchway.auth.throttle import LoginThrottle
from hatchway.relay.api import core
from hatchway.relay.api.core import ApiError, check_password
from hatchway.relay.server import RelayConfig, RelayServer
from hatchway.store.base import UserRecord
from hatchway.store.sql import DB_FILE_NAME, LOCKOUT_FAILURES, SqlStore
from tests.apiclient import Api
from tests.procs import Env
from tests.test_integration import Setup, setup

__all__ = ["setup"]  # the fixture

PASSWORD = "Vivid-Lantern-482!"


def test_lockout_after_ten_failures_survives_a_restart(tmp_path: Path) -> None:
    store = SqlStore.open_data_dir(tmp_path)
    store.add_user("erin", "user", PASSWORD)
    for _ in range(LOCKOUT_FAILURES - 1):
        assert store.authenticate_user("erin", "wrong") is None
    assert store.authenticate_user("erin", PASSWORD) is not None  # success resets the count
    for _ in range(LOCKOUT_FAILURES):
        assert store.authenticate_user("erin", "wrong") is None
    assert store.locked_until("erin") is not None
    assert store.authenticate_user("erin", PASSWORD) is None  # locked: like a wrong password
    store.close()
    store = SqlStore.open_data_dir(tmp_path)
    assert store.authenticate_user("erin", PASSWORD) is None  # still locked after a restart
    assert [r.kind for r in store.audit_records(kind="lockout")] == ["lockout"]
    # Ten minutes later (the lockout's end moved into the past) it opens again.
    with sqlite3.connect(tmp_path / DB_FILE_NAME) as db:
        db.execute("UPDATE login_state SET locked_until = '2000-01-01 00:00:00.000000'")
    assert store.locked_until("erin") is None
    assert store.authenticate_user("erin", PASSWORD) is not None
    for _ in range(LOCKOUT_FAILURES):
        store.authenticate_user("erin", "wrong")
    store.unlock("erin")
    assert store.authenticate_user("erin", PASSWORD) is not None
    assert store.audit_verify().ok


def test_throttle_window() -> None:
    throttle = LoginThrottle(limit=3, window=60)
    for t in (0.0, 1.0, 2.0):
        assert throttle.retry_after("a", now=t) == 0
        throttle.failed("a", now=t)
    assert throttle.retry_after("a", now=3.0) == 57
    assert throttle.retry_after("b", now=3.0) == 0  # other addresses are not affected
    assert throttle.retry_after("a", now=60.5) == 0  # the oldest failure aged out
    small = LoginThrottle(limit=1, window=60, max_sources=2)
    for source in ("a", "b", "c"):
        small.failed(source, now=0.0)
    assert small.retry_after("a", now=1.0) == 0  # bounded: the oldest source was forgotten
    assert small.retry_after("c", now=1.0) == 59


def _login(setup: Setup, user: str, password: str) -> tuple[int, dict[str, object]]:
    ctx = ssl.create_default_context(cafile=str(setup.env.ca_file))
    request = urllib.request.Request(
        f"{setup.url}/api/v1/login",
        data=json.dumps({"user": user, "password": password}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_relay_locks_the_account_and_throttles_the_address(setup: Setup) -> None:
    for _ in range(LOCKOUT_FAILURES):
        assert _login(setup, "admin", "wrong")[0] == 401
    status, body = _login(setup, "admin", setup.password)
    assert (status, body["error"]) == (401, "invalid_credentials")  # locked looks the same
    for n in range(20 - LOCKOUT_FAILURES - 1):
        assert _login(setup, f"nobody{n}", "wrong")[0] == 401
    status, body = _login(setup, "nobody", "wrong")
    assert status == 429 and body["error"] == "too_many_attempts"
    assert "try again in" in str(body["message"])
    out = setup.env.hatchway(
        "audit", "list", "--kind", "lockout", "--data-dir", str(setup.env.data_dir), prefix=()
    )
    assert "lockout" in out.stdout.decode() and "admin" in out.stdout.decode()
    out = setup.env.hatchway(
        "user", "unlock", "admin", "--data-dir", str(setup.env.data_dir), prefix=()
    )
    assert out.stdout.decode().strip() == "user admin unlocked"


def test_concurrent_wrong_logins_get_no_more_checks_than_the_throttle_allows(env: Env) -> None:
    """Logins still being checked count towards the address's throttle: 60 wrong logins
    sent at once get at most 20 password checks (401), the rest 429 without one."""
    relay, port, _ = env.start_relay()
    api = Api(f"https://127.0.0.1:{port}", env.ca_file)

    def login(n: int) -> tuple[int, str]:
        wrong = {"user": f"u{n}", "password": PASSWORD}
        status, body = api.call("POST", "/api/v1/login", wrong, "")
        return status, str(body.get("error"))

    with ThreadPoolExecutor(60) as pool:
        answers = Counter(pool.map(login, range(60)))
    assert set(answers) <= {(401, "invalid_credentials"), (429, "too_many_attempts")}
    assert answers[(429, "too_many_attempts")] >= 40
    checked = answers[(401, "invalid_credentials")]
    assert checked <= 20
    # What the burst did not use is left, and no more.
    assert [login(n)[0] for n in range(60, 80 - checked)] == [401] * (20 - checked)
    assert login(80) == (429, "too_many_attempts")
    body = json.dumps({"user": "u81", "password": PASSWORD}).encode()
    status, headers, _ = api.raw(
        "POST", "/api/v1/login", body, {"Content-Type": "application/json"}
    )
    retry_after = {k.lower(): v for k, v in headers.items()}["retry-after"]
    assert status == 429 and 500 <= int(retry_after) <= 600  # until the oldest is 10 min old
    failed = [line for line in relay.output().splitlines() if "login failed for" in line]
    assert len(failed) == 20


def test_wrong_current_passwords_on_the_password_endpoint_lock_the_account(env: Env) -> None:
    """POST /password is no way round the lockout: a wrong current password counts like
    a failed login and is audited as one, and a locked account is refused even the right
    one (a stolen token cannot guess the password)."""
    _, port, password = env.start_relay()
    assert password is not None
    api = Api(f"https://127.0.0.1:{port}", env.ca_file)
    api.token = api.call("POST", "/api/v1/login", {"user": "admin", "password": password})[1][
        "token"
    ]
    body = {"name": "erin", "role": "operator", "password": PASSWORD}
    assert api.call("POST", "/api/v1/users", body)[0] == 200
    status, login = api.call("POST", "/api/v1/login", {"user": "erin", "password": PASSWORD}, "")
    stolen = login["token"]

    def change(current: str) -> tuple[int, dict[str, str]]:
        new = {"password": current, "new_password": "Amber-Harbour-93!x"}
        return api.call("POST", "/api/v1/password", new, token=stolen)

    for n in range(LOCKOUT_FAILURES):
        status, answer = change(f"Guess-{n:04d}-Xyzzy!")
        assert (status, answer["error"]) == (403, "wrong_password")
    status, user = api.call("GET", "/api/v1/users/erin")
    assert user["locked_until"] is not None
    status, answer = change(PASSWORD)  # right, but the account is locked
    assert (status, answer["error"]) == (403, "wrong_password")
    status, answer = api.call("POST", "/api/v1/login", {"user": "erin", "password": PASSWORD}, "")
    assert status == 401  # the lockout is the login's
    status, audit = api.call("GET", "/api/v1/audit?user=erin")
    failed = [r for r in audit["records"] if r["kind"] == "login_failed"]
    assert [r["details"]["via"] for r in failed].count("password") == LOCKOUT_FAILURES + 1
    assert [r["kind"] for r in audit["records"]].count("lockout") == 1
    assert api.call("POST", "/api/v1/users/erin/unlock")[0] == 200
    assert change(PASSWORD)[0] == 200


def test_throttle_counts_attempts_in_flight() -> None:
    """A place is reserved before the password check: failures and attempts still being
    checked together stay below the limit, so a burst gets no more checks than that."""
    throttle = LoginThrottle(limit=3, window=60)
    assert [throttle.reserve("a", now=0.0) for _ in range(4)] == [0, 0, 0, 1]
    assert throttle.in_flight("a") == 3
    assert throttle.reserve("b", now=0.0) == 0  # other sources are not affected
    throttle.release("a")  # a success (or an abandoned attempt) gives its place back
    assert throttle.reserve("a", now=1.0) == 0
    throttle.failed("a", now=2.0, reserved=True)  # the place becomes the failure
    throttle.failed("a", now=3.0, reserved=True)
    assert throttle.in_flight("a") == 1
    assert throttle.reserve("a", now=4.0) == 1  # 2 failures + 1 in flight: full
    throttle.failed("a", now=5.0, reserved=True)
    assert (throttle.in_flight("a"), throttle.retry_after("a", now=5.0)) == (0, 57)
    assert throttle.reserve("a", now=5.0) == 57  # full of failures: wait for the oldest
    assert throttle.reserve("a", now=62.5) == 0


def _relay_server(tmp_path: Path) -> RelayServer:
    server = RelayServer(RelayConfig(data_dir=tmp_path / "relay"))
    server.bootstrap()
    return server


async def _settle() -> None:
    """Wait for the audit writes the logins started."""
    await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not asyncio.current_task()))


async def _attempt(server: RelayServer, source: str, name: str = "nobody") -> int:
    """The status the login answers: 401 for a wrong password, else the ApiError's."""
    try:
        user = await check_password(server, name, "Wrong-Password-123!", source, "api")
    except ApiError as exc:
        return exc.status
    return 401 if user is None else 200


def test_an_ipv6_host_is_throttled_as_its_64(tmp_path: Path) -> None:
    """The throttle counts by the relay's admission key: a client rotating through the
    addresses of its /64 is one source, as is an IPv4 client on a dual-stack socket."""
    server = _relay_server(tmp_path)

    async def main() -> None:
        statuses = [await _attempt(server, f"2001:db8:1:2::{n + 1:x}") for n in range(22)]
        assert statuses == [401] * 20 + [429] * 2
        with pytest.raises(ApiError) as refused:
            await check_password(server, "nobody", "x", "2001:db8:1:2:ffff::1", "web")
        assert refused.value.code == "too_many_attempts"
        assert "2001:db8:1:2::/64" in refused.value.message
        assert refused.value.retry_after is not None and 60 < refused.value.retry_after <= 600
        assert await _attempt(server, "2001:db8:1:3::1") == 401  # the next /64 is not
        for _ in range(20):
            await _attempt(server, "::ffff:192.0.2.7", name="")
        assert await _attempt(server, "192.0.2.7") == 429
        await _settle()

    try:
        asyncio.run(main())
    finally:
        server.store.close()


class _SlowChecks:
    """``authenticate_user`` that holds every check until ``go`` is set."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self, name: str, password: str) -> UserRecord | None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.go.wait(30)
        with self._lock:
            self.running -= 1
        return None


def test_logins_waiting_for_a_check_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source cannot hold more than a few logins waiting for the password check (429
    at once), nor can all sources together (503), and the throttle's places and the
    queue's counts come back when they end, also when they are cancelled."""
    server = _relay_server(tmp_path)
    checks = _SlowChecks()
    monkeypatch.setattr(server, "authenticate_user", checks)
    monkeypatch.setattr(core, "_login_slots", None)  # fresh slots, for this event loop
    held = core.LOGIN_CONCURRENCY + core.MAX_LOGINS_WAITING_PER_SOURCE

    async def until(condition: Callable[[], bool]) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.01)

    async def main() -> None:
        # One address: the password checks running and the few waiting are held, the
        # rest refused at once, without a check.
        burst = [asyncio.create_task(_attempt(server, "192.0.2.1")) for _ in range(40)]
        await until(lambda: sum(t.done() for t in burst) == 40 - held)
        assert {t.result() for t in burst if t.done()} == {429}
        slots = core._login_slots
        assert slots is not None
        await until(lambda: checks.running == core.LOGIN_CONCURRENCY)  # the threads started
        assert (checks.running, slots.waiting) == (
            core.LOGIN_CONCURRENCY,
            held - core.LOGIN_CONCURRENCY,
        )
        assert server.login_throttle.in_flight("192.0.2.1") == held
        with pytest.raises(ApiError) as refused:
            await check_password(server, "nobody", "x", "192.0.2.1", "api")
        assert (refused.value.status, refused.value.retry_after) == (
            429,
            core.LOGIN_BUSY_RETRY_AFTER,
        )
        # Many addresses: past the global bound, 503 (busy) for everyone.
        room = core.MAX_LOGINS_WAITING - slots.waiting
        sources = [f"10.0.{n}.1" for n in range(room)]
        crowd = [asyncio.create_task(_attempt(server, source)) for source in sources]
        await until(lambda: slots.waiting == core.MAX_LOGINS_WAITING)
        with pytest.raises(ApiError) as busy:
            await check_password(server, "nobody", "x", "203.0.113.9", "web")
        assert (busy.value.status, busy.value.code, busy.value.retry_after) == (
            503,
            "busy",
            core.LOGIN_BUSY_RETRY_AFTER,
        )
        assert server.login_throttle.in_flight("203.0.113.9") == 0  # not a failure either
        assert server.login_throttle.retry_after("203.0.113.9") == 0
        # A waiting login that is abandoned gives back its place and its queue entry.
        crowd[-1].cancel()
        await asyncio.gather(crowd[-1], return_exceptions=True)
        assert server.login_throttle.in_flight(sources[-1]) == 0
        assert slots.waiting == core.MAX_LOGINS_WAITING - 1
        checks.go.set()
        results = await asyncio.gather(*burst, *crowd[:-1])
        assert results.count(401) == held + room - 1
        assert checks.most == core.LOGIN_CONCURRENCY
        assert (slots.waiting, slots.waiting_from("192.0.2.1")) == (0, 0)
        assert server.login_throttle.in_flight("192.0.2.1") == 0
        assert server.login_throttle.retry_after("192.0.2.1") == 0  # 12 failures, not 20
        await _settle()

    try:
        asyncio.run(main())
    finally:
        checks.go.set()
        server.store.close()
