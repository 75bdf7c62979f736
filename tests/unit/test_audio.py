"""Audio decoding / resampling, feature helpers, ONNX wrappers and Frontend mode rules."""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from golden import REPO, golden_root, manifest, model_dir, model_version
from helpers import load_audio
from resources import missing

from cosyserve.audio.io import decode_audio, duration_s, to_mono
from cosyserve.audio.resample import OutputResampler, resample
from cosyserve.errors import AudioError, InvalidRequest, ModelLoadError, UnsupportedMode
from cosyserve.frontend.features import MelExtractor, slaney_mel_filters
from cosyserve.frontend.frontend import Frontend
from cosyserve.frontend.onnx_models import SpeakerEncoder, SpeechTokenizer
from cosyserve.frontend.voice_prompt import VoicePrompt


def tone(sr: int, seconds: float, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    """(N, channels) float32 test signal, each channel at a different amplitude."""
    t = np.arange(round(sr * seconds)) / sr
    return np.stack([0.3 / (c + 1) * np.sin(2 * np.pi * freq * t) for c in range(channels)], axis=1).astype(np.float32)


def encode(data: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def first_model(*versions: str) -> str:
    for model in manifest()["models"]:
        if not versions or model_version(model) in versions:
            return model
    missing(f"no golden model of version {versions}")


def tokenizer_path(model: str) -> Path:
    return model_dir(model) / f"speech_tokenizer_{model_version(model)}.onnx"


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "subtype", "atol"),
    [("WAV", "PCM_16", 1 / 32768), ("WAV", "FLOAT", 0), ("FLAC", "PCM_16", 1 / 32768), ("OGG", "VORBIS", None)],
)
def test_lossless_and_ogg_bytes_decode(fmt, subtype, atol):
    data = tone(24000, 0.5, channels=2)
    wave, sr = decode_audio(encode(data, 24000, fmt, subtype))
    assert sr == 24000 and wave.dtype == np.float32 and wave.shape[0] == 2
    if atol is None:  # lossy: same length, same waveform up to coding noise
        assert abs(wave.shape[1] - data.shape[0]) < 0.05 * data.shape[0]
        n = min(wave.shape[1], data.shape[0])
        assert np.corrcoef(wave[0, :n], data[:n, 0])[0, 1] > 0.9
    else:
        np.testing.assert_allclose(wave, data.T, atol=atol)


def test_mp3_bytes_decode():
    if "MP3" not in sf.available_formats():
        pytest.skip("libsndfile built without MP3")
    data = tone(24000, 1.0)
    wave, sr = decode_audio(encode(data, 24000, "MP3", "MPEG_LAYER_III"))
    assert sr == 24000 and wave.shape[0] == 1
    assert 0.9 * data.shape[0] < wave.shape[1] < 1.2 * data.shape[0]
    assert 0.1 < np.abs(wave).max() < 0.5


def test_inputs_path_str_filelike_stream_and_decoded(tmp_path):
    data = tone(16000, 0.25)
    raw = encode(data, 16000, "WAV", "PCM_16")
    path = tmp_path / "a.wav"
    path.write_bytes(raw)

    class Stream(io.RawIOBase):  # not seekable, like a socket or a pipe
        def __init__(self) -> None:
            self.inner = io.BytesIO(raw)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            chunk = self.inner.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    expected, _ = decode_audio(raw)
    for source in (path, str(path), io.BytesIO(raw), Stream(), bytearray(raw), (expected, 16000)):
        wave, sr = decode_audio(source)
        assert sr == 16000
        np.testing.assert_array_equal(wave, expected)


def test_load_audio_downmixes_and_resamples():
    data = tone(44100, 0.5, channels=2)
    out = load_audio(encode(data, 44100, "WAV", "FLOAT"), 16000)
    assert out.shape == (1, math.ceil(data.shape[0] * 16000 / 44100)) and out.dtype == torch.float32
    direct = resample(torch.from_numpy(data.T.mean(0, keepdims=True)), 44100, 16000)
    torch.testing.assert_close(out, direct)
    assert duration_s(out, 16000) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty"),
        (b"this is certainly not audio, just some text bytes" * 10, "could not decode"),
        (encode(np.zeros((0, 1), np.float32), 16000, "WAV", "PCM_16"), "empty"),
        (encode(np.full((800, 1), np.nan, np.float32), 16000, "WAV", "FLOAT"), "NaN"),
    ],
    ids=["empty-bytes", "not-audio", "zero-samples", "nan"],
)
def test_bad_audio_raises_audio_error(payload, message):
    with pytest.raises(AudioError, match=message):
        load_audio(payload, 16000)


