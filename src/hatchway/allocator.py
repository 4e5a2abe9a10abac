"""Memory management at start: glibc's allocator thresholds and the garbage collector.

Keep glibc's allocator from returning memory to the kernel on every large free.

The data path allocates and frees buffers of 64 to 256 KiB all the time: a TCP read
(uvloop hands over up to 256 KiB at once), each TLS read (asyncio's SSL layer asks for
256 KiB and keeps one 16 KiB record of it), a batched tunnel message. glibc serves
blocks above ``M_MMAP_THRESHOLD`` (128 KiB at first) with ``mmap`` and, when the top of
the heap holds more than ``M_TRIM_THRESHOLD`` free, gives it back with ``brk``: either
way every such buffer costs system calls and page faults, which on a virtual machine
cost more than the copy itself. Measured on 2 cores (bench/README.md): the stock TLS
receive path went from ~760 MB/s to ~1.9 GB/s, and the tunnel's bulk throughput rose
by about a tenth with less CPU per byte.

Fixing both thresholds (blocks up to 1 MiB come from the heap; up to 4 MiB of free heap
is kept) costs at most a few MiB of resident memory. The ``MALLOC_*_`` environment
variables, when set, win; ``HATCHWAY_MALLOPT=0`` leaves glibc's defaults; other C
libraries are left alone.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

#: mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1024 * 1024
TRIM_THRESHOLD = 4 * 1024 * 1024


def tune() -> bool:
    """Set the thresholds; True when glibc took them."""
    if not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    if os.environ.get("HATCHWAY_MALLOPT", "1") == "0":
        return False
    try:
        # The symbols the interpreter is linked with: libc's among them (no ldconfig run).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt in this C library
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def freeze_startup() -> int:
    """Collect the garbage starting up left, then put every object alive now out of the
    garbage collector's sight (``gc.freeze``); returns how many objects that is.

    A relay holds ~150,000 objects from its start (modules, classes, the ORM's tables
    and compiled statements) for as long as it runs. A full collection walks every
    object it tracks, and one over those took 60-90 ms on 2 cores: a pause in which no
    connection is served, repeated whenever enough connection objects have grown old.
    Frozen, they are walked no more, and a full collection costs what the live
    connections own. Objects made later are collected as before.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
