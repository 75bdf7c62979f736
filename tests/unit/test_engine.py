"""The inference engine end to end on the tiny golden models: every mode, streaming, speed, seeds,
early close, call-time errors, stored voices and the v3 specifics.

The models come from the golden manifest (one test per model dir), so the same tests run on other
golden sets; the random weights make the audio noise-like, so only its form is checked here (the
golden e2e parity test checks the numbers).
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from golden import TEST_DEVICE, golden_root, manifest, model_dir, model_version
from resources import missing_mark

from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.engine.scheduler import Scheduler
from cosyserve.errors import AudioError, InvalidRequest, TextError, UnknownSpeaker, UnsupportedMode

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

SHORT = "今天天气真好，我们一起去散步吧。"
# One sentence (no split) long enough that every family's LLM emits several streaming hops.
LONG = (
    "Once upon a time in a quiet village surrounded by rolling hills and green fields there lived an old "
    "clockmaker named Elias who opened his small shop every single morning at exactly seven and closed it "
    "every evening at six while the villagers who passed by his window trusted his clocks more than the sun "
    "itself and the children of the village loved to watch him repair the tiny gears"
)
PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
INSTRUCT = {"instruct": "A gentle female voice, speaking slowly.", "instruct2": "请用温柔的语气说这句话。"}
LLM_MODES = ("sft", "zero_shot", "cross_lingual", "instruct", "instruct2")
FAMILY_OF = {"v1": "cosyvoice1", "v2": "cosyvoice2", "v3": "cosyvoice3"}


def _models(versions: tuple[str, ...] = ("v1", "v2", "v3")) -> list:
    names = [m for m in manifest()["models"] if model_version(m) in versions]
    if not names:
        return [pytest.param(None, marks=missing_mark(f"no golden models in {golden_root()}"))]
    return names


def _audio_inputs() -> dict:
    return manifest().get("inputs", {}).get("e2e", {})


def _wav_bytes(name: str) -> bytes:
    return (golden_root() / "audio" / f"{name}.wav").read_bytes()


@pytest.fixture(scope="module")
def prompt_wav() -> bytes:
    return _wav_bytes(_audio_inputs().get("prompt_wav", "zero_shot_prompt"))


@pytest.fixture(scope="module")
def source_wav() -> bytes:
    return _wav_bytes(_audio_inputs().get("vc_source", "zero_shot_prompt"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny models gain nothing from threads, and on a shared machine a second OpenMP thread
    # waiting for a busy core makes every op slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine():
    """Each golden model loaded once for the module (text frontend without wetext: fast, offline)."""
    loaded: dict[str, TTSModel] = {}

    def get(name: str) -> TTSModel:
        if name not in loaded:
            loaded[name] = load_model(model_dir(name), text_frontend="none", device=TEST_DEVICE)
        return loaded[name]

    return get


class LLMTap:
    """Records what the engine asks of ``model.core.llm``: each prefix's inputs (text, prompt text,
    prompt speech tokens, embedding), every token picked, and each sequence the scheduler drops."""

    def __init__(self, model: TTSModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple] = []
        self.tokens: list[int] = []
        self.finished = 0
        llm = model.core.llm
        build_prefix, make_sampler, stop_ids = llm.build_prefix, llm.make_sampler, llm.stop_token_ids

        def tapped_prefix(*args, **kwargs):
            self.calls.append(args)
            return build_prefix(*args, **kwargs)

        def tapped_sampler(*args, **kwargs):
            sampler = make_sampler(*args, **kwargs)

            def pick(logp, history):
                token = sampler(logp, history)
                if token not in stop_ids:
                    self.tokens.append(int(token))
                return token

            return pick

        remove = Scheduler.remove

        def tapped_remove(scheduler, sequence):
            self.finished += 1
            return remove(scheduler, sequence)

        monkeypatch.setattr(llm, "build_prefix", tapped_prefix)
        monkeypatch.setattr(llm, "make_sampler", tapped_sampler)
        monkeypatch.setattr(Scheduler, "remove", tapped_remove)

    def reset(self) -> None:
        self.calls.clear()
        self.tokens.clear()
        self.finished = 0


def _wav(seconds: float, sr: int = 16000, silent: bool = False) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    x = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 180.0 * t)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def _request(model: TTSModel, mode: str, text: str, prompt: bytes, source: bytes, **kwargs):
    spk = kwargs.pop("spk_id", None)
    if mode == "sft":
        return model.inference_sft(text, spk or model.list_speakers()[0], **kwargs)
    if mode == "zero_shot":
        if spk:
            return model.inference_zero_shot(text, "", spk_id=spk, **kwargs)
        return model.inference_zero_shot(text, PROMPT_TEXT, prompt, **kwargs)
    if mode == "cross_lingual":
        return model.inference_cross_lingual(text, None if spk else prompt, spk_id=spk, **kwargs)
    if mode == "instruct":
        return model.inference_instruct(text, spk or model.list_speakers()[0], INSTRUCT["instruct"], **kwargs)
    if mode == "instruct2":
        return model.inference_instruct2(text, INSTRUCT["instruct2"], None if spk else prompt, spk_id=spk, **kwargs)
    if mode == "vc":
        return model.inference_vc(source, prompt, **kwargs)
    raise AssertionError(mode)


def _check_chunks(model: TTSModel, chunks: list[np.ndarray]) -> np.ndarray:
    assert chunks, "no audio"
    for chunk in chunks:
        assert isinstance(chunk, np.ndarray) and chunk.dtype == np.float32 and chunk.ndim == 1
        assert chunk.size > 0, "empty chunk"
        assert np.isfinite(chunk).all(), "non-finite samples"
        assert np.abs(chunk).max() <= 1.0, f"samples outside [-1, 1]: {np.abs(chunk).max()}"
    return np.concatenate(chunks)


def _expected_samples(model: TTSModel, n_tokens: int, speed: float) -> float:
    return n_tokens / model.core.token_frame_rate * model.sample_rate / speed


@pytest.mark.parametrize("mode", ["sft", "zero_shot", "cross_lingual", "instruct", "instruct2", "vc"])
@pytest.mark.parametrize("name", _models())
def test_mode(engine, name, mode, prompt_wav, source_wav, monkeypatch):
    model = engine(name)
    assert model.family == FAMILY_OF[model_version(name)]
    if mode not in model.modes:
        with pytest.raises(UnsupportedMode) as err:
            _request(model, mode, SHORT, prompt_wav, source_wav)
        message = str(err.value)
        assert model.family in message
        assert ("CosyVoice2" if mode == "instruct2" else "CosyVoice-300M") in message, message
        return

    tap = LLMTap(model, monkeypatch)
    audio = _check_chunks(model, list(_request(model, mode, SHORT, prompt_wav, source_wav, seed=7)))
    tokens = list(tap.tokens)
    if mode == "vc":
        assert not tokens, "vc must not run the LLM"
        source_seconds = sf.info(io.BytesIO(source_wav)).duration
        assert 0.8 < audio.size / model.sample_rate / source_seconds < 1.2, "vc output duration"
    else:
        assert tokens, "the LLM produced no token"
        ratio = audio.size / _expected_samples(model, len(tokens), 1.0)
        assert 0.5 < ratio < 1.2, f"{audio.size} samples for {len(tokens)} tokens"
        if model.core.version == "v3":
            # The engine adds the system prompt when the request has none.
            args = tap.calls[0]
            eop = model.frontend.tokenize("<|endofprompt|>").reshape(-1)
            assert eop.numel() == 1 and bool((torch.cat([args[0], args[1]], 1) == eop).any())

    tap.reset()
    again = np.concatenate(list(_request(model, mode, SHORT, prompt_wav, source_wav, seed=7)))
    np.testing.assert_array_equal(again, audio, "same seed, different audio")
    assert tap.tokens == tokens

    tap.reset()
    streamed = _check_chunks(model, list(_request(model, mode, SHORT, prompt_wav, source_wav, seed=7, stream=True)))
    assert tap.tokens == tokens, "a seeded request must pick the same tokens streamed or not"
    assert abs(streamed.size - audio.size) <= 0.02 * audio.size, (streamed.size, audio.size)

    tap.reset()
    fast = _check_chunks(model, list(_request(model, mode, SHORT, prompt_wav, source_wav, seed=7, speed=1.5)))
    assert tap.tokens == tokens
    assert abs(fast.size - audio.size / 1.5) <= 0.05 * audio.size, (fast.size, audio.size)

    if mode != "vc":
        tap.reset()
        other = np.concatenate(list(_request(model, mode, SHORT, prompt_wav, source_wav, seed=8)))
        assert tap.tokens != tokens, "a different seed must sample differently"
        assert other.shape != audio.shape or not np.array_equal(other, audio)


@pytest.mark.parametrize("name", _models())
def test_stream_long_text_and_early_close(engine, name, monkeypatch):
    model = engine(name)
    # v1's first streaming hop is 2 s of tokens + overlap; v2/v3 start after about one second.
    text = LONG if model.core.version == "v1" else " ".join(LONG.split()[:24])
    tap = LLMTap(model, monkeypatch)
    chunks = list(model.inference_sft(text, model.list_speakers()[0], stream=True, seed=3))
    audio = _check_chunks(model, chunks)
    n_tokens = len(tap.tokens)
    segments = model.frontend.normalize(text, split=True, text_frontend=True)
    assert len(chunks) > len(segments), f"{len(chunks)} chunks for {len(segments)} segment(s)"
    assert 0.5 < audio.size / _expected_samples(model, n_tokens, 1.0) < 1.2

    # Closing after the first chunk stops the LLM: its iterator is finalised and yields nothing more.
    tap.reset()
    chunks = model.inference_sft(text, model.list_speakers()[0], stream=True, seed=3)
    _check_chunks(model, [next(chunks)])
    produced = len(tap.tokens)
    assert 0 < produced < n_tokens
    chunks.close()
    assert tap.finished == 1, "the request was not dropped from its scheduler when closed"
    assert len(tap.tokens) == produced
    with pytest.raises(StopIteration):
        next(chunks)


@pytest.mark.parametrize("name", _models())
def test_call_time_errors(engine, name, prompt_wav, source_wav):
    """Every error is raised by the inference_* call itself, before anything is iterated."""
    model = engine(name)
    known = model.list_speakers()
    with pytest.raises(UnknownSpeaker) as err:
        model.inference_sft(SHORT, "no such speaker")
    assert "no such speaker" in str(err.value) and all(k in str(err.value) for k in known)
    with pytest.raises(UnknownSpeaker):
        model.inference_zero_shot(SHORT, "", spk_id="no such speaker")

    llm_modes = [m for m in LLM_MODES if m in model.modes]
    for mode in llm_modes:
        for text in ("", "   ", "。。！？", "?!..."):
            with pytest.raises(TextError):
                _request(model, mode, text, prompt_wav, source_wav)

    bad_audio = {
        "not audio": (b"this is not a wav file" * 20, "decode"),
        "empty bytes": (b"", "empty"),
        "0.2 s of silence": (_wav(0.2, silent=True), "0.20 s"),
        "31 s": (_wav(31.0), "31"),
        "8 kHz": (_wav(2.0, sr=8000), "8000 Hz"),
    }
    prompt_calls = {
        "zero_shot": lambda a: model.inference_zero_shot(SHORT, PROMPT_TEXT, a),
        "cross_lingual": lambda a: model.inference_cross_lingual(SHORT, a),
        "instruct2": lambda a: model.inference_instruct2(SHORT, INSTRUCT["instruct2"], a),
        "vc (prompt)": lambda a: model.inference_vc(source_wav, a),
        "vc (source)": lambda a: model.inference_vc(a, prompt_wav),
    }
    for call_name, call in prompt_calls.items():
        if call_name.split()[0] not in model.modes:
            continue
        for what, (data, expected) in bad_audio.items():
            with pytest.raises(AudioError) as err:
                call(data)
            assert expected in str(err.value), f"{call_name} with {what}: {err.value}"

    with pytest.raises(AudioError):
        model.inference_cross_lingual(SHORT)  # neither prompt audio nor voice
    with pytest.raises(InvalidRequest):
        model.inference_sft(SHORT, known[0], speed=10.0)


def _fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.mark.parametrize("name", _models())
def test_stored_voice(name, prompt_wav, source_wav, tmp_path, monkeypatch):
    src = model_dir(name)
    builtin = src / "spk2info.pt"
    before = _fingerprint(builtin), sorted(p.name for p in src.iterdir())
    model = load_model(src, text_frontend="none", data_dir=tmp_path)
    tap = LLMTap(model, monkeypatch)

    voice = model.add_speaker("my voice", PROMPT_TEXT, prompt_wav)
    assert "my voice" in model.list_speakers() and "sft" in model.modes
    with pytest.raises(InvalidRequest):
        model.add_speaker(model.list_speakers()[0], PROMPT_TEXT, prompt_wav)  # a built-in id
    with pytest.raises(InvalidRequest):
        model.add_speaker("../escape", PROMPT_TEXT, prompt_wav)

    # A stored voice gives exactly what its prompt audio gives.
    for mode in ("zero_shot", "cross_lingual", "instruct2"):
        if mode not in model.modes:
            continue
        tap.reset()
        by_audio = np.concatenate(list(_request(model, mode, SHORT, prompt_wav, source_wav, seed=5)))
        audio_prompt_text = tap.calls[0][1]
        tap.reset()
        by_id = np.concatenate(list(_request(model, mode, SHORT, prompt_wav, source_wav, seed=5, spk_id="my voice")))
        np.testing.assert_array_equal(by_id, by_audio, f"{mode}: stored voice differs from its audio")
        if mode == "instruct2":
            # The instruct text stays the LLM prompt (the reference would put the transcript there).
            assert torch.equal(tap.calls[0][1], audio_prompt_text)
            assert not torch.equal(tap.calls[0][1], voice.prompt_text_ids)
        if mode == "zero_shot":
            assert torch.equal(tap.calls[0][1], voice.prompt_text_ids)
    sft = _check_chunks(model, list(model.inference_sft(SHORT, "my voice", seed=5)))

    # Persisted in the data directory (not the model's): a new load knows the voice.
    assert (tmp_path / "voices.sqlite3").is_file()
    reloaded = load_model(src, text_frontend="none", data_dir=tmp_path)
    assert "my voice" in reloaded.list_speakers()
    np.testing.assert_array_equal(np.concatenate(list(reloaded.inference_sft(SHORT, "my voice", seed=5))), sft)
    assert "my voice" not in load_model(src, text_frontend="none").list_speakers()

    assert (_fingerprint(builtin), sorted(p.name for p in src.iterdir())) == before, "the model dir was modified"


@pytest.mark.parametrize("name", _models(("v3",)))
def test_v3_llm_weights(engine, name, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir(name), copy)
    state = torch.load(copy / "llm.pt", map_location="cpu", weights_only=True)
    weight = state["llm_decoder.weight"]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    state["llm_decoder.weight"] = weight + 0.5 * weight.std() * noise
    torch.save(state, copy / "llm.rl.pt")

    text = "今天天气真好。"  # no <|endofprompt|>: the engine adds the system prompt
    speaker = engine(name).list_speakers()[0]
    base = np.concatenate(list(engine(name).inference_sft(text, speaker, seed=1)))
    same = np.concatenate(list(load_model(copy, text_frontend="none").inference_sft(text, speaker, seed=1)))
    np.testing.assert_array_equal(same, base)
    rl_model = load_model(copy, text_frontend="none", llm_weights="llm.rl.pt")
    rl = np.concatenate(list(rl_model.inference_sft(text, speaker, seed=1)))
    assert rl.shape != base.shape or not np.array_equal(rl, base), "llm.rl.pt was not used"


@pytest.mark.parametrize("name", _models(("v2", "v3")))
def test_token_budget_keeps_within_the_flow_noise(engine, name, prompt_wav, monkeypatch):
    """An unsplittable text cannot make the LLM outrun the flow's fixed noise (a crash mid-stream)."""
    import cosyserve.engine.scheduler as scheduler

    model = engine(name)
    prompt = model.prompt(prompt_wav)
    prompt_tokens = prompt.speech_token.shape[1]
    monkeypatch.setattr(scheduler, "FIXED_NOISE_FRAMES", model.core.token_mel_ratio * (prompt_tokens + 6))
    tap = LLMTap(model, monkeypatch)
    chunks = list(model.inference_cross_lingual("今天天气真好，我们一起去公园散步吧。", prompt_wav, seed=1))
    assert 0 < len(tap.tokens) <= 6
    _check_chunks(model, chunks)