def test_missing_file_and_low_rate(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav", 16000)
    low = encode(tone(8000, 0.5), 8000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match=r"8000 Hz is too low.*16000"):
        load_audio(low, 16000)
    with pytest.raises(AudioError, match="too low"):
        to_mono(np.zeros((1, 100), np.float32), 12000, 24000)


# --- resampling -------------------------------------------------------------------------------


def test_resample_identity_shape_and_band_limited_accuracy():
    x = torch.randn(2, 1000)
    assert resample(x, 24000, 24000) is x
    for orig, new in ((44100, 16000), (16000, 22050), (24000, 16000), (16000, 24000)):
        n = orig // 2
        t = torch.arange(n, dtype=torch.float64) / orig
        y = resample(torch.sin(2 * math.pi * 440 * t).float()[None], orig, new)
        assert y.shape == (1, math.ceil(n * new / orig))
        t_new = torch.arange(y.shape[1], dtype=torch.float64) / new
        expected = torch.sin(2 * math.pi * 440 * t_new)
        interior = slice(200, y.shape[1] - 200)  # away from the zero-padded edges
        assert (y[0, interior].double() - expected[interior]).abs().max() < 2e-3, (orig, new)
    with pytest.raises(TypeError):
        resample(torch.zeros(1, 10, dtype=torch.int16), 16000, 24000)


def test_output_resampler_streams_continuously():
    data = tone(24000, 1.0)[:, 0]
    whole = OutputResampler(24000, 16000)(data, last=True)
    stream = OutputResampler(24000, 16000)
    pieces = [stream(c) for c in np.array_split(data, 7)] + [stream(np.zeros(0, np.float32), last=True)]
    chunked = np.concatenate(pieces)
    assert chunked.dtype == np.float32 and abs(len(chunked) - 16000) <= 1
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    same = OutputResampler(24000, 24000)
    np.testing.assert_array_equal(same(data), data)


# --- features ---------------------------------------------------------------------------------


def test_slaney_filters_match_whisper_assets():
    path = REPO.parent / "shared" / "assets" / "mel_filters.npz"
    if not path.is_file():
        missing("whisper mel_filters.npz not available")
    with np.load(path) as assets:
        for key in assets.files:
            n_mels = int(key.split("_")[1])
            np.testing.assert_allclose(slaney_mel_filters(16000, 400, n_mels), assets[key], rtol=0, atol=1e-7)


def test_mel_extractors_keep_their_own_filterbank():
    """v1 (22.05 kHz, n_fft 1024) and v2 (24 kHz, n_fft 1920) with the same fmax in one process (§17.8)."""
    v1 = MelExtractor(1024, 80, 22050, 256, 1024, 0, 8000, False)
    v2 = MelExtractor(1920, 80, 24000, 480, 1920, 0, 8000, False)
    wave = torch.from_numpy(tone(22050, 0.5)[:, 0])[None]
    first = v1(wave)
    assert v2(torch.from_numpy(tone(24000, 0.5)[:, 0])[None]).shape == (1, 80, 12000 // 480)
    torch.testing.assert_close(v1(wave), first, rtol=0, atol=0)
    assert first.shape == (1, 80, wave.shape[1] // 256)
    assert v1.mel_basis.shape == (80, 513) and v2.mel_basis.shape == (80, 961)


# --- ONNX wrappers ----------------------------------------------------------------------------


def test_onnx_missing_or_corrupt_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nothere\.onnx"):
        SpeechTokenizer(tmp_path / "nothere.onnx")
    bad = tmp_path / "campplus.onnx"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ModelLoadError, match=r"campplus\.onnx"):
        SpeakerEncoder(bad)


def test_tokenizer_limits_and_thread_safety():
    model = first_model()
    tokenizer = SpeechTokenizer(tokenizer_path(model))
    with pytest.raises(AudioError, match="at most 30 s"):
        tokenizer(torch.zeros(1, 16000 * 30 + 160))
    with pytest.raises(AudioError, match="too short"):
        tokenizer(torch.zeros(1, 100))
    encoder = SpeakerEncoder(model_dir(model) / "campplus.onnx")
    waves = [load_audio(p, 16000) for p in sorted((golden_root() / "audio").glob("*.wav"))]
    expected = [(tokenizer(w), encoder(w)) for w in waves]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda w: (tokenizer(w), encoder(w)), waves * 4))
    for (tokens, emb), (exp_tokens, exp_emb) in zip(results, expected * 4, strict=True):
        assert tokens.dtype == torch.int32 and tokens.shape[0] == 1
        assert torch.equal(tokens, exp_tokens) and torch.equal(emb, exp_emb)
        assert emb.shape == (1, 192)


# --- Frontend mode rules (stand-in models) ----------------------------------------------------


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class FakeSpeechTokenizer:
    """25 Hz: one token per 4 whisper frames, like the v2 tokenizer's output length."""

    def __call__(self, wave16k: torch.Tensor) -> torch.Tensor:
        frames = wave16k.shape[1] // 160
        return torch.arange(math.ceil(math.ceil(frames / 2) / 2), dtype=torch.int32)[None]


