"""The ``hatchway`` command line (relay administration and the user's client)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import sys
import urllib.parse
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from hatchway import __version__
from hatchway.admin_cli import ADMIN_GROUPS
from hatchway.cliutil import api as _api
from hatchway.cliutil import fail as _fail
from hatchway.cliutil import guard as _guard
from hatchway.cliutil import login as _login
from hatchway.errors import HatchwayError, network_error_text

T = TypeVar("T")
#: ``hatchway devices`` lists at most this many (a page holds far fewer).
MAX_LISTED_DEVICES = 1_000_000

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("hatchway-data"),
    envvar="HATCHWAY_DATA_DIR",
    show_default=True,
    help="the relay's data directory (database, TLS files)",
)


def _run(coro: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            if loop == "uvloop":
                raise click.UsageError("uvloop is not installed") from None
    return asyncio.run(coro)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Even with -v: at DEBUG, websockets logs every handshake header (a bearer token)
    # and the frames (the users' traffic).
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


# --- client -----------------------------------------------------------------------------


def _new_password(password_stdin: bool) -> str:
    """The new password the relay asks for at first login."""
    if password_stdin:
        new = sys.stdin.readline().rstrip("\r\n")
        if not new:
            _fail(
                "the relay requires a new password before first use: give it as a second "
                "line on standard input, or log in without --password-stdin"
            )
        return new
    click.echo("The relay requires a new password before first use.", err=True)
    new = click.prompt("new password", hide_input=True, confirmation_prompt=True)
    return str(new)


@cli.command()
@click.argument("url")
@click.option("--user", "name", required=True, help="user name")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="read the password from standard input (and, if the relay requires a new one, "
    "the new password from the next line)",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="verify the relay against this CA (the relay prints it at start)",
)
@click.option("--otp", help="one-time code from the authenticator app (two-factor login)")
def login(url: str, name: str, password_stdin: bool, ca_file: Path | None, otp: str | None) -> None:
    """Log in to a relay and store the API token."""
    from hatchway.client.config import Login, prepare_config_dir, save_login
    from hatchway.client.relay_api import call
    from hatchway.errors import RelayError
    from hatchway.tunnel.connect import validate_relay_url

    if not url.startswith("https://"):
        _fail("the relay URL must start with https://")
    _guard(lambda: validate_relay_url(url))
    # Before the relay issues a token: it must have somewhere to go.
    _guard(prepare_config_dir)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            _fail("no password on standard input (--password-stdin)")
    else:
        password = click.prompt("password", hide_input=True)
    ca = str(ca_file.resolve()) if ca_file else None
    body = {"user": name, "password": password, "label": "cli"}
    if otp:
        body["otp"] = otp

    def attempt() -> Any:
        while True:
            try:
                return call(url, "POST", "/api/v1/login", ca_file=ca, body=body)
            except RelayError as exc:
                if exc.code == "otp_required" and "otp" not in body and sys.stdin.isatty():
                    body["otp"] = click.prompt("one-time code", hide_input=False)
                elif exc.code == "password_change_required" and "new_password" not in body:
                    body["new_password"] = _new_password(password_stdin)
                else:
                    raise

    answer = _guard(attempt)
    saved = Login(server=url.rstrip("/"), user=name, token=answer["token"], ca_file=ca)
    path = _guard(lambda: save_login(saved))
    click.echo(f"logged in to {url} as {name} (token saved in {path})")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def devices(as_json: bool) -> None:
    """List the devices you may reach, with their state and services."""
    from hatchway.client.relay_api import call

    login_ = _login()
    items: list[dict[str, Any]] = []
    after: str | None = None
    cursors: set[str] = set()
    while True:
        path = "/api/v1/devices" + (f"?after={urllib.parse.quote(after)}" if after else "")

        def page(path: str = path) -> Any:
            return call(login_.server, "GET", path, ca_file=login_.ca_file, token=login_.token)

        answer = _guard(page)
        items.extend(answer["devices"])
        after = answer.get("next")
        if not after:
            break
        # A relay whose pages go round in a circle, or a list past any relay's size, is
        # not followed for ever.
        if not isinstance(after, str) or after in cursors:
            _fail("the relay's device list does not move on; stopped")
        cursors.add(after)
        if len(items) > MAX_LISTED_DEVICES:
            _fail(f"more than {MAX_LISTED_DEVICES} devices: use the REST API (docs/API.md)")
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
@click.option(
    "--no-check",
    is_flag=True,
    help="do not first ask the relay whether the device is online and exposes the service "
    "(the relay's page then says why it cannot show the device)",
)
def open_(
    device_id: str, service: str | None, next_path: str, print_url: bool, no_check: bool
) -> None:
    """Open a device's web UI in the browser, already logged in.

    The URL carries a one-time token valid for 60 seconds: `curl -L -c jar -b jar URL`
    follows it to the device's page.
    """
    import webbrowser

    from hatchway.client.relay_api import call

    login_ = _login()
    if not no_check:
        _guard(lambda: _check_web_target(login_, device_id, service))
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


def _device_item(login_: Any, device_id: str, *, refusal_is_final: bool) -> dict[str, Any] | None:
    """The relay's entry for the device (online state, services), for the checks made
    before ``open``, ``forward`` and ``ssh`` go on. None when the check cannot be made
    with this token: one made only to connect, or (unless ``refusal_is_final``) any
    refusal, which the relay's page will explain. A relay that cannot be reached, a
    relay URL or proxy that cannot be used: a sentence and exit 1."""
    from hatchway.client.relay_api import call
    from hatchway.errors import RelayError

    path = "/api/v1/devices/" + urllib.parse.quote(device_id, safe="")
    try:
        item: dict[str, Any] = call(
            login_.server, "GET", path, ca_file=login_.ca_file, token=login_.token
        )
    except RelayError as exc:
        if exc.status == 0 or (refusal_is_final and exc.code != "insufficient_scope"):
            _fail(str(exc))
        return None
    except HatchwayError as exc:
        _fail(str(exc))
    return item


def _check_web_target(login_: Any, device_id: str, service: str | None) -> None:
    """Fail as ``forward`` would when the device is offline or does not expose the
    service, rather than hand out a URL that leads to an error page."""
    item = _device_item(login_, device_id, refusal_is_final=False)
    if item is None:
        return  # not visible with this token: the relay's answer to the grant says why
    if not item.get("online"):
        _fail(f"device {device_id} is offline")
    services = item.get("services") or []
    if service is None:
        if "http" not in services and "https" not in services:
            _fail(f"{device_id} exposes no web UI (no http or https service)")
    elif service not in services:
        _fail(f"service {service} is not exposed by {device_id}")


def _check_stream_target(
    login_: Any, device_id: str, service: str, *, offline_ok: bool = True
) -> None:
    """Before ``forward`` listens or ``ssh`` starts: fail at once for what no
    connection could get past (a relay that cannot be reached or refuses the token, a
    device that does not exist for this user, a service the online device does not
    expose). An offline device fails ``ssh``; for ``forward`` it is only noted: it may
    come back while ``forward`` runs."""
    item = _device_item(login_, device_id, refusal_is_final=True)
    if item is None:
        return  # a token made only to connect: its connections will tell
    if not item.get("online"):
        if not offline_ok:
            _fail(f"device {device_id} is offline")
        click.echo(
            f"hatchway: device {device_id} is offline for now: connections fail until it is back",
            err=True,
        )
    elif service not in (item.get("services") or []):
        _fail(f"service {service} is not exposed by {device_id}")


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
    "--mux/--no-mux",
    default=True,
    show_default=True,
    help="carry every connection on one multiplexed tunnel to the relay (a new connection "
    "costs one round trip, no TLS handshake); --no-mux opens one TLS WebSocket per "
    "connection instead",
)
def forward(device_id: str, service: str, local_port: int, bind: str, mux: bool) -> None:
    """Forward a local port to a device's service."""
    from hatchway.agent.config import validate_service_name
    from hatchway.auth.device import validate_device_id
    from hatchway.client.session import serve_forward_mux
    from hatchway.client.streams import serve_forward_streams

    serve_forward = serve_forward_mux if mux else serve_forward_streams
    if not bind.strip():
        _fail("--bind: give an address (0.0.0.0 for every interface)")
    _guard(lambda: validate_device_id(device_id))
    _guard(lambda: validate_service_name(service))
    login_ = _login()
    _check_stream_target(login_, device_id, service)

    def listening(host: str, port: int) -> None:
        try:
            click.echo(f"listening on {host}:{port}")
            sys.stdout.flush()
        except OSError:  # a closed pipe: whoever wanted the port is gone
            _fail("cannot write the listening address to standard output")

    try:
        _run(serve_forward(login_, device_id, service, bind, local_port, listening))
    except HatchwayError as exc:
        _fail(str(exc))
    except OSError as exc:
        where = f"{bind}:{local_port}" if local_port else bind
        _fail(f"cannot listen on {where}: {network_error_text(exc)}")
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
        sys.exit(1)  # the reason is on standard error already


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("target")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--service", default="ssh", show_default=True, help="the device's SSH service")
def ssh(target: str, ssh_args: tuple[str, ...], service: str) -> None:
    """Run OpenSSH to [USER@]DEVICE through the relay."""
    from hatchway.agent.config import validate_service_name
    from hatchway.auth.device import validate_device_id

    user, at, device_id = target.rpartition("@")
    if not device_id or (at and not user):
        _fail(f"expected [USER@]DEVICE, got {target!r}")
    _guard(lambda: validate_device_id(device_id))
    _guard(lambda: validate_service_name(service))
    login_ = _login()  # fail early with a clear message
    ssh_bin = shutil.which("ssh")
    if ssh_bin is None:
        _fail("OpenSSH's ssh is not installed (no ssh on PATH)")
    _check_stream_target(login_, device_id, service, offline_ok=False)
    # ssh hands ProxyCommand to the shell and expands %-tokens in it first: quote every
    # word for the shell, then double every % (a path may hold both). ssh runs it in the
    # user's current directory, which ``-m`` would put first on sys.path: -P (safe
    # path) keeps a ./hatchway there from running instead of this one.
    words = [sys.executable, "-P", "-m", "hatchway", "proxy", device_id, service]
    proxy_command = " ".join(shlex.quote(word) for word in words).replace("%", "%%")
    argv = [
        ssh_bin,
        "-o",
        f"ProxyCommand={proxy_command}",
        "-o",
        f"HostKeyAlias=hatchway-{device_id}",
        *(["-l", user] if user else []),  # given apart: a user name is never an option
        device_id,
        *ssh_args,
    ]
    os.execv(ssh_bin, argv)


def main() -> None:
    try:
        cli()
    except HatchwayError as exc:  # one a command did not expect: still one sentence
        _fail(str(exc))


for _group in ADMIN_GROUPS:
    cli.add_command(_group)
