"""Optional LDAP bind authentication, with directory groups mapped to Hatchway roles.

A user proves who they are by binding to the directory as ``user_dn`` (their name put
into a template) with their password; Hatchway never reads or compares password hashes.
After a successful bind the same connection searches for the groups the user is a member
of, and the first group in ``LdapConfig.roles`` (priority order) gives the organisation
role.

Decisions worth knowing, mostly about ldap3's defaults:

- An empty password is refused before any connection: a simple bind with a DN and no
  password is an *unauthenticated* bind, which servers answer with success (RFC 4513
  5.1.2), so "bind succeeded" would not mean "password checked".
- User names are restricted to a conservative alphabet, then escaped anyway (for the DN
  and for the group filter), so no name can change the DN or the filter it goes into.
- ldap3's ``Tls()`` verifies nothing by default. Every TLS connection here (ldaps:// or
  StartTLS) has the standard library check the chain to ``ca_file`` (or the system CAs)
  and the host name during the handshake (``_VerifyingTls``).
- Referrals are not followed: ldap3 would bind to the referred server with the user's
  password, handing it to whichever host a directory entry names.
- ldap3 packs ``receive_timeout`` as a C integer (a float raises ``struct.error``): it
  is given whole seconds, rounded up.
- The group search runs on the user's own connection, with the user's own read rights:
  no service account, no stored directory password.

The configuration lives in the relay's settings (``ldap.*``, ``docs/LDAP.md``):
``check_setting`` checks one key as it is set, ``LdapConfig.from_settings`` the whole
when it is used (``RelayServer.authenticate_user``).

Only a wrong password or an unknown user gives ``None``; anything else that goes wrong
with the directory raises ``LdapUnavailable`` (including the KeyError, IndexError... that
ldap3's decoder raises on a reply that is not LDAP), so that callers can tell "refused"
from "could not check".
"""

from __future__ import annotations

import math
import re
import ssl
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from ldap3 import NONE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.core.results import RESULT_INVALID_CREDENTIALS, RESULT_SUCCESS
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from hatchway.auth.permissions import USER_ROLES
from hatchway.errors import ConfigError, HatchwayError

#: Roles a directory group can give (``user`` means no role: leave the group unmapped).
LDAP_ROLES = tuple(role for role in USER_ROLES if role != "user")
DEFAULT_GROUP_FILTER = "(|(member={dn})(uniqueMember={dn})(memberUid={user}))"
#: The longest ldap.timeout: a login waits up to about this long per network step.
MAX_TIMEOUT = 60.0
#: Default and longest lifetime of a directory user's API tokens (``ldap.token_hours``).
DEFAULT_TOKEN_HOURS = 12
MAX_TOKEN_HOURS = 24 * 30
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SETTINGS = (
    "ldap.url",
    "ldap.user_dn",
    "ldap.group_base",
    "ldap.group_filter",
    "ldap.roles",
    "ldap.org",
    "ldap.starttls",
    "ldap.ca_file",
    "ldap.timeout",
    "ldap.token_hours",
)


