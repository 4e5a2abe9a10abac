"""The agent's configuration: a TOML file, command-line flags on top."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatchway.auth.device import validate_device_id
from hatchway.errors import ConfigError
from hatchway.files import read_small_text
from hatchway.tunnel.connect import (
    ProxyConfig,
    check_host_name,
    proxy_from_environment,
    relay_websocket_url,
    validate_relay_url,
)

SERVICE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_SECRET_FILE = 4096
#: An agent's TOML file: a few services and options, far below this.
MAX_CONFIG_FILE = 1024 * 1024


@dataclass(frozen=True)
class ServiceTarget:
    """A service the agent exposes: the only places it will ever connect to.

    ``tls``: the agent speaks TLS to the service (a device's own HTTPS web server),
    verifying it against ``ca_file`` when one is given (name: ``server_name`` or the
    host) and not at all otherwise, since devices mostly have self-signed certificates.
    ``host_header``: for web services, the Host the relay sends instead of the
    browser's (for web servers that only answer to their own name).
    """

    name: str
    host: str
    port: int
    tls: bool = False
    ca_file: Path | None = None
    server_name: str | None = None
    host_header: str | None = None

    @property
    def is_gateway(self) -> bool:
        return self.host not in ("localhost", "127.0.0.1", "::1")

    @property
    def verified(self) -> bool:
        return self.tls and self.ca_file is not None

    def advertised(self) -> dict[str, str]:
        """What the relay needs to know about this service (HELLO ``service_options``)."""
        return {"host": self.host_header} if self.host_header else {}


@dataclass(frozen=True)
class AgentConfig:
    server: str
    device: str
    secret: str
    services: dict[str, ServiceTarget] = field(default_factory=dict)
    ca_file: Path | None = None
    #: The proxy to use: the configured one, else HTTPS_PROXY's (unless NO_PROXY
    #: exempts the relay), both checked at start.
    proxy: ProxyConfig | None = None

    @property
    def tunnel_url(self) -> str:
        return relay_websocket_url(self.server, "/api/v1/tunnel")


def validate_service_name(name: str) -> str:
    if not SERVICE_NAME_RE.match(name):
        raise ConfigError(
            f"invalid service name {name!r}: use 1-32 of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit"
        )
    return name


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``: a host name (letters, digits, '.', '-', '_';
    labels of 1-63 characters), an IPv4 address or a bracketed IPv6 address."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:([0-9]+)|([^:\[\]\s]+):([0-9]+)", value.strip())
    if not match:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    if match.group(1) is not None:
        host = match.group(1)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what}: invalid IPv6 address {host!r}") from None
    else:
        host = check_host_name(match.group(3), what)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"{what}: port {port} out of range")
    return host, port


_SERVICE_OPTIONS = {"ca": "ca_file", "name": "server_name", "host": "host_header"}
_HOST_HEADER_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def parse_service(spec: str, base: Path | None = None) -> ServiceTarget:
    """``NAME=[tls://]HOST:PORT[?ca=FILE&name=TLS_NAME&host=HOST_HEADER]``."""
    name, sep, target = spec.partition("=")
    if not sep:
        raise ConfigError(f"--service {spec!r}: expected NAME=HOST:PORT")
    return _service_spec(validate_service_name(name.strip()), target, base)


def _service_spec(name: str, target: str, base: Path | None) -> ServiceTarget:
    """A validated service name and its ``[tls://]HOST:PORT[?OPTIONS]``."""
    target, _, query = target.strip().partition("?")
    tls = target.startswith("tls://")
    if tls:
        target = target[len("tls://") :]
    options: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key, has_value, value = item.partition("=")
        if key not in _SERVICE_OPTIONS or not has_value or not value:
            raise ConfigError(
                f"service {name}: unknown option {item!r} (known: ca=FILE, name=TLS_NAME, "
                "host=HOST_HEADER)"
            )
        options[_SERVICE_OPTIONS[key]] = value
    return _service(name, target, tls, options, base)


def _service(
    name: str, address: str, tls: bool, options: dict[str, Any], base: Path | None
) -> ServiceTarget:
    host, port = parse_host_port(address, f"service {name}")
    ca = options.get("ca_file")
    server_name = options.get("server_name")
    host_header = options.get("host_header")
    for key, value in (("ca_file", ca), ("server_name", server_name), ("host_header", host_header)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"service {name}: {key} must be a string")
    if (ca is not None or server_name is not None) and not tls:
        raise ConfigError(f"service {name}: ca and name need TLS (tls://HOST:PORT)")
    if server_name is not None:
        try:
            ipaddress.ip_address(server_name)
        except ValueError:
            check_host_name(server_name, f"service {name}: TLS name")
    if host_header is not None and not _HOST_HEADER_RE.fullmatch(host_header):
        raise ConfigError(f"service {name}: invalid host header {host_header!r}")
    ca_file = None
    if ca is not None:
        ca_file = (base or Path.cwd()) / os.path.expanduser(ca)
        if not ca_file.is_file():
            raise ConfigError(f"service {name}: no CA file {ca_file}")
    return ServiceTarget(name, host, port, tls, ca_file, server_name, host_header)


def _service_table(name: str, value: object, base: Path) -> ServiceTarget:
    """A TOML service: ``"HOST:PORT"`` or a table with ``address`` and options."""
    # The key is the name as stored and advertised: checked as it is, first.
    validate_service_name(name)
    if isinstance(value, str):
        return _service_spec(name, value, base)
    if not isinstance(value, dict):
        raise ConfigError(f'service {name}: expected "HOST:PORT" or a table')
    unknown = set(value) - {"address", "tls", "ca_file", "server_name", "host_header"}
    if unknown:
        raise ConfigError(f"service {name}: unknown settings {', '.join(sorted(unknown))}")
    address, tls = value.get("address"), value.get("tls", False)
    if not isinstance(address, str) or not isinstance(tls, bool):
        raise ConfigError(f'service {name}: address = "HOST:PORT" and tls = true|false')
    options = {k: v for k, v in value.items() if k not in ("address", "tls")}
    return _service(name, address, tls, options, base)


def read_secret_file(path: Path) -> str:
    try:
        st = path.stat()
        secret = read_small_text(path, MAX_SECRET_FILE, "the secret file").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"the secret file {path} is empty")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        import logging

        logging.getLogger(__name__).warning(
            "secret file %s is readable by other users: chmod 600 it", path
        )
    return secret


def load_agent_config(
    *,
    config_file: Path | None = None,
    server: str | None = None,
    device: str | None = None,
    secret_file: Path | None = None,
    services: list[str] | None = None,
    ca_file: Path | None = None,
    proxy: str | None = None,
) -> AgentConfig:
    """Merge the TOML file (if any) with flags; flags win. Raises ConfigError."""
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(read_small_text(config_file, MAX_CONFIG_FILE, "the config file"))
        except OSError as exc:
            raise ConfigError(f"cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file}: {exc}") from None
        unknown = set(data) - {"server", "device", "secret_file", "services", "ca_file", "proxy"}
        if unknown:
            raise ConfigError(f"{config_file}: unknown settings {', '.join(sorted(unknown))}")
    base = config_file.parent if config_file is not None else Path.cwd()
    where = f"{config_file}: " if config_file is not None else ""

    def path_of(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key} must be a string")
        return base / os.path.expanduser(value)

    def string(key: str, example: str) -> str | None:
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}{key} must be a string, e.g. {key} = {example}")
        return value

    server = server or string("server", '"https://relay.example.com:8443"')
    device = device or string("device", '"dev1"')
    secret_file = secret_file or path_of("secret_file")
    ca_file = ca_file or path_of("ca_file")
    proxy = proxy or string("proxy", '"http://proxy.example.com:3128"')
    if not server:
        raise ConfigError("no relay given: use --server URL or 'server' in the config file")
    if not device:
        raise ConfigError("no device id given: use --device ID or 'device' in the config file")
    relay = validate_relay_url(server)
    relay_host, relay_port = relay.hostname or "", relay.port or 443
    if secret_file is None:
        raise ConfigError("no secret given: use --secret-file F or 'secret_file' in the config")
    targets: dict[str, ServiceTarget] = {}
    table = data.get("services", {})
    if not isinstance(table, dict):
        raise ConfigError('[services] must be a table of NAME = "HOST:PORT"')
    for name, target in table.items():
        targets[name] = _service_table(name, target, base)
    flagged: set[str] = set()
    for spec in services or []:  # a flag replaces the config file's service of its name
        target = parse_service(spec)
        if target.name in flagged:
            raise ConfigError(f"service {target.name} is given twice (--service)")
        flagged.add(target.name)
        targets[target.name] = target
    if not targets:
        raise ConfigError("no service exposed: add --service NAME=HOST:PORT")
    config = AgentConfig(
        server=server,
        device=validate_device_id(device),
        secret=read_secret_file(secret_file),
        services=targets,
        ca_file=ca_file,
        # Checked now, not at every connect: a bad proxy is a mistake to fix, not retry.
        proxy=ProxyConfig.parse(proxy) if proxy else proxy_from_environment(relay_host, relay_port),
    )
    return config
