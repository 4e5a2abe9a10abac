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
