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


_ARENA_PROBE = """
import ctypes, sys, threading
from cosyserve.engine.memory import limit_malloc_arenas
took = limit_malloc_arenas(int(sys.argv[1]))
barrier = threading.Barrier(6)
def work():
    blocks = [bytearray(100_000) for _ in range(20)]  # above pymalloc's limit: glibc malloc, in this thread's arena
    barrier.wait()  # all six alive at once: none can take over an arena another left
    del blocks
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
print(took)
"""


def _arenas(limit: int) -> tuple[bool, int]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _ARENA_PROBE, str(limit)], capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True", done.stderr.count("Arena ")


def test_malloc_arenas_are_bounded_for_the_threads_started_after():
    if HeapTrimmer().available is False:
        pytest.skip("the C library is not glibc")
    took, bounded = _arenas(1)
    assert took and bounded == 1
    took, unbounded = _arenas(0)  # glibc's default: an arena per thread here
    assert not took and unbounded > 1


_KERNEL_PROBE = """
import ctypes, sys
from cosyserve.engine.memory import bound_kernel_caches
if sys.argv[1] != "default":
    bound_kernel_caches(int(sys.argv[1]))
import torch
torch.set_num_threads(1)
info = ctypes.CDLL(None).mallinfo2
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS]
info.restype = MallInfo2
conv = torch.nn.Conv1d(80, 256, 3, padding=1)
with torch.inference_mode():
    conv(torch.randn(1, 80, 50))
    before = info().uordblks + info().hblkhd
    for length in range(100, 500):  # a new input length each time, as the flow's convolutions see
        conv(torch.randn(1, 80, length))
    print((info().uordblks + info().hblkhd - before) / 2**20)
"""


def _conv_growth_mb(entries: str) -> float:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    done = subprocess.run(
        [sys.executable, "-c", _KERNEL_PROBE, entries], capture_output=True, text=True, check=True, env=env
    )
    return float(done.stdout.strip())


@pytest.mark.slow  # two processes that import torch
def test_bounded_kernel_caches_stop_growing_with_new_shapes():
    torch = pytest.importorskip("torch")
    if not torch.backends.mkldnn.is_available() or HeapTrimmer().available is False:
        pytest.skip("no oneDNN in this torch build, or no glibc")
    unbounded, bounded = _conv_growth_mb("default"), _conv_growth_mb("16")
    assert unbounded > 10 and bounded < unbounded / 3, (unbounded, bounded)
