"""Model-input parity: the per-mode dicts of the ``llm`` and ``e2e`` cases rebuilt through Frontend.

The mode of a case is read from its meta (which inputs it names), the inputs from the meta /
manifest, and the text frontend runs in mode ``none`` as the golden's did.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from golden import assert_close, entries, golden_root, load_case, model_dir

from cosyserve.engine.pipeline import load_model
from cosyserve.engine.voices import read_spk2info
from cosyserve.frontend.frontend import Frontend
from cosyserve.frontend.voice_prompt import VoicePrompt

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

FIELDS = (
    "text",
    "prompt_text",
    "llm_prompt_speech_token",
    "flow_prompt_speech_token",
    "prompt_speech_feat",
    "llm_embedding",
    "flow_embedding",
    "source_speech_token",
)
FLOAT_FIELDS = {"prompt_speech_feat": 1e-4, "llm_embedding": 1e-4, "flow_embedding": 1e-4}


@cache
def frontend(model: str) -> Frontend:
    # The golden ran the reference commit, whose prompt mel is always computed at 24 kHz.
    return load_model(model_dir(model), text_frontend="none", prompt_mel_rate="reference").frontend


@cache
def spk2info(model: str) -> dict[str, VoicePrompt]:
    """The model's speakers, read from the reference's spk2info.pt layout."""
    fe = frontend(model)
    return read_spk2info(model_dir(model) / "spk2info.pt", fe.family, fe.token_rate)


def wav_path(name: str) -> Path:
    """A prompt wav named in the meta, with or without its extension."""
    audio = golden_root() / "audio"
    found = sorted(p for p in audio.iterdir() if p.name == name or p.stem == Path(name).stem)
    assert found, f"prompt wav {name} not in {audio}"
    return found[0]


def build(fe: Frontend, model: str, meta: dict[str, Any], text: str | None) -> dict[str, torch.Tensor]:
    """The model input of one segment, choosing the mode from the inputs the case names."""
    if "source_wav" in meta:
        return fe.vc(wav_path(meta["source_wav"]), wav_path(meta["prompt_wav"]))
    if "spk_id" in meta:
        speaker = spk2info(model)[meta["spk_id"]]
        if "instruct_text" in meta:
            return fe.instruct(text, speaker, fe.normalize(meta["instruct_text"], split=False))
        return fe.sft(text, speaker)
    if "zero_shot_spk_id" in meta:
        prompt = spk2info(model)[meta["zero_shot_spk_id"]]
    else:
        prompt = fe.process_prompt(wav_path(meta["prompt_wav"]))
    if "instruct_text" in meta:  # instruct2: the instruct text is not normalised
        return fe.instruct2(text, meta["instruct_text"], prompt)
    if "prompt_text" in meta or "zero_shot_spk_id" in meta:
        return fe.zero_shot(text, fe.normalize(meta.get("prompt_text", ""), split=False), prompt)
    return fe.cross_lingual(text, prompt)


def compare(built: dict[str, torch.Tensor], case: dict[str, np.ndarray], prefix: str, exact_set: bool) -> dict:
    stored = {f for f in FIELDS if prefix + f in case}
    assert stored, f"no model-input fields with prefix '{prefix}' in the case"
    assert stored <= set(built), f"fields missing from the built input: {stored - set(built)}"
    if exact_set:
        assert set(built) == stored, f"built fields {sorted(built)} != golden {sorted(stored)}"
    errors = {}
    for field in sorted(stored):
        expected = case[prefix + field]
        got = built[field]
        if field in FLOAT_FIELDS:
            assert got.dtype == torch.float32, f"{field}: dtype {got.dtype}"
            errors[field] = assert_close(got, expected, FLOAT_FIELDS[field], prefix + field)
        else:
            assert got.dtype == torch.int32, f"{field}: dtype {got.dtype}"
            errors[field] = assert_close(got, expected, 0, prefix + field)
        if prefix + field + "_len" in case:
            assert int(case[prefix + field + "_len"][0]) == got.shape[1], f"{field}_len"
    return errors


@pytest.mark.parametrize("entry", entries("llm"))
def test_llm_model_input(entry):
    model, meta = entry["model"], entry["meta"]
    fe = frontend(model)
    if "segment" in meta:
        assert meta["segment"] in fe.normalize(meta["tts_text"], split=True)
    built = build(fe, model, meta, meta.get("segment", meta.get("tts_text")))
    # llm cases keep only what the LLM reads: compare those, not the set.
    errors = compare(built, load_case(entry), "", exact_set=False)
    print(entry["id"], {k: f"{v:.2e}" for k, v in errors.items()})


@pytest.mark.parametrize("entry", entries("e2e"))
def test_e2e_model_input(entry):
    model, meta = entry["model"], entry["meta"]
    fe = frontend(model)
    case = load_case(entry)
    segments = fe.normalize(meta["tts_text"], split=True) if "tts_text" in meta else [None]
    if "segments" in meta:
        assert segments == meta["segments"]
    for s, segment in enumerate(segments):
        errors = compare(build(fe, model, meta, segment), case, f"mi{s}_", exact_set=True)
        print(entry["id"], s, {k: f"{v:.2e}" for k, v in errors.items()})
    assert not any(k.startswith(f"mi{len(segments)}_") for k in case), "golden has more segments"
