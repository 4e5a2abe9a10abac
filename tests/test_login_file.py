"""The client's stored login holds an API token: how ``hatchway login`` writes it, and
the configuration directories it refuses (before it asks the relay for a token)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.procs import HATCHWAY, Env, free_port

pytestmark = pytest.mark.timeout(120)


def _login(
    env: Env, url: str, password: str, config_dir: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    environ = env.environ()
    if config_dir is not None:
        environ["HATCHWAY_CONFIG_DIR"] = str(config_dir)
    return subprocess.run(
        [*HATCHWAY, "login", url, "--user", "admin", "--password-stdin"]
        + (["--ca-file", str(env.ca_file)] if env.ca_file.exists() else []),
        input=password.encode() + b"\n",
        capture_output=True,
        env=environ,
        timeout=60,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_token_file_is_written_privately_whatever_lies_around(env: Env, tmp_path: Path) -> None:
    _, port, password = env.start_relay()
    assert password is not None
    url = f"https://localhost:{port}"
    # A fresh directory is created 0700, the file 0600.
    fresh = tmp_path / "fresh" / "hatchway"
    out = _login(env, url, password, fresh)
    assert out.returncode == 0, out.stderr
    assert _mode(fresh) == 0o700 and _mode(fresh / "login.json") == 0o600
    # What an earlier version (or someone else) left under the old fixed temporary
    # name is neither reused nor followed: a world-readable file, a symbolic link.
    config = env.config_dir
    config.mkdir(mode=0o700)
    stale = config / "login.tmp"
    stale.write_text("")
    stale.chmod(0o644)
    out = _login(env, url, password)
    assert out.returncode == 0, out.stderr
    assert _mode(config / "login.json") == 0o600
    assert stale.read_text() == "" and _mode(stale) == 0o644
    stale.unlink()
    victim = tmp_path / "elsewhere"
    victim.write_text("")
    stale.symlink_to(victim)
    out = _login(env, url, password)
    assert out.returncode == 0, out.stderr
    assert victim.read_text() == ""
    login_file = config / "login.json"
    assert not login_file.is_symlink() and _mode(login_file) == 0o600
    assert json.loads(login_file.read_text())["user"] == "admin"
    # No temporary file stays behind.
    assert sorted(p.name for p in config.iterdir()) == ["login.json", "login.tmp"]


def _refused(env: Env, config_dir: Path) -> str:
    """Log in to a relay that is not there: the directory must be refused first."""
    out = _login(env, f"https://localhost:{free_port()}", "pw", config_dir)
    err = out.stderr.decode()
    assert out.returncode == 1, err
    assert "cannot reach" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    return err


def test_a_directory_others_may_write_is_refused_before_the_relay_is_asked(
    env: Env, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: another user could plant or swap files
    assert "may be written by other users (mode 1777)" in _refused(env, shared)
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o770)
    assert "chmod 700" in _refused(env, group)
    assert list(shared.iterdir()) == [] and list(group.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory away")
def test_a_directory_of_another_user_is_refused(env: Env, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    assert "belongs to another user" in _refused(env, theirs)


def test_a_config_dir_that_cannot_be_one_is_refused_before_the_relay_is_asked(
    env: Env, tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "is not a directory" in _refused(env, a_file)
    assert "cannot create the configuration directory" in _refused(env, a_file / "below")


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b'{"server": "https://relay", "tok', "damaged (Unterminated string starting at"),
        (b"", "damaged (Expecting value: line 1 column 1 (char 0))"),
        (b"[1, 2]", "damaged (no valid server)"),
        (b'{"server": "https://relay", "user": "a"}', "damaged (no valid token)"),
        (b'{"server": "https://relay", "user": 5, "token": "t"}', "damaged (no valid user)"),
        (
            b'{"server": "https://relay", "user": "a", "token": "t", "ca_file": 7}',
            "damaged (no valid ca_file)",
        ),
        (b"\xff\xfe", "is not UTF-8 text"),
    ],
)
def test_a_damaged_login_file_is_said_in_one_sentence(env: Env, content: bytes, said: str) -> None:
    """What a client reads back from its login file is checked: a file cut short or
    edited by hand stops the command with what is wrong and what to do, not a
    Python error ("list indices must be integers", "'server'")."""
    env.config_dir.mkdir(mode=0o700)
    (env.config_dir / "login.json").write_bytes(content)
    out = env.hatchway("devices", check=False)
    err = out.stderr.decode()
    assert out.returncode == 1, err
    assert err.startswith(f"hatchway: the login file {env.config_dir / 'login.json'} "), err
    assert said in err and len(err.strip().splitlines()) == 1, err
    if said != "is not UTF-8 text":
        assert err.rstrip().endswith("; log in again"), err
