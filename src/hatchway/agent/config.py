"""The agent's configuration: a TOML file, command-line flags on top."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hatchway.auth.device import validate_device_id
from hatchway.errors import ConfigError
from hatchway.tunnel.connect import ProxyConfig, relay_websocket_url

SERVICE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_SECRET_FILE = 4096


@dataclass(frozen=True)
class ServiceTarget:
    """A service the agent exposes: the only places it will ever connect to."""

    name: str
    host: str
    port: int

    @property
    def is_gateway(self) -> bool:
        return self.host not in ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class AgentConfig:
    server: str
    device: str
    secret: str
    services: dict[str, ServiceTarget] = field(default_factory=dict)
    ca_file: Path | None = None
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
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", value.strip())
    if not match:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ConfigError(f"{what}: port {port} out of range")
    return host, port


def parse_service(spec: str) -> ServiceTarget:
    """``NAME=HOST:PORT``."""
    name, sep, target = spec.partition("=")
    if not sep:
        raise ConfigError(f"--service {spec!r}: expected NAME=HOST:PORT")
    host, port = parse_host_port(target, f"service {name}")
    return ServiceTarget(validate_service_name(name.strip()), host, port)


def read_secret_file(path: Path) -> str:
    try:
        st = path.stat()
        if st.st_size > MAX_SECRET_FILE:
            raise ConfigError(f"secret file {path} is too large to be a device secret")
        secret = path.read_text().strip()
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
            data = tomllib.loads(config_file.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file}: {exc}") from None
        unknown = set(data) - {"server", "device", "secret_file", "services", "ca_file", "proxy"}
        if unknown:
            raise ConfigError(f"{config_file}: unknown settings {', '.join(sorted(unknown))}")
    base = config_file.parent if config_file is not None else Path.cwd()

    def path_of(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string")
        return base / os.path.expanduser(value)

    server = server or data.get("server")
    device = device or data.get("device")
    secret_file = secret_file or path_of("secret_file")
    ca_file = ca_file or path_of("ca_file")
    proxy = proxy or data.get("proxy")
    if not server or not isinstance(server, str):
        raise ConfigError("no relay given: use --server URL or 'server' in the config file")
    if not device or not isinstance(device, str):
        raise ConfigError("no device id given: use --device ID or 'device' in the config file")
    if secret_file is None:
        raise ConfigError("no secret given: use --secret-file F or 'secret_file' in the config")
    targets: dict[str, ServiceTarget] = {}
    table = data.get("services", {})
    if not isinstance(table, dict):
        raise ConfigError('[services] must be a table of NAME = "HOST:PORT"')
    for name, target in table.items():
        if not isinstance(target, str):
            raise ConfigError(f'service {name}: expected "HOST:PORT"')
        targets[name] = parse_service(f"{name}={target}")
    for spec in services or []:
        target = parse_service(spec)
        targets[target.name] = target
    if not targets:
        raise ConfigError("no service exposed: add --service NAME=HOST:PORT")
    config = AgentConfig(
        server=server,
        device=validate_device_id(device),
        secret=read_secret_file(secret_file),
        services=targets,
        ca_file=ca_file,
        proxy=ProxyConfig.parse(proxy) if proxy else None,
    )
    config.tunnel_url  # noqa: B018 - validates the URL now, not at the first connect
    return config
