"""How far each precision option moves a model's outputs from fp32 (``--dtype`` / ``--flow_steps``).

Builds one model (a real directory, or a full-size random-weight one from an official yaml, as
``cosyserve bench --random-weights`` does), then compares every option with fp32 on the SAME
weights (each variant is a copy of the fp32 stage with :meth:`FamilyModel.set_precision` applied)
and the same inputs:

- LLM (``llm=bf16|fp16|int8``), teacher-forced: the fp32 model decodes ``--steps`` speech tokens
  greedily (stop ids masked) from an sft prefix; the variant is fed the same prefix and the same
  fp32 tokens, so a flip does not cascade. Reported per step: whether the variant's argmax over
  the speech ids equals fp32's (agreement rate), and |logp - logp32| over the FULL vocabulary
  (max over all steps and ids, and mean) and at fp32's top-10 ids. With random weights the
  distribution is nearly flat, so ``top1-top2`` (fp32's mean margin in log-prob) is printed too:
  an argmax flips when the error is comparable to that margin.
- Flow (``flow=bf16|fp16``, ``flow_steps=N``) on the same speech tokens (``--seconds`` of seeded
  random ids: a random-weight LLM's greedy ids are often one repeated id), the same x-vector and
  noise: ||mel - mel32|| / ||mel32||, and the SNR (dB) of the vocoder's waveform from that mel
  against the vocoder's waveform from mel32; the vocoder itself always runs in fp32 with the same
  source draws (as the engine does). The harmonic excitation integrates the predicted f0, so a
  0.1 % f0 change drifts the phase by a sizeable fraction of a cycle within seconds and the
  waveform SNR falls to a few dB whatever the mel error; two phase-blind views are printed beside
  it: the relative error of the STFT magnitude, and the SNR of the vocoder's decoder run on the
  fp32 mel's excitation (the mel's effect without the phase drift).

Example (full-size CosyVoice2, random weights, 2 threads)::

    COSYSERVE_ASSETS_DIR=/work/shared/assets python3 scripts/precision_report.py \\
        /work/shared/golden/fullsize-configs/v2-0.5b --random-weights \\
        --frontend-from /work/shared/golden/models/v2-tiny
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cosyserve.bench import progress, random_weight_dir
from cosyserve.engine.inputs import SegmentInput
from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.models.base import FamilyModel
from cosyserve.precision import STAGE_DTYPES

DEFAULT_OPTIONS = "llm=bf16,llm=fp16,llm=int8,flow=bf16,flow=fp16,flow_steps=5"
TEXT = "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐，笑容如花儿般绽放。"
TOP_K = 10


def parse_options(spec: str) -> list[tuple[str, str]]:
    """``"llm=bf16,flow_steps=5"`` -> [("llm", "bf16"), ("flow_steps", "5")], checked."""
    out = []
    for part in spec.split(","):
        key, _, value = part.strip().partition("=")
        steps = key == "flow_steps" and value.isdigit() and int(value) >= 1
        if not steps and (key not in STAGE_DTYPES or value not in STAGE_DTYPES[key] or value == "fp32"):
            raise SystemExit(f"bad option {part!r}: llm=<{'|'.join(STAGE_DTYPES['llm'])}>, flow=<...>, flow_steps=N")
        out.append((key, value))
    return out


# -- LLM ------------------------------------------------------------------------------------------
def llm_prefix_inputs(model: TTSModel) -> SegmentInput:
    """The first segment's model input of an sft request for the first built-in speaker."""
    request = SynthesisRequest("sft", TEXT, spk_id=model.list_speakers()[0], options=GenerationOptions(seed=0))
    return model.prepare(request).inputs[0]


def teacher_forced_logps(llm: torch.nn.Module, inputs: SegmentInput, tokens: list[int] | None, steps: int):
    """(steps, V) log-probs of ``llm`` fed ``tokens`` after the prefix; with ``tokens`` None, greedy
    over the speech ids (what the fp32 reference feeds). Returns (log-probs, the ids fed)."""
    rows, fed = [], []
    with torch.inference_mode():
        prefix = llm.build_prefix(inputs.text, inputs.prompt_text, inputs.llm_prompt_speech, inputs.llm_embedding)
        hidden, cache = llm.prefill(prefix)
        for step in range(steps):
            logp = llm.logp(hidden).float().cpu()
            rows.append(logp)
            token = tokens[step] if tokens is not None else int(logp[: llm.speech_token_size].argmax())
            fed.append(token)
            if step + 1 < steps:
                hidden = llm.decode_batch(torch.tensor([token]), cache)[0]
    return torch.stack(rows), fed


