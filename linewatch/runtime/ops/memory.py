"""Resident memory of a long-running daemon: glibc's allocator held to a few arenas.

glibc gives each thread that allocates under contention an arena of its own (up to 8 per core)
and keeps freed memory in it. The daemon's threads (receive, decode, one per stage, sinks)
each decode or judge frames of hundreds of kB, so on a 2-core host its resident size grew by
a few hundred MB over what it uses (`benchmarks/overload.py`, its big-PNG phase: 1214 MB
without the cap, 1017 MB with it). Two arenas are enough for threads that mostly
wait; the variable MALLOC_ARENA_MAX set in the environment (systemd unit, container) wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
DEFAULT_ARENAS = 2


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads started from now on, unless MALLOC_ARENA_MAX is
    set. Returns whether the cap was set (False on other C libraries, or when the environment
    decides)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt arenas)
        return False
