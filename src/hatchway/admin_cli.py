"""Administration commands: devices, users, organisations, teams, roles, grants, settings
and the audit log.

Each command works one of two ways:

- **through the relay's REST API**, as the user logged in with ``hatchway login``: the
  relay checks what that user may do and records them in the audit log. This is the
  default once logged in.
- **directly on the relay's database** with ``--data-dir`` (or ``HATCHWAY_DATA_DIR``), for
  the operator on the relay's host: bootstrap and recovery, with every permission, as
  actor ``cli``. Without a login, ``./hatchway-data`` is used if it exists.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from hatchway.cliutil import api, fail, guard, open_store
from hatchway.text import printable

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="HATCHWAY_DATA_DIR",
    help="work on the relay's database in this directory instead of through its API",
)
org_option = click.option(
    "--org", default=None, help="the organisation (default: yours; offline: default)"
)
DEFAULT_DATA_DIR = Path("hatchway-data")


def _offline(data_dir: Path | None) -> Any | None:
    """The store when the command works on the database directly; None: use the API."""
    from hatchway.client.config import config_dir

    if data_dir is not None:
        return open_store(data_dir)
    if (config_dir() / "login.json").exists():
        return None
    if DEFAULT_DATA_DIR.is_dir():
        return open_store(DEFAULT_DATA_DIR)
    fail(
        "not logged in to a relay (hatchway login URL --user NAME), and no --data-dir "
        "for working on a relay's database directly"
    )


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _query(**params: Any) -> str:
    items = {k: v for k, v in params.items() if v is not None}
    return ("?" + urllib.parse.urlencode(items)) if items else ""


def _pages(path: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
    """Every item of a paged API list (``next`` is passed back as ``after``)."""
    after = params.pop("after", None)
    while True:
        answer = api("GET", path + _query(**params, after=after))
        yield from answer[key]
        after = answer.get("next")
        if after is None:
            return


def _read_password(password_stdin: bool, prompt: str = "password") -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(prompt, hide_input=True, confirmation_prompt=True)
    if not password:
        fail("empty password")
    return str(password)


# --- devices ----------------------------------------------------------------------------


@click.group()
def device() -> None:
    """Manage devices."""


@device.command("add")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help='print {"device": ..., "secret": ...}')
@org_option
@click.option("--tag", "tags", multiple=True, help="a tag (repeatable): grants can name it")
@data_dir_option
def device_add(
    device_id: str, as_json: bool, org: str | None, tags: tuple[str, ...], data_dir: Path | None
) -> None:
    """Create a device and print its secret (shown only this once)."""
    store = _offline(data_dir)
    if store is None:
        secret = api("POST", "/api/v1/devices", {"id": device_id, "tags": list(tags), "org": org})[
            "secret"
        ]
    else:
        secret = guard(lambda: store.add_device(device_id, org=org or "default", tags=tags))
    if as_json:
        click.echo(json.dumps({"device": device_id, "secret": secret}))
    else:
        click.echo(f"device {device_id} created. Its secret (shown only once):\n{secret}")


@device.command("list")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def device_list(as_json: bool, data_dir: Path | None) -> None:
    """List the devices (through the API: those you may see, with their state)."""
    store = _offline(data_dir)
    if store is None:
        items = [
            {"device": d["id"], "org": d.get("org"), "tags": d.get("tags", []),
             "online": d["online"]}
            for d in _pages("/api/v1/devices", "devices")
        ]  # fmt: skip
    else:
        items = [
            {"device": r.device_id, "org": r.org, "tags": list(r.tags),
             "created_at": r.created_at.isoformat()}
            for r in store.list_devices()
        ]  # fmt: skip
    if as_json:
        click.echo(json.dumps(items))
        return
    for item in items:
        last = ("online" if item["online"] else "offline") if "online" in item else (
            f"{datetime.fromisoformat(item['created_at']):%Y-%m-%d %H:%M}"
        )  # fmt: skip
        click.echo(f"{item['device']}\t{item['org']}\t{' '.join(item['tags']) or '-'}\t{last}")


@device.command("tag")
@click.argument("device_id")
@click.argument("tags", nargs=-1)
@data_dir_option
def device_tag(device_id: str, tags: tuple[str, ...], data_dir: Path | None) -> None:
    """Set a device's tags (none: remove them all)."""
    store = _offline(data_dir)
    if store is None:
        api("PATCH", f"/api/v1/devices/{_q(device_id)}", {"tags": list(tags)})
    else:
        guard(lambda: store.set_device_tags(device_id, tags))
    click.echo(f"device {device_id} tags: {' '.join(sorted(set(tags))) or '(none)'}")