def compare_llm(ref: torch.Tensor, got: torch.Tensor, speech_ids: int) -> dict[str, float]:
    diff = (got - ref).abs()
    top = ref.topk(TOP_K, dim=-1).indices
    agree = (got[:, :speech_ids].argmax(-1) == ref[:, :speech_ids].argmax(-1)).float().mean()
    return {
        "argmax_agree": float(agree),
        "max_abs_dlogp": float(diff.max()),
        "mean_abs_dlogp": float(diff.mean()),
        "top10_max_abs_dlogp": float(diff.gather(-1, top).max()),
        "top10_mean_abs_dlogp": float(diff.gather(-1, top).mean()),
    }


def fp32_margin(ref: torch.Tensor, speech_ids: int) -> float:
    top2 = ref[:, :speech_ids].topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).mean())


# -- flow + vocoder ---------------------------------------------------------------------------------
def flow_mel(core: FamilyModel, tokens: torch.Tensor, embedding: torch.Tensor, seed: int) -> torch.Tensor:
    """The flow's mel (1, 80, T) for ``tokens`` with no prompt; v1's noise from a ``seed`` generator."""
    prompt_token, prompt_feat = torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, 80)
    with torch.inference_mode():
        if core.token_mel_ratio:  # v2 / v3: the fixed noise
            mel = core.flow.tokens_to_mel(tokens, prompt_token, prompt_feat, embedding, streaming=False, finalize=True)
        else:
            generator = torch.Generator().manual_seed(seed)
            mel, _ = core.flow.tokens_to_mel(tokens, prompt_token, prompt_feat, embedding, generator=generator)
    return mel.float()


def vocode(core: FamilyModel, mel: torch.Tensor, seed: int, source: torch.Tensor | None = None):
    """The fp32 vocoder's (waveform, excitation), the excitation drawn from a ``seed`` generator (v3:
    the fixed noise), or ``source`` given: the decoder alone on that excitation."""
    with torch.inference_mode():
        if core.family == "cosyvoice3":
            speech, source = core.hift.mel_to_wave(mel, finalize=True, source=source)
        elif source is None:
            speech, source = core.hift.mel_to_wave(mel, generator=torch.Generator().manual_seed(seed))
        else:
            speech = core.hift.decode(mel, source)
    return speech.float().reshape(-1), source


