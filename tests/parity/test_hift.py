"""HiFT vocoder parity against the golden ``hift`` stage (v1/v2 HiFTGenerator, v3 CausalHiFTGenerator)."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from golden import assert_close, entries, load_case, manifest, model_dir
from resources import missing_mark

from cosyserve.config import load_yaml
from cosyserve.models.base import load_weights
from cosyserve.models.checkpoint import read_vocoder_state
from cosyserve.models.config_checks import build_hift, hift_config
from cosyserve.nn.hift import HiFTGenerator, SourceDraws
from cosyserve.nn.hift_causal import CausalHiFTGenerator

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

F0_ATOL = 1e-3  # Hz
DECODE_ATOL = 1e-4
SOURCE_ATOL = 1e-3
INFERENCE_ATOL = 1e-3


def _is_fixed_noise(entry: dict) -> bool:
    return entry["stage"] == "hift" and "sine_waves_head" in entry.get("tensors", {})


@cache
def _hift_node(model: str):
    config_path = next(model_dir(model).glob("cosyvoice*.yaml"))
    return load_yaml(config_path)["hift"]


@cache
def _vocoder(model: str) -> HiFTGenerator | CausalHiFTGenerator:
    node = _hift_node(model)
    cls = CausalHiFTGenerator if node.cls == CausalHiFTGenerator.__name__ else HiFTGenerator
    hift = build_hift(cls, hift_config(node, cls))
    path = model_dir(model) / "hift.pt"
    load_weights(hift, path, read_vocoder_state(path))
    if isinstance(hift, CausalHiFTGenerator):
        fixed = next(e for e in manifest()["entries"] if e["model"] == model and _is_fixed_noise(e))
        tensors = load_case(fixed)
        hift.set_fixed_noise(torch.from_numpy(tensors["rand_ini"]), torch.from_numpy(tensors["sine_waves_head"]))
    return hift.eval()


def _is_causal(entry: dict) -> bool:
    return _hift_node(entry["model"]).cls == CausalHiFTGenerator.__name__


def _cases(causal: bool) -> list:
    """The hift cases of one generator kind (the fixed-noise tensors are injected, not tested alone)."""
    params = [
        p
        for p in entries("hift")
        if p.values[0] is None or (not _is_fixed_noise(p.values[0]) and _is_causal(p.values[0]) == causal)
    ]
    return params or [pytest.param(None, marks=missing_mark("no golden hift cases"))]


@pytest.mark.parametrize("entry", _cases(causal=False))
def test_hift(entry):
    hift = _vocoder(entry["model"])
    case = {k: torch.from_numpy(v) for k, v in load_case(entry).items()}
    mel, cache_source = case["mel"], case["cache_source"]
    draws = SourceDraws(case["rng0_rand"], case["rng1_randn_like"], case["rng2_randn_like"])

    assert_close(hift.f0_predictor(mel), case["f0"].numpy(), F0_ATOL, "f0")
    assert_close(hift.decode(mel, case["source"]), case["speech"].numpy(), DECODE_ATOL, "decode(mel, source)")
    # The source from the stored f0; the cached head is not the source module's output.
    cached = cache_source.shape[-1]
    source = hift.make_source(case["f0"], draws)
    assert_close(source[..., cached:], case["source"][..., cached:].numpy(), SOURCE_ATOL, "source")

    speech, source = hift.mel_to_wave(mel, cache_source=cache_source, draws=draws)
    assert_close(source, case["source"].numpy(), INFERENCE_ATOL, "inference source")
    assert_close(speech, case["speech"].numpy(), INFERENCE_ATOL, "inference speech")


@pytest.mark.parametrize("entry", _cases(causal=True))
def test_causal_hift(entry):
    hift = _vocoder(entry["model"])
    case = {k: torch.from_numpy(v) for k, v in load_case(entry).items()}
    mel, finalize = case["mel"], entry["meta"]["finalize"]

    assert_close(hift.predict_f0(mel, finalize), case["f0"].numpy(), F0_ATOL, "f0")
    decode_mel = mel if finalize else mel[:, :, : -hift.f0_look_ahead]
    speech = hift.decode(decode_mel, case["source"], finalize)
    assert_close(speech, case["speech"].numpy(), DECODE_ATOL, "decode(mel, source)")
    assert_close(hift.make_source(case["f0"]), case["source"].numpy(), SOURCE_ATOL, "source")

    speech, source = hift.mel_to_wave(mel, finalize)
    assert_close(source, case["source"].numpy(), INFERENCE_ATOL, "inference source")
    assert_close(speech, case["speech"].numpy(), INFERENCE_ATOL, "inference speech")
