"""Giving freed heap memory back to the system between requests, and bounding what glibc keeps.

Each request allocates and frees many tensors of its own shapes (text length, chunk sizes). glibc
keeps freed blocks in its heaps (and raises its mmap threshold as large blocks are freed, so later
large tensors land in the heap too), so a long-running server's resident memory creeps up with the
variety of requests it has seen, although nothing is leaked. ``malloc_trim`` returns the free pages;
the engine calls it as requests finish, at most once per interval, and whenever it becomes idle.

glibc also gives each thread that allocates its own arena (up to eight per core); freed memory then
sits in many arenas, each keeping its own free pages, and a long-running server's resident memory
grows with the threads it has seen (the engine's, the frontend pool's, the event loop's worker threads).
:func:`limit_malloc_arenas` caps their number for the whole process (the server: ``--malloc_arenas``).

What did grow in a long soak is oneDNN's (PyTorch's CPU convolutions): it keeps a compiled kernel per
convolution and input shape, in its primitive cache and in ideep's, 1024 entries each by default; the
flow and vocoder see a new length with almost every request, so the caches take tens of megabytes more
with the requests of every new length, for hours, before they are full. :func:`bound_kernel_caches`
gives them :data:`KERNEL_CACHE_ENTRIES` entries: still every convolution of a request (reused over its
flow steps and chunks), no longer the shapes of a thousand requests before it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

logger = logging.getLogger("cosyserve.engine")

TRIM_INTERVAL_S = 1.0  # at most one trim per second while busy (a trim of a large heap takes a few ms)
_M_ARENA_MAX = -8  # mallopt's parameter number (glibc malloc.h)
# Entries of each oneDNN kernel cache (its default: 1024). Measured on the tiny CosyVoice2, 60 requests of
# varied lengths: 1024 entries took 20 MB more, 256 took 3 MB at the same speed, 64 was 15 % slower.
KERNEL_CACHE_ENTRIES = 256
_KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Give oneDNN's kernel caches ``entries`` entries each (a value already in the environment wins).
    They are sized when torch first runs a convolution: call it before the models load."""
    for name in _KERNEL_CACHES:
        os.environ.setdefault(name, str(entries))


def limit_malloc_arenas(count: int) -> bool:
    """Let glibc create at most ``count`` malloc arenas from now on (call it before threads start);
    whether it took (False without glibc, or for ``count`` 0: glibc's default)."""
    name = ctypes.util.find_library("c")
    if count < 1 or not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # glibc only (absent on musl and macOS)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def available_memory_bytes() -> int:
    """Memory the system can give without swapping (Linux's MemAvailable; else free physical pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # unknown: a modest guess


class HeapTrimmer:
    """Trims the C heap after requests finish (a no-op where the C library has no ``malloc_trim``)."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._trim = _malloc_trim()
        self._last = float("-inf")
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def request_finished(self, idle: bool) -> None:
        """A request left the engine; ``idle``: nothing else is running."""
        now = time.monotonic()
        if self._trim is None or (not idle and now - self._last < self.interval_s):
            return
        self._last = now
        self._trim(0)
        self.trims += 1
