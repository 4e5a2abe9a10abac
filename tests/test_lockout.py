"""Account lockout after failed logins (persisted) and throttling per source address."""

from __future__ import annotations

import json
import sqlite3
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from hatchway.auth.throttle import LoginThrottle
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
