"""The agent's dependency set: a device installs ``hatchway`` without extras, which is
``websockets`` and the standard library; ``uvloop`` (the ``speedups`` extra) is used
when it is there. Nothing on the agent's path may import the client's or the relay's
packages (click, cryptography, sqlalchemy, argon2, fastapi, pydantic, ...).

Each check runs a fresh interpreter (``sys.executable``), so that what this test
process has imported does not count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Env, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
#: What the agent may load besides the standard library. ``hatchway__mypyc`` is the
#: shared library of hatchway's own compiled modules (setup.py, mypyc).
AGENT_ALLOWED = frozenset({"hatchway", "hatchway__mypyc", "websockets", "uvloop"})
#: What a device has when only the base dependencies are installed.
DEVICE_INSTALLED = frozenset({"hatchway", "hatchway__mypyc", "websockets"})
MARK = "HATCHWAY-TEST-MODULES "

#: Runs in the fresh interpreter. It notes what is imported at start (the interpreter
#: and site: .pth hooks and the like are not the agent's), optionally hides every
#: third-party package but the allowed ones as a device without them would, then
#: either imports modules or runs ``python -m hatchway ARGS`` (the console script's
#: ``hatchway.__main__:main``), and prints the top-level packages that were loaded
#: since, and the hidden ones something tried to import.
PROBE = r"""
import json, logging, os, runpy, sys

spec = json.loads(os.environ["HW_PROBE"])
before = {name.partition(".")[0] for name in sys.modules}
blocked = []

class Hide:
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in sys.stdlib_module_names or top in spec["visible"] or top in before:
            return None
        blocked.append(fullname)
        raise ModuleNotFoundError(f"No module named {fullname!r} (hidden)", name=fullname)

if spec["visible"] is not None:
    sys.meta_path.insert(0, Hide())

def report():
    loaded = sorted({name.partition(".")[0] for name in sys.modules} - before)
    print(spec["mark"] + json.dumps({"loaded": loaded, "blocked": blocked}), flush=True)

