"""Keep glibc's allocator from returning memory to the kernel on every large free.

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
