"""v3 flow parity: DiT estimator alone, fixed noise, whole flow calls (single and streaming)."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from golden import assert_close, entries, load_case, manifest, model_dir

from cosyserve.config import load_yaml
from cosyserve.models.checkpoint import load_into, read_state_dict
from cosyserve.models.cosyvoice3.config import flow_config
from cosyserve.models.cosyvoice3.flow import CausalMaskedDiffWithDiT

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

CASES = entries("flow", ("v3",))
MU_ATOL = 1e-4
MEL_ATOL = 2e-4
DIT_ATOL = 2e-4


@cache
def _flow(model: str) -> CausalMaskedDiffWithDiT:
    directory = model_dir(model)
    (yaml_path,) = sorted(directory.glob("cosyvoice*.yaml"))
    flow = CausalMaskedDiffWithDiT(flow_config(load_yaml(yaml_path)["flow"]))
    load_into(flow, read_state_dict(directory / "flow.pt"), directory / "flow.pt")
    return flow.eval()


@cache
def _noise_head(model: str) -> torch.Tensor | None:
    """The stored head of the seed-0 CFM noise of ``model``, if the golden set has it."""
    for entry in manifest()["entries"]:
        if entry["model"] == model and entry["stage"] == "flow":
            case = load_case(entry)
            if "rand_noise_head" in case:
                return torch.from_numpy(case["rand_noise_head"])
    return None


def _noise(model: str, frames: int) -> torch.Tensor | None:
    head = _noise_head(model)
    return head if head is not None and head.size(2) >= frames else None


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def _check_call(
    flow: CausalMaskedDiffWithDiT,
    model: str,
    inputs: dict[str, torch.Tensor],
    expected: dict[str, np.ndarray],
    streaming: bool,
    finalize: bool,
    what: str,
) -> dict[str, float]:
    errors = {}
    with torch.inference_mode():
        c = flow.condition(
            inputs["token"], inputs["prompt_token"], inputs["prompt_feat"], inputs["embedding"], finalize
        )
    errors["mu"] = assert_close(c.mu, expected["mu"], MU_ATOL, f"{what} mu")
    errors["cond"] = assert_close(c.cond, expected["cond"], MU_ATOL, f"{what} cond")
    if "spks" in expected:
        errors["spks"] = assert_close(c.spks, expected["spks"], MU_ATOL, f"{what} spks")
    if "mask" in expected:
        assert_close(c.mask, expected["mask"], 0.0, f"{what} mask")
    noise = _t(expected["z"]) if "z" in expected else _noise(model, c.mu.size(2))
    mel = flow.tokens_to_mel(**inputs, streaming=streaming, finalize=finalize, noise=noise)
    assert_close(mel, expected["mel"], MEL_ATOL, f"{what} mel")


@pytest.mark.parametrize("entry", CASES)
def test_flow_v3(entry: dict) -> None:
    case = load_case(entry)
    meta = entry.get("meta", {})
    flow = _flow(entry["model"])

    if "out_full" in case:  # one estimator call on random inputs
        est = flow.decoder.estimator
        args = [_t(case[k]) for k in ("x", "mask", "mu", "t", "spks", "cond")]
        with torch.inference_mode():
            assert_close(est(*args, streaming=False), case["out_full"], DIT_ATOL, "out_full")
            assert_close(est(*args, streaming=True), case["out_stream"], DIT_ATOL, "out_stream")
        return

    if "rand_noise_head" in case:  # the construction-time noise must be the seed-0 draw
        head = case["rand_noise_head"]
        assert_close(flow.decoder.fixed_noise(head.shape[2]), head, 0.0, "rand_noise")
        return

    common = {k: _t(case[k]) for k in ("prompt_token", "prompt_feat", "embedding")}
    if "calls" in meta:  # the sequence of flow calls a streaming request makes
        token_all = _t(case["token_all"])
        for k, call in enumerate(meta["calls"]):
            expected = {name: case[f"call{k}_{name}"] for name in ("mel", "mu", "cond")}
            inputs = {"token": token_all[:, : call["n_tokens"]], **common}
            _check_call(flow, entry["model"], inputs, expected, call["streaming"], call["finalize"], f"call{k}")
        # The same calls through the incremental flow, which computes only each call's new frames.
        state = flow.stream_state()
        for k, call in enumerate(meta["calls"]):
            inputs = {"token": token_all[:, : call["n_tokens"]], **common}
            frames = (inputs["prompt_token"].size(1) + call["n_tokens"] - (0 if call["finalize"] else 3)) * 2
            noise = _noise(entry["model"], frames)
            mel = flow.tokens_to_mel_stream(
                state, **inputs, streaming=call["streaming"], finalize=call["finalize"], noise=noise
            )
            assert_close(mel, case[f"call{k}_mel"], MEL_ATOL, f"call{k} incremental mel")
        return

    inputs = {"token": _t(case["token"]), **common}
    if "z" in case:  # the stored noise is the head of the fixed noise
        assert_close(flow.decoder.fixed_noise(case["z"].shape[2]), case["z"], 0.0, "z")
    _check_call(flow, entry["model"], inputs, case, meta["streaming"], meta["finalize"], entry["name"])
