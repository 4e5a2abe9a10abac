"""``hatchway agent``: argparse only, so a device needs nothing but websockets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from hatchway import __version__, allocator
from hatchway.agent.config import load_agent_config
from hatchway.agent.runner import Agent
from hatchway.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hatchway agent",
        description="Keep a tunnel to a Hatchway relay and expose local services through it.",
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--server", help="relay URL, e.g. https://relay.example.com:8443")
    parser.add_argument("--device", help="this device's id")
    parser.add_argument("--secret-file", type=Path, help="file holding the device secret")
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="expose a service (repeatable); the agent connects to nothing else",
    )
    parser.add_argument("--ca-file", type=Path, help="verify the relay against this CA")
    parser.add_argument(
        "--proxy",
        metavar="URL",
        help="HTTP CONNECT proxy, http://[USER:PASSWORD@]HOST:PORT (default: $HTTPS_PROXY); "
        "a password given here is visible in the process list: put it in the config file's "
        "'proxy' key or in HTTPS_PROXY instead",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"hatchway {__version__}")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Even with -v: at DEBUG, websockets logs the frames (the users' traffic).
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        config = load_agent_config(
            config_file=args.config,
            server=args.server,
            device=args.device,
            secret_file=args.secret_file,
            services=args.service,
            ca_file=args.ca_file,
            proxy=args.proxy,
        )
        agent = Agent(config)
    except ConfigError as exc:
        print(f"hatchway agent: {exc}", file=sys.stderr)
        return 2
    allocator.freeze_startup()
    try:
        _run(agent.run())
    except KeyboardInterrupt:
        return 130
    return 0


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """uvloop when it is installed (the optional ``speedups`` extra), else the stdlib."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