@device.command("remove")
@click.argument("device_id")
@data_dir_option
def device_remove(device_id: str, data_dir: Path | None) -> None:
    """Remove a device (through the API its tunnel closes at once; offline, its secret
    stops working at its next connection)."""
    store = _offline(data_dir)
    if store is None:
        api("DELETE", f"/api/v1/devices/{_q(device_id)}")
    else:
        guard(lambda: store.remove_device(device_id))
    click.echo(f"device {device_id} removed")


# --- users ------------------------------------------------------------------------------

ROLE_CHOICE = click.Choice(["owner", "admin", "operator", "viewer", "user"])


@click.group()
def user() -> None:
    """Manage users."""


@user.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=ROLE_CHOICE,
    default="user",
    show_default=True,
    help="organisation-wide role (user: none, grants only)",
)
@org_option
@click.option("--superadmin", is_flag=True, help="may do everything in every organisation")
@click.option("--must-change-password", is_flag=True, help="at their first login")
@click.option("--password-stdin", is_flag=True, help="read the password from standard input")
@data_dir_option
def user_add(
    name: str,
    role: str,
    org: str | None,
    superadmin: bool,
    must_change_password: bool,
    password_stdin: bool,
    data_dir: Path | None,
) -> None:
    """Create a user."""
    store = _offline(data_dir)
    password = _read_password(password_stdin)
    if store is None:
        created = api(
            "POST", "/api/v1/users",
            {"name": name, "role": role, "password": password, "org": org,
             "superadmin": superadmin, "must_change_password": must_change_password},
        )  # fmt: skip
        org = created["org"]
    else:
        org = org or "default"
        guard(
            lambda: store.add_user(
                name, role, password, org=org, superadmin=superadmin,
                must_change_password=must_change_password,
            )
        )  # fmt: skip
    click.echo(f"user {name} created in {org} with role {role}")


@user.command("list")
@org_option
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def user_list(org: str | None, as_json: bool, data_dir: Path | None) -> None:
    """List the users (through the API: your organisation's)."""
    store = _offline(data_dir)
    if store is None:
        items = list(_pages("/api/v1/users", "users", org=org))
    else:
        from hatchway.store.audit import format_time

        items = [
            {"name": r.name, "org": r.org, "role": r.role, "superadmin": r.superadmin,
             "source": r.source, "created_at": format_time(r.created_at)}
            for r in store.list_users(org)
        ]  # fmt: skip
    if as_json:
        click.echo(json.dumps(items))
        return
    for item in items:
        extra = "\tsuperadmin" if item["superadmin"] else ""
        created = item["created_at"][:16].replace("T", " ")
        click.echo(f"{item['name']}\t{item['org']}\t{item['role']}\t{created}{extra}")


@user.command("role")
@click.argument("name")
@click.argument("role", type=ROLE_CHOICE)
@data_dir_option
def user_role(name: str, role: str, data_dir: Path | None) -> None:
    """Change a user's organisation-wide role."""
    store = _offline(data_dir)
    if store is None:
        api("PATCH", f"/api/v1/users/{_q(name)}", {"role": role})
    else:
        guard(lambda: store.set_user_role(name, role))
    click.echo(f"{name} is now {role}")


@user.command("remove")
@click.argument("name")
@data_dir_option
def user_remove(name: str, data_dir: Path | None) -> None:
    """Remove a user: their tokens and sessions end, their tunnels close."""
    store = _offline(data_dir)
    if store is None:
        api("DELETE", f"/api/v1/users/{_q(name)}")
    else:
        guard(lambda: store.remove_user(name))
    click.echo(f"user {name} removed")


@user.command("unlock")
@click.argument("name")
@data_dir_option
def user_unlock(name: str, data_dir: Path | None) -> None:
    """End a lockout after failed logins."""
    store = _offline(data_dir)
    if store is None:
        api("POST", f"/api/v1/users/{_q(name)}/unlock")
    else:
        guard(lambda: store.unlock(name))
    click.echo(f"user {name} unlocked")


