"""The allocator thresholds set at start (hatchway/allocator.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHECK = "from hatchway import allocator; print(allocator.tune())"


def run(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, timeout=30, check=True
    )
    return out.stdout.decode().strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_thresholds() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert run(env) == "True"


def test_the_environment_wins() -> None:
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="131072")
    assert run(env) == "False"


def test_it_can_be_switched_off() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["HATCHWAY_MALLOPT"] = "0"
    assert run(env) == "False"
