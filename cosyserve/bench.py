"""``cosyserve bench``: per-stage time, real-time factor, first-chunk latency and peak memory.

Works on a real model directory, or builds a full-size model with random weights from an official
yaml alone (``--random-weights``), so speed can be measured without downloading weights. With
random weights the LLM cannot be trusted to stop, so every run generates exactly
``--seconds`` of speech tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cosyserve.config import load_yaml
from cosyserve.engine.pipeline import _FAMILIES, load_model
from cosyserve.engine.streaming import Draws, PromptCondition
from cosyserve.hub import resolve_model_dir
from cosyserve.models.cosyvoice3.llm import ENDOFPROMPT_ID

DEFAULT_TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory or hub id (with --random-weights: a directory with the yaml)")
    parser.add_argument("--random-weights", action="store_true", help="build the networks from the yaml, no .pt")
    parser.add_argument("--blank-en", type=Path, help="CosyVoice-BlankEN dir with config.json (v2/v3 random weights)")
    parser.add_argument("--seconds", type=float, default=9.0, help="speech to generate per run (default 9)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="text for the frontend timing")
    parser.add_argument("--prompt-wav", type=Path, help="prompt audio: times the prompt frontend (real models)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


class StageTimer:
    """Accumulates wall time of wrapped callables per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

        return timed

    @contextmanager
    def stage(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fixed_length_sampler(core, n_tokens: int, generator: torch.Generator):
    """RAS sampling restricted to speech ids for ``n_tokens`` steps, then the stop id."""
    ras = core.llm.make_sampler(generator)
    speech_ids = core.llm.speech_token_size
    stop_id = core.llm.eos_token

    def sample(logp: torch.Tensor, history: list[int]) -> int:
        if len(history) >= n_tokens:
            return stop_id
        masked = logp.clone()
        masked[speech_ids:] = float("-inf")
        return ras(masked, history)

    return sample


def _build_random(model: str, blank_en: Path | None):
    model_dir, family = resolve_model_dir(model)
    yaml_name, module_name, _, synthesizer = _FAMILIES[family]
    blank = blank_en or model_dir / "CosyVoice-BlankEN"
    config = load_yaml(model_dir / yaml_name, {"qwen_pretrain_path": str(blank)})
    module = __import__(module_name, fromlist=["load"])
    if family != "cosyvoice1":
        # The v2/v3 loaders read the LLM geometry from <dir>/CosyVoice-BlankEN/config.json.
        model_dir = _with_blank_en(model_dir, blank)
    core = module.load(model_dir, config, random_weights=True)
    return core, synthesizer, None


def _with_blank_en(model_dir: Path, blank: Path) -> Path:
    if (model_dir / "CosyVoice-BlankEN" / "config.json").is_file():
        return model_dir
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="cosyserve-bench-"))
    (tmp / "CosyVoice-BlankEN").symlink_to(blank.resolve())
    return tmp


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    timer = StageTimer()
    with timer.stage("load"):
        if args.random_weights:
            core, synthesizer_cls, tts = _build_random(args.model, args.blank_en)
        else:
            tts = load_model(args.model)
            core, synthesizer_cls = tts.core, tts._synthesizer
    load_s = timer.seconds.pop("load")

    report: dict[str, Any] = {
        "model": str(args.model),
        "family": core.family,
        "random_weights": bool(args.random_weights),
        "threads": args.threads,
        "load_s": round(load_s, 2),
    }
    if tts is not None:
        with timer.stage("frontend"):
            tts.frontend.normalize(args.text, split=True, text_frontend=True)
            if args.prompt_wav:
                prompt = tts.prompt(args.prompt_wav.read_bytes())
    if args.random_weights or not args.prompt_wav:
        prompt = {"flow_embedding": torch.randn(1, 192, generator=torch.Generator().manual_seed(args.seed))}
    condition = PromptCondition(
        token=prompt.get("flow_prompt_speech_token", torch.zeros(1, 0, dtype=torch.int32)),
        feat=prompt.get("prompt_speech_feat", torch.zeros(1, 0, 80)),
        embedding=prompt["flow_embedding"],
    )
    text_ids = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(args.seed), dtype=torch.int32)
    if core.version == "v3":  # the v3 LLM requires <|endofprompt|> in its text
        text_ids[0, 0] = ENDOFPROMPT_ID
    n_tokens = round(args.seconds * core.token_frame_rate)

    core.flow.inference = timer.wrap("flow", core.flow.inference)
    core.hift.inference = timer.wrap("vocoder", core.hift.inference)

    def one_run(stream: bool) -> tuple[float, float | None, float]:
        draws = Draws(args.seed)
        sampler = _fixed_length_sampler(core, n_tokens, draws.generator)
        llm_tokens = core.llm.inference(
            text_ids,
            torch.zeros(1, 0, dtype=torch.int32),
            torch.zeros(1, 0, dtype=torch.int32),
            torch.zeros(0, 192),
            sampler,
        )
        llm_tokens = _timed_iter(llm_tokens, timer, "llm")
        synth = synthesizer_cls(core, condition, draws, 1.0)
        start = time.perf_counter()
        first = None
        samples = 0
        with torch.inference_mode():
            for chunk in synth.run(llm_tokens, stream):
                first = first if first is not None else time.perf_counter() - start
                samples += chunk.shape[0]
        return time.perf_counter() - start, first, samples / core.sample_rate

    runs = [("non-stream", False)] + ([] if args.no_stream else [("stream", True)])
    for name, stream in runs:
        timer.seconds = {k: v for k, v in timer.seconds.items() if k == "frontend"}
        total, first, audio_s = one_run(stream)
        stages = {k: round(v, 3) for k, v in timer.seconds.items()}
        report[name] = {
            "audio_s": round(audio_s, 2),
            "total_s": round(total, 2),
            "rtf": round(total / audio_s, 3) if audio_s else None,
            "first_chunk_s": round(first, 3) if first is not None else None,
            "stages_s": stages,
            "stages_rtf": {k: round(v / audio_s, 3) for k, v in stages.items()} if audio_s else {},
        }
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _timed_iter(iterator, timer: StageTimer, stage: str):
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            timer.seconds[stage] = timer.seconds.get(stage, 0.0) + time.perf_counter() - start
            return
        timer.seconds[stage] = timer.seconds.get(stage, 0.0) + time.perf_counter() - start
        yield item


def _print_table(report: dict[str, Any]) -> None:
    print(
        f"model {report['model']} ({report['family']}, random weights: {report['random_weights']}), "
        f"{report['threads']} threads, load {report['load_s']} s"
    )
    for name in ("non-stream", "stream"):
        if name not in report:
            continue
        r = report[name]
        first = f", first chunk {r['first_chunk_s']} s" if name == "stream" else ""
        print(f"{name}: {r['audio_s']} s audio in {r['total_s']} s, RTF {r['rtf']}{first}")
        for stage, seconds in r["stages_s"].items():
            print(f"  {stage:9s} {seconds:8.3f} s  RTF {r['stages_rtf'].get(stage)}")
    print(f"peak RSS {report['peak_rss_mb']} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cosyserve bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