@user.command("passwd")
@click.argument("name")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="read the password from standard input (your own: the current one first, then "
    "the new one, on two lines)",
)
@data_dir_option
def user_passwd(name: str, password_stdin: bool, data_dir: Path | None) -> None:
    """Set a user's password (their tokens and web sessions end), or change your own
    (your other tokens and sessions end)."""
    from hatchway.cliutil import login

    store = _offline(data_dir)
    if store is None and name == login().user:
        if password_stdin:
            current = sys.stdin.readline().rstrip("\r\n")
        else:
            current = click.prompt("current password", hide_input=True)
        new = _read_password(password_stdin, "new password")
        api("POST", "/api/v1/password", {"password": current, "new_password": new})
    elif store is None:
        password = _read_password(password_stdin)
        api("PATCH", f"/api/v1/users/{_q(name)}", {"password": password})
    else:
        password = _read_password(password_stdin)
        guard(lambda: store.set_password(name, password))
    click.echo(f"password of {name} changed")


@user.command("totp")
@click.argument("name")
@click.option("--confirm", "code", metavar="CODE", help="turn it on with a code from the app")
@click.option("--disable", is_flag=True, help="turn two-factor login off")
@click.option("--relay-name", default="relay", show_default=True, help="label in the app")
@data_dir_option
def user_totp(
    name: str, code: str | None, disable: bool, relay_name: str, data_dir: Path | None
) -> None:
    """Two-factor login (on the relay's host, with --data-dir): make a secret for an
    authenticator app, then confirm it.

    First `hatchway user totp NAME` prints the secret and an otpauth:// URI to add to the
    app; then `hatchway user totp NAME --confirm CODE` with a code the app shows turns it
    on. From then on logins need a code too.
    """
    from hatchway.auth.totp import provisioning_uri

    store = _offline(data_dir)
    if store is None:
        fail("two-factor setup is done on the relay's host for now: add --data-dir")
    if disable:
        guard(lambda: store.totp_disable(name))
        click.echo(f"two-factor login is off for {name}")
        return
    if code is not None:
        if not store.totp_confirm(name, code):
            fail("that code does not match the pending secret (run without --confirm first)")
        click.echo(f"two-factor login is on for {name}")
        return
    secret = guard(lambda: store.totp_begin(name))
    click.echo(f"secret: {secret}")
    click.echo(f"uri:    {provisioning_uri(secret, name, relay_name)}")
    click.echo(f"then:   hatchway user totp {name} --confirm CODE")


# --- settings -----------------------------------------------------------------------------


@click.group()
def settings() -> None:
    """Relay settings (super-admins): the password policy, LDAP."""


@settings.command("list")
@data_dir_option
def settings_list(data_dir: Path | None) -> None:
    """Show the password policy in force (defaults included) and the other settings."""
    store = _offline(data_dir)
    if store is None:
        stored = api("GET", "/api/v1/settings")["settings"]
        policy = None
    else:
        stored, policy = store.settings(), store.password_policy()
    if policy is not None:
        for name, value in sorted(vars(policy).items()):
            if name not in ("max_length", "reject_user_name"):
                click.echo(f"password.{name} = {str(value).lower()}")
        stored = {k: v for k, v in stored.items() if not k.startswith("password.")}
    for name, value in sorted(stored.items()):
        click.echo(f"{name} = {value}")


@settings.command("set")
@click.argument("name")
@click.argument("value")
@data_dir_option
def settings_set(name: str, value: str, data_dir: Path | None) -> None:
    """Change a setting, e.g. `password.min_length 16` or `password.require_special false`."""
    store = _offline(data_dir)
    if store is None:
        api("PUT", f"/api/v1/settings/{_q(name)}", {"value": value})
    else:
        guard(lambda: store.set_setting(name, value))
    click.echo(f"{name} = {value if name.startswith('ldap.') else value.lower()}")


# --- organisations, teams, roles, grants -----------------------------------------------------


@click.group()
def org() -> None:
    """Organisations (tenants)."""


@org.command("add")
@click.argument("name")
@data_dir_option
def org_add(name: str, data_dir: Path | None) -> None:
    """Create an organisation (super-admins)."""
    store = _offline(data_dir)
    if store is None:
        api("POST", "/api/v1/orgs", {"name": name})
    else:
        guard(lambda: store.add_org(name))
    click.echo(f"organisation {name} created")


