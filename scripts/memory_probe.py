#!/usr/bin/env python3
"""Run a cosyserve command with its memory recorded per phase: what grows, and in which allocator.

Every ``--every`` seconds one JSON line goes to ``--out``: the resident memory, glibc's heap statistics
(``mallinfo2``, all arenas: the heap's size, the bytes in use and free in it, the bytes in mmap'd
blocks), and unless ``--no_trace`` the Python heap traced by ``tracemalloc`` with the ten tracebacks whose
traced memory grew most since the first sample (after warm-up). Python growth shows in tracemalloc; a
flat tracemalloc with growing ``in_use`` is native (torch, onnxruntime); growing ``free`` is the allocator
keeping freed memory.

    python3 scripts/memory_probe.py --out mem.jsonl -- serve --model_dir ../shared/golden/models/v2-tiny
    python3 scripts/soak.py --url http://127.0.0.1:50000 --pid PID --clients 32 --duration 600

``scripts/soak.py --memory_probe mem.jsonl`` starts its server this way. tracemalloc slows Python down:
use it to find growth, not to measure throughput.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

TRACE_FRAMES = 8
TOP_LINES = 10


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mallinfo2() -> dict[str, int] | None:
    """glibc's heap statistics in bytes (None without glibc >= 2.33)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):
        return None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    info = fn()
    return {"heap": info.arena, "in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _sample(
    first: tracemalloc.Snapshot | None, started: float, group: str
) -> tuple[dict[str, Any], tracemalloc.Snapshot | None]:
    record: dict[str, Any] = {"t_s": round(time.monotonic() - started, 1), "rss": _rss_bytes(), "malloc": _mallinfo2()}
    if not tracemalloc.is_tracing():
        return record, None
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    record["python_traced"], record["python_peak"] = tracemalloc.get_traced_memory()
    if first is not None:
        growth = snapshot.compare_to(first, group)[:TOP_LINES]
        record["python_growth"] = [
            {"bytes": stat.size_diff, "count": stat.count_diff, "where": [str(f) for f in stat.traceback][-4:]}
            for stat in growth
            if stat.size_diff > 0
        ]
    return record, snapshot


def _probe(out: Path, every: float, warmup: float, started: float, group: str) -> None:
    first = None
    time.sleep(warmup)
    with out.open("a", encoding="utf-8") as sink:
        while True:
            record, snapshot = _sample(first, started, group)
            first = first or snapshot
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            time.sleep(every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines file, appended to")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between samples (default 60)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the first sample (default 60)")
    parser.add_argument("--no_trace", action="store_true", help="allocator statistics only (no tracemalloc)")
    parser.add_argument(
        "--group", choices=("traceback", "lineno", "filename"), default="traceback", help="how growth is summed up"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the cosyserve command's arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.no_trace:
        tracemalloc.start(TRACE_FRAMES)
    started = time.monotonic()
    probe_args = (Path(args.out), args.every, args.warmup, started, args.group)
    threading.Thread(target=_probe, args=probe_args, daemon=True).start()
    from cosyserve.cli import main as cosyserve_main

    return cosyserve_main(command)


if __name__ == "__main__":
    sys.exit(main())
