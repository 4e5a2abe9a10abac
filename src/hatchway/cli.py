"""The ``hatchway`` command line (relay administration and the user's client)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from hatchway import __version__
from hatchway.errors import HatchwayError

T = TypeVar("T")

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("hatchway-data"),
    envvar="HATCHWAY_DATA_DIR",
    show_default=True,
    help="the relay's data directory (database, TLS files)",
)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"hatchway: {message}", err=True)
    sys.exit(code)


def _run(coro: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            if loop == "uvloop":
                raise click.UsageError("uvloop is not installed") from None
    return asyncio.run(coro)


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except HatchwayError as exc:
        _fail(str(exc))
        raise AssertionError from exc  # unreachable


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("websockets").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hatchway")
def cli() -> None:
    """Secure remote access to devices behind NAT."""


@cli.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.pass_context
def agent(ctx: click.Context) -> None:
    """Run the device agent (see 'hatchway agent --help')."""
    from hatchway.agent.main import main as agent_main

    sys.exit(agent_main(ctx.args))


# --- relay ------------------------------------------------------------------------------


@cli.command()
@data_dir_option
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="HOST:PORT to serve")
@click.option("--domain", default="localhost", show_default=True, help="the relay's domain")
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="certificate chain (PEM); reloaded on SIGHUP",
)
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="its key")
@click.option(
    "--loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    show_default=True,
    help="event loop implementation",
)
@click.option(
    "--max-channels",
    type=click.IntRange(1, 65536),
    default=1024,
    show_default=True,
    help="open channels per device tunnel and per client tunnel",
)
@click.option(
    "--web-max-body",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="largest request body (bytes) sent to a device's web UI; 0: no limit",
)
@click.option(
    "--web-cache-mb",
    type=click.IntRange(0, 1 << 20),
    default=0,
    show_default=True,
    help="cache this many MiB of each device's static web resources (0: no cache)",
)
@click.option(
    "--web-routing",
    type=click.Choice(["host", "path", "both"]),
    default="host",
    show_default=True,
    help="device web UIs at https://DEVICE.DOMAIN/ (host) or https://DOMAIN/d/DEVICE/ "
    "(path: no wildcard DNS needed, weaker isolation, see docs/WEB.md)",
)
@click.option(
    "--session-idle",
    type=click.IntRange(0),
    default=900,
    show_default=True,
    help="seconds after which an unused web session ends (0: never)",
)
@click.option(
    "--audit-retention-days",
    type=click.IntRange(0),
    default=365,
    show_default=True,
    help="remove audit records older than this (0: keep them forever)",
)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def server(
    data_dir: Path,
    listen: str,
    domain: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    loop: str,
    max_channels: int,
    web_max_body: int,
    web_cache_mb: int,
    web_routing: str,
    session_idle: int,
    audit_retention_days: int,
    verbose: bool,
) -> None:
    """Run the relay server."""
    from hatchway.agent.config import parse_host_port
    from hatchway.relay.server import RelayConfig, run_relay

    _setup_logging(verbose)
    host, port = _guard(lambda: parse_host_port(listen, "--listen"))
    config = RelayConfig(
        data_dir=data_dir,
        host=host,
        port=port,
        domain=domain.lower(),
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_channels=max_channels,
        web_max_body=web_max_body,
        web_cache_size=web_cache_mb << 20,
        web_routing=web_routing,
        audit_retention_days=audit_retention_days,
        session_idle=float(session_idle),
    )
    try:
        _run(run_relay(config), loop)
    except HatchwayError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot listen on {listen}: {exc.strerror or exc}")


def _store(data_dir: Path) -> Any:
    from hatchway.store.sql import SqlStore

    return _guard(lambda: SqlStore.open_data_dir(data_dir))


@cli.group()
def device() -> None:
    """Manage devices (offline, against the relay's data directory)."""


@device.command("add")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help='print {"device": ..., "secret": ...}')
@click.option("--org", default="default", show_default=True, help="its organisation")
@click.option("--tag", "tags", multiple=True, help="a tag (repeatable): grants can name it")
@data_dir_option
def device_add(
    device_id: str, as_json: bool, org: str, tags: tuple[str, ...], data_dir: Path
) -> None:
    """Create a device and print its secret (shown only this once)."""
    store = _store(data_dir)
    secret = _guard(lambda: store.add_device(device_id, org=org, tags=tags))
    if as_json:
        click.echo(json.dumps({"device": device_id, "secret": secret}))
    else:
        click.echo(f"device {device_id} created. Its secret (shown only once):\n{secret}")