@org.command("set")
@click.argument("name")
@click.option(
    "--require-totp/--no-require-totp",
    default=None,
    help="every user of the organisation must log in with a second factor",
)
@data_dir_option
def org_set(name: str, require_totp: bool | None, data_dir: Path | None) -> None:
    """Change an organisation's settings (its owners)."""
    if require_totp is None:
        fail("nothing to change: give --require-totp or --no-require-totp")
    store = _offline(data_dir)
    if store is None:
        api("PATCH", f"/api/v1/orgs/{_q(name)}", {"require_totp": require_totp})
    else:
        guard(lambda: store.set_org_require_totp(name, require_totp))
    state = "required" if require_totp else "optional"
    click.echo(f"two-factor login is {state} in {name}")


@org.command("list")
@data_dir_option
def org_list(data_dir: Path | None) -> None:
    """List the organisations."""
    store = _offline(data_dir)
    names = [o["name"] for o in api("GET", "/api/v1/orgs")["orgs"]] if store is None else (
        store.list_orgs()
    )  # fmt: skip
    for name in names:
        click.echo(name)


@org.command("remove")
@click.argument("name")
@data_dir_option
def org_remove(name: str, data_dir: Path | None) -> None:
    """Remove an organisation without users or devices (super-admins)."""
    store = _offline(data_dir)
    if store is None:
        api("DELETE", f"/api/v1/orgs/{_q(name)}")
    else:
        guard(lambda: store.remove_org(name))
    click.echo(f"organisation {name} removed")


@click.group()
def team() -> None:
    """Teams: users of one organisation that grants can name together."""


@team.command("add")
@click.argument("name")
@org_option
@data_dir_option
def team_add(name: str, org: str | None, data_dir: Path | None) -> None:
    """Create a team."""
    store = _offline(data_dir)
    if store is None:
        api("POST", "/api/v1/teams", {"name": name, "org": org})
    else:
        guard(lambda: store.add_team(name, org=org or "default"))
    click.echo(f"team {name} created")


@team.command("remove")
@click.argument("name")
@org_option
@data_dir_option
def team_remove(name: str, org: str | None, data_dir: Path | None) -> None:
    """Remove a team and its grants."""
    store = _offline(data_dir)
    if store is None:
        api("DELETE", f"/api/v1/teams/{_q(name)}{_query(org=org)}")
    else:
        guard(lambda: store.remove_team(name, org=org or "default"))
    click.echo(f"team {name} removed")


def _membership(name: str, user_name: str, member: bool, data_dir: Path | None) -> None:
    store = _offline(data_dir)
    if store is None:
        api("PUT" if member else "DELETE", f"/api/v1/teams/{_q(name)}/members/{_q(user_name)}")
    else:
        guard(lambda: store.set_team_member(name, user_name, member))
    click.echo(f"{user_name} {'joined' if member else 'left'} team {name}")


@team.command("join")
@click.argument("name")
@click.argument("user_name", metavar="USER")
@data_dir_option
def team_join(name: str, user_name: str, data_dir: Path | None) -> None:
    """Add USER to a team of their organisation."""
    _membership(name, user_name, True, data_dir)


@team.command("leave")
@click.argument("name")
@click.argument("user_name", metavar="USER")
@data_dir_option
def team_leave(name: str, user_name: str, data_dir: Path | None) -> None:
    """Remove USER from a team."""
    _membership(name, user_name, False, data_dir)


@team.command("list")
@click.option("--org", help="only this organisation's (through the API: default yours)")
@data_dir_option
def team_list(org: str | None, data_dir: Path | None) -> None:
    """List the teams and their members."""
    store = _offline(data_dir)
    if store is None:
        teams = [
            (t["org"], t["name"], t["members"])
            for t in api("GET", "/api/v1/teams" + _query(org=org))["teams"]
        ]
    else:
        teams = store.list_teams(org)
    for org_name, name, members in teams:
        click.echo(f"{org_name}/{name}: {' '.join(members) or '(no members)'}")


@click.group()
def role() -> None:
    """Custom roles: named sets of permissions, per organisation."""


@role.command("add")
@click.argument("name")
@click.option(
    "--permission",
    "permissions",
    multiple=True,
    required=True,
    help="devices.view, connect:* or connect:SERVICE, devices.manage, users.manage, "
    "audit.read, org.manage (repeatable)",
)
@org_option
@data_dir_option
def role_add(
    name: str, permissions: tuple[str, ...], org: str | None, data_dir: Path | None
) -> None:
    """Create a custom role."""
    store = _offline(data_dir)
    if store is None:
        api("POST", "/api/v1/roles", {"name": name, "permissions": list(permissions), "org": org})
    else:
        guard(lambda: store.add_role(name, permissions, org=org or "default"))
    click.echo(f"role {name} created: {' '.join(sorted(set(permissions)))}")


