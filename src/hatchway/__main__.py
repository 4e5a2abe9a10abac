"""The ``hatchway`` command.

``hatchway agent`` is dispatched before anything else is imported, so that a device
with only the agent's dependencies (websockets) can run it.
"""

from __future__ import annotations

import sys


def _open_standard_streams() -> None:
    """Standard input, output or error closed by whoever started us (``<&-``): point
    them at /dev/null. Otherwise the next socket opened takes descriptor 0, 1 or 2,
    which libuv refuses by aborting the process, and a write meant for the terminal
    could land in a connection."""
    import os

    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # Python found the descriptor closed at start
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - kept open


def main() -> None:
    _open_standard_streams()
    from hatchway import allocator

    allocator.tune()
    argv = sys.argv[1:]
    if argv[:1] == ["agent"]:
        from hatchway.agent.main import main as agent_main

        sys.exit(agent_main(argv[1:]))
    try:
        from hatchway.cli import main as cli_main
    except ImportError as exc:
        print(
            f"hatchway: this command needs the client or server extras ({exc.name} is missing):"
            " pip install 'hatchway[client]' or 'hatchway[server]'",
            file=sys.stderr,
        )
        sys.exit(2)
    cli_main()


if __name__ == "__main__":
    main()
