"""Accounts through the REST API and the CLI on top of it: the bootstrap admin's first
login, self-service password change and logout, and an organisation admin setting up a
service partner, a customer and a support engineer who each reach exactly what they
should, with every step in the organisation's audit log."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from pathlib import Path

from tests.apiclient import Api
from tests.procs import HATCHWAY, Env, wait_for
from tests.test_integration import EchoServer

PASSWORD = "Vivid-Lantern-482!"
NEW_PASSWORD = "Amber-Harbour-93!x"


def _as(env: Env, who: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as ``who`` (their own login, in their own config directory)."""
    environ = env.environ()
    environ["HATCHWAY_CONFIG_DIR"] = str(env.root / f"config-{who}")
    environ.pop("HATCHWAY_DATA_DIR", None)
    return subprocess.run(
        [*HATCHWAY, *args], input=stdin.encode(), capture_output=True, timeout=60, env=environ,
        cwd=env.root,
    )  # fmt: skip


def _login(env: Env, url: str, who: str, password: str) -> None:
    result = _as(env, who, "login", url, "--user", who if who != "super" else "admin",
                 "--password-stdin", "--ca-file", str(env.ca_file), stdin=password + "\n")  # fmt: skip
    assert result.returncode == 0, result.stderr


def _ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def test_the_bootstrap_password_must_be_changed_through_the_api(env: Env) -> None:
    _, port, bootstrap = env.start_relay(keep_bootstrap=True)
    assert bootstrap is not None
    api = Api(f"https://127.0.0.1:{port}", env.ca_file)
    login = {"user": "admin", "password": bootstrap}
    status, body = api.call("POST", "/api/v1/login", login)
    assert (status, body["error"]) == (403, "password_change_required") and "token" not in body
    for weak in ("short", bootstrap):  # too weak; the same as before
        status, body = api.call("POST", "/api/v1/login", {**login, "new_password": weak})
        assert (status, body["error"]) == (400, "weak_password"), body
    # A wrong password learns nothing about the pending change.
    status, body = api.call(
        "POST", "/api/v1/login", {**login, "password": "wrong", "new_password": NEW_PASSWORD}
    )
    assert (status, body["error"]) == (401, "invalid_credentials")
    status, body = api.call("POST", "/api/v1/login", {**login, "new_password": NEW_PASSWORD})
    assert status == 200, body
    token = body["token"]
    status, me = api.call("GET", "/api/v1/whoami", token=token)
    assert (status, me["user"], me["superadmin"]) == (200, "admin", True)
    status, body = api.call("POST", "/api/v1/login", login)
    assert (status, body["error"]) == (401, "invalid_credentials")
    status, body = api.call("POST", "/api/v1/login", {"user": "admin", "password": NEW_PASSWORD})
    assert status == 200
    status, body = api.call("GET", "/api/v1/audit?kind=password_changed", token=token)
    assert [(r["actor"], r["details"]["user"]) for r in body["records"]] == [("admin", "admin")]


def test_the_bootstrap_password_must_be_changed_from_the_cli(env: Env) -> None:
    _, port, bootstrap = env.start_relay(keep_bootstrap=True)
    assert bootstrap is not None
    url = f"https://127.0.0.1:{port}"
    args = ("login", url, "--user", "admin", "--password-stdin", "--ca-file", str(env.ca_file))
    once = _as(env, "super", *args, stdin=bootstrap + "\n")
    assert once.returncode == 1
    assert b"requires a new password before first use" in once.stderr
    _ok(_as(env, "super", *args, stdin=f"{bootstrap}\n{NEW_PASSWORD}\n"))
    assert json.loads(_ok(_as(env, "super", "devices", "--json"))) == []