@dataclass(frozen=True)
class LdapConfig:
    """Where the directory is and how its users and groups are found.

    Values are checked when the object is made, so that a mistake shows at start-up
    rather than at the first login (``ConfigError``).
    """

    url: str  # ldap://host:port or ldaps://host:port
    user_dn: str  # template with {user}, e.g. "uid={user},ou=people,dc=example,dc=org"
    group_base: str  # where groups are searched, e.g. "ou=groups,dc=example,dc=org"
    group_filter: str = DEFAULT_GROUP_FILTER
    roles: tuple[tuple[str, str], ...] = ()  # (group CN, hatchway role) in priority order
    org: str = "default"  # organisation LDAP users belong to
    starttls: bool = False
    ca_file: str | None = None  # verify the server (ldaps/StartTLS) against it; else system CAs
    timeout: float = 5.0
    # A directory user's API tokens last at most this long: the relay cannot ask the
    # directory whether they still exist, so a user removed there loses access when the
    # token expires (docs/LDAP.md).
    token_hours: int = DEFAULT_TOKEN_HOURS

    @property
    def token_ttl(self) -> timedelta:
        return timedelta(hours=self.token_hours)

    def __post_init__(self) -> None:
        _parse_url(self.url)
        _check_user_dn(self.user_dn)
        _check_dn("ldap.group_base", self.group_base)
        _check_group_filter(self.group_filter)
        _check_role_pairs(self.roles)
        if not self.org:
            raise ConfigError("ldap.org is empty")
        if self.starttls and self.url.lower().startswith("ldaps:"):
            raise ConfigError("ldap.starttls is for ldap:// URLs (ldaps:// is TLS from the start)")
        if self.ca_file is not None:
            _check_ca_file(self.ca_file)
        _check_timeout_range(self.timeout)
        _check_token_hours_range(self.token_hours)

    @classmethod
    def from_settings(cls, settings: dict[str, str]) -> LdapConfig | None:
        """The LDAP configuration in ``settings``; ``None`` when ``ldap.url`` is unset or empty.

        Keys: ldap.url, ldap.user_dn, ldap.group_base, ldap.group_filter, ldap.roles
        ("support=admin,partners=operator"), ldap.org, ldap.starttls ("true"/"false"),
        ldap.ca_file, ldap.timeout, ldap.token_hours. Other keys are ignored, except
        unknown ``ldap.*`` ones (a misspelt option would otherwise be silently dropped).
        """
        url = settings.get("ldap.url", "").strip()
        if not url:
            return None
        unknown = sorted(
            key for key in settings if key.startswith("ldap.") and key not in _SETTINGS
        )
        if unknown:
            raise ConfigError(
                f"unknown LDAP settings: {', '.join(unknown)} (known: {', '.join(_SETTINGS)})"
            )

        def get(key: str) -> str | None:
            value = settings.get(key, "").strip()
            return value or None

        def required(key: str) -> str:
            value = get(key)
            if value is None:
                raise ConfigError(f"{key} is required when ldap.url is set")
            return value

        return cls(
            url=url,
            user_dn=required("ldap.user_dn"),
            group_base=required("ldap.group_base"),
            group_filter=get("ldap.group_filter") or DEFAULT_GROUP_FILTER,
            roles=_parse_roles(get("ldap.roles") or ""),
            org=get("ldap.org") or "default",
            starttls=_parse_bool("ldap.starttls", get("ldap.starttls") or "false"),
            ca_file=get("ldap.ca_file"),
            timeout=_parse_timeout(get("ldap.timeout") or "5"),
            token_hours=_parse_token_hours(get("ldap.token_hours") or str(DEFAULT_TOKEN_HOURS)),
        )


@dataclass(frozen=True)
class LdapUser:
    """A user the directory accepted."""

    dn: str
    groups: tuple[str, ...]  # CNs of the groups the user is in
    role: str | None  # the first mapped role found in config.roles order, None if no group maps


class LdapUnavailable(HatchwayError):
    """The directory could not be reached or answered an error (not a wrong password)."""


def check_setting(name: str, value: str) -> str:
    """``value`` as it should be stored for the setting ``name``; ``""`` unsets it.

    Each key is checked on its own, so that they can be set in any order (``ldap.url``
    first, say); whether they make a complete configuration together is checked when it
    is used (``LdapConfig.from_settings``). Values are stripped; ``ldap.starttls`` is
    stored as ``true``/``false``. Raises ``ConfigError`` for an unknown ``ldap.*`` key
    or a bad value.
    """
    check = _SETTING_CHECKS.get(name)
    if check is None:
        raise ConfigError(f"unknown LDAP setting {name!r} (known: {', '.join(_SETTINGS)})")
    value = value.strip()
    return check(value) if value else ""


def ldap_authenticate(config: LdapConfig, user: str, password: str) -> LdapUser | None:
    """Bind to the directory as ``user``; the user and their role, or ``None`` if refused.

    Synchronous and blocking (up to about ``config.timeout`` per network step): callers
    run it in a thread. ``None`` for a wrong password, an unknown user, an empty password
    or a name outside ``[A-Za-z0-9][A-Za-z0-9._@-]{0,63}``; the last two without
    contacting the server. Raises ``LdapUnavailable`` when the directory cannot be
    reached, TLS fails, or the directory answers with any other error.
    """
    if not password or not _USER_NAME.fullmatch(user):
        return None
    dn = config.user_dn.format(user=escape_rdn(user))
    try:
        connection = Connection(
            _server(config),
            user=dn,
            password=password,
            authentication=SIMPLE,
            auto_bind=False,
            auto_referrals=False,
            read_only=True,
            receive_timeout=math.ceil(config.timeout),
        )
    except LDAPException as exc:  # e.g. an unreadable ca_file
        raise LdapUnavailable(f"LDAP configuration refused by ldap3: {exc}") from exc
    try:
        return _bind_and_search(connection, config, dn, user)
    except LdapUnavailable:
        raise
    except Exception as exc:
        # Not only LDAPException: on a reply that is not LDAP (say, from an HTTP server)
        # ldap3's decoder raises KeyError, IndexError, TypeError, AttributeError...
        # ldap3's own messages nest tuples of tuples; its last_error is the readable one.
        reason = connection.last_error or f"{type(exc).__name__}: {exc}"
        raise LdapUnavailable(f"LDAP server {config.url}: {reason}") from exc
    finally:
        _close(connection)


