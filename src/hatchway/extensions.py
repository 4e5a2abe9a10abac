"""The modules built as C extensions, and the switch that runs them as Python instead.

``setup.py`` compiles the modules named here with mypyc when the package is built:
the multiplexer, and the web proxy with its response framer, which every DATA frame
and every proxied request and response go through. The ``.py``
files stay in the package beside the extensions, and a build that cannot compile (no
C compiler on a small device) installs them alone, as plain Python: the behaviour is
the same either way, only the speed differs.

``HATCHWAY_NO_EXTENSIONS=1`` in the environment skips the compilation when building,
and at run time loads the Python source of these modules even where extensions were
built: to step through them in a debugger, to see them in a Python profiler, and so
that the tests cover both builds.

Standard library only: the agent imports this (through ``hatchway/__init__.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

#: Compiled by setup.py. mypyc type-checks them when it compiles them, where only the
#: build requirements are installed: what they import from outside the standard
#: library and hatchway is taken as Any then (setup.py's flags), so it runs as
#: ordinary Python calls from the compiled code.
COMPILED_MODULES = (
    "hatchway.mux.events",
    "hatchway.mux.frames",
    "hatchway.mux.session",
    "hatchway.web.framing",
    "hatchway.web.proxy",
)
ENV_SWITCH = "HATCHWAY_NO_EXTENSIONS"


def disabled() -> bool:
    """True when the environment asks for the Python source of the compiled modules."""
    return os.environ.get(ENV_SWITCH, "") not in ("", "0")


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from a C extension."""
    return not (module.__file__ or "").endswith(".py")


class _SourceFinder:
    """A finder on ``sys.meta_path``: the ``.py`` file of a compiled module, ahead of the
    extension beside it."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname not in COMPILED_MODULES or path is None:
            return None
        import importlib.util

        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path:
            source = os.path.join(entry, leaf)
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def install_switch() -> None:
    """Honour ``HATCHWAY_NO_EXTENSIONS`` for the modules not imported yet."""
    if disabled() and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())
