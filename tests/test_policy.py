"""The password policy: the strict default, variations of common passwords, the CLI."""

from __future__ import annotations

import pytest

from hatchway.auth.passwords import new_password
from hatchway.auth.policy import DEFAULT_POLICY, PasswordPolicy, common_passwords
from hatchway.errors import ConfigError
from tests.procs import Env


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("Short-1a!", "at least 14 characters"),
        ("all-lower-case-42!", "an upper-case letter"),
        ("ALL-UPPER-CASE-42!", "a lower-case letter"),
        ("No-Digits-Anywhere!", "a digit"),
        ("NoSpecialCharacters42", "a special character"),
        ("Password1234567!", "common password"),  # a common word plus a suffix
        ("P@ssw0rd20242024", "common password"),  # look-alike digits
        ("!!Football99999999", "common password"),  # affixes on both sides
        ("Qwertyuiop123456!", "common password"),
        ("Alice-Wonder-2024!", "not to contain the user name"),
    ],
)
def test_default_policy_refuses(password: str, problem: str) -> None:
    problems = DEFAULT_POLICY.problems(password, user="alice")
    assert any(problem in p for p in problems), problems
    with pytest.raises(ConfigError, match="the password needs"):
        DEFAULT_POLICY.check(password, user="alice")


@pytest.mark.parametrize("password", ["Vivid-Lantern-482!", "correct Horse battery 9 staple"])
def test_default_policy_accepts(password: str) -> None:
    assert DEFAULT_POLICY.problems(password, user="alice") == []


def test_generated_passwords_pass_and_the_list_ships() -> None:
    assert len(common_passwords()) == 30_000
    assert "password" in common_passwords() and "dragon" in common_passwords()
    assert all(not DEFAULT_POLICY.problems(new_password(), "admin") for _ in range(50))


def test_policy_can_be_relaxed_or_tightened() -> None:
    relaxed = PasswordPolicy(min_length=8, require_special=False, reject_common=False)
    assert relaxed.problems("Abcdefg1") == []
    assert PasswordPolicy(min_length=24).problems("Vivid-Lantern-482!") == [
        "at least 24 characters"
    ]


def test_admin_commands_enforce_the_policy(env: Env) -> None:
    data = ["--data-dir", str(env.data_dir)]
    out = env.hatchway(
        "user", "add", "dave", "--password-stdin", *data, input=b"password\n", prefix=(),
        check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert b"the password needs at least 14 characters" in out.stderr
    assert b"Traceback" not in out.stderr
    env.hatchway(
        "user", "add", "dave", "--password-stdin", *data, input=b"Vivid-Lantern-482!\n", prefix=()
    )
    out = env.hatchway(
        "user", "passwd", "dave", "--password-stdin", *data, input=b"Dave-is-2024-great!\n",
        prefix=(), check=False,
    )  # fmt: skip
    assert out.returncode == 1 and b"not to contain the user name" in out.stderr


def test_operators_set_the_policy(env: Env) -> None:
    data = ["--data-dir", str(env.data_dir)]
    out = env.hatchway("settings", "list", *data, prefix=()).stdout.decode()
    assert "password.min_length = 14" in out and "password.reject_common = true" in out
    env.hatchway("settings", "set", "password.min_length", "20", *data, prefix=())
    out = env.hatchway(
        "user", "add", "hal", "--password-stdin", *data, input=b"Vivid-Lantern-482!\n",
        prefix=(), check=False,
    )  # fmt: skip
    assert out.returncode == 1 and b"at least 20 characters" in out.stderr
    env.hatchway("settings", "set", "password.require_special", "false", *data, prefix=())
    env.hatchway("settings", "set", "password.min_length", "16", *data, prefix=())
    env.hatchway(
        "user", "add", "hal", "--password-stdin", *data, input=b"VividLantern4821x\n", prefix=()
    )
    for name, value, message in [
        ("password.min_length", "4", "from 8 to 128"),
        ("password.require_upper", "maybe", "true or false"),
        ("password.colour", "blue", "unknown setting"),
    ]:
        out = env.hatchway("settings", "set", name, value, *data, prefix=(), check=False)
        assert out.returncode == 1 and message.encode() in out.stderr
    out = env.hatchway("audit", "list", "--kind", "setting_changed", *data, prefix=())
    assert out.stdout.decode().count("setting_changed") == 3
