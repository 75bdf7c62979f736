"""Prompt-audio parity: resampling, Kaldi fbank, Whisper log-mel, speech tokens, x-vector, prompt mel."""

from __future__ import annotations

from functools import cache

import pytest
import soundfile as sf
import torch
from golden import assert_close, entries, golden_root, load_case, model_dir, model_version
from helpers import load_audio

from cosyserve.audio.resample import resample
from cosyserve.engine.pipeline import load_model
from cosyserve.frontend.features import kaldi_fbank, whisper_log_mel
from cosyserve.frontend.frontend import Frontend

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

WAVE_ATOL = 1e-5
FEAT_ATOL = 1e-4
EMBED_ATOL = 1e-4


@cache
def frontend(model: str, prompt_mel_rate: str) -> Frontend:
    """The model's frontend as the server assembles it."""
    return load_model(model_dir(model), text_frontend="none", prompt_mel_rate=prompt_mel_rate).frontend


@pytest.mark.parametrize("entry", entries("prompt_audio"))
def test_prompt_audio(entry):
    case = load_case(entry)
    wav = golden_root() / entry["meta"]["wav"]
    speech16k = load_audio(wav, 16000)
    checked = {"speech_16k": assert_close(speech16k, case["speech_16k"], WAVE_ATOL, "speech_16k")}
    for key, expected in case.items():
        if key.startswith("speech_legacy_"):
            rate = int(key.rsplit("_", 1)[1])
            got = resample(torch.from_numpy(case["speech_16k"]), 16000, rate)
            checked[key] = assert_close(got, expected, WAVE_ATOL, key)
        elif key.startswith("speech_") and key.endswith("k") and key != "speech_16k":
            rate = int(key[len("speech_") : -1]) * 1000
            checked[key] = assert_close(load_audio(wav, rate), expected, WAVE_ATOL, key)
    checked["fbank80"] = assert_close(kaldi_fbank(speech16k), case["fbank80"], FEAT_ATOL, "fbank80")
    checked["whisper_logmel128"] = assert_close(
        whisper_log_mel(speech16k, 128), case["whisper_logmel128"], FEAT_ATOL, "whisper_logmel128"
    )
    print(entry["id"], {k: f"{v:.2e}" for k, v in checked.items()})


@pytest.mark.parametrize("entry", entries("prompt"))
def test_prompt(entry):
    case = load_case(entry)
    model = entry["model"]
    wav = golden_root() / entry["meta"]["wav"]
    fe = frontend(model, "reference")
    raw = fe.process_prompt(wav, align=False)
    checked = {
        "embedding": assert_close(raw.embedding, case["embedding"], EMBED_ATOL, "embedding"),
        "speech_token": assert_close(raw.speech_token, case["speech_token"], 0, "speech_token"),
        "speech_feat": assert_close(raw.speech_feat, case["speech_feat"], FEAT_ATOL, "speech_feat"),
    }
    assert raw.speech_token.dtype == torch.int32

    # Legacy path (prompt mel from the 16 kHz audio resampled to the model rate), from its parts...
    rate = fe.sample_rate
    legacy = fe.mel_extractor(resample(load_audio(wav, 16000), 16000, rate)).transpose(1, 2)
    checked["speech_feat_legacy"] = assert_close(legacy, case["speech_feat_legacy"], FEAT_ATOL, "speech_feat_legacy")
    # ... and through the default "model" path, which is the same computation for a 16 kHz file.
    if sf.info(str(wav)).samplerate == 16000:
        model_path = frontend(model, "model").process_prompt(wav, align=False).speech_feat
        assert_close(model_path, case["speech_feat_legacy"], FEAT_ATOL, "speech_feat_legacy (model path)")

    aligned = fe.process_prompt(wav)
    if "zs_prompt_speech_feat" in case:
        checked["zs_prompt_speech_feat"] = assert_close(
            aligned.speech_feat, case["zs_prompt_speech_feat"], FEAT_ATOL, "zs_prompt_speech_feat"
        )
        checked["zs_flow_prompt_speech_token"] = assert_close(
            aligned.speech_token, case["zs_flow_prompt_speech_token"], 0, "zs_flow_prompt_speech_token"
        )
    if model_version(model) == "v1":  # v1 keeps every frame and token
        assert aligned.speech_feat.shape == raw.speech_feat.shape
    else:
        assert aligned.speech_feat.shape[1] == 2 * aligned.speech_token.shape[1]
    print(entry["id"], {k: f"{v:.2e}" for k, v in checked.items()})