if spec["stop_on"]:
    class Stop(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith(spec["stop_on"]):
                print("stopped on: " + record.getMessage(), flush=True)
                report()
                os._exit(0)
    logging.getLogger("hatchway").addHandler(Stop(logging.INFO))

for name in spec["imports"]:
    __import__(name)
if spec["argv"] is not None:
    sys.argv = ["hatchway", *spec["argv"]]
    try:
        runpy.run_module("hatchway", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        print(f"exit status {exc.code}", flush=True)
report()
"""


def probe_spec(
    *,
    imports: Sequence[str] = (),
    argv: Sequence[str] | None = None,
    visible: frozenset[str] | None = None,
    stop_on: str | None = None,
) -> dict[str, Any]:
    return {
        "imports": list(imports),
        "argv": None if argv is None else list(argv),
        "visible": None if visible is None else sorted(visible),
        "stop_on": stop_on,
        "mark": MARK,
    }


def probe_environ(spec: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env["HW_PROBE"] = json.dumps(spec)
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        env.pop(var, None)
    return env


def probe_result(output: str) -> tuple[list[str], list[str]]:
    for line in output.splitlines():
        if line.startswith(MARK):
            found = json.loads(line[len(MARK) :])
            return found["loaded"], found["blocked"]
    raise AssertionError(f"the probe printed no module list:\n{output}")


def run_probe(spec: dict[str, Any], timeout: float = 30.0) -> tuple[str, list[str], list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=probe_environ(spec),
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    loaded, blocked = probe_result(output)
    return output, loaded, blocked


def third_party(loaded: Sequence[str], allowed: frozenset[str] = AGENT_ALLOWED) -> list[str]:
    return [name for name in loaded if name not in sys.stdlib_module_names and name not in allowed]


def requirement_names(requirements: Sequence[str]) -> list[str]:
    """The distribution names of PEP 508 requirement strings, normalised (PEP 503)."""
    names = []
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        assert match is not None, requirement
        names.append(re.sub(r"[-_.]+", "-", match[1]).lower())
    return names


def test_base_dependencies_are_only_websockets() -> None:
    """What ``pip install hatchway`` (no extras) brings: websockets, nothing else."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "dependencies" not in project.get("dynamic", [])
    assert requirement_names(project["dependencies"]) == ["websockets"], project["dependencies"]
    # uvloop stays optional: an extra of its own, not a base dependency.
    assert requirement_names(project["optional-dependencies"]["speedups"]) == ["uvloop"]
    # The console script a device runs is the one whose dispatch is tested below.
    assert project["scripts"]["hatchway"] == "hatchway.__main__:main"


def test_hatchway_agent_help_loads_only_websockets() -> None:
    """``hatchway agent --help`` through the real dispatch (``hatchway.__main__``),
    with every package of the dev environment installed: what does it load?"""
    output, loaded, _ = run_probe(probe_spec(argv=["agent", "--help"]))
    assert "usage: hatchway agent" in output and "exit status 0" in output, output
    assert "websockets" in loaded and "hatchway" in loaded
    assert third_party(loaded) == [], f"the agent's CLI loads {third_party(loaded)}"


AGENT_MODULES = [
    "hatchway.agent",
    "hatchway.agent.main",
    "hatchway.agent.runner",
    "hatchway.agent.config",
    "hatchway.tunnel.connect",
    "hatchway.tunnel.endpoint",
    "hatchway.tunnel.local",
    "hatchway.tunnel.websocket",
    "hatchway.mux",
    "hatchway.auth.device",
    "hatchway.tlsutil",
    "hatchway.__main__",
]


def test_agent_modules_import_only_websockets() -> None:
    """The agent's modules, imported alone and without the server's packages present."""
    output, loaded, blocked = run_probe(probe_spec(imports=AGENT_MODULES, visible=DEVICE_INSTALLED))
    assert third_party(loaded) == [], output
    assert set(loaded) >= {"hatchway", "websockets"}
    tried = tried_installed(blocked)
    assert tried == [], f"the agent's modules try to import {tried}"


def tried_installed(blocked: Sequence[str]) -> list[str]:
    """The hidden imports of packages that this environment has (the standard library's
    own probes for modules that exist nowhere, such as ``org.python.core``, aside),
    uvloop aside: the agent uses it when it is there."""
    import importlib.util

    out = []
    for name in blocked:
        top = name.partition(".")[0]
        if top != "uvloop" and importlib.util.find_spec(top) is not None:
            out.append(name)
    return out


@pytest.mark.timeout(60)
def test_agent_runs_on_a_device_with_only_websockets(env: Env, tmp_path: Path) -> None:
    """The agent process, with every package but websockets hidden (uvloop too: the
    fallback to the standard event loop is used), connects to a real relay: its whole
    path (config, TLS, WebSocket, challenge-response, multiplexer) up to the moment it
    is connected loads nothing else and tries to import nothing else."""
    relay, port, _ = env.start_relay(keep_bootstrap=True)
    secret = env.add_device("dev1")
    spec = probe_spec(
        argv=[
            "agent",
            "--server",
            f"https://localhost:{port}",
            "--device",
            "dev1",
            "--secret-file",
            str(secret),
            "--ca-file",
            str(env.ca_file),
            "--service",
            f"ssh=127.0.0.1:{free_port()}",
        ],
        visible=DEVICE_INSTALLED,
        stop_on="connected to ",
    )
    log = tmp_path / "agent.log"
    with log.open("wb") as fh:
        agent = subprocess.Popen(
            [sys.executable, "-c", PROBE],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=probe_environ(spec),
            cwd=ROOT,
        )
    try:
        wait_for(lambda: agent.poll() is not None, 30, "the agent to connect and report")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
    output = log.read_text(errors="replace")
    assert "stopped on: connected to https://localhost:" in output, output
    loaded, blocked = probe_result(output)
    assert {"hatchway", "websockets"} <= set(loaded)
    assert "uvloop" not in loaded
    assert third_party(loaded, DEVICE_INSTALLED) == [], output
    tried = tried_installed(blocked)
    assert tried == [], f"the agent tried to import {tried}"
    relay.wait_output(r"device dev1 connected")
