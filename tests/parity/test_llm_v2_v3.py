"""Parity of the v2 / v3 LLMs (Qwen2LM, CosyVoice3LM) with the reference's golden LLM outputs."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from golden import assert_close, entries, load_case, model_dir, model_version

from cosyserve.config import load_yaml
from cosyserve.errors import InvalidRequest
from cosyserve.models.checkpoint import load_into, read_state_dict
from cosyserve.models.cosyvoice2.config import BLANK_EN, llm_config
from cosyserve.models.cosyvoice2.llm import Qwen2LM
from cosyserve.models.cosyvoice3.llm import ENDOFPROMPT_ID, CosyVoice3LM, drop_excess_silence

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

LOGP_ATOL = 1e-4  # golden README, "llm logp"
PREFIX_ATOL = 1e-6  # the prefix is gathered embedding rows: exact up to copying

_FAMILY = {"v2": ("cosyvoice2.yaml", Qwen2LM), "v3": ("cosyvoice3.yaml", CosyVoice3LM)}


@cache
def _llm(model: str) -> Qwen2LM:
    yaml_name, cls = _FAMILY[model_version(model)]
    root = model_dir(model)
    llm = cls(llm_config(load_yaml(root / yaml_name)["llm"], root / BLANK_EN, cls.__name__))
    load_into(llm, read_state_dict(root / "llm.pt"), root / "llm.pt")
    return llm.eval().requires_grad_(False)


def _inputs(case: dict[str, np.ndarray], prefix: str = "") -> dict[str, Any]:
    return {
        "text": case[prefix + "text"],
        "prompt_text": case.get(prefix + "prompt_text"),
        "prompt_speech_token": case.get(prefix + "llm_prompt_speech_token"),
    }


def _teacher_forced(llm: Qwen2LM, inputs: dict[str, Any], forced: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Prefix, per-step hidden states (N+1, D) and log-probs (N+1, V) with ``forced`` fed back."""
    with torch.inference_mode():
        prefix = llm.build_prefix(**inputs)
        hidden, kv = llm.prefill(prefix)
        rows = [hidden]
        for token in forced.tolist():
            rows.append(llm.decode_step(token, kv))
        return prefix, torch.stack(rows), torch.stack([llm.logp(h) for h in rows])


def _recording_sampler(forced: list[int], log: list[int]) -> Callable[[torch.Tensor, list[int]], int]:
    """Return ``forced`` ids first, then the argmax of the scores it is given; record every id."""

    def sample(scores: torch.Tensor, history: list[int]) -> int:
        assert history == log[: len(history)]
        token = forced[len(log)] if len(log) < len(forced) else int(scores.argmax())
        log.append(token)
        return token

    return sample


def _llm_entries(versions: tuple[str, ...], teacher_forced: bool) -> list[Any]:
    """``llm`` cases with per-step ``logp`` rows (teacher-forced) or the free-running greedy ones."""
    params = entries("llm", versions)
    return [p for p in params if p.values[0] is None or ("logp" in p.values[0]["tensors"]) == teacher_forced]


@pytest.mark.parametrize("entry", _llm_entries(("v2", "v3"), teacher_forced=True))
def test_teacher_forced_logp(entry: dict[str, Any]) -> None:
    case = load_case(entry)
    llm = _llm(entry["model"])
    prefix, hidden, logp = _teacher_forced(llm, _inputs(case), case["forced_tokens"])
    assert_close(prefix, case["lm_input_prefix"], PREFIX_ATOL, "lm_input_prefix")
    assert_close(hidden, case["hidden_last"], LOGP_ATOL, "hidden_last")
    for i in range(len(logp)):
        assert_close(logp[i], case["logp"][i], LOGP_ATOL, f"logp row {i}")
    meta = entry["meta"]
    assert llm.speech_token_size == meta["speech_token_size"]
    assert meta["eos_token"] == llm.eos_token and meta["eos_token"] in llm.stop_token_ids
    assert 2 * case["text"].shape[-1] == meta["min_len"] and 20 * case["text"].shape[-1] == meta["max_len"]