@device.command("list")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def device_list(as_json: bool, data_dir: Path) -> None:
    """List the devices."""
    records = _store(data_dir).list_devices()
    if as_json:
        items = [
            {
                "device": r.device_id,
                "org": r.org,
                "tags": list(r.tags),
                "created_at": r.created_at.isoformat(),
            }
            for r in records
        ]
        click.echo(json.dumps(items))
        return
    for r in records:
        click.echo(
            f"{r.device_id}\t{r.org}\t{' '.join(r.tags) or '-'}\t{r.created_at:%Y-%m-%d %H:%M}"
        )


@device.command("tag")
@click.argument("device_id")
@click.argument("tags", nargs=-1)
@data_dir_option
def device_tag(device_id: str, tags: tuple[str, ...], data_dir: Path) -> None:
    """Set a device's tags (none: remove them all)."""
    store = _store(data_dir)
    _guard(lambda: store.set_device_tags(device_id, tags))
    click.echo(f"device {device_id} tags: {' '.join(sorted(set(tags))) or '(none)'}")


@device.command("remove")
@click.argument("device_id")
@data_dir_option
def device_remove(device_id: str, data_dir: Path) -> None:
    """Remove a device (its secret stops working at its next connection)."""
    store = _store(data_dir)
    _guard(lambda: store.remove_device(device_id))
    click.echo(f"device {device_id} removed")


@cli.group()
def user() -> None:
    """Manage users (offline, against the relay's data directory)."""


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    if not password:
        _fail("empty password")
    return password


@user.command("add")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["owner", "admin", "operator", "viewer", "user"]),
    default="user",
    show_default=True,
    help="organisation-wide role (user: none, grants only)",
)
@click.option("--org", default="default", show_default=True, help="the user's organisation")
@click.option("--superadmin", is_flag=True, help="may do everything in every organisation")
@click.option("--password-stdin", is_flag=True, help="read the password from standard input")
@data_dir_option
def user_add(
    name: str, role: str, org: str, superadmin: bool, password_stdin: bool, data_dir: Path
) -> None:
    """Create a user."""
    store = _store(data_dir)
    password = _read_password(password_stdin)
    _guard(lambda: store.add_user(name, role, password, org=org, superadmin=superadmin))
    click.echo(f"user {name} created in {org} with role {role}")


@user.command("list")
@data_dir_option
def user_list(data_dir: Path) -> None:
    """List the users."""
    for r in _store(data_dir).list_users():
        extra = "\tsuperadmin" if r.superadmin else ""
        click.echo(f"{r.name}\t{r.org}\t{r.role}\t{r.created_at:%Y-%m-%d %H:%M}{extra}")


@user.command("remove")
@click.argument("name")
@data_dir_option
def user_remove(name: str, data_dir: Path) -> None:
    """Remove a user and revoke their tokens."""
    store = _store(data_dir)
    _guard(lambda: store.remove_user(name))
    click.echo(f"user {name} removed")


