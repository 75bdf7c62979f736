"""The LLM decode step per batch size with each linear kernel, measured side by side in one process.

Compares the fp32 LLM's projections as plain ``nn.Linear`` (MKL) with the packed oneDNN weights it
runs with on the CPU (:class:`cosyserve.nn.linear.PackedLinear`), and optionally other LLM dtypes,
on a full-size random-weight model, interleaving the runs so that a noisy machine affects all alike.
Use it to check the kernel choice on a new kind of CPU:

    COSYSERVE_ASSETS_DIR=../shared/assets python3 scripts/decode_kernels.py \\
        ../shared/golden/fullsize-configs/v2-0.5b --frontend-from ../shared/golden/models/v2-tiny
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch

from cosyserve.bench import random_weight_dir
from cosyserve.engine.pipeline import load_model
from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.linear import unpack_linears


def step_ms(llm: torch.nn.Module, cache: KVCache, steps: int) -> float:
    ids = torch.randint(0, llm.speech_token_size, (cache.rows,))
    llm.logp(llm.decode_batch(ids, cache))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        llm.logp(llm.decode_batch(ids, cache))
    return (time.perf_counter() - start) / steps * 1000


def batch_cache(llm: torch.nn.Module, rows: int, prefix_len: int = 150) -> KVCache:
    dtype = llm.speech_embedding.weight.dtype
    cache = None
    for row in range(rows):
        _, row_cache = llm.prefill(torch.randn(1, prefix_len + 7 * row, llm.hidden_size, dtype=dtype))
        if cache is None:
            cache = row_cache
        else:
            cache.add_row(row_cache)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a full-size config dir (random weights)")
    parser.add_argument("--frontend-from", type=Path, required=True)
    parser.add_argument("--blank-en", type=Path)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--dtypes", default="", help="other LLM dtypes to time too, e.g. bf16,int8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    directory = random_weight_dir(args.model, args.frontend_from, args.blank_en)
    batches = [int(b) for b in args.batches.split(",")]
    # name -> the LLM (the same random weights: every variant is made from one fp32 model's state dict)
    reference = load_model(directory, random_weights=True, text_frontend="none").core
    plain = copy.deepcopy(reference.llm)
    unpack_linears(plain)
    llms = {"fp32 plain nn.Linear (MKL)": plain, "fp32 packed oneDNN (default)": reference.llm}
    for dtype in filter(None, args.dtypes.split(",")):
        variant = dataclasses.replace(reference, llm=copy.deepcopy(reference.llm)).set_precision(llm=dtype)
        llms[f"llm={dtype}"] = variant.llm
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        caches = {(name, b): batch_cache(llm, b) for name, llm in llms.items() for b in batches}
        for _ in range(args.rounds):
            for name, llm in llms.items():
                for b in batches:
                    times.setdefault((name, b), []).append(step_ms(llm, caches[name, b], args.steps))
    print(f"decode step, ms (best of {args.rounds} rounds of {args.steps} steps)")
    print(f"{'':44}" + "".join(f"batch {b:<4}" for b in batches))
    for name in llms:
        print(f"{name:44}" + "".join(f"{min(times[name, b]):<10.1f}" for b in batches))


if __name__ == "__main__":
    main()