@pytest.mark.parametrize("entry", _llm_entries(("v3",), teacher_forced=False))
def test_v3_greedy(entry: dict[str, Any]) -> None:
    case, meta = load_case(entry), entry["meta"]
    llm = _llm(entry["model"])
    forced = case["forced_tokens"].tolist()
    returned: list[int] = []
    tokens = list(
        llm.generate(
            **_inputs(case), embedding=None, sampler=_recording_sampler(forced, returned), reference_eos_mask=True
        )
    )
    assert returned == case["sampler_tokens"].tolist()
    assert tokens == case["tokens"].tolist()
    assert len(returned) - 1 == meta["stop_step"] and returned[-1] == meta["stop_token"]

    # Every row the sampler saw, recomputed with the primitives: top-16 before masking, argmaxes.
    _, _, logp = _teacher_forced(llm, _inputs(case), case["tokens"])
    assert_close(logp.topk(16, dim=-1).values, case["logp_top16_values"], LOGP_ATOL, "logp_top16_values")
    assert logp.topk(16, dim=-1).indices.tolist() == case["logp_top16_ids"].tolist()
    sts = llm.speech_token_size
    assert_close(logp[:, sts : sts + 2], case["logp_sos_eos"], LOGP_ATOL, "logp_sos_eos")
    assert logp.argmax(-1).tolist() == case["raw_argmax"].tolist()
    masked = [
        int((llm.mask_early_stop(row, reference_eos_mask=True) if i < meta["min_len"] else row).argmax())
        for i, row in enumerate(logp)
    ]
    assert masked == case["masked_argmax"].tolist()

    # The default mask keeps every special id out before min_len, so decoding never stops early.
    returned = []
    tokens = list(llm.generate(**_inputs(case), embedding=None, sampler=_recording_sampler(forced, returned)))
    assert len(tokens) >= meta["min_len"]
    assert all(t < sts for t in tokens) and returned[-1] in llm.stop_token_ids


def _segments(case: dict[str, np.ndarray]) -> list[str]:
    found, s = [], 0
    while f"mi{s}_text" in case:
        found.append(f"mi{s}_")
        s += 1
    return found


@pytest.mark.parametrize("entry", entries("e2e", ("v2", "v3"), having="mi0_text"))  # vc has no LLM
def test_e2e_speech_tokens(entry: dict[str, Any]) -> None:
    case, meta = load_case(entry), entry["meta"]
    segments = _segments(case)
    llm = _llm(entry["model"])
    forced = case["forced_tokens"].tolist() if "forced_tokens" in case else None
    tokens: list[int] = []
    for prefix in segments:
        # Forced cases: the forced ids, then eos (what the orchestration's filter receives).
        sampler = _recording_sampler([] if forced is None else [*forced, llm.eos_token], [])
        tokens += llm.generate(**_inputs(case, prefix), embedding=None, sampler=sampler, reference_eos_mask=True)
    assert tokens == case["speech_tokens"].tolist()
    if forced is None and meta.get("min_len") is not None and len(segments) == 1:
        assert meta["min_len"] == 2 * case["mi0_text"].shape[-1]
    # The last flow call sees every token the orchestration kept.
    last = max(int(k[4 : k.index("_")]) for k in case if k.startswith("flow") and k.endswith("_token"))
    kept = list(drop_excess_silence(tokens)) if isinstance(llm, CosyVoice3LM) else tokens
    assert kept == case[f"flow{last}_token"].reshape(-1).tolist()


@pytest.mark.parametrize("entry", entries("llm", ("v3",)))
def test_v3_requires_endofprompt(entry: dict[str, Any]) -> None:
    case = load_case(entry)
    llm = _llm(entry["model"])
    inputs = _inputs(case)
    text = np.concatenate([np.asarray(v).reshape(-1) for v in (inputs["prompt_text"], inputs["text"]) if v is not None])
    stripped = text[text != ENDOFPROMPT_ID]
    with pytest.raises(InvalidRequest):
        llm.generate(stripped, None, inputs["prompt_speech_token"], None, sampler=_recording_sampler([], []))


def test_silence_filter_streams_and_closes() -> None:
    silent = 1
    closed = []

    def source():
        try:
            yield from [7, *([silent] * 8), 9, silent]
        finally:
            closed.append(True)

    filtered = drop_excess_silence(source())
    assert [next(filtered) for _ in range(7)] == [7, *([silent] * 5), 9]
    filtered.close()
    assert closed == [True]
