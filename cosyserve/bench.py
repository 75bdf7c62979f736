"""``cosyserve bench``: throughput, latency, per-stage time and memory, through the engine client.

Works on a real model directory, or builds a full-size model with random weights from an official
yaml alone (``--random-weights``), so speed can be measured without downloading weights. A
random-weight model has no tokenizer or ONNX files: ``--frontend-from`` names a directory of the same
family whose frontend files are used (the golden tiny models have them). With random weights the LLM
cannot be trusted to stop, so every request generates exactly ``--seconds`` of speech tokens, with
the given text and prompt: the same work as the official implementation's reference timings.

What it reports (progress goes to stderr, the report to stdout):
- per concurrency level N (``--concurrency 1,4,8``): N requests submitted at once to the engine
  client (no HTTP), aggregate audio seconds per wall second, first-chunk and total latency p50/p95,
  and, at N = 1, the time per stage (prefill, decode, flow, vocoder);
- the LLM decode step time at batch 1, 4, 8 (``--decode-batches``) next to its weight-read bound:
  the bytes of weights one step reads divided by the measured memory bandwidth;
- peak RSS;
- with ``--mixed``, through HTTP: a stream's largest gap between chunks alone, beside a non-streamed
  request, and while a zero-shot request with a long prompt is admitted (:mod:`cosyserve.bench_mixed`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cosyserve.bench_mixed import print_mixed, run_mixed
from cosyserve.engine.client import AsyncEngine, AudioStream
from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.hub import resolve_model_dir
from cosyserve.models.base import BLANK_EN
from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.linear import PackedLinear
from cosyserve.precision import DEFAULT_STREAM_CACHE_MB, DEFAULT_STREAM_LAST_CHUNK, STREAM_LAST_CHUNK_MODES

# The official benchmark's text and prompt transcript (the reference repo's example).
DEFAULT_TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。"
DEFAULT_PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
# The files a frontend reads; a random-weight model borrows them from --frontend-from.
FRONTEND_FILES = ("campplus.onnx", "spk2info.pt", "speech_tokenizer_v1.onnx", "speech_tokenizer_v2.onnx",
                  "speech_tokenizer_v3.onnx")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or hub id (with --random-weights: a directory with the yaml)")
    parser.add_argument("--random-weights", action="store_true", help="build the networks from the yaml, no .pt")
    parser.add_argument("--frontend-from", type=Path, help="directory whose tokenizer / ONNX / speaker files to use")
    parser.add_argument("--blank-en", type=Path, help="CosyVoice-BlankEN dir with config.json (v2/v3 geometry)")
    parser.add_argument("--seconds", type=float, default=9.0, help="speech per request (default 9)")
    parser.add_argument("--mode", choices=("sft", "zero_shot"), default="sft")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--prompt-wav", type=Path, help="prompt recording (zero_shot)")
    parser.add_argument("--prompt-text", default=DEFAULT_PROMPT_TEXT, help="its transcript (zero_shot)")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated request counts (default 1,4,8)")
    parser.add_argument("--stream-concurrency", help="request counts of the streaming runs (default: --concurrency)")
    parser.add_argument("--decode-batches", default="1,4,8", help="batch sizes for the decode-step timing")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", default="fp32", help="precision: fp32, bf16, or llm=int8,flow=bf16 (default fp32)")
    parser.add_argument("--flow-steps", type=int, help="Euler steps of the flow (default: the model's 10)")
    parser.add_argument(
        "--stream-last-chunk",
        choices=STREAM_LAST_CHUNK_MODES,
        default=DEFAULT_STREAM_LAST_CHUNK,
        help="streamed v2/v3 last chunk: causal (its own frames only) or reference (full context)",
    )
    parser.add_argument(
        "--stream-cache-mb",
        type=int,
        default=DEFAULT_STREAM_CACHE_MB,
        help="MB of the flow's cached keys / values of all streamed requests; 0: automatic (default %(default)s)",
    )
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming runs")
    parser.add_argument("--stream-only", action="store_true", help="skip the non-streaming runs")
    parser.add_argument("--mixed", action="store_true", help="also the mixed-load scenarios through HTTP")
    parser.add_argument(
        "--long-prompt-seconds", type=float, default=29.0, help="the mixed load's zero-shot prompt (default 29)"
    )
    parser.add_argument("--no-warmup", action="store_true", help="measure from the first request on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class FixedLengthSampler:
    """The yaml's RAS sampler restricted to speech ids for ``n_tokens`` picks per request, then the stop id."""

    def __init__(self, model: TTSModel, n_tokens: int, seed: int) -> None:
        llm = model.core.llm
        self.ras = llm.make_sampler(torch.Generator().manual_seed(seed))
        self.speech_ids = llm.speech_token_size
        self.stop_id = llm.eos_token
        self.left = n_tokens

    def __call__(self, logp: torch.Tensor, history: list[int]) -> int:
        if self.left <= 0:
            return self.stop_id
        self.left -= 1
        masked = logp.clone()
        masked[self.speech_ids :] = float("-inf")
        return self.ras(masked, history)


