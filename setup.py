"""Compiles the hot path with mypyc; the rest of the build is in pyproject.toml.

Which modules, and why: ``src/hatchway/extensions.py``. Set ``HATCHWAY_NO_EXTENSIONS=1``
to build pure Python. A build where compiling fails (no C compiler) installs the
Python source alone: the extensions are optional.
"""

from __future__ import annotations

import os
import runpy

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions() -> list[Extension]:
    spec = runpy.run_path(os.path.join(HERE, "src", "hatchway", "extensions.py"))
    if spec["disabled"]():
        return []
    from mypyc.build import mypycify

    paths = [os.path.join("src", *name.split(".")) + ".py" for name in spec["COMPILED_MODULES"]]
    # The build has only its build requirements (setuptools, mypy): the modules the
    # compiled ones import from the relay's dependencies are not installed. Those
    # become Any, and the strict checks that Any trips are off for this check only;
    # `mypy` on the source (scripts/test.sh) is where the types are held to strict.
    flags = [
        "--follow-imports=silent",
        "--ignore-missing-imports",
        "--allow-subclassing-any",
        "--allow-untyped-calls",
        "--no-warn-return-any",
    ]
    built = list(mypycify([*flags, *paths], opt_level="3", group_name="hatchway"))
    for ext in built:
        ext.optional = True
    return built


setup(ext_modules=extensions())