class FakeSpeakerEncoder:
    def __call__(self, wave16k: torch.Tensor) -> torch.Tensor:
        return torch.full((1, 192), float(wave16k.abs().mean()))


def make_frontend(version: str) -> Frontend:
    if version == "v1":
        mel, sr = MelExtractor(1024, 80, 22050, 256, 1024, 0, 8000, False), 22050
    else:
        mel, sr = MelExtractor(1920, 80, 24000, 480, 1920, 0, 8000, False), 24000
    family = {"v1": "cosyvoice1", "v2": "cosyvoice2", "v3": "cosyvoice3"}[version]
    return Frontend(
        version,
        CharTokenizer(),
        None,
        FakeSpeechTokenizer(),
        FakeSpeakerEncoder(),
        mel,
        sr,
        family=family,
        token_rate=50 if version == "v1" else 25,
    )


# 0.83 s: 21 tokens but 41 mel frames at 24 kHz -> v2/v3 trim to 20 tokens / 40 frames.
PROMPT = encode(tone(16000, 0.83), 16000, "WAV", "PCM_16")


def test_prompt_alignment_and_vc_untrimmed():
    v2 = make_frontend("v2")
    prompt = v2.process_prompt(PROMPT)
    assert (prompt.family, prompt.token_rate) == ("cosyvoice2", 25)
    assert prompt.speech_token.shape == (1, 20)
    assert prompt.speech_feat.shape == (1, 40, 80)
    vc = v2.vc(PROMPT, PROMPT)  # audio prompt: processed as the reference's frontend_vc, no trim
    assert set(vc) == {"source_speech_token", "flow_prompt_speech_token", "prompt_speech_feat", "flow_embedding"}
    assert vc["flow_prompt_speech_token"].shape == (1, 21) and vc["prompt_speech_feat"].shape == (1, 41, 80)
    v1 = make_frontend("v1").process_prompt(PROMPT)  # v1: no trimming, mel at 22.05 kHz by default
    assert v1.speech_feat.shape == (1, math.ceil(0.83 * 22050) // 256, 80)
    assert v1.speech_token.shape == (1, 21)


def test_mode_fields_and_stored_speakers():
    v2 = make_frontend("v2")
    prompt = v2.process_prompt(PROMPT)
    stored = prompt.with_transcript("xyz", torch.tensor([[7, 8, 9]], dtype=torch.int32))

    zs = v2.zero_shot("ab", "xy", prompt)
    assert zs["prompt_text"].tolist() == [[ord("x"), ord("y")]] and zs["text"].dtype == torch.int32
    # A stored zero-shot speaker keeps its own transcript (it belongs to its speech tokens)...
    assert v2.zero_shot("ab", "", stored)["prompt_text"].tolist() == [[7, 8, 9]]
    # ... but instruct2 keeps the instruct text (reference bug §17.4 fixed).
    ins2 = v2.instruct2("ab", "go", stored)
    assert ins2["prompt_text"].tolist() == [[ord("g"), ord("o")]] and "llm_prompt_speech_token" not in ins2
    cl = v2.cross_lingual("ab", stored)
    assert "prompt_text" not in cl and "llm_prompt_speech_token" not in cl and "flow_prompt_speech_token" in cl

    voice = v2.with_transcript(v2.process_prompt(PROMPT), "PQ", "pq")
    assert voice.prompt_text == "PQ" and voice.has_transcript
    fields = voice.as_fields()  # the reference's add_zero_shot_spk layout
    assert fields["prompt_text"].tolist() == [[ord("p"), ord("q")]] and int(fields["prompt_text_len"][0]) == 2
    assert int(fields["prompt_speech_feat_len"][0]) == 40
    assert fields["flow_prompt_speech_token_len"].dtype == torch.int32
    from_voice = v2.zero_shot("ab", None, voice)
    assert from_voice["prompt_text"].tolist() == [[ord("p"), ord("q")]]
    assert not any(k.endswith("_len") for k in from_voice)
    assert v2.zero_shot("ab", None, prompt)["prompt_text"].shape == (1, 0)

    speaker = VoicePrompt.from_fields({"embedding": torch.ones(1, 192)}, "cosyvoice2", 25)
    assert set(v2.sft("ab", speaker)) == {"text", "llm_embedding", "flow_embedding"}
    with pytest.raises(ValueError, match="no speaker embedding"):
        VoicePrompt.from_fields({"foo": torch.ones(1)}, "cosyvoice2", 25)
    with pytest.raises(InvalidRequest, match="only a speaker embedding"):
        v2.zero_shot("ab", "xy", speaker)
    with pytest.raises(UnsupportedMode):
        v2.instruct("ab", speaker, "calm")
    v1 = make_frontend("v1")
    ins = v1.instruct("ab", speaker, "calm")
    assert set(ins) == {"text", "prompt_text", "flow_embedding"}
    with pytest.raises(UnsupportedMode):
        v1.instruct2("ab", "calm", prompt)
