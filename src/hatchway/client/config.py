"""Where the CLI keeps its login: ``$HATCHWAY_CONFIG_DIR/login.json`` (mode 0600),
by default ``$XDG_CONFIG_HOME/hatchway`` or ``~/.config/hatchway``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from hatchway.errors import ConfigError


@dataclass(frozen=True)
class Login:
    server: str
    user: str
    token: str
    ca_file: str | None = None


def config_dir() -> Path:
    explicit = os.environ.get("HATCHWAY_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hatchway"


def save_login(login: Login) -> Path:
    directory = config_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "login.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(login), fh, indent=2)
    os.replace(tmp, path)
    return path


def load_login() -> Login:
    """The stored login; ``HATCHWAY_TOKEN`` replaces its token (a scoped token, say)."""
    path = config_dir() / "login.json"
    try:
        data = json.loads(path.read_text())
        return Login(
            server=str(data["server"]),
            user=str(data["user"]),
            token=os.environ.get("HATCHWAY_TOKEN") or str(data["token"]),
            ca_file=data.get("ca_file"),
        )
    except FileNotFoundError:
        raise ConfigError("not logged in: run 'hatchway login URL --user NAME' first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; log in again") from None