@user.command("totp")
@click.argument("name")
@click.option("--confirm", "code", metavar="CODE", help="turn it on with a code from the app")
@click.option("--disable", is_flag=True, help="turn two-factor login off")
@click.option("--relay-name", default="relay", show_default=True, help="label in the app")
@data_dir_option
def user_totp(name: str, code: str | None, disable: bool, relay_name: str, data_dir: Path) -> None:
    """Two-factor login: make a secret for an authenticator app, then confirm it.

    First `hatchway user totp NAME` prints the secret and an otpauth:// URI to add to the
    app; then `hatchway user totp NAME --confirm CODE` with a code the app shows turns it
    on. From then on logins need a code too.
    """
    from hatchway.auth.totp import provisioning_uri

    store = _store(data_dir)
    if disable:
        _guard(lambda: store.totp_disable(name))
        click.echo(f"two-factor login is off for {name}")
        return
    if code is not None:
        if not store.totp_confirm(name, code):
            _fail("that code does not match the pending secret (run without --confirm first)")
        click.echo(f"two-factor login is on for {name}")
        return
    secret = _guard(lambda: store.totp_begin(name))
    click.echo(f"secret: {secret}")
    click.echo(f"uri:    {provisioning_uri(secret, name, relay_name)}")
    click.echo(f"then:   hatchway user totp {name} --confirm CODE")


@user.command("unlock")
@click.argument("name")
@data_dir_option
def user_unlock(name: str, data_dir: Path) -> None:
    """End a lockout after failed logins."""
    store = _store(data_dir)
    _guard(lambda: store.unlock(name))
    click.echo(f"user {name} unlocked")


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="read the password from standard input")
@data_dir_option
def user_passwd(name: str, password_stdin: bool, data_dir: Path) -> None:
    """Set a user's password."""
    store = _store(data_dir)
    password = _read_password(password_stdin)
    _guard(lambda: store.set_password(name, password))
    click.echo(f"password of {name} changed")


@cli.group()
def settings() -> None:
    """Relay settings (offline, against --data-dir): the password policy."""


@settings.command("list")
@data_dir_option
def settings_list(data_dir: Path) -> None:
    """Show the password policy in force (defaults included)."""
    policy = _store(data_dir).password_policy()
    for name, value in sorted(vars(policy).items()):
        if name != "max_length" and name != "reject_user_name":
            click.echo(f"password.{name} = {str(value).lower()}")


@settings.command("set")
@click.argument("name")
@click.argument("value")
@data_dir_option
def settings_set(name: str, value: str, data_dir: Path) -> None:
    """Change a setting, e.g. `password.min_length 16` or `password.require_special false`."""
    store = _store(data_dir)
    _guard(lambda: store.set_setting(name, value))
    click.echo(f"{name} = {value.lower()}")


# --- organisations and grants ------------------------------------------------------------


@cli.group()
def org() -> None:
    """Organisations (tenants), offline against --data-dir."""


@org.command("add")
@click.argument("name")
@data_dir_option
def org_add(name: str, data_dir: Path) -> None:
    """Create an organisation."""
    store = _store(data_dir)
    _guard(lambda: store.add_org(name))
    click.echo(f"organisation {name} created")


@org.command("set")
@click.argument("name")
@click.option(
    "--require-totp/--no-require-totp",
    default=None,
    help="every user must (or need not) log in with a second factor",
)
@data_dir_option
def org_set(name: str, require_totp: bool | None, data_dir: Path) -> None:
    """Change an organisation's settings."""
    store = _store(data_dir)
    if require_totp is not None:
        _guard(lambda: store.set_org_require_totp(name, require_totp))
        state = "required" if require_totp else "optional"
        click.echo(f"two-factor login is {state} in {name}")


@org.command("list")
@data_dir_option
def org_list(data_dir: Path) -> None:
    """List the organisations."""
    for name in _store(data_dir).list_orgs():
        click.echo(name)


@org.command("remove")
@click.argument("name")
@data_dir_option
def org_remove(name: str, data_dir: Path) -> None:
    """Remove an empty organisation."""
    store = _store(data_dir)
    _guard(lambda: store.remove_org(name))
    click.echo(f"organisation {name} removed")


@cli.group()
def team() -> None:
    """Teams: users of an organisation that grants name together."""


@team.command("add")
@click.argument("name")
@click.option("--org", default="default", show_default=True)
@data_dir_option
def team_add(name: str, org: str, data_dir: Path) -> None:
    """Create a team."""
    store = _store(data_dir)
    _guard(lambda: store.add_team(name, org=org))
    click.echo(f"team {name} created in {org}")


