"""v1 TransformerLM against the golden `llm` (teacher-forced logp) and `e2e` (greedy tokens) cases."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from golden import assert_close, entries, load_case, model_dir

from cosyserve.config import ConfigError, Node, load_yaml
from cosyserve.models.checkpoint import load_into, read_state_dict
from cosyserve.models.cosyvoice1.config import llm_config
from cosyserve.models.cosyvoice1.llm import TransformerLM
from cosyserve.nn.sampling import GreedySampler

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

LOGP_ATOL = 1e-4


@cache
def _llm(model: str) -> TransformerLM:
    directory = model_dir(model)
    llm = TransformerLM(llm_config(load_yaml(directory / "cosyvoice.yaml")["llm"]))
    load_into(llm, read_state_dict(directory / "llm.pt"), directory / "llm.pt")
    return llm.eval()


def _inputs(case: dict[str, np.ndarray], prefix: str = "") -> dict[str, torch.Tensor | None]:
    def get(key: str) -> torch.Tensor | None:
        return torch.from_numpy(case[prefix + key]) if prefix + key in case else None

    return {
        "text": get("text"),
        "prompt_text": get("prompt_text"),
        "prompt_speech_token": get("llm_prompt_speech_token"),
        "embedding": get("llm_embedding"),
    }


@pytest.mark.parametrize("entry", entries("llm", ("v1",)))
def test_teacher_forced_logp(entry):
    case = load_case(entry)
    llm = _llm(entry["model"])
    assert llm.eos_token == entry["meta"]["eos_token"]
    with torch.inference_mode():
        prefix = llm.build_prefix(**_inputs(case))
        hidden, kv = llm.prefill(prefix)
        rows = [hidden]
        for token in case["forced_tokens"].tolist():
            rows.append(llm.decode_step(token, kv))
        hidden_all = torch.stack(rows)
        logp = llm.logp(hidden_all)
    assert_close(prefix, case["lm_input_prefix"], LOGP_ATOL, "lm_input_prefix")
    assert_close(hidden_all, case["hidden_last"], LOGP_ATOL, "hidden_last")
    assert_close(logp, case["logp"], LOGP_ATOL, "logp")


@pytest.mark.parametrize("entry", entries("llm", ("v1",)))
def test_length_bounds_and_close(entry):
    case = load_case(entry)
    llm = _llm(entry["model"])
    inputs = _inputs(case)
    # eos is masked for the first min_len steps, so min_len == max_len yields exactly that many.
    tokens = list(llm.generate(**inputs, sampler=GreedySampler(), min_len=5, max_len=5))
    assert len(tokens) == 5 and all(0 <= t < llm.speech_token_size for t in tokens)
    it = llm.generate(**inputs, sampler=GreedySampler())
    assert next(it) == tokens[0]
    it.close()
    assert next(it, None) is None


@pytest.mark.parametrize("entry", entries("e2e", ("v1",), having="mi0_text"))  # vc has no LLM
def test_greedy_tokens(entry):
    case = load_case(entry)
    llm = _llm(entry["model"])
    tokens = list(llm.generate(**_inputs(case, "mi0_"), sampler=GreedySampler()))
    expected = case["speech_tokens"].tolist()
    if len(entry["meta"].get("segments", [])) > 1:
        # Later segments' tokens follow the first segment's.
        expected = expected[: len(tokens)]
    assert tokens == expected


@pytest.mark.parametrize("entry", entries("llm", ("v1",))[:1])
def test_config_errors_name_the_key(entry):
    node = load_yaml(model_dir(entry["model"]) / "cosyvoice.yaml")["llm"]

    def broken(path: tuple[str, ...], value) -> Node:
        fresh = load_yaml(model_dir(entry["model"]) / "cosyvoice.yaml")["llm"]
        target = fresh
        for key in path[:-1]:
            target = target.args[key]
        target.args[path[-1]] = value
        return fresh

    TransformerLM(llm_config(node))
    cases = [
        (("text_encoder", "use_cnn_module"), True, "use_cnn_module"),
        (("llm", "pos_enc_layer_type"), "abs_pos", "pos_enc_layer_type"),
        (("llm", "input_layer"), "conv2d", "input_layer"),
        (("speech_token_size",), -1, "speech_token_size"),
        (("sampling", "top_k"), 0, "top_k"),
        (("unexpected_key",), 1, "unexpected_key"),
    ]
    for path, value, name in cases:
        with pytest.raises(ConfigError, match=name):
            llm_config(broken(path, value))