def test_the_bootstrap_password_must_be_changed_in_the_web_form(env: Env) -> None:
    _, port, bootstrap = env.start_relay(keep_bootstrap=True)
    assert bootstrap is not None
    url = f"https://127.0.0.1:{port}"
    api = Api(url, env.ca_file)

    def post(**fields: str) -> tuple[int, dict[str, str], str]:
        data = urllib.parse.urlencode({"user": "admin", "password": bootstrap, **fields})
        status, headers, body = api.raw(
            "POST", "/login", data.encode(),
            {"Origin": url, "Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        return status, headers, body.decode()

    status, headers, page = post()
    assert status == 403 and "name=new_password " in page and "Set-Cookie" not in headers
    status, headers, page = post(new_password=NEW_PASSWORD, new_password2=NEW_PASSWORD + "x")
    assert status == 400 and "differ" in page and "Set-Cookie" not in headers
    status, headers, page = post(new_password=NEW_PASSWORD, new_password2=NEW_PASSWORD)
    assert status == 303, page
    assert headers["Set-Cookie"].startswith("__Host-hatchway=")
    assert api.call("POST", "/api/v1/login", {"user": "admin", "password": NEW_PASSWORD})[0] == 200


def test_users_change_their_own_password_and_log_out(env: Env) -> None:
    _, port, password = env.start_relay()
    assert password is not None
    url = f"https://127.0.0.1:{port}"
    _login(env, url, "super", password)
    _ok(_as(env, "super", "user", "add", "pat", "--role", "operator", "--password-stdin",
            stdin=PASSWORD + "\n"))  # fmt: skip
    _login(env, url, "pat", PASSWORD)
    wrong = _as(env, "pat", "user", "passwd", "pat", "--password-stdin",
                stdin=f"not-it\n{NEW_PASSWORD}\n")  # fmt: skip
    assert wrong.returncode == 1 and b"current password is wrong" in wrong.stderr
    _ok(_as(env, "pat", "user", "passwd", "pat", "--password-stdin",
            stdin=f"{PASSWORD}\n{NEW_PASSWORD}\n"))  # fmt: skip
    api = Api(url, env.ca_file)
    status, body = api.call("POST", "/api/v1/login", {"user": "pat", "password": PASSWORD})
    assert status == 401
    status, body = api.call("POST", "/api/v1/login", {"user": "pat", "password": NEW_PASSWORD})
    assert status == 200
    token = body["token"]
    assert api.call("POST", "/api/v1/logout", token=token)[0] == 200
    status, body = api.call("GET", "/api/v1/whoami", token=token)
    assert (status, body["error"]) == (401, "unauthorized")
    # Not on one's own account through the admin endpoints, even as an admin.
    _login(env, url, "pat", NEW_PASSWORD)
    refused = _as(env, "super", "user", "remove", "admin")
    assert refused.returncode == 1 and b"not on your own account" in refused.stderr


def test_an_admin_sets_up_a_partner_a_customer_and_a_support_engineer(env: Env) -> None:
    """The whole story through the CLI on top of the API: a super-admin creates the
    organisation and its admin; the admin adds devices, users, a team, a custom role and
    grants; each user reaches exactly what they should; the audit log has it all."""
    _, port, password = env.start_relay()
    assert password is not None
    url = f"https://127.0.0.1:{port}"
    _login(env, url, "super", password)
    _ok(_as(env, "super", "org", "add", "acme"))
    _ok(_as(env, "super", "user", "add", "boss", "--org", "acme", "--role", "admin",
            "--password-stdin", stdin=PASSWORD + "\n"))  # fmt: skip
    _login(env, url, "boss", PASSWORD)
    boss = lambda *args, stdin="": _ok(_as(env, "boss", *args, stdin=stdin))  # noqa: E731
    secrets = {}
    for device, tag in (("plc-1", "plant1"), ("plc-2", "plant2")):
        secrets[device] = json.loads(boss("device", "add", device, "--tag", tag, "--json"))
    for name in ("partner", "customer", "engineer"):
        boss("user", "add", name, "--password-stdin", stdin=PASSWORD + "\n")
    boss("grant", "add", "operator", "--user", "partner", "--tag", "plant1")
    boss("grant", "add", "viewer", "--user", "customer", "--device", "plc-2")
    boss("team", "add", "support")
    boss("team", "join", "support", "engineer")
    boss("role", "add", "ssh-only", "--permission", "devices.view", "--permission",
         "connect:ssh")  # fmt: skip
    boss("grant", "add", "ssh-only", "--team", "support", "--tag", "plant2")
    assert "acme/support: engineer" in boss("team", "list")
    assert {u["name"] for u in json.loads(boss("user", "list", "--json"))} == {
        "boss", "partner", "customer", "engineer"
    }  # fmt: skip
    refused = _as(env, "boss", "org", "add", "other")
    assert refused.returncode == 1 and b"only a super-admin" in refused.stderr

    echo = {(d, s): EchoServer() for d in secrets for s in ("ssh", "http")}
    try:
        for device, answer in secrets.items():
            path = env.root / f"{device}.secret"
            path.write_text(answer["secret"] + "\n")
            path.chmod(0o600)
            env.start_agent(url, device, path, [
                f"{s}=127.0.0.1:{echo[device, s].port}" for s in ("ssh", "http")
            ])  # fmt: skip

        def online() -> bool:
            listed = json.loads(boss("devices", "--json"))
            return all(d["online"] for d in listed) and len(listed) == len(secrets)

        wait_for(online, 30, "the devices online")
        reach = {
            "partner": {("plc-1", "ssh"), ("plc-1", "http")},
            "customer": {("plc-2", "http")},
            "engineer": {("plc-2", "ssh")},
        }
        for who, allowed in reach.items():
            _login(env, url, who, PASSWORD)
            listed = {d["id"] for d in json.loads(_ok(_as(env, who, "devices", "--json")))}
            assert listed == {d for d, _ in allowed}, who
            for device, service in echo:
                result = _as(env, who, "proxy", device, service, stdin="ping")
                if (device, service) in allowed:
                    assert result.stdout == b"ping", (who, device, service, result.stderr)
                else:
                    assert result.returncode == 1 and result.stdout == b"", (who, device)
    finally:
        for server in echo.values():
            server.close()

    def exported() -> list[dict[str, object]]:
        return [json.loads(line) for line in boss("audit", "export").splitlines()]

    # Finished channels are written in batches (at most CHANNEL_LOG_DELAY later).
    wait_for(
        lambda: any(r["kind"] == "channel" and r["actor"] == "engineer" for r in exported()),
        10,
        "the last channel in the audit log",
    )
    records = exported()
    assert {r["org"] for r in records} == {"acme"}
    kinds = {(r["kind"], r["actor"]) for r in records}
    for expected in (("device_added", "boss"), ("user_added", "boss"), ("grant_added", "boss"),
                     ("team_member_added", "boss"), ("role_added", "boss"),
                     ("channel", "partner"), ("channel", "customer"), ("channel", "engineer"),
                     ("login", "engineer")):  # fmt: skip
        assert expected in kinds, expected
    assert "audit log intact" in _ok(_as(env, "super", "audit", "verify"))
    verify = _as(env, "boss", "audit", "verify")
    assert verify.returncode == 1 and b"super-admin" in verify.stderr


def test_admin_commands_need_a_login_or_a_data_dir(env: Env, tmp_path: Path) -> None:
    result = _as(env, "nobody", "user", "list")
    assert result.returncode == 1
    assert b"not logged in to a relay" in result.stderr and b"--data-dir" in result.stderr


def test_the_relay_session_works_for_the_api_from_the_relay_s_own_pages(env: Env) -> None:
    """The relay's pages may call the API with their session cookie; another site's page
    cannot make changes with it (Origin), and a form post is not JSON."""
    _, port, password = env.start_relay()
    assert password is not None
    url = f"https://127.0.0.1:{port}"
    api = Api(url, env.ca_file)
    form = urllib.parse.urlencode({"user": "admin", "password": password}).encode()
    status, headers, _ = api.raw(
        "POST", "/login", form,
        {"Origin": url, "Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert status == 303
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, body = api.raw("GET", "/api/v1/whoami", headers={"Cookie": cookie})
    assert status == 200 and json.loads(body)["user"] == "admin"
    token = json.dumps({"name": "from-the-page"}).encode()
    json_type = {"Content-Type": "application/json", "Cookie": cookie}
    status, _, body = api.raw("POST", "/api/v1/tokens", token, json_type)
    assert (status, json.loads(body)["error"]) == (403, "cross_site")
    status, _, body = api.raw(
        "POST", "/api/v1/tokens", token, {**json_type, "Origin": "https://evil.example"}
    )
    assert (status, json.loads(body)["error"]) == (403, "cross_site")
    status, _, body = api.raw(
        "POST", "/api/v1/tokens", b"name=x",
        {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie, "Origin": url},
    )  # fmt: skip
    assert status == 400
    status, _, body = api.raw("POST", "/api/v1/tokens", token, {**json_type, "Origin": url})
    assert status == 200 and json.loads(body)["name"] == "from-the-page"
    # Without the cookie, nothing.
    status, _, body = api.raw("GET", "/api/v1/whoami")
    assert (status, json.loads(body)["error"]) == (401, "unauthorized")