class FixedLengthEngine(AsyncEngine):
    """The in-process engine with every request generating exactly ``n_tokens`` speech tokens (a
    random-weight LLM cannot be trusted to stop), also for requests that come through HTTP."""

    def __init__(self, model: TTSModel, n_tokens: int, seed: int, max_running: int, max_queue: int) -> None:
        super().__init__(model, max_running=max_running, max_queue=max_queue)
        self.n_tokens = n_tokens
        self.seeds = itertools.count(seed)

    async def synthesize(
        self, request: SynthesisRequest, request_id: str | None = None, **overrides: Any
    ) -> AudioStream:
        overrides.setdefault("sampler", FixedLengthSampler(self.model, self.n_tokens, next(self.seeds)))
        return await super().synthesize(request, request_id, **overrides)


def random_weight_dir(model_dir: Path, frontend_from: Path | None, blank_en: Path | None) -> Path:
    """A directory with ``model_dir``'s yaml and geometry and ``frontend_from``'s frontend files."""
    work = Path(tempfile.mkdtemp(prefix="cosyserve-bench-"))
    for yaml in model_dir.glob("*.yaml"):
        (work / yaml.name).symlink_to(yaml.resolve())
    if frontend_from is not None:
        for name in FRONTEND_FILES:
            if (frontend_from / name).is_file():
                (work / name).symlink_to((frontend_from / name).resolve())
    geometry = blank_en or (model_dir / BLANK_EN if (model_dir / BLANK_EN).is_dir() else None)
    tokenizer = frontend_from / BLANK_EN if frontend_from is not None else None
    if geometry is not None or (tokenizer is not None and tokenizer.is_dir()):
        (work / BLANK_EN).mkdir()
        for source in (tokenizer, geometry):  # the geometry's config.json wins over the tokenizer dir's
            if source is not None and source.is_dir():
                for f in source.iterdir():
                    target = work / BLANK_EN / f.name
                    if target.exists() or target.is_symlink():
                        target.unlink()
                    target.symlink_to(f.resolve())
    return work


def _request(model: TTSModel, args: argparse.Namespace, stream: bool) -> SynthesisRequest:
    options = GenerationOptions(stream=stream, seed=args.seed)
    if args.mode == "sft":
        return SynthesisRequest("sft", args.text, spk_id=model.list_speakers()[0], options=options)
    if args.prompt_wav is None:
        raise SystemExit("--mode zero_shot needs --prompt-wav")
    prompt = args.prompt_wav.read_bytes()
    return SynthesisRequest("zero_shot", args.text, prompt_text=args.prompt_text, prompt_audio=prompt, options=options)


async def _one(engine: FixedLengthEngine, request: SynthesisRequest) -> dict[str, Any]:
    start = time.perf_counter()
    arrivals = []
    samples = 0
    stream = await engine.synthesize(request)
    async for chunk in stream:
        arrivals.append(time.perf_counter())
        samples += chunk.shape[0]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "total_s": time.perf_counter() - start,
        "first_s": arrivals[0] - start if arrivals else 0.0,
        "samples": samples,
        "gap_max_s": max(gaps, default=0.0),
        "gap_median_s": _percentile(gaps, 0.5) or 0.0,
    }