@role.command("list")
@org_option
@data_dir_option
def role_list(org: str | None, data_dir: Path | None) -> None:
    """List the roles: built-in, then the organisation's own."""
    from hatchway.auth.permissions import ROLE_PERMISSIONS

    store = _offline(data_dir)
    if store is None:
        roles = [
            (r["name"], r["permissions"], r["builtin"])
            for r in api("GET", "/api/v1/roles" + _query(org=org))["roles"]
        ]
    else:
        custom = guard(lambda: store.list_roles(org or "default"))
        roles = [(n, sorted(p), True) for n, p in ROLE_PERMISSIONS.items()]
        roles += [(n, sorted(p), False) for n, p in sorted(custom.items())]
    for name, perms, builtin in roles:
        label = " (built-in)" if builtin else ""
        click.echo(f"{name:<12}{label} {' '.join(perms) or '-'}")


@role.command("remove")
@click.argument("name")
@org_option
@data_dir_option
def role_remove(name: str, org: str | None, data_dir: Path | None) -> None:
    """Remove a custom role."""
    store = _offline(data_dir)
    if store is None:
        api("DELETE", f"/api/v1/roles/{_q(name)}{_query(org=org)}")
    else:
        guard(lambda: store.remove_role(name, org=org or "default"))
    click.echo(f"role {name} removed")


@click.group()
def grant() -> None:
    """Grants: a role on one device or on every device with a tag, for a user or a team."""


@grant.command("add")
@click.argument("role")
@click.option("--user", "user_name", help="the user")
@click.option("--team", help="every member of this team")
@click.option("--org", default=None, help="the team's organisation")
@click.option("--device", help="the device")
@click.option("--tag", help="every device with this tag (now and later)")
@data_dir_option
def grant_add(
    role: str,
    user_name: str | None,
    team: str | None,
    org: str | None,
    device: str | None,
    tag: str | None,
    data_dir: Path | None,
) -> None:
    """Give a user or a team ROLE (admin, operator, viewer or a custom role) on a
    device or a tag."""
    store = _offline(data_dir)
    if store is None:
        body = {"role": role, "user": user_name, "team": team, "org": org, "device": device,
                "tag": tag}  # fmt: skip
        grant_id = api("POST", "/api/v1/grants", {k: v for k, v in body.items() if v})["id"]
    else:
        grant_id = guard(
            lambda: store.add_grant(
                user_name, role, team=team, device=device, tag=tag, org=org or "default"
            )
        )
    target = f"device {device}" if device else f"tag {tag}"
    who = user_name if user_name else f"team {team}"
    click.echo(f"grant {grant_id}: {who} is {role} on {target}")


@grant.command("list")
@click.option("--user", "user_name", help="only those that apply to this user")
@org_option
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def grant_list(
    user_name: str | None, org: str | None, as_json: bool, data_dir: Path | None
) -> None:
    """List the grants."""
    store = _offline(data_dir)
    if store is None:
        items = list(_pages("/api/v1/grants", "grants", user=user_name, org=org))
    else:
        items = [g.__dict__ for g in store.list_grants(user_name, org=org)]
    if as_json:
        click.echo(json.dumps(items))
        return
    for g in items:
        target = f"device {g['device']}" if g["device"] else f"tag {g['tag']}"
        who = g["user"] if g["user"] else f"team {g['team']}"
        click.echo(f"{g['id']:>5} {who:<24} {g['role']:<12} {target}")


@grant.command("remove")
@click.argument("grant_id", type=int)
@data_dir_option
def grant_remove(grant_id: int, data_dir: Path | None) -> None:
    """Remove a grant (open channels it allowed close within seconds)."""
    store = _offline(data_dir)
    if store is None:
        api("DELETE", f"/api/v1/grants/{grant_id}")
    else:
        guard(lambda: store.remove_grant(grant_id))
    click.echo(f"grant {grant_id} removed")


# --- audit log ------------------------------------------------------------------------------


@click.group()
def audit() -> None:
    """The relay's hash-chained audit log."""