@team.command("remove")
@click.argument("name")
@click.option("--org", default="default", show_default=True)
@data_dir_option
def team_remove(name: str, org: str, data_dir: Path) -> None:
    """Remove a team and its grants."""
    store = _store(data_dir)
    _guard(lambda: store.remove_team(name, org=org))
    click.echo(f"team {name} removed")


@team.command("join")
@click.argument("name")
@click.argument("user_name", metavar="USER")
@data_dir_option
def team_join(name: str, user_name: str, data_dir: Path) -> None:
    """Add USER to a team of their organisation."""
    store = _store(data_dir)
    _guard(lambda: store.set_team_member(name, user_name, True))
    click.echo(f"{user_name} joined team {name}")


@team.command("leave")
@click.argument("name")
@click.argument("user_name", metavar="USER")
@data_dir_option
def team_leave(name: str, user_name: str, data_dir: Path) -> None:
    """Remove USER from a team."""
    store = _store(data_dir)
    _guard(lambda: store.set_team_member(name, user_name, False))
    click.echo(f"{user_name} left team {name}")


@team.command("list")
@click.option("--org", help="only this organisation's")
@data_dir_option
def team_list(org: str | None, data_dir: Path) -> None:
    """List the teams and their members."""
    for org_name, name, members in _store(data_dir).list_teams(org):
        click.echo(f"{org_name}/{name}: {' '.join(members) or '(no members)'}")


@cli.group()
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
@click.option("--org", default="default", show_default=True)
@data_dir_option
def role_add(name: str, permissions: tuple[str, ...], org: str, data_dir: Path) -> None:
    """Create a custom role."""
    store = _store(data_dir)
    _guard(lambda: store.add_role(name, permissions, org=org))
    click.echo(f"role {name} created in {org}: {' '.join(sorted(set(permissions)))}")


@role.command("list")
@click.option("--org", default="default", show_default=True)
@data_dir_option
def role_list(org: str, data_dir: Path) -> None:
    """List the roles: built-in, then the organisation's own."""
    from hatchway.auth.permissions import ROLE_PERMISSIONS

    for name, perms in ROLE_PERMISSIONS.items():
        click.echo(f"{name:<12} (built-in) {' '.join(sorted(perms)) or '-'}")
    roles = _guard(lambda: _store(data_dir).list_roles(org))
    for name, perms in sorted(roles.items()):
        click.echo(f"{name:<12} {' '.join(sorted(perms))}")


@role.command("remove")
@click.argument("name")
@click.option("--org", default="default", show_default=True)
@data_dir_option
def role_remove(name: str, org: str, data_dir: Path) -> None:
    """Remove a custom role."""
    store = _store(data_dir)
    _guard(lambda: store.remove_role(name, org=org))
    click.echo(f"role {name} removed")


@cli.group()
def grant() -> None:
    """Grants: a role on one device or on every device with a tag, for a user."""


@grant.command("add")
@click.argument("role")
@click.option("--user", "user_name", help="the user")
@click.option("--team", help="every member of this team")
@click.option("--org", default="default", show_default=True, help="the team's organisation")
@click.option("--device", help="the device")
@click.option("--tag", help="every device with this tag (now and later)")
@data_dir_option
def grant_add(
    role: str,
    user_name: str | None,
    team: str | None,
    org: str,
    device: str | None,
    tag: str | None,
    data_dir: Path,
) -> None:
    """Give a user or a team ROLE (admin, operator, viewer or a custom role) on a
    device or a tag."""
    store = _store(data_dir)
    grant_id = _guard(
        lambda: store.add_grant(user_name, role, team=team, device=device, tag=tag, org=org)
    )
    target = f"device {device}" if device else f"tag {tag}"
    who = user_name if user_name else f"team {team}"
    click.echo(f"grant {grant_id}: {who} is {role} on {target}")


@grant.command("list")
@click.option("--user", "user_name", help="only this user's")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def grant_list(user_name: str | None, as_json: bool, data_dir: Path) -> None:
    """List the grants."""
    grants = _store(data_dir).list_grants(user_name)
    if as_json:
        click.echo(json.dumps([g.__dict__ for g in grants]))
        return
    for g in grants:
        target = f"device {g.device}" if g.device else f"tag {g.tag}"
        who = g.user if g.user else f"team {g.team}"
        click.echo(f"{g.id:>5} {who:<24} {g.role:<12} {target}")


