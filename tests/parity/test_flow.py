"""v1 / v2 flow parity: U-Net + CFM on the stored condition, whole flow calls, fixed noise, streaming."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from golden import assert_close, entries, load_case, model_dir, model_version
from resources import missing

from cosyserve.config import Node, load_yaml
from cosyserve.models.checkpoint import load_into, read_state_dict
from cosyserve.models.cosyvoice1 import config as v1_config
from cosyserve.models.cosyvoice1.flow import MaskedDiffWithXvec
from cosyserve.models.cosyvoice2 import config as v2_config
from cosyserve.models.cosyvoice2.flow import CausalMaskedDiffWithXvec
from cosyserve.nn.flow_matching import FIXED_NOISE_FRAMES, ConditionalCFM, fixed_noise

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

CASES = entries("flow", ("v1", "v2"))
MU_ATOL = 1e-4
MEL_ATOL = 2e-4

_FLOWS = {"v1": (MaskedDiffWithXvec, v1_config), "v2": (CausalMaskedDiffWithXvec, v2_config)}


def _yaml(model: str) -> dict:
    (path,) = sorted(model_dir(model).glob("cosyvoice*.yaml"))
    return load_yaml(path)


@cache
def _flow(model: str) -> MaskedDiffWithXvec | CausalMaskedDiffWithXvec:
    cls, family_config = _FLOWS[model_version(model)]
    flow = cls(family_config.flow_config(_yaml(model)["flow"]))
    path = model_dir(model) / "flow.pt"
    load_into(flow, read_state_dict(path), path)
    return flow.eval().requires_grad_(False)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def _common(case: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: _t(case[k]) for k in ("prompt_token", "prompt_feat", "embedding")}


def _check_condition(c, expected: dict[str, np.ndarray], what: str) -> dict[str, float]:
    errors = {
        "mu": assert_close(c.mu, expected["mu"], MU_ATOL, f"{what} mu"),
        "cond": assert_close(c.cond, expected["cond"], MU_ATOL, f"{what} cond"),
    }
    if "spks" in expected:
        errors["spks"] = assert_close(c.spks, expected["spks"], MU_ATOL, f"{what} spks")
    if "mask" in expected:
        assert_close(c.mask, expected["mask"], 0.0, f"{what} mask")
    return errors


@pytest.mark.parametrize("entry", CASES)
def test_flow(entry: dict) -> None:
    case = load_case(entry)
    meta = entry.get("meta", {})
    flow = _flow(entry["model"])
    v1 = isinstance(flow, MaskedDiffWithXvec)

    if "rand_noise_head" in case:  # the v2 construction-time noise is the seed-0 draw
        head = case["rand_noise_head"]
        state = torch.get_rng_state()
        assert_close(fixed_noise()[:, :, : head.shape[2]], head, 0.0, "fixed_noise()")
        assert_close(flow.decoder.fixed_noise(head.shape[2]), head, 0.0, "decoder.fixed_noise")
        assert torch.equal(state, torch.get_rng_state()), "making the fixed noise touched the global RNG"
        return

    common = _common(case)
    if "calls" in meta:  # the sequence of v2 flow calls one streaming request makes
        token_all = _t(case["token_all"])
        for k, call in enumerate(meta["calls"]):
            inputs = {"token": token_all[:, : call["n_tokens"]], **common}
            streaming, finalize = call["streaming"], call["finalize"]
            with torch.no_grad():
                c = flow.condition(**inputs, streaming=streaming, finalize=finalize)
            expected = {name: case[f"call{k}_{name}"] for name in ("mu", "cond")}
            _check_condition(c, expected, f"call{k}")
            mel = flow.tokens_to_mel(**inputs, streaming=streaming, finalize=finalize)
            assert_close(mel, case[f"call{k}_mel"], MEL_ATOL, f"call{k} mel")
        # The same calls through the incremental flow, which computes only each call's new frames.
        state = flow.stream_state()
        for k, call in enumerate(meta["calls"]):
            inputs = {"token": token_all[:, : call["n_tokens"]], **common}
            mel = flow.tokens_to_mel_stream(state, **inputs, streaming=call["streaming"], finalize=call["finalize"])
            assert_close(mel, case[f"call{k}_mel"], MEL_ATOL, f"call{k} incremental mel")
        return

    inputs = {"token": _t(case["token"]), **common}
    prompt_frames = case["prompt_feat"].shape[1]

    # The estimator and sampler alone, on the stored condition and noise.
    solved = flow.decoder.solve(*(_t(case[k]) for k in ("mu", "mask", "spks", "cond", "z")))
    assert_close(solved[:, :, prompt_frames:], case["mel"], MEL_ATOL, "solve(stored mu, z) mel")

    with torch.no_grad():
        if v1:
            c = flow.condition(**inputs)
        else:
            c = flow.condition(**inputs, streaming=meta["streaming"], finalize=meta["finalize"])
    _check_condition(c, case, entry["name"])

    if v1:  # v1 draws its noise per call: inject the stored draw
        mel, cache_out = flow.tokens_to_mel(**inputs, noise=_t(case["z"]))
        assert_close(cache_out, case["flow_cache_out"], MU_ATOL, "flow_cache_out")
    else:  # v2 starts from the fixed noise, whose head is the stored z
        assert_close(flow.decoder.fixed_noise(case["z"].shape[2]), case["z"], 0.0, "z")
        mel = flow.tokens_to_mel(**inputs, streaming=meta["streaming"], finalize=meta["finalize"])
    assert_close(mel, case["mel"], MEL_ATOL, "mel")


def _first_model(version: str) -> str | None:
    for param in entries("flow", (version,)):
        if param.values[0] is not None:
            return param.values[0]["model"]
    return None


def _needs(version: str) -> str:
    model = _first_model(version)
    if model is None:
        missing(f"no golden {version} flow model")
    return model


def test_v1_noise_from_generator_only() -> None:
    """v1 draws its noise from the given generator (same seed, same mel) and never the global RNG."""
    model = _needs("v1")
    flow = _flow(model)
    # Few enough tokens that the whole call fits in the 34-frame cache tail, at 50 and 25 Hz.
    token = torch.arange(5).unsqueeze(0)
    args = (token, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80), torch.ones(1, 192))
    state = torch.get_rng_state()
    mel_a, cache_a = flow.tokens_to_mel(*args, generator=torch.Generator().manual_seed(7))
    mel_b, _ = flow.tokens_to_mel(*args, generator=torch.Generator().manual_seed(7))
    assert torch.equal(state, torch.get_rng_state()), "the v1 flow touched the global RNG"
    assert torch.equal(mel_a, mel_b)
    frames = mel_a.size(2)
    assert cache_a.shape == (1, 80, frames, 2)
    assert torch.equal(cache_a[..., 0], torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(7)))

    # A streaming call given that cache starts from the cached noise and mu, whatever it draws.
    mel_c, cache_c = flow.tokens_to_mel(*args, flow_cache=cache_a, generator=torch.Generator().manual_seed(8))
    assert torch.equal(cache_c, cache_a)
    assert torch.equal(mel_c, mel_a)


def test_v2_noise_limit() -> None:
    model = _needs("v2")
    flow = _flow(model)
    with pytest.raises(ValueError, match="fixed noise"):
        flow.decoder.fixed_noise(FIXED_NOISE_FRAMES + 1)
    too_many = torch.zeros(1, FIXED_NOISE_FRAMES // flow.token_mel_ratio + 1, dtype=torch.long)
    empty = (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 80), torch.ones(1, 192))
    with pytest.raises(ValueError, match="fixed noise"):
        flow.tokens_to_mel(too_many, *empty, streaming=False, finalize=True)


def test_v2_legacy_estimator_spelling() -> None:
    """The first CosyVoice2 yaml: ``ConditionalDecoder`` + ``causal: True`` and no chunk size."""
    model = _needs("v2")
    node = _yaml(model)["flow"]
    est = node.args["decoder"].args["estimator"]
    args = {k: v for k, v in est.args.items() if k not in ("static_chunk_size", "num_decoding_left_chunks")}
    node.args["decoder"].args["estimator"] = Node(
        est.kind, "cosyvoice.flow.decoder.ConditionalDecoder", {**args, "causal": True}
    )
    legacy = CausalMaskedDiffWithXvec(v2_config.flow_config(node))
    current = _flow(model)
    assert legacy.state_dict().keys() == current.state_dict().keys()
    assert legacy.decoder.estimator.causal
    chunk = node.args["encoder"].get("static_chunk_size") * node.args.get("token_mel_ratio")
    assert legacy.decoder.estimator.static_chunk_size == chunk


def test_cfm_is_parameter_free() -> None:
    """``decoder`` adds no state of its own: checkpoints keep the ``decoder.estimator.*`` names."""
    cfm = ConditionalCFM(torch.nn.Linear(2, 2))
    cfm.fixed_noise(10)
    assert set(cfm.state_dict()) == {"estimator.weight", "estimator.bias"}
