"""Small files a person gives the agent or the client (secrets, configuration, the
saved login): read with a bound, whatever the path turns out to be."""

from __future__ import annotations

from pathlib import Path

from hatchway.errors import ConfigError


def read_small_text(path: Path, limit: int, what: str) -> str:
    """The UTF-8 text of ``path``, which may hold at most ``limit`` bytes. A device or
    a pipe that never ends (``/dev/zero``) is refused after ``limit`` bytes, not read
    until memory runs out. ConfigError with a sentence otherwise; ``OSError`` passes
    (the caller words it: a missing file means something different to each)."""
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is too large (more than {limit // 1024} KiB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