def _when(value: str | None, option: str) -> datetime | None:
    """An ISO-8601 time (UTC if no zone), or an age such as 15m, 2h, 7d."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[:-1].isdigit() and value[-1:] in units:
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: expected an ISO-8601 time or an age like 30m, 12h, 7d; got {value!r}")
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _audit_filters(f: Callable[..., None]) -> Callable[..., None]:
    for decorator in reversed(
        [
            click.option("--since", help="from this time (ISO-8601) or age (30m, 12h, 7d)"),
            click.option("--until", help="before this time or age"),
            click.option("--user", "actor", help="only what this user (or device) did"),
            click.option("--device", help="only records about this device"),
            click.option("--kind", help="only this kind of record (login, channel, ...)"),
            click.option("--org", help="only this organisation's (super-admins)"),
            data_dir_option,
        ]
    ):
        f = decorator(f)
    return f


def _audit_records(
    data_dir: Path | None, limit: int | None, filters: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Matching records as JSON objects, oldest first, from the API or the database."""
    since = _when(filters.pop("since"), "--since")
    until = _when(filters.pop("until"), "--until")
    store = _offline(data_dir)
    left = limit
    if store is None:
        params = {
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "user": filters["actor"], "device": filters["device"], "kind": filters["kind"],
            "org": filters["org"],
        }  # fmt: skip
        for record in _pages("/api/v1/audit", "records", **params):
            if left is not None:
                if left <= 0:
                    return
                left -= 1
            yield record
        return
    after = 0
    while left is None or left > 0:
        page = store.audit_records(
            after_id=after, limit=min(1000, left or 1000), since=since, until=until,
            actor=filters["actor"], device=filters["device"], kind=filters["kind"],
            org=filters["org"],
        )  # fmt: skip
        if not page:
            return
        for record in page:
            yield record.as_json()
        after = page[-1].id
        if left is not None:
            left -= len(page)


@audit.command("verify")
@data_dir_option
@click.option(
    "--expect-head",
    metavar="ID:HASH",
    help="also check the log still reaches this head (as printed by an earlier verify)",
)
def audit_verify(data_dir: Path | None, expect_head: str | None) -> None:
    """Recompute the hash chain; exit 1 if a record was changed, inserted or removed."""
    store = _offline(data_dir)
    result = api("GET", "/api/v1/audit/verify") if store is None else vars(store.audit_verify())
    if not result["ok"]:
        fail(f"audit log damaged at record {result['bad_id']}: {result['problem']}")
    if expect_head is not None:
        head_id, _, head_hash = expect_head.partition(":")
        if not head_id.isdigit() or len(head_hash) != 64:
            fail("--expect-head: expected ID:HASH")
        if store is None:
            found = api("GET", f"/api/v1/audit?after={int(head_id) - 1}&limit=1")["records"]
        else:
            found = [r.as_json() for r in store.audit_records(after_id=int(head_id) - 1, limit=1)]
        if not found or found[0]["id"] != int(head_id) or found[0]["hash"] != head_hash:
            fail(f"audit log damaged: record {head_id} is missing or no longer {head_hash}")
    click.echo(f"audit log intact: {result['records']} records")
    click.echo(f"head: {result['head_id']}:{result['head_hash']}")


@audit.command("list")
@_audit_filters
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON lines, as export")
def audit_list(data_dir: Path | None, limit: int, as_json: bool, **filters: Any) -> None:
    """Show audit records, oldest first."""
    for record in _audit_records(data_dir, limit, filters):
        if as_json:
            click.echo(json.dumps(record))
            continue
        details = " ".join(f"{k}={v}" for k, v in record["details"].items())
        where = f" device={record['device']}" if record["device"] else ""
        source = f" from={record['source']}" if record["source"] else ""
        line = (
            f"{record['id']:>6} {record['at']} {record['kind']:<19} "
            f"{record['actor']}{where}{source} {details}".rstrip()
        )
        click.echo(printable(line, 1 << 16))  # values from devices and clients


@audit.command("export")
@_audit_filters
def audit_export(data_dir: Path | None, **filters: Any) -> None:
    """Write the matching records as JSON lines to standard output."""
    for record in _audit_records(data_dir, None, filters):
        sys.stdout.write(json.dumps(record) + "\n")


@audit.command("prune")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    envvar="HATCHWAY_DATA_DIR",
    show_default=True,
    help="the relay's data directory",
)
@click.option("--older-than", required=True, help="remove records older than this age (e.g. 365d)")
def audit_prune(data_dir: Path, older_than: str) -> None:
    """Remove old records from the start of the chain, on the relay's host (it stays
    verifiable). The relay's --audit-retention-days does this daily."""
    removed = open_store(data_dir).audit_prune(_when(older_than, "--older-than"))
    click.echo(f"removed {removed} audit records")


ADMIN_GROUPS = (device, user, settings, org, team, role, grant, audit)