def _bind_and_search(
    connection: Connection, config: LdapConfig, dn: str, user: str
) -> LdapUser | None:
    connection.open()
    if config.starttls and not connection.start_tls():
        raise LdapUnavailable(f"LDAP server {config.url}: StartTLS failed")
    if not connection.bind():
        if connection.result["result"] == RESULT_INVALID_CREDENTIALS:
            return None
        raise LdapUnavailable(f"LDAP server {config.url}: bind: {_describe(connection.result)}")
    groups = _search_groups(connection, config, dn, user)
    return LdapUser(dn=dn, groups=groups, role=_role(config.roles, groups))


def _close(connection: Connection) -> None:
    """Unbind, which closes the connection, and close whatever socket ldap3 left open."""
    try:
        connection.unbind()
    except Exception:  # a broken connection: ldap3 may raise anything (see above)
        pass
    finally:
        # A failed connect() leaves its socket in place, and unbind() skips connections
        # that never opened: without this it lingers until garbage collection.
        if connection.socket is not None:
            connection.socket.close()


def _search_groups(
    connection: Connection, config: LdapConfig, dn: str, user: str
) -> tuple[str, ...]:
    """The CNs of the groups ``config.group_filter`` finds for the bound user."""
    search_filter = config.group_filter.format(
        dn=escape_filter_chars(dn), user=escape_filter_chars(user)
    )
    connection.search(
        config.group_base,
        search_filter,
        search_scope=SUBTREE,
        attributes=["cn"],
        time_limit=math.ceil(config.timeout),
    )
    if connection.result["result"] != RESULT_SUCCESS:
        raise LdapUnavailable(
            f"LDAP server {config.url}: group search: {_describe(connection.result)}"
        )
    groups: list[str] = []
    for entry in connection.response or ():
        if entry.get("type") != "searchResEntry":
            continue  # search references: not followed (see the module docstring)
        values = entry.get("attributes", {}).get("cn", [])
        for cn in [values] if isinstance(values, str) else values:
            if str(cn) not in groups:
                groups.append(str(cn))
    return tuple(groups)


def _role(roles: tuple[tuple[str, str], ...], groups: tuple[str, ...]) -> str | None:
    """The role of the first mapped group the user is in (CNs compare case-insensitively,
    as the directory compares them)."""
    member_of = {group.casefold() for group in groups}
    for group, role in roles:
        if group.casefold() in member_of:
            return role
    return None


def _server(config: LdapConfig) -> Server:
    scheme, host, port = _parse_url(config.url)
    tls = None
    if scheme == "ldaps" or config.starttls:
        tls = _VerifyingTls(ca_certs_file=config.ca_file, sni=host)
    return Server(
        host,
        port=port,
        use_ssl=scheme == "ldaps",
        tls=tls,
        get_info=NONE,  # no schema or root DSE reads: one bind and one search
        connect_timeout=config.timeout,
    )


class _VerifyingTls(Tls):
    """TLS that verifies the server the way the standard library does.

    ldap3's own ``Tls`` verifies nothing by default, and when told to, turns the
    context's host name check off and runs its own afterwards (with the deprecated
    ``ssl.match_hostname``), leaking the socket when that check fails. Here the
    handshake itself checks the chain (``ca_file`` or the system CAs) and the host name
    (``sni``), and a failed handshake closes its socket. ldap3 calls this for ldaps://
    when connecting and for StartTLS after the server agreed.
    """

    def wrap_socket(self, connection: Connection, do_handshake: bool = False) -> None:
        context = ssl.create_default_context(cafile=self.ca_certs_file)
        connection.socket = context.wrap_socket(connection.socket, server_hostname=self.sni)


