#!/usr/bin/env python3
"""Peak RSS growth of synthesizing one 4,000-character text without punctuation (issue 14, item 1).

    PYTHONPATH=. python3 scripts/long_text_memory.py ../shared/golden/models/v2-tiny letters
    PYTHONPATH=. python3 scripts/long_text_memory.py ../shared/golden/models/v2-tiny cjk

Runs the engine's Python API (``inference_sft`` with the model's first speaker) after a short warm-up
and samples /proc/self/status every 50 ms; prints segments, audio seconds, wall time and RSS growth.
"""

from __future__ import annotations

import random
import string
import sys
import threading
import time


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def unpunctuated(kind: str, length: int = 4000) -> str:
    rng = random.Random(kind)
    if kind == "letters":
        return "".join(rng.choice(string.ascii_letters) for _ in range(length))
    if kind == "cjk":
        return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(length))
    raise SystemExit(f"kind must be letters or cjk, not {kind!r}")


def main() -> int:
    import torch

    from cosyserve.engine.pipeline import load_model

    model_dir, kind = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "letters"
    torch.set_num_threads(1)
    text = unpunctuated(kind)
    model = load_model(model_dir)
    speaker = model.list_speakers()[0]
    for _ in model.inference_sft("Hello there.", speaker, seed=1):  # warm-up: first-call allocations
        pass
    base = rss_mb()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    segments = model.frontend.normalize(text)
    started = time.monotonic()
    samples = sum(chunk.shape[-1] for chunk in model.inference_sft(text, speaker, seed=1))
    done.set()
    print(
        f"kind={kind} segments={len(segments)} audio_s={samples / model.sample_rate:.1f} "
        f"wall_s={time.monotonic() - started:.1f} rss_base_mb={base:.0f} rss_peak_mb={peak:.0f} "
        f"growth_mb={peak - base:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
