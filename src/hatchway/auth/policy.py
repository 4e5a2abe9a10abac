"""The password policy for relay accounts.

The default follows strict embedded-device practice: at least 14 characters with
upper-case and lower-case letters, digits and special characters, not one of the
30,000 most common leaked passwords (``common-passwords.txt.gz``, shipped with the
package), not built from one of them by capitals, look-alike digits or a suffix of
digits and symbols (``P@ssw0rd2024!!`` is ``password``), and not containing the user
name. The relay's settings can relax or tighten it (``PasswordPolicy``).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from hatchway.errors import ConfigError

_LEET = str.maketrans({"@": "a", "4": "a", "0": "o", "1": "l", "!": "i", "3": "e", "$": "s",
                       "5": "s", "7": "t", "+": "t", "8": "b", "9": "g"})  # fmt: skip
_AFFIXES = re.compile(r"^[\d\W_]+|[\d\W_]+$")


@cache
def common_passwords() -> frozenset[str]:
    data = resources.files("hatchway.auth").joinpath("common-passwords.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode().splitlines()
    return frozenset(line for line in lines if line and not line.startswith("#"))


def _variants(password: str) -> set[str]:
    lower = password.lower()
    stripped = _AFFIXES.sub("", lower)
    return {lower, stripped, lower.translate(_LEET), stripped.translate(_LEET),
            _AFFIXES.sub("", lower.translate(_LEET))} - {""}  # fmt: skip


@dataclass(frozen=True)
class PasswordPolicy:
    min_length: int = 14
    require_upper: bool = True
    require_lower: bool = True
    require_digit: bool = True
    require_special: bool = True
    reject_common: bool = True
    reject_user_name: bool = True
    max_length: int = 1024

    def problems(self, password: str, user: str | None = None) -> list[str]:
        """What is wrong with ``password``, in words (empty: acceptable)."""
        out = []
        if len(password) < self.min_length:
            out.append(f"at least {self.min_length} characters")
        if len(password) > self.max_length:
            out.append(f"at most {self.max_length} characters")
        if self.require_upper and not any(c.isupper() for c in password):
            out.append("an upper-case letter")
        if self.require_lower and not any(c.islower() for c in password):
            out.append("a lower-case letter")
        if self.require_digit and not any(c.isdigit() for c in password):
            out.append("a digit")
        if self.require_special and not any(not c.isalnum() for c in password):
            out.append("a special character")
        if self.reject_common and _variants(password) & common_passwords():
            out.append("not to be a common password or a variation of one")
        if self.reject_user_name and user and len(user) >= 3 and user.lower() in password.lower():
            out.append("not to contain the user name")
        return out

    def check(self, password: str, user: str | None = None) -> None:
        """Raise ConfigError naming every rule the password breaks."""
        problems = self.problems(password, user)
        if problems:
            raise ConfigError("the password needs " + ", ".join(problems))


DEFAULT_POLICY = PasswordPolicy()

#: Settings an operator can change (``hatchway settings set``), and their types.
POLICY_SETTINGS: dict[str, type] = {
    "password.min_length": int,
    "password.require_upper": bool,
    "password.require_lower": bool,
    "password.require_digit": bool,
    "password.require_special": bool,
    "password.reject_common": bool,
}


def parse_setting(name: str, value: str) -> int | bool:
    """A policy setting's value from text, checked; ValueError says what is wrong."""
    kind = POLICY_SETTINGS.get(name)
    if kind is None:
        raise ValueError(f"unknown setting {name!r}: one of {', '.join(POLICY_SETTINGS)}")
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise ValueError(f"{name} is true or false")
        return value.lower() == "true"
    if not value.isdigit() or not 8 <= int(value) <= 128:
        raise ValueError(f"{name} is a number from 8 to 128")
    return int(value)


def policy_from_settings(settings: dict[str, str]) -> PasswordPolicy:
    fields = {
        name.removeprefix("password."): parse_setting(name, value)
        for name, value in settings.items()
        if name in POLICY_SETTINGS
    }
    return PasswordPolicy(**fields)  # type: ignore[arg-type]
