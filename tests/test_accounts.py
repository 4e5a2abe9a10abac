"""Accounts through the REST API and the CLI on top of it: the bootstrap admin's first
login, self-service password change and logout, and an organisation admin setting up a
service partner, a customer and a support engineer who each reach exactly what they
should, with every step in the organisation's audit log."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.apiclient import Api
from tests.procs import HATCHWAY, Env, device_online, wait_for
from tests.test_integration import EchoServer
from tests.webclient import DOMAIN, WebClient, set_cookie_value

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


# --- sessions end with a revocation or a password change ---------------------------------

DEVICE_COOKIE = "__Host-hatchway-device"
RELAY_COOKIE = "__Host-hatchway"


class _DevicePage(http.server.ThreadingHTTPServer):
    """cam1's web UI: one page."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "9")
                self.end_headers()
                self.wfile.write(b"cam1 page")

            def log_message(self, *_args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@dataclass
class Relay:
    env: Env
    url: str
    api: Api  # the super-admin's token
    web: WebClient

    def token(self, user: str, password: str = PASSWORD) -> str:
        status, body = self.api.call(
            "POST", "/api/v1/login", {"user": user, "password": password}, token=""
        )
        assert status == 200, body
        return str(body["token"])

    def browser_login(self, user: str, password: str = PASSWORD) -> str:
        """Log in on the relay's page: the relay session cookie."""
        form = urllib.parse.urlencode({"user": user, "password": password}).encode()
        resp = self.web.request(
            "POST", "/login", device=None, body=form,
            headers={"Origin": self.web.origin(), "Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        assert resp.status == 303, resp
        return f"{RELAY_COOKIE}={set_cookie_value(resp, RELAY_COOKIE)}"

    def device_session(self, link: str) -> str:
        """Follow a one-time link into cam1's web UI: the device session cookie."""
        url = urllib.parse.urlsplit(link)
        resp = self.web.request("GET", f"{url.path}?{url.query}", device="cam1")
        assert resp.status == 303, resp
        return f"{DEVICE_COOKIE}={set_cookie_value(resp, DEVICE_COOKIE)}"

    def opened_from_page(self, relay_cookie: str) -> str:
        """/open/cam1 on the relay's pages, then the link: a device session."""
        resp = self.web.request("GET", "/open/cam1", device=None, cookie=relay_cookie)
        assert resp.status == 303 and "grant=" in (resp.header("location") or ""), resp
        return self.device_session(resp.header("location") or "")

    def opened_with_token(self, token: str) -> str:
        status, body = self.api.call(
            "POST", "/api/v1/web-sessions", {"device": "cam1", "service": "http"}, token=token
        )
        assert status == 200, body
        return self.device_session(body["url"])

    def whoami(self, credential: str) -> int:
        """The status of GET /whoami with a token or the relay's cookie."""
        if credential.startswith(RELAY_COOKIE + "="):
            status, _, _ = self.api.raw("GET", "/api/v1/whoami", headers={"Cookie": credential})
            return status
        return self.api.call("GET", "/api/v1/whoami", token=credential)[0]

    def mint_with_cookie(self, relay_cookie: str) -> int:
        status, _, _ = self.api.raw(
            "POST", "/api/v1/tokens", json.dumps({"name": "again"}).encode(),
            {"Content-Type": "application/json", "Cookie": relay_cookie, "Origin": self.url},
        )  # fmt: skip
        return status

    def page_works(self, device_cookie: str) -> bool:
        page = self.web.request("GET", "/", device="cam1", cookie=device_cookie)
        if page.status == 200:
            assert page.body == b"cam1 page"
            return True
        assert page.status == 303 and "/open/cam1" in (page.header("location") or ""), page
        return False


@pytest.fixture
def relay(env: Env) -> Iterator[Relay]:
    """A relay with the device cam1 online (its web UI on cam1's subdomain) and the
    operator alice."""
    page = _DevicePage()
    try:
        _, port, password = env.start_relay(extra=["--domain", DOMAIN])
        assert password is not None
        url = f"https://127.0.0.1:{port}"
        secret = env.add_device("cam1")
        env.start_agent(url, "cam1", secret, [f"http=127.0.0.1:{page.server_address[1]}"])
        api = Api(url, env.ca_file)
        relay = Relay(env, url, api, WebClient(port, env.ca_file))
        api.token = relay.token("admin", password)
        status, body = api.call(
            "POST", "/api/v1/users", {"name": "alice", "role": "operator", "password": PASSWORD}
        )
        assert status == 200, body
        env.login(url, "admin", password)
        wait_for(lambda: device_online(env, "cam1"), 20, "cam1 online")
        yield relay
    finally:
        page.shutdown()
        page.server_close()


@pytest.mark.parametrize("how", ["revoke", "reset"])
def test_revoking_tokens_or_resetting_the_password_ends_every_session(
    relay: Relay, how: str
) -> None:
    """DELETE /users/NAME/tokens and an administrator's password reset end the user's
    tokens, relay (browser) sessions and device web sessions at once: nothing of the old
    cookie calls the API, makes a token or opens a device."""
    token = relay.token("alice")
    cookie = relay.browser_login("alice")
    from_page, from_token = relay.opened_from_page(cookie), relay.opened_with_token(token)
    assert relay.whoami(token) == 200 and relay.whoami(cookie) == 200
    assert relay.page_works(from_page) and relay.page_works(from_token)
    if how == "revoke":
        status, body = relay.api.call("DELETE", "/api/v1/users/alice/tokens")
        assert (status, body["revoked"]) == (200, 1)
        kind = "tokens_revoked"
    else:
        status, body = relay.api.call("PATCH", "/api/v1/users/alice", {"password": NEW_PASSWORD})
        assert status == 200, body
        kind = "password_changed"
    # At once: no waiting for the relay's caches or its sweep.
    assert relay.whoami(token) == 401 and relay.whoami(cookie) == 401
    assert relay.mint_with_cookie(cookie) == 401
    opened = relay.web.request("GET", "/open/cam1", device=None, cookie=cookie)
    assert opened.status == 303 and "grant=" not in (opened.header("location") or "")
    assert not relay.page_works(from_page) and not relay.page_works(from_token)
    status, body = relay.api.call("GET", f"/api/v1/audit?kind={kind}")
    (record,) = [r for r in body["records"] if r["details"]["user"] == "alice"]
    assert record["details"]["sessions_ended"] >= 3  # the relay session and two of cam1
    # Logging in again works (with the new password after a reset).
    again = relay.token("alice", NEW_PASSWORD if how == "reset" else PASSWORD)
    assert relay.whoami(again) == 200


def test_changing_one_s_own_password_keeps_only_the_session_it_came_from(relay: Relay) -> None:
    """POST /password ends the user's other tokens and sessions (the old password opened
    them) but not the one the change was made with, nor the device sessions made from it."""
    other_token, other_cookie = relay.token("alice"), relay.browser_login("alice")
    other_page = relay.opened_from_page(other_cookie)
    cookie = relay.browser_login("alice")
    kept_page = relay.opened_from_page(cookie)
    status, _, raw = relay.api.raw(
        "POST", "/api/v1/password",
        json.dumps({"password": PASSWORD, "new_password": NEW_PASSWORD}).encode(),
        {"Content-Type": "application/json", "Cookie": cookie, "Origin": relay.url},
    )  # fmt: skip
    assert status == 200, raw
    assert relay.whoami(cookie) == 200 and relay.page_works(kept_page)
    assert relay.whoami(other_token) == 401 and relay.whoami(other_cookie) == 401
    assert not relay.page_works(other_page)
    # The same with a token: it stays, the browser's session ends.
    token, cookie = relay.token("alice", NEW_PASSWORD), relay.browser_login("alice", NEW_PASSWORD)
    from_token = relay.opened_with_token(token)
    status, body = relay.api.call(
        "POST", "/api/v1/password", {"password": NEW_PASSWORD, "new_password": PASSWORD}, token
    )
    assert status == 200, body
    assert relay.whoami(token) == 200 and relay.page_works(from_token)
    assert relay.whoami(cookie) == 401
