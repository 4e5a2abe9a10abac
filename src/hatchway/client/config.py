"""Where the CLI keeps its login: ``$HATCHWAY_CONFIG_DIR/login.json`` (mode 0600),
by default ``$XDG_CONFIG_HOME/hatchway`` or ``~/.config/hatchway``.

The login holds an API token, so the file is written the way a secret must be: the
directory is created 0700 and refused when another user owns it or may write to it
(they could swap files under us), and the file is written through a temporary file of
a fresh random name, created exclusively (never an existing file, never through a
symbolic link) with mode 0600, synced, then renamed over ``login.json``.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from hatchway.errors import ConfigError
from hatchway.files import read_small_text

LOGIN_FILE = "login.json"
#: A saved login is a few hundred bytes.
MAX_LOGIN_FILE = 64 * 1024


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


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def prepare_config_dir() -> Path:
    """Create the configuration directory (0700) if need be and check that only we
    may change it; ConfigError with what to do otherwise. ``hatchway login`` calls
    this before asking the relay for a token, so that the token has somewhere to go."""
    directory = config_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"the configuration directory {directory} exists but is not a directory "
            "(set HATCHWAY_CONFIG_DIR to a directory)"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot create the configuration directory {directory}: {_why(exc)}"
        ) from None
    os.close(_open_dir(directory))
    if not os.access(directory, os.W_OK | os.X_OK):  # also false on a read-only file system
        raise ConfigError(f"the configuration directory {directory} is not writable")
    return directory


def _open_dir(directory: Path) -> int:
    """Open ``directory`` and check, on the open descriptor, who may change it."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise ConfigError(
            f"the configuration directory {directory} is not a directory "
            "(set HATCHWAY_CONFIG_DIR to a directory)"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot open the configuration directory {directory}: {_why(exc)}"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"the configuration directory {directory} belongs to another user (uid "
                f"{st.st_uid}): use a directory of your own (HATCHWAY_CONFIG_DIR)"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"the configuration directory {directory} may be written by other users "
                f"(mode {mode:04o}): run 'chmod 700 {directory}' or use another directory"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def save_login(login: Login) -> Path:
    """Write ``login.json`` atomically with mode 0600; ConfigError if it cannot be."""
    directory = prepare_config_dir()
    dir_fd = _open_dir(directory)
    tmp_name = f".{LOGIN_FILE}.{secrets.token_hex(8)}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp_name, flags, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                os.fchmod(fh.fileno(), 0o600)  # whatever the umask
                json.dump(asdict(login), fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, LOGIN_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp_name, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        except OSError:
            pass
    except OSError as exc:
        raise ConfigError(f"cannot save the login in {directory}: {_why(exc)}") from None
    finally:
        os.close(dir_fd)
    return directory / LOGIN_FILE


def load_login() -> Login:
    """The stored login; ``HATCHWAY_TOKEN`` replaces its token (a scoped token, say)."""
    path = config_dir() / LOGIN_FILE
    try:
        text = read_small_text(path, MAX_LOGIN_FILE, "the login file")
    except FileNotFoundError:
        raise ConfigError("not logged in: run 'hatchway login URL --user NAME' first") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {_why(exc)}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"the login file {path} is damaged ({exc}); log in again") from None
    if not isinstance(data, dict):
        data = {}

    def field(name: str) -> str:
        value = data.get(name)
        if not isinstance(value, str):
            raise ConfigError(f"the login file {path} is damaged (no valid {name}); log in again")
        return value

    server, user, token = field("server"), field("user"), field("token")
    ca_file = field("ca_file") if data.get("ca_file") is not None else None
    return Login(server, user, os.environ.get("HATCHWAY_TOKEN") or token, ca_file)
