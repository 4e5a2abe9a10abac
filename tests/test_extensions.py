"""The compiled modules (hatchway/extensions.py): the tests run what ships, and the
switch to the Python source works. scripts/test.sh runs the tests of these modules a
second time with the switch on, so both builds are covered."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hatchway import extensions

MODULES = extensions.COMPILED_MODULES

PROBE = (
    "import importlib, json, sys; from hatchway import extensions; "
    "print(json.dumps({n: importlib.import_module(n).__file__ "
    "for n in extensions.COMPILED_MODULES}))"
)


def _files(switch: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != extensions.ENV_SWITCH}
    if switch is not None:
        env[extensions.ENV_SWITCH] = switch
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    files: dict[str, str] = json.loads(out.stdout)
    return files


@pytest.mark.skipif(extensions.disabled(), reason="HATCHWAY_NO_EXTENSIONS is set")
def test_the_tests_run_the_compiled_modules() -> None:
    """scripts/test.sh installs with `pip install -e .`, which compiles: a build that
    fell back to Python (no compiler, a mypyc error) must not pass unnoticed."""
    for name in MODULES:
        module = importlib.import_module(name)
        assert extensions.is_compiled(module), f"{name} is not compiled: {module.__file__}"


@pytest.mark.skipif(extensions.disabled(), reason="HATCHWAY_NO_EXTENSIONS is set")
def test_no_extension_is_older_than_its_source() -> None:
    """An edited module whose extension was not rebuilt would be tested as it was."""
    for name in MODULES:
        built = Path(str(importlib.import_module(name).__file__))
        source = built.parent / (name.rpartition(".")[2] + ".py")
        assert source.is_file()
        assert built.stat().st_mtime >= source.stat().st_mtime, (
            f"{built.name} is older than {source.name}: rebuild with `.venv/bin/pip install -e .`"
        )


def test_the_switch_loads_the_python_source() -> None:
    plain = _files("1")
    assert set(plain) == set(MODULES)
    for name, file in plain.items():
        assert file.endswith(name.replace(".", "/") + ".py"), file
    # "0" and an empty value leave the extensions on, as an unset switch does.
    unset = _files(None)
    for value in ("0", ""):
        assert _files(value) == unset