def _parse_url(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an ldap:// or ldaps:// URL. Parsed here rather than by
    ldap3, which rejects a trailing slash and misreads some IPv6 forms."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"ldap.url is not a valid URL: {url!r} ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise ConfigError(f"ldap.url must start with ldap:// or ldaps://: {url!r}")
    if not parts.hostname:
        raise ConfigError(f"ldap.url has no host: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"ldap.url must be ldap[s]://host[:port] only: {url!r}")
    return scheme, parts.hostname, port or (636 if scheme == "ldaps" else 389)


def _template_fields(template: str, key: str) -> set[str]:
    """The ``{field}`` names in a str.format template."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:  # e.g. a lone "{" (write "{{" for a literal brace)
        raise ConfigError(f"{key} is not a valid template: {template!r} ({exc})") from exc


def _check_user_dn(template: str) -> str:
    if _template_fields(template, "ldap.user_dn") != {"user"}:
        raise ConfigError(f"ldap.user_dn must contain {{user}} (and no other field): {template!r}")
    _check_dn("ldap.user_dn", template.format(user="x"))
    return template


def _check_dn(key: str, dn: str) -> str:
    if not dn:
        raise ConfigError(f"{key} is empty")
    try:
        parse_dn(dn)
    except LDAPException as exc:
        raise ConfigError(f"{key} is not a valid DN: {dn!r} ({exc})") from exc
    return dn


def _check_group_filter(template: str) -> str:
    """Only ``{dn}`` and ``{user}``, and a valid filter once they are filled in (a
    mistake here would otherwise show as an error from the directory at every login)."""
    if not _template_fields(template, "ldap.group_filter") <= {"dn", "user"}:
        raise ConfigError(f"ldap.group_filter may only use {{dn}} and {{user}}: {template!r}")
    example = template.format(dn=escape_filter_chars("uid=x,dc=example,dc=org"), user="x")
    try:
        parse_filter(example, None, False, False, None, False)  # type: ignore[no-untyped-call]
    except Exception as exc:  # LDAPInvalidFilterError, and whatever else ldap3 raises
        raise ConfigError(f"ldap.group_filter is not a valid LDAP filter: {template!r}") from exc
    return template


def _check_roles(value: str) -> str:
    _parse_roles(value)
    return value


def _check_role_pairs(roles: tuple[tuple[str, str], ...]) -> None:
    for group, role in roles:
        if not group:
            raise ConfigError("ldap.roles: empty group name")
        if role not in LDAP_ROLES:
            known = ", ".join(LDAP_ROLES)
            raise ConfigError(f"ldap.roles: unknown role {role!r} for {group!r} (one of {known})")


def _check_ca_file(path: str) -> str:
    # Absolute: the relay, not the shell that set it, opens the file.
    if not Path(path).is_absolute():
        raise ConfigError(f"ldap.ca_file must be an absolute path: {path}")
    if not Path(path).is_file():
        raise ConfigError(f"ldap.ca_file: no such file: {path}")
    return path


def _check_timeout(value: str) -> str:
    _check_timeout_range(_parse_timeout(value))
    return value


def _check_timeout_range(timeout: float) -> None:
    # Bounded: a login waits for the directory while holding one of the directory slots.
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        raise ConfigError(
            f"ldap.timeout must be a positive number of seconds, at most {MAX_TIMEOUT:g}: {timeout}"
        )


def _check_token_hours(value: str) -> str:
    _check_token_hours_range(_parse_token_hours(value))
    return value


def _check_token_hours_range(hours: int) -> None:
    if not 1 <= hours <= MAX_TOKEN_HOURS:
        raise ConfigError(
            f"ldap.token_hours must be a whole number of hours from 1 to {MAX_TOKEN_HOURS}: {hours}"
        )


def _parse_token_hours(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"ldap.token_hours must be a whole number of hours: {value!r}") from None


def _check_org(value: str) -> str:
    return value  # not empty (check_setting); that it exists is the store's business


def _check_url(url: str) -> str:
    _parse_url(url)
    return url


def _check_starttls(value: str) -> str:
    return "true" if _parse_bool("ldap.starttls", value) else "false"


_SETTING_CHECKS: dict[str, Callable[[str], str]] = {
    "ldap.url": _check_url,
    "ldap.user_dn": _check_user_dn,
    "ldap.group_base": lambda dn: _check_dn("ldap.group_base", dn),
    "ldap.group_filter": _check_group_filter,
    "ldap.roles": _check_roles,
    "ldap.org": _check_org,
    "ldap.starttls": _check_starttls,
    "ldap.ca_file": _check_ca_file,
    "ldap.timeout": _check_timeout,
    "ldap.token_hours": _check_token_hours,
}


def _parse_roles(value: str) -> tuple[tuple[str, str], ...]:
    """``"support=admin,partners=operator"`` -> ``(("support", "admin"), ...)``."""
    roles: list[tuple[str, str]] = []
    for item in value.split(","):
        if not item.strip():
            continue
        group, sep, role = item.rpartition("=")
        if not sep:
            raise ConfigError(f"ldap.roles: expected GROUP=ROLE, got {item.strip()!r}")
        roles.append((group.strip(), role.strip()))
    _check_role_pairs(tuple(roles))
    return tuple(roles)


def _parse_bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{key} must be true or false: {value!r}")


def _parse_timeout(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"ldap.timeout must be a number of seconds: {value!r}") from None


def _describe(result: dict[str, object]) -> str:
    """An LDAP result for an error message: ``noSuchObject (32): ...``."""
    message = result.get("message") or "no message"
    return f"{result.get('description')} ({result.get('result')}): {message}"
