"""Two-factor login with TOTP: setup, replay protection, API, CLI and the web form."""

from __future__ import annotations

import re
import ssl
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyotp

from hatchway.auth.totp import matching_step
from hatchway.store.sql import LOCKOUT_FAILURES, SqlStore
from tests.apiclient import Api
from tests.procs import Env
from tests.test_integration import Setup, setup

__all__ = ["setup"]  # the fixture

PASSWORD = "Vivid-Lantern-482!"


def code(secret: str, offset: int = 0) -> str:
    return pyotp.TOTP(secret).at(time.time() + offset)


def previous_code(secret: str) -> str:
    """The code of the step before this one, with time to use it: a command started
    near the end of a step would see it two steps old (refused) by the time it checks."""
    if time.time() % 30 > 20:
        time.sleep(30.5 - time.time() % 30)
    return code(secret, -30)


def test_codes_drift_and_replay(tmp_path: Path) -> None:
    secret = pyotp.random_base32()
    now = time.time()
    step = pyotp.TOTP(secret).timecode(int(now))
    assert matching_step(secret, pyotp.TOTP(secret).at(now - 30), now) == step - 1
    assert matching_step(secret, pyotp.TOTP(secret).at(now + 30), now) == step + 1
    assert matching_step(secret, pyotp.TOTP(secret).at(now - 90), now) is None
    assert matching_step(secret, "12a456", now) is None
    store = SqlStore.open_data_dir(tmp_path)
    store.add_user("erin", "user", PASSWORD)
    secret = store.totp_begin("erin")
    assert not store.totp_required("erin")
    assert not store.totp_confirm("erin", "000000" if code(secret) != "000000" else "111111")
    assert store.totp_confirm("erin", code(secret, -30))
    assert store.totp_required("erin")
    now_code = code(secret)
    assert store.totp_check("erin", now_code)
    assert not store.totp_check("erin", now_code)  # spent
    assert not store.totp_check("erin", code(secret, -30))  # older than the last used
    for _ in range(LOCKOUT_FAILURES - 1):  # wrong codes count towards the lockout
        store.totp_check("erin", "999999" if now_code != "999999" else "888888")
    assert store.locked_until("erin") is not None
    kinds = [r.kind for r in store.audit_records()]
    assert "totp_enabled" in kinds and "lockout" in kinds
    store.totp_disable("erin")
    assert not store.totp_required("erin")


def test_login_with_two_factors(setup: Setup) -> None:
    env = setup.env
    data = ["--data-dir", str(env.data_dir)]
    out = env.hatchway("user", "totp", "admin", *data, prefix=()).stdout.decode()
    secret = re.search(r"secret: (\S+)", out)
    assert secret and "otpauth://totp/" in out
    confirm = previous_code(secret.group(1))
    env.hatchway("user", "totp", "admin", "--confirm", confirm, *data, prefix=())

    def login(*extra: str) -> tuple[int, str]:
        result = env.hatchway(
            "login", setup.url, "--user", "admin", "--password-stdin", "--ca-file",
            str(env.ca_file), *extra, input=setup.password.encode() + b"\n", check=False,
        )  # fmt: skip
        return result.returncode, result.stderr.decode()

    status, err = login()
    assert status == 1 and "one-time code" in err
    wrong = "123456" if code(secret.group(1)) != "123456" else "654321"
    status, err = login("--otp", wrong)
    assert status == 1 and "wrong user name or password" in err
    assert login("--otp", code(secret.group(1)))[0] == 0
    out = env.hatchway("audit", "list", "--kind", "login", *data, prefix=()).stdout.decode()
    assert "admin" in out


def test_web_form_asks_for_the_code(setup: Setup) -> None:
    env = setup.env
    data = ["--data-dir", str(env.data_dir)]
    env.hatchway(
        "user", "add", "fay", "--role", "admin", "--password-stdin", *data,
        input=PASSWORD.encode() + b"\n", prefix=(),
    )  # fmt: skip
    out = env.hatchway("user", "totp", "fay", *data, prefix=()).stdout.decode()
    secret = re.search(r"secret: (\S+)", out)
    assert secret
    confirm = previous_code(secret.group(1))
    env.hatchway("user", "totp", "fay", "--confirm", confirm, *data, prefix=())
    ctx = ssl.create_default_context(cafile=str(env.ca_file))
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoRedirect())

    def post(fields: dict[str, str]) -> tuple[int, str, str]:
        request = urllib.request.Request(
            f"{setup.url}/login",
            data=urllib.parse.urlencode(fields).encode(),
            headers={"Origin": setup.url},
            method="POST",
        )
        try:
            with opener.open(request, timeout=30) as resp:
                return resp.status, resp.read().decode(), resp.headers.get("Set-Cookie", "")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), exc.headers.get("Set-Cookie", "")

    status, page, _ = post({"user": "fay", "password": PASSWORD})
    assert status == 401 and "one-time code" in page and "name=otp" in page
    status, _, cookie = post({"user": "fay", "password": PASSWORD, "otp": code(secret.group(1))})
    assert status == 303 and cookie.startswith("__Host-hatchway=")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_an_organisation_can_require_two_factor_login(setup: Setup) -> None:
    env = setup.env
    data = ["--data-dir", str(env.data_dir)]
    env.hatchway("org", "add", "secure", *data, prefix=())
    env.hatchway(
        "user", "add", "gil", "--org", "secure", "--role", "viewer", "--password-stdin", *data,
        input=PASSWORD.encode() + b"\n", prefix=(),
    )  # fmt: skip
    out = env.hatchway("org", "set", "secure", "--require-totp", *data, prefix=())
    assert out.stdout.decode().strip() == "two-factor login is required in secure"

    def login(*extra: str) -> tuple[int, str]:
        result = env.hatchway(
            "login", setup.url, "--user", "gil", "--password-stdin", "--ca-file",
            str(env.ca_file), *extra, input=PASSWORD.encode() + b"\n", check=False,
        )  # fmt: skip
        return result.returncode, result.stderr.decode()

    status, err = login()
    assert status == 1 and "requires two-factor login" in err
    out = env.hatchway("user", "totp", "gil", *data, prefix=()).stdout.decode()
    secret = re.search(r"secret: (\S+)", out)
    assert secret
    env.hatchway("user", "totp", "gil", "--confirm", code(secret.group(1), -30), *data, prefix=())
    assert login("--otp", code(secret.group(1)))[0] == 0


