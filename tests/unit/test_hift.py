"""HiFT vocoders: checkpoint namings, config errors, injected / private randomness, v3 causality and fixed noise."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from golden import entries, load_case, manifest, model_dir
from resources import missing_mark

from cosyserve.config import ConfigError, Node, load_yaml
from cosyserve.models.base import load_weights
from cosyserve.models.checkpoint import read_vocoder_state
from cosyserve.models.config_checks import build_hift, hift_config
from cosyserve.nn.hift import HiFTGenerator
from cosyserve.nn.hift_causal import NOISE_BLOCK, CausalHiFTGenerator, UniformTable


def _models(causal: bool) -> list:
    found = sorted({p.values[0]["model"] for p in entries("hift") if p.values[0] is not None})
    found = [m for m in found if (_node(m).cls == CausalHiFTGenerator.__name__) == causal]
    return found or [pytest.param(None, marks=missing_mark("no such golden model"))]


@cache
def _node(model: str) -> Node:
    return load_yaml(next(model_dir(model).glob("cosyvoice*.yaml")))["hift"]


def _build(model: str) -> HiFTGenerator | CausalHiFTGenerator:
    node = _node(model)
    cls = CausalHiFTGenerator if node.cls == CausalHiFTGenerator.__name__ else HiFTGenerator
    hift = build_hift(cls, hift_config(node, cls))
    path = model_dir(model) / "hift.pt"
    load_weights(hift, path, read_vocoder_state(path))
    return hift.eval()


def _mel(model: str) -> torch.Tensor:
    """The longest golden hift mel of the model."""
    cases = [load_case(p.values[0]) for p in entries("hift") if p.values[0] and p.values[0]["model"] == model]
    mels = [case["mel"] for case in cases if "mel" in case]
    return torch.from_numpy(max(mels, key=lambda m: m.shape[-1]))


@pytest.mark.parametrize("model", _models(False) + _models(True))
def test_both_weight_norm_namings_and_prefix(model, tmp_path):
    path = model_dir(model) / "hift.pt"
    state = torch.load(path, weights_only=True)
    legacy = {
        "generator."
        + k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    assert any(k.endswith(".weight_g") for k in legacy)
    torch.save(legacy, tmp_path / "hift.pt")
    folded, folded_legacy = read_vocoder_state(path), read_vocoder_state(tmp_path / "hift.pt")
    assert folded.keys() == folded_legacy.keys()
    assert all(torch.equal(folded[k], folded_legacy[k]) for k in folded)
    hift = _build(model)
    load_weights(hift, tmp_path / "hift.pt", read_vocoder_state(tmp_path / "hift.pt"))  # strict
    assert all(torch.equal(hift.state_dict()[k], folded[k]) for k in folded)


@pytest.mark.parametrize("model", _models(False))
def test_config_errors(model):
    node = _node(model)
    for key, value in (("unknown_key", 1), ("istft_params", {"n_fft": 16}), ("upsample_rates", [8])):
        bad = copy.deepcopy(node)
        bad.args[key] = value
        with pytest.raises(ConfigError, match=key if key == "unknown_key" else "hift"):
            hift_config(bad, HiFTGenerator)
    bad = copy.deepcopy(node)
    bad.args["f0_predictor"].target = "somewhere.OtherPredictor"
    with pytest.raises(ConfigError, match="OtherPredictor"):
        hift_config(bad, HiFTGenerator)
    with pytest.raises(ConfigError, match="HiFTGenerator"):
        hift_config(node, CausalHiFTGenerator)


@pytest.mark.parametrize("model", _models(False))
def test_private_generator_draws(model):
    hift, mel = _build(model), _mel(model)
    global_state = torch.get_rng_state()
    a, source_a = hift.mel_to_wave(mel, generator=torch.Generator().manual_seed(0))
    b, _ = hift.mel_to_wave(mel, generator=torch.Generator().manual_seed(0))
    c, _ = hift.mel_to_wave(mel, generator=torch.Generator().manual_seed(1))
    hift.mel_to_wave(mel)  # fresh private generator
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape[-1] == source_a.shape[-1] == mel.shape[-1] * hift.samples_per_frame

    # The same draws, injected, give the same result; wrong shapes are refused.
    draws = hift.m_source.l_sin_gen.draw(1, source_a.shape[-1], torch.Generator().manual_seed(0))
    assert torch.equal(hift.mel_to_wave(mel, draws=draws)[0], a)
    with pytest.raises(ValueError, match="noise"):
        hift.mel_to_wave(mel[:, :, :-1], draws=draws)
    cache_source = source_a[:, :, : hift.samples_per_frame]
    _, source = hift.mel_to_wave(mel, cache_source=cache_source + 1, draws=draws)
    assert torch.equal(source[:, :, : cache_source.shape[-1]], cache_source + 1)
    assert torch.equal(source[:, :, cache_source.shape[-1] :], source_a[:, :, cache_source.shape[-1] :])


@pytest.mark.parametrize("model", _models(True))
def test_causal_nonfinal_is_prefix_of_final(model):
    hift, mel = _build(model), _mel(model)
    global_state = torch.get_rng_state()
    full, full_source = hift.mel_to_wave(mel, finalize=True)
    assert full.shape[-1] == full_source.shape[-1] == mel.shape[-1] * hift.samples_per_frame
    # A non-final call needs more than look-ahead (f0 + conv_pre) + the trimmed frame.
    first = hift.f0_look_ahead + hift.conv_pre_look_right + 2
    for frames in range(first, mel.shape[-1] + 1):
        speech, source = hift.mel_to_wave(mel[:, :, :frames], finalize=False)
        assert speech.shape[-1] == (frames - first + 1) * hift.samples_per_frame
        assert source.shape[-1] == (frames - hift.f0_look_ahead) * hift.samples_per_frame
        torch.testing.assert_close(speech, full[:, : speech.shape[-1]], atol=1e-5, rtol=0)
        torch.testing.assert_close(source, full_source[:, :, : source.shape[-1]], atol=1e-6, rtol=0)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert {p.dtype for p in hift.f0_predictor.parameters()} == {torch.float32}


@pytest.mark.parametrize("model", _models(True))
def test_causal_default_noise_is_reproducible(model):
    mel = _mel(model)
    a, b = _build(model), _build(model)
    assert a.rand_ini[0, 0] == 0 and torch.equal(a.rand_ini, b.rand_ini)
    assert torch.equal(a.mel_to_wave(mel)[0], b.mel_to_wave(mel)[0])
    b.set_fixed_noise(noise_seed=1)
    assert not torch.equal(a.mel_to_wave(mel)[0], b.mel_to_wave(mel)[0])
    # Only the blocks the request needed were made.
    assert a.sine_waves._rows.shape[1] == NOISE_BLOCK * -(-mel.shape[-1] * a.samples_per_frame // NOISE_BLOCK)

    with pytest.raises(ValueError, match="rand_ini"):
        a.set_fixed_noise(rand_ini=torch.zeros(1, 8))
    a.set_fixed_noise(sine_waves=torch.rand(1, 10, 9))
    with pytest.raises(ValueError, match="covers 10 samples"):
        a.mel_to_wave(mel)


def test_uniform_table_blocks():
    table = UniformTable(9, seed=3)
    head = table.head(1000)
    assert head.shape == (1, 1000, 9) and table._rows.shape[1] == NOISE_BLOCK
    longer = UniformTable(9, seed=3).head(NOISE_BLOCK + 5)
    assert torch.equal(longer[:, :1000], head)
    assert torch.equal(table.head(NOISE_BLOCK + 5), longer)
    assert float(longer.min()) >= 0 and float(longer.max()) < 1
    assert not torch.equal(longer[:, :5], longer[:, NOISE_BLOCK:])  # blocks are keyed, not repeated
    assert not torch.equal(UniformTable(9, seed=4).head(1000), head)


def test_manifest_fixed_noise_is_injectable():
    fixed = [e for e in manifest()["entries"] if e["stage"] == "hift" and "sine_waves_head" in e.get("tensors", {})]
    if not fixed:
        pytest.skip("no v3 fixed-noise tensors in the golden set")
    for entry in fixed:
        tensors = {k: torch.from_numpy(v) for k, v in load_case(entry).items()}
        hift = _build(entry["model"])
        hift.set_fixed_noise(tensors["rand_ini"], tensors["sine_waves_head"])
        covered = entry["meta"]["covers_samples"]
        assert torch.equal(hift.sine_waves.head(covered), tensors["sine_waves_head"])
        with pytest.raises(ValueError):
            hift.sine_waves.head(covered + 1)


@pytest.mark.parametrize("model", _models(True))
def test_causal_f0_predictor_runs_in_float64(model):
    # The reference casts v3's f0 predictor and its input to float64 on every call (v1/v2: float32).
    hift, mel = _build(model), _mel(model)
    seen: list[torch.dtype] = []
    hift.f0_predictor.condnet[0].register_forward_pre_hook(lambda _module, args: seen.append(args[0].dtype))
    f0 = hift.predict_f0(mel)
    speech, _ = hift.mel_to_wave(mel)
    assert seen == [torch.float64, torch.float64] and f0.dtype == speech.dtype == torch.float32
    in_float64 = copy.deepcopy(hift.f0_predictor).double()(mel.double()).float()
    in_float32 = hift.f0_predictor(mel)
    assert torch.equal(f0, in_float64) and not torch.equal(f0, in_float32)
    assert {p.dtype for p in hift.parameters()} == {torch.float32}  # the shared module is untouched


@pytest.mark.parametrize("model", _models(True))
def test_causal_f0_predictor_follows_the_module_to_its_device(model):
    # The float64 twin is built on first use: a later move must not leave it on the old device.
    hift, mel = _build(model), _mel(model)
    hift.predict_f0(mel)
    hift.to("meta")
    assert hift.predict_f0(mel.to("meta")).device == torch.device("meta")
