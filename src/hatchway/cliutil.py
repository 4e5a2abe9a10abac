"""What the command-line modules share: failing cleanly, and reaching the relay."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from hatchway.errors import HatchwayError

T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"hatchway: {message}", err=True)
    sys.exit(code)


def guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; a Hatchway error becomes a one-line message and exit status 1."""
    try:
        return fn()
    except HatchwayError as exc:
        fail(str(exc))


def open_store(data_dir: Path) -> Any:
    from hatchway.store.sql import SqlStore

    return guard(lambda: SqlStore.open_data_dir(data_dir))


def login() -> Any:
    from hatchway.client.config import load_login

    return guard(load_login)


def api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the relay's REST API as the logged-in user."""
    from hatchway.client.relay_api import call

    saved = login()
    return guard(
        lambda: call(
            saved.server, method, path, ca_file=saved.ca_file, token=saved.token, body=body
        )
    )