def _wrong(secret: str) -> str:
    """A code that is right in no step of the drift window."""
    valid = {code(secret, offset) for offset in (-60, -30, 0, 30, 60)}
    return next(c for c in ("123456", "654321", "111111", "999999") if c not in valid)


def test_wrong_codes_after_the_right_password_lock_the_account(tmp_path: Path) -> None:
    """The right password no longer resets the failure count of a user with two-factor
    login (it did, before each wrong code added one: the count never passed 1); a right
    code does."""
    store = SqlStore.open_data_dir(tmp_path)
    store.add_user("erin", "user", PASSWORD)
    secret = store.totp_begin("erin")
    assert store.totp_confirm("erin", code(secret, -30))

    def attempt(otp: str) -> bool:
        return store.authenticate_user("erin", PASSWORD) is not None and store.totp_check(
            "erin", otp
        )

    for _ in range(LOCKOUT_FAILURES - 1):
        assert not attempt(_wrong(secret))
    assert store.locked_until("erin") is None
    assert attempt(code(secret))  # both factors right: the count starts again
    for _ in range(LOCKOUT_FAILURES - 1):
        assert not attempt(_wrong(secret))
    assert store.locked_until("erin") is None
    assert not attempt(_wrong(secret))
    assert store.locked_until("erin") is not None
    assert store.authenticate_user("erin", PASSWORD) is None  # locked: the password too
    assert [r.actor for r in store.audit_records(kind="lockout")] == ["erin"]


def test_the_relay_locks_an_account_after_ten_wrong_codes(env: Env) -> None:
    _, port, password = env.start_relay()
    assert password is not None
    data = ["--data-dir", str(env.data_dir)]
    env.hatchway(
        "user", "add", "erin", "--role", "operator", "--password-stdin", *data,
        input=PASSWORD.encode() + b"\n", prefix=(),
    )  # fmt: skip
    out = env.hatchway("user", "totp", "erin", *data, prefix=()).stdout.decode()
    secret = re.search(r"secret: (\S+)", out)
    assert secret
    env.hatchway("user", "totp", "erin", "--confirm", previous_code(secret.group(1)), *data,
                 prefix=())  # fmt: skip
    api = Api(f"https://127.0.0.1:{port}", env.ca_file)

    def login(otp: str) -> tuple[int, dict[str, str]]:
        return api.call("POST", "/api/v1/login", {"user": "erin", "password": PASSWORD, "otp": otp})

    for _ in range(LOCKOUT_FAILURES):
        status, body = login(_wrong(secret.group(1)))
        assert (status, body["error"]) == (401, "invalid_credentials")
    status, body = login(code(secret.group(1)))  # both right, but locked
    assert (status, body["error"]) == (401, "invalid_credentials")
    status, body = api.call("POST", "/api/v1/login", {"user": "admin", "password": password})
    api.token = body["token"]
    status, user = api.call("GET", "/api/v1/users/erin")
    assert status == 200 and user["locked_until"] is not None
    status, body = api.call("GET", "/api/v1/audit?kind=lockout")
    assert [r["actor"] for r in body["records"]] == ["erin"]
    assert api.call("POST", "/api/v1/users/erin/unlock")[0] == 200
    assert login(code(secret.group(1)))[0] == 200


def test_a_directory_user_s_wrong_codes_count_too(tmp_path: Path) -> None:
    """The directory accepting the password (sync_external_user) does not reset the count
    of a user with two-factor login either."""
    store = SqlStore.open_data_dir(tmp_path)
    assert store.sync_external_user("dana", "operator", "default") is not None
    secret = store.totp_begin("dana")
    assert store.totp_confirm("dana", code(secret, -30))
    for _ in range(LOCKOUT_FAILURES - 1):
        assert store.sync_external_user("dana", "operator", "default") is not None
        assert not store.totp_check("dana", _wrong(secret))
    assert store.locked_until("dana") is None
    assert store.sync_external_user("dana", "operator", "default") is not None
    assert not store.totp_check("dana", _wrong(secret))
    assert store.locked_until("dana") is not None