def spectral_error(ref: torch.Tensor, got: torch.Tensor, n_fft: int = 1024) -> float:
    """|| |STFT(got)| - |STFT(ref)| || / || |STFT(ref)| ||: the waveform error a phase drift does not count."""
    window = torch.hann_window(n_fft)
    ref_mag, got_mag = (torch.stft(w, n_fft, n_fft // 4, window=window, return_complex=True).abs() for w in (ref, got))
    return float((got_mag - ref_mag).norm() / ref_mag.norm())


def snr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = float(((got - ref) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref**2).sum()) / noise)


# -- the report -------------------------------------------------------------------------------------
def variant(core: FamilyModel, key: str, value: str) -> FamilyModel:
    """A model sharing ``core``'s weights but the changed stage, which is a copy with the option applied."""
    if key == "llm":
        return dataclasses.replace(core, llm=copy.deepcopy(core.llm)).set_precision(llm=value)
    flow = dataclasses.replace(core, flow=copy.deepcopy(core.flow))
    if key == "flow":
        return flow.set_precision(flow=value)
    flow.flow.decoder.n_timesteps = int(value)
    return flow


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    directory = random_weight_dir(args.model, args.frontend_from, args.blank_en) if args.random_weights else args.model
    progress(f"loading {args.model} ({'random weights' if args.random_weights else 'weights'}), fp32")
    model = load_model(directory, random_weights=args.random_weights, threads=args.threads, text_frontend="none")
    core = model.core
    inputs = llm_prefix_inputs(model)
    options = parse_options(args.options)
    rows: list[dict[str, Any]] = []
    speech_ids = core.llm.speech_token_size

    if any(key == "llm" for key, _ in options):
        start = time.perf_counter()
        ref_logp, tokens = teacher_forced_logps(core.llm, inputs, None, args.steps)
        progress(f"fp32 LLM: {args.steps} greedy steps in {time.perf_counter() - start:.1f} s")
        margin = fp32_margin(ref_logp, speech_ids)
    for key, value in options:
        if key != "llm":
            continue
        start = time.perf_counter()
        try:
            logp, _ = teacher_forced_logps(variant(core, key, value).llm, inputs, tokens, args.steps)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. an op without a CPU kernel in that dtype
            rows.append({"option": f"{key}={value}", "error": str(exc).splitlines()[0][:90]})
            continue
        seconds = time.perf_counter() - start
        rows.append(
            {
                "option": f"{key}={value}",
                "seconds": seconds,
                "margin": margin,
                **compare_llm(ref_logp, logp, speech_ids),
            }
        )
        progress(f"{key}={value}: {seconds:.1f} s")

    flow_options = [(k, v) for k, v in options if k != "llm"]
    if flow_options:
        n_tokens = round(args.seconds * core.token_frame_rate)
        tokens = torch.randint(0, speech_ids, (1, n_tokens), generator=torch.Generator().manual_seed(args.seed))
        tokens = tokens.to(torch.int32)
        embedding = inputs.flow_embedding
        start = time.perf_counter()
        mel32 = flow_mel(core, tokens, embedding, args.seed)
        wave32, source32 = vocode(core, mel32, args.seed)
        progress(f"fp32 flow + vocoder: {n_tokens} tokens in {time.perf_counter() - start:.1f} s")
        again = snr_db(wave32, vocode(core, mel32, args.seed)[0])  # the vocoder's own repeatability
        rows.append({"option": "fp32 (vocoder rerun)", "mel_rel_err": 0.0, "snr_db": again, "spec_err": 0.0,
                     "decoder_snr_db": again, "seconds": 0.0})  # fmt: skip
        for key, value in flow_options:
            start = time.perf_counter()
            try:
                mel = flow_mel(variant(core, key, value), tokens, embedding, args.seed)
            except (RuntimeError, NotImplementedError) as exc:
                rows.append({"option": f"{key}={value}", "error": str(exc).splitlines()[0][:90]})
                continue
            seconds = time.perf_counter() - start
            rel = float((mel - mel32).norm() / mel32.norm())
            wave, _ = vocode(core, mel, args.seed)
            decoded, _ = vocode(core, mel, args.seed, source32)
            rows.append({"option": f"{key}={value}", "seconds": seconds, "mel_rel_err": rel,
                         "snr_db": snr_db(wave32, wave), "spec_err": spectral_error(wave32, wave),
                         "decoder_snr_db": snr_db(wave32, decoded)})  # fmt: skip
            progress(f"{key}={value}: {seconds:.1f} s")
    return rows


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"model {args.model} (random weights: {args.random_weights}), seed {args.seed}, {args.threads} threads")
    llm = [r for r in rows if r["option"].startswith("llm")]
    if llm:
        print(f"LLM, teacher-forced on {args.steps} fp32 greedy ids; |dlogp| over all ids and at fp32's top 10")
        print("option      argmax agree  max|dlogp|  mean|dlogp|  top10 max  top10 mean  fp32 top1-top2  time s")
        for r in llm:
            if "error" in r:
                print(f"{r['option']:11s} not runnable here: {r['error']}")
                continue
            print(
                f"{r['option']:11s} {r['argmax_agree']:12.3f} {r['max_abs_dlogp']:11.4f} {r['mean_abs_dlogp']:12.5f} "
                f"{r['top10_max_abs_dlogp']:10.4f} {r['top10_mean_abs_dlogp']:11.5f} {r['margin']:15.4f} "
                f"{r['seconds']:7.1f}"
            )
    flow = [r for r in rows if not r["option"].startswith("llm")]
    if flow:
        print(f"flow + fp32 vocoder on {args.seconds} s of seeded random speech ids, vs fp32 flow (10 steps)")
        print("option                mel rel err   wave SNR dB  |STFT| rel err  SNR fp32-source dB  flow time s")
        for r in flow:
            if "error" in r:
                print(f"{r['option']:21s} not runnable here: {r['error']}")
                continue
            print(
                f"{r['option']:21s} {r['mel_rel_err']:11.5f} {r['snr_db']:13.2f} {r['spec_err']:15.5f} "
                f"{r['decoder_snr_db']:19.2f} {r['seconds']:12.1f}"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model directory (with --random-weights: a directory with the yaml)")
    parser.add_argument("--random-weights", action="store_true", help="build the networks from the yaml, no .pt")
    parser.add_argument("--frontend-from", type=Path, help="directory whose tokenizer / ONNX / speaker files to use")
    parser.add_argument("--blank-en", type=Path, help="CosyVoice-BlankEN dir with config.json (v2/v3 geometry)")
    parser.add_argument("--options", default=DEFAULT_OPTIONS, help=f"what to compare (default {DEFAULT_OPTIONS})")
    parser.add_argument("--steps", type=int, default=200, help="LLM decode steps (default 200)")
    parser.add_argument("--seconds", type=float, default=9.0, help="speech fed to the flow (default 9)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="weights, speech ids and vocoder draws")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_table(args, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
