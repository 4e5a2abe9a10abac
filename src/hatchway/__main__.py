"""The ``hatchway`` command.

``hatchway agent`` is dispatched before anything else is imported, so that a device
with only the agent's dependencies (websockets) can run it.
"""

from __future__ import annotations

import sys


def main() -> None:
    from hatchway import allocator

    allocator.tune()
    argv = sys.argv[1:]
    if argv[:1] == ["agent"]:
        from hatchway.agent.main import main as agent_main

        sys.exit(agent_main(argv[1:]))
    try:
        from hatchway.cli import cli
    except ImportError as exc:
        print(
            f"hatchway: this command needs the client or server extras ({exc.name} is missing):"
            " pip install 'hatchway[client]' or 'hatchway[server]'",
            file=sys.stderr,
        )
        sys.exit(2)
    cli()


if __name__ == "__main__":
    main()
