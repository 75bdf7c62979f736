"""Freed heap memory goes back to the system as requests finish (glibc's malloc_trim)."""

from __future__ import annotations

import pytest

from cosyserve.engine.memory import HeapTrimmer


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_trimming_returns_freed_heap_pages():
    heap = HeapTrimmer()
    if not heap.available:
        pytest.skip("the C library has no malloc_trim")
    # 64 KiB blocks stay below glibc's mmap threshold, so they live in the heap; the last one
    # allocated stays alive and pins the heap's top, so free() alone cannot shrink it.
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    keep = blocks[-1]
    del blocks
    before = _rss_mb()
    heap.request_finished(idle=True)
    after = _rss_mb()
    assert heap.trims == 1
    assert before - after > 100, f"RSS {before:.0f} -> {after:.0f} MB"
    assert keep  # still alive


def test_trimming_is_rate_limited_while_busy():
    heap = HeapTrimmer(interval_s=3600)
    if not heap.available:
        pytest.skip("the C library has no malloc_trim")
    heap.request_finished(idle=False)
    heap.request_finished(idle=False)
    assert heap.trims == 1
    heap.request_finished(idle=True)  # idle: always
    assert heap.trims == 2