@grant.command("remove")
@click.argument("grant_id", type=int)
@data_dir_option
def grant_remove(grant_id: int, data_dir: Path) -> None:
    """Remove a grant (open channels it allowed close within seconds)."""
    store = _store(data_dir)
    _guard(lambda: store.remove_grant(grant_id))
    click.echo(f"grant {grant_id} removed")


# --- audit log ------------------------------------------------------------------------------


@cli.group()
def audit() -> None:
    """The relay's hash-chained audit log (offline, against --data-dir)."""


def _when(value: str | None, option: str) -> Any:
    """An ISO-8601 time (UTC if no zone), or an age such as 15m, 2h, 7d."""
    from datetime import UTC, datetime, timedelta

    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[:-1].isdigit() and value[-1:] in units:
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{option}: expected an ISO-8601 time or an age like 30m, 12h, 7d; got {value!r}")
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _audit_filters(f: Callable[..., None]) -> Callable[..., None]:
    for decorator in reversed(
        [
            click.option("--since", help="from this time (ISO-8601) or age (30m, 12h, 7d)"),
            click.option("--until", help="before this time or age"),
            click.option("--user", "actor", help="only what this user (or device) did"),
            click.option("--device", help="only records about this device"),
            click.option("--kind", help="only this kind of record (login, channel, ...)"),
            data_dir_option,
        ]
    ):
        f = decorator(f)
    return f


def _audit_pages(data_dir: Path, limit: int | None, **filters: Any) -> Any:
    store = _store(data_dir)
    after, left = 0, limit
    while left is None or left > 0:
        page = store.audit_records(after_id=after, limit=min(1000, left or 1000), **filters)
        if not page:
            return
        yield from page
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
def audit_verify(data_dir: Path, expect_head: str | None) -> None:
    """Recompute the hash chain; exit 1 if a record was changed, inserted or removed."""
    store = _store(data_dir)
    result = store.audit_verify()
    if not result.ok:
        _fail(f"audit log damaged at record {result.bad_id}: {result.problem}")
    if expect_head is not None:
        head_id, _, head_hash = expect_head.partition(":")
        if not head_id.isdigit() or len(head_hash) != 64:
            _fail("--expect-head: expected ID:HASH")
        found = store.audit_records(after_id=int(head_id) - 1, limit=1)
        if not found or found[0].id != int(head_id) or found[0].hash != head_hash:
            _fail(f"audit log damaged: record {head_id} is missing or no longer {head_hash}")
    click.echo(f"audit log intact: {result.records} records")
    click.echo(f"head: {result.head_id}:{result.head_hash}")