async def _level(engine: FixedLengthEngine, model: TTSModel, args: argparse.Namespace, n: int, stream: bool) -> dict:
    requests = [_request(model, args, stream) for _ in range(n)]
    timings: dict[str, float] = {}
    engine.core.scheduler.timings = timings
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(engine, r) for r in requests))
    wall = time.perf_counter() - start
    engine.core.scheduler.timings = None
    audio_s = sum(r["samples"] for r in results) / model.sample_rate
    totals = [r["total_s"] for r in results]
    firsts = [r["first_s"] for r in results]
    return {
        "concurrency": n,
        "stream": stream,
        "audio_s": round(audio_s, 2),
        "wall_s": round(wall, 2),
        "throughput": round(audio_s / wall, 3),  # audio seconds per wall second
        "rtf": round(wall / (audio_s / n), 3) if audio_s else None,  # per request, as a listener sees it
        "first_chunk_p50_s": round(_percentile(firsts, 0.5), 3),
        "first_chunk_p95_s": round(_percentile(firsts, 0.95), 3),
        "total_p50_s": round(_percentile(totals, 0.5), 3),
        "total_p95_s": round(_percentile(totals, 0.95), 3),
        # Per request, its largest / median gap between two chunks; the worst request's here.
        "gap_max_s": round(max(r["gap_max_s"] for r in results), 3),
        "gap_median_s": round(max(r["gap_median_s"] for r in results), 3),
        "stages_s": {k: round(v, 3) for k, v in timings.items()},
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth_gbs(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes moved per second by a large tensor copy (one read and one write per byte)."""
    src = torch.ones(megabytes * 1024 * 1024 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def decode_weight_bytes(llm: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: everything but the embedding tables (one row each)."""
    total = 0
    seen: set[int] = set()
    for module in llm.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not isinstance(module, torch.nn.Embedding):
                total += param.numel() * param.element_size()
        if isinstance(module, PackedLinear):  # its weight is an opaque oneDNN tensor, not a parameter
            total += module.out_features * module.in_features * module.dtype.itemsize
        packed = getattr(module, "_packed_params", None)  # an int8 (dynamically quantized) linear layer
        if packed is not None and callable(getattr(module, "weight", None)):
            for tensor in (module.weight(), module.bias()):
                total += 0 if tensor is None else tensor.numel() * tensor.element_size()
    return total


def decode_step_times(model: TTSModel, batches: list[int], prefix_len: int = 150, steps: int = 12) -> list[dict]:
    """Mean time of one batched decode step at each batch size (rows with different history lengths)."""
    llm = model.core.llm
    device = llm.speech_embedding.weight.device
    dtype = llm.speech_embedding.weight.dtype
    out = []
    with torch.inference_mode():
        for b in batches:
            cache = KVCache(0)
            for row in range(b):
                prefix = torch.randn(1, prefix_len + 7 * row, llm.hidden_size, device=device, dtype=dtype)
                _, row_cache = llm.prefill(prefix)
                if row == 0:
                    cache = row_cache
                else:
                    cache.add_row(row_cache)
            ids = torch.randint(0, llm.speech_token_size, (b,), device=device)
            llm.logp(llm.decode_batch(ids, cache))  # warm-up
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                llm.logp(llm.decode_batch(ids, cache))
            _sync(device)
            out.append({"batch": b, "step_ms": round((time.perf_counter() - start) / steps * 1000, 2)})
    return out


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model_dir, _ = resolve_model_dir(args.model)
    progress(f"loading {model_dir} ({'random weights' if args.random_weights else 'weights'})")
    started = time.perf_counter()
    options = {
        "threads": args.threads,
        "dtype": args.dtype,
        "flow_steps": args.flow_steps,
        "stream_last_chunk": args.stream_last_chunk,
        "stream_cache_mb": args.stream_cache_mb,
        "device": args.device,
    }
    if args.random_weights:
        directory = random_weight_dir(model_dir, args.frontend_from, args.blank_en)
        model = load_model(directory, random_weights=True, text_frontend="none", **options)
    else:
        model = load_model(model_dir, **options)
    load_s = time.perf_counter() - started
    report: dict[str, Any] = {
        "model": str(args.model),
        "family": model.family,
        "random_weights": bool(args.random_weights),
        "mode": args.mode,
        "threads": args.threads,
        "dtype": args.dtype,
        "flow_steps": args.flow_steps,
        "stream_last_chunk": args.stream_last_chunk,
        "stream_cache_mb": args.stream_cache_mb,
        "load_s": round(load_s, 2),
        "runs": [],
    }
    levels = [int(n) for n in args.concurrency.split(",") if n.strip()]
    stream_levels = [int(n) for n in (args.stream_concurrency or args.concurrency).split(",") if n.strip()]
    kinds = ([] if args.stream_only else [(False, levels)]) + ([] if args.no_stream else [(True, stream_levels)])
    most = max(levels + stream_levels + [3])
    n_tokens = round(args.seconds * model.token_rate)
    engine = FixedLengthEngine(model, n_tokens, args.seed, max_running=most, max_queue=most)
    try:
        if not args.no_warmup:
            # A server's first requests write memory the process never touched (the streamed flow's
            # key / value buffers among it), several times slower on a VM: measured apart, not in the runs.
            for stream, _ in kinds:
                progress(f"warm-up: one {'streamed' if stream else 'non-streamed'} request ...")
                warm = asyncio.run(_level(engine, model, args, 1, stream))
                report.setdefault("warmup", []).append(warm)
        for stream, counts in kinds:
            for n in counts:
                progress(f"{'stream' if stream else 'non-stream'}: {n} request(s) of {args.seconds} s ...")
                result = asyncio.run(_level(engine, model, args, n, stream))
                progress(
                    f"  {result['audio_s']} s audio in {result['wall_s']} s: {result['throughput']} audio s/s, "
                    f"first chunk p50 {result['first_chunk_p50_s']} s"
                )
                report["runs"].append(result)
        if args.mixed:
            progress(
                f"mixed load through HTTP ({args.seconds} s each, {args.long_prompt_seconds} s zero-shot prompt) ..."
            )
            report["mixed"] = run_mixed(
                engine, model.list_speakers()[0], args.text, args.prompt_text, args.long_prompt_seconds
            )
    finally:
        engine.core.stop()
    progress("decode step timing ...")
    batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
    bandwidth = memory_bandwidth_gbs(model.core.llm.speech_embedding.weight.device)
    weight_bytes = decode_weight_bytes(model.core.llm)
    bound_ms = weight_bytes / (bandwidth * 1e9) * 1000
    report["decode"] = {
        "weight_mb": round(weight_bytes / 1e6, 1),
        "bandwidth_gbs": round(bandwidth, 2),
        "weight_read_bound_ms": round(bound_ms, 2),
        "steps": [{**s, "x_bound": round(s["step_ms"] / bound_ms, 2)} for s in decode_step_times(model, batches)],
    }
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict[str, Any]) -> None:
    print(
        f"model {report['model']} ({report['family']}, random weights: {report['random_weights']}, "
        f"{report['mode']}), {report['threads']} threads, dtype {report['dtype']}, "
        f"flow steps {report['flow_steps'] or 'default'}, stream last chunk {report['stream_last_chunk']}, "
        f"stream cache {report['stream_cache_mb']} MB, load {report['load_s']} s"
    )
    for w in report.get("warmup", []):
        print(f"warm-up ({'stream' if w['stream'] else 'non-stream'}, not counted): {w['wall_s']} s")
    print("kind        N  audio_s  wall_s  audio_s/s   RTF  first p50/p95 s  total p50/p95 s")
    for r in report["runs"]:
        kind = "stream" if r["stream"] else "non-stream"
        print(
            f"{kind:10s} {r['concurrency']:2d} {r['audio_s']:8.2f} {r['wall_s']:7.2f} {r['throughput']:10.3f} "
            f"{r['rtf']:5.2f} {r['first_chunk_p50_s']:7.2f}/{r['first_chunk_p95_s']:<7.2f} "
            f"{r['total_p50_s']:7.2f}/{r['total_p95_s']:<7.2f}"
        )
        if r["stream"]:
            print(f"{'':14s}gap between chunks: max {r['gap_max_s']:.2f} s, median {r['gap_median_s']:.2f} s")
        if r["concurrency"] == 1:
            stages = ", ".join(f"{k} {v:.2f} s" for k, v in r["stages_s"].items())
            print(f"{'':14s}stages: {stages}")
    d = report["decode"]
    print(
        f"LLM decode step: weights {d['weight_mb']} MB, bandwidth {d['bandwidth_gbs']} GB/s, "
        f"weight-read bound {d['weight_read_bound_ms']} ms"
    )
    for s in d["steps"]:
        print(f"  batch {s['batch']:2d}: {s['step_ms']:8.2f} ms  ({s['x_bound']}x the bound)")
    if "mixed" in report:
        print_mixed(report["mixed"])
    print(f"peak RSS {report['peak_rss_mb']} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cosyserve bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