@audit.command("list")
@_audit_filters
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON lines, as export")
def audit_list(
    data_dir: Path,
    since: str | None,
    until: str | None,
    actor: str | None,
    device: str | None,
    kind: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Show audit records, oldest first."""
    from hatchway.store.audit import format_time

    filters = dict(
        since=_when(since, "--since"), until=_when(until, "--until"), actor=actor,
        device=device, kind=kind,
    )  # fmt: skip
    for record in _audit_pages(data_dir, limit, **filters):
        if as_json:
            click.echo(json.dumps(record.as_json()))
            continue
        details = " ".join(f"{k}={v}" for k, v in record.details.items())
        where = f" device={record.device}" if record.device else ""
        source = f" from={record.source}" if record.source else ""
        click.echo(
            f"{record.id:>6} {format_time(record.at)} {record.kind:<19} "
            f"{record.actor}{where}{source} {details}".rstrip()
        )


@audit.command("export")
@_audit_filters
def audit_export(
    data_dir: Path,
    since: str | None,
    until: str | None,
    actor: str | None,
    device: str | None,
    kind: str | None,
) -> None:
    """Write the matching records as JSON lines to standard output."""
    filters = dict(
        since=_when(since, "--since"), until=_when(until, "--until"), actor=actor,
        device=device, kind=kind,
    )  # fmt: skip
    for record in _audit_pages(data_dir, None, **filters):
        sys.stdout.write(json.dumps(record.as_json()) + "\n")


@audit.command("prune")
@data_dir_option
@click.option("--older-than", required=True, help="remove records older than this age (e.g. 365d)")
def audit_prune(data_dir: Path, older_than: str) -> None:
    """Remove old records from the start of the chain (it stays verifiable)."""
    removed = _store(data_dir).audit_prune(_when(older_than, "--older-than"))
    click.echo(f"removed {removed} audit records")


# --- client -----------------------------------------------------------------------------


def _login() -> Any:
    from hatchway.client.config import load_login

    return _guard(load_login)


@cli.command()
@click.argument("url")
@click.option("--user", "name", required=True, help="user name")
@click.option("--password-stdin", is_flag=True, help="read the password from standard input")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="verify the relay against this CA (the relay prints it at start)",
)
@click.option("--otp", help="one-time code from the authenticator app (two-factor login)")
def login(url: str, name: str, password_stdin: bool, ca_file: Path | None, otp: str | None) -> None:
    """Log in to a relay and store the API token."""
    from hatchway.client.config import Login, save_login
    from hatchway.client.relay_api import call
    from hatchway.errors import RelayError

    if not url.startswith("https://"):
        _fail("the relay URL must start with https://")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True)
    ca = str(ca_file.resolve()) if ca_file else None
    body = {"user": name, "password": password, "label": "cli"}
    if otp:
        body["otp"] = otp

    def attempt() -> Any:
        try:
            return call(url, "POST", "/api/v1/login", ca_file=ca, body=body)
        except RelayError as exc:
            if exc.code != "otp_required" or "otp" in body or not sys.stdin.isatty():
                raise
            body["otp"] = click.prompt("one-time code", hide_input=False)
            return call(url, "POST", "/api/v1/login", ca_file=ca, body=body)

    answer = _guard(attempt)
    path = save_login(Login(server=url.rstrip("/"), user=name, token=answer["token"], ca_file=ca))
    click.echo(f"logged in to {url} as {name} (token saved in {path})")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def devices(as_json: bool) -> None:
    """List the devices you may reach, with their state and services."""
    from hatchway.client.relay_api import call

    login_ = _login()
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        path = "/api/v1/devices" + (f"?after={after}" if after else "")

        def page(path: str = path) -> Any:
            return call(login_.server, "GET", path, ca_file=login_.ca_file, token=login_.token)

        answer = _guard(page)
        items.extend(answer["devices"])
        after = answer.get("next")
        if not after:
            break
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if not items:
        click.echo("no devices")
    for item in items:
        state = "online" if item["online"] else "offline"
        services = ",".join(item.get("services") or []) or "-"
        click.echo(f"{item['id']:<24} {state:<8} {services}")


@cli.group()
def token() -> None:
    """Your API tokens: named, scoped, expiring; shown once when created."""


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    from hatchway.client.relay_api import call

    login_ = _login()
    return _guard(
        lambda: call(
            login_.server, method, path, ca_file=login_.ca_file, token=login_.token, body=body
        )
    )


@token.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(["all", "read", "connect", "web", "tokens"]),
    help="what the token may do (repeatable; default all)",
)
@click.option("--expires-days", type=click.IntRange(1, 365), default=90, show_default=True)
def token_create(name: str, scopes: tuple[str, ...], expires_days: int) -> None:
    """Create a token and print it (it is not shown again)."""
    answer = _api(
        "POST",
        "/api/v1/tokens",
        {"name": name, "scopes": list(scopes or ("all",)), "expires_in_days": expires_days},
    )
    click.echo(answer["token"])
    click.echo(
        f"token {answer['id']} ({name}, scopes {' '.join(answer['scopes'])}) expires "
        f"{answer['expires_at']}; keep it safe: it is not shown again",
        err=True,
    )


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
def token_list(as_json: bool) -> None:
    """List your tokens (never the tokens themselves)."""
    items = _api("GET", "/api/v1/tokens")["tokens"]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    for item in items:
        scopes = " ".join(item["scopes"])
        used = item["last_used_at"] or "never used"
        click.echo(
            f"{item['id']:>5} {item['name']:<24} {scopes:<20} "
            f"expires {item['expires_at'] or 'never'}  {used}"
        )


@token.command("revoke")
@click.argument("token_id", type=int)
def token_revoke(token_id: int) -> None:
    """Revoke a token (and the web sessions opened with it)."""
    _api("DELETE", f"/api/v1/tokens/{token_id}")
    click.echo(f"token {token_id} revoked")


@cli.command("open")
@click.argument("device_id")
@click.option("--service", default=None, help="the web service (default: http, else https)")
@click.option("--path", "next_path", default="/", show_default=True, help="page to open")
@click.option(
    "--print-url", is_flag=True, help="print the one-time login URL instead of opening it"
)
def open_(device_id: str, service: str | None, next_path: str, print_url: bool) -> None:
    """Open a device's web UI in the browser, already logged in.

    The URL carries a one-time token valid for 60 seconds: `curl -L -c jar -b jar URL`
    follows it to the device's page.
    """
    import webbrowser

    from hatchway.client.relay_api import call

    login_ = _login()
    body: dict[str, str] = {"device": device_id, "next": next_path}
    if service is not None:
        body["service"] = service
    answer = _guard(
        lambda: call(
            login_.server,
            "POST",
            "/api/v1/web-sessions",
            ca_file=login_.ca_file,
            token=login_.token,
            body=body,
        )
    )
    url = answer["url"]
    if print_url:
        click.echo(url)
        return
    if not webbrowser.open(url):
        _fail(f"could not start a browser; open this link within 60 s:\n{url}")
    click.echo(f"opened {device_id} in the browser")


@cli.command()
@click.argument("device_id")
@click.argument("service")
@click.option(
    "--local-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="local port (default: a free one)",
)
@click.option("--bind", default="127.0.0.1", show_default=True, help="local address")
@click.option(
    "--mux",
    is_flag=True,
    help="carry every connection on one multiplexed tunnel to the relay: opens in ~2 ms "
    "instead of ~5 ms (no TLS handshake each), at some cost in bulk throughput",
)
def forward(device_id: str, service: str, local_port: int, bind: str, mux: bool) -> None:
    """Forward a local port to a device's service."""
    from hatchway.client.session import serve_forward_mux
    from hatchway.client.streams import serve_forward_streams

    serve_forward = serve_forward_mux if mux else serve_forward_streams

    login_ = _login()

    def listening(host: str, port: int) -> None:
        click.echo(f"listening on {host}:{port}")
        sys.stdout.flush()

    try:
        _run(serve_forward(login_, device_id, service, bind, local_port, listening))
    except HatchwayError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot listen on {bind}:{local_port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("device_id")
@click.argument("service")
def proxy(device_id: str, service: str) -> None:
    """Join standard input and output to a device's service (ssh ProxyCommand)."""
    from hatchway.client.streams import run_stdio

    login_ = _login()
    try:
        # The stdlib loop: uvloop aborts the process on some kinds of stdio.
        reason = _run(run_stdio(login_, device_id, service), "asyncio")
    except HatchwayError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)
    if reason:
        _fail(reason)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("target")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--service", default="ssh", show_default=True, help="the device's SSH service")
def ssh(target: str, ssh_args: tuple[str, ...], service: str) -> None:
    """Run OpenSSH to [USER@]DEVICE through the relay."""
    _login()  # fail early with a clear message
    user_part, _, device_id = target.rpartition("@")
    ssh_bin = shutil.which("ssh")
    if ssh_bin is None:
        _fail("OpenSSH's ssh is not installed")
        return
    proxy_command = f"{sys.executable} -m hatchway proxy {device_id} {service}"
    argv = [
        ssh_bin,
        "-o",
        f"ProxyCommand={proxy_command}",
        "-o",
        f"HostKeyAlias=hatchway-{device_id}",
        target if user_part else device_id,
        *ssh_args,
    ]
    os.execv(ssh_bin, argv)


def main() -> None:
    cli()
