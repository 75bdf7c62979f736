"""Linear-cost streaming of the v2 / v3 flows: each streamed call computes only its new frames,
and the incremental result equals the full re-run from the start of the utterance."""

from __future__ import annotations

import importlib
from functools import cache

import numpy as np
import pytest
import torch
from golden import model_dir

from cosyserve.config import load_yaml
from cosyserve.engine import streaming
from cosyserve.engine.streaming import AudioStage, Draws, PromptCondition, StreamingOptions
from cosyserve.families import FAMILIES

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

MODELS = {"v2-tiny": "cosyvoice2", "v3-tiny": "cosyvoice3"}
ATOL = 1e-5  # mel, incremental vs full re-run (they differ by float round-off, ~2e-6)


@cache
def _core(model: str):
    family = FAMILIES[MODELS[model]]
    directory = model_dir(model)
    config = load_yaml(directory / family.yaml, {"qwen_pretrain_path": str(directory / "CosyVoice-BlankEN")})
    return importlib.import_module(family.model_module).load(directory, config).eval()


def _stage(core, streaming: StreamingOptions | None = None) -> AudioStage:
    cpu = torch.device("cpu")
    return AudioStage.of(core, cpu, cpu, streaming)


def _condition(prompt_tokens: int, seed: int = 1) -> PromptCondition:
    g = torch.Generator().manual_seed(seed)
    return PromptCondition(
        torch.randint(0, 6561, (1, prompt_tokens), generator=g, dtype=torch.int32),
        torch.randn(1, 2 * prompt_tokens, 80, generator=g) * 0.3,
        torch.randn(1, 192, generator=g),
    )


def _tokens(n: int, seed: int = 2) -> list[int]:
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class _FrameCounter:
    """Records the frames of every estimator evaluation (full or incremental) of one flow."""

    def __init__(self, estimator, monkeypatch) -> None:
        self.frames: list[int] = []
        for name in ("forward", "forward_chunk"):
            original = getattr(estimator, name)

            def counted(x, *args, _original=original, **kwargs):
                self.frames.append(x.size(2))
                return _original(x, *args, **kwargs)

            monkeypatch.setattr(estimator, name, counted)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("hops", [(25,), (25, 50), (25, 50, 100), (50, 25, 25, 75)])
def test_incremental_flow_equals_full_rerun_and_computes_new_frames_only(model, hops, monkeypatch):
    core = _core(model)
    flow, ratio, lookahead = core.flow, core.token_mel_ratio, core.pre_lookahead_len
    c = _condition(prompt_tokens=25)
    tokens = torch.tensor([_tokens(sum(hops) + lookahead)], dtype=torch.int32)
    steps = flow.decoder.n_timesteps
    counter = _FrameCounter(flow.decoder.estimator, monkeypatch)
    state = flow.stream_state()
    done = 0
    for hop in hops:
        n = done + hop + lookahead
        args = (tokens[:, :n], c.token, c.feat, c.embedding)
        counter.frames.clear()
        mel = flow.tokens_to_mel_stream(state, *args, streaming=True, finalize=False)
        new_frames = list(counter.frames)
        full = flow.tokens_to_mel(*args, streaming=True, finalize=False)
        assert mel.shape == full.shape
        np.testing.assert_allclose(mel.numpy(), full.numpy(), atol=ATOL, rtol=0)
        # Linear cost: every Euler step evaluates the estimator on this call's own frames only.
        expected = hop * ratio + (c.token.size(1) * ratio if done == 0 else 0)
        assert new_frames == [expected] * steps, f"estimator frames {new_frames}, expected {steps} x {expected}"
        done += hop
    assert state.cache.frames == (c.token.size(1) + done) * ratio

    # The last chunk attends to everything (spec §14.3): a full re-run, still equal to tokens_to_mel().
    args = (tokens, c.token, c.feat, c.embedding)
    counter.frames.clear()
    mel = flow.tokens_to_mel_stream(state, *args, streaming=False, finalize=True)
    assert counter.frames == [(c.token.size(1) + tokens.size(1)) * ratio] * steps
    full = flow.tokens_to_mel(*args, streaming=False, finalize=True)
    np.testing.assert_allclose(mel.numpy(), full.numpy(), atol=ATOL, rtol=0)


def test_misaligned_state_is_recomputed_from_the_start(monkeypatch):
    flow = _core("v2-tiny").flow
    c = _condition(prompt_tokens=10)
    tokens = torch.tensor([_tokens(60)], dtype=torch.int32)
    state = flow.stream_state()
    flow.tokens_to_mel_stream(state, tokens[:, :20], c.token, c.feat, c.embedding, streaming=True, finalize=False)
    assert state.cache.frames == 54  # not a whole number of 50-frame chunks: it cannot be continued
    counter = _FrameCounter(flow.decoder.estimator, monkeypatch)
    args = (tokens, c.token, c.feat, c.embedding)
    mel = flow.tokens_to_mel_stream(state, *args, streaming=True, finalize=False)
    assert counter.frames[0] == (10 + 60 - 3) * 2
    np.testing.assert_allclose(
        mel.numpy(), flow.tokens_to_mel(*args, streaming=True, finalize=False).numpy(), atol=ATOL
    )


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("n_tokens", [40, 120, 260])
def test_streamed_request_equals_the_full_rerun(model, n_tokens):
    """The synthesizer with the incremental flow emits the chunks of the re-run-from-the-start path."""
    core = _core(model)
    synth_cls = getattr(streaming, FAMILIES[MODELS[model]].synthesizer)
    c = _condition(prompt_tokens=17)
    outputs = []
    for incremental in (True, False):
        synth = synth_cls(_stage(core), c, Draws(seed=0), stream=True)
        assert synth.flow_state is not None
        if not incremental:
            synth.flow_state = None  # the full re-run of every chunk
        mels, chunks = [], []
        flow_mel = synth.flow_mel

        def recording_flow_mel(*args, _flow_mel=flow_mel, _mels=mels, **kwargs):
            _mels.append(_flow_mel(*args, **kwargs))
            return _mels[-1]

        synth.flow_mel = recording_flow_mel
        for token in _tokens(n_tokens):
            synth.add(token)
            if synth.ready():
                chunks.append(synth.next_chunk())
        chunks.append(synth.finish())
        outputs.append((mels, chunks))
    (mels, chunks), (full_mels, full_chunks) = outputs
    assert len(mels) == len(full_mels) >= 2
    for a, b in zip(mels, full_mels, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=ATOL, rtol=0)
    # The audio follows (not compared value by value: the f0 / phase of the vocoder's source turn the
    # mel's round-off into differences of up to ~1e-3 in single samples).
    assert [len(x) for x in chunks] == [len(x) for x in full_chunks]


@pytest.mark.parametrize("cuts", [(60, 160, 360), (53, 120, 250, 300, 390), (400,)])
def test_causal_hift_continued_from_state_equals_the_rerun(cuts, monkeypatch):
    """v3: the vocoder continued from the request's state emits the samples of the re-run on the whole mel,
    decoding only the new frames plus a bounded left context."""
    hift = _core("v3-tiny").hift
    mel = torch.randn(1, 80, 400, generator=torch.Generator().manual_seed(0)) * 2 - 5
    decoded: list[int] = []
    decode = hift.decode

    def counted(m, *args, **kwargs):
        decoded.append(m.size(2))
        return decode(m, *args, **kwargs)

    monkeypatch.setattr(hift, "decode", counted)
    state, pieces, emitted = hift.stream_state(), [], 0
    look = hift.f0_look_ahead + hift.conv_pre_look_right + 1  # frames a non-final call holds back
    for end, finalize in [*((c, False) for c in cuts), (400, True)]:
        decoded.clear()
        pieces.append(hift.mel_to_wave_stream(state, mel[:, :, :end], finalize))
        full, _ = hift.mel_to_wave(mel[:, :, :end], finalize)
        incremental = torch.cat(pieces, dim=1)
        assert incremental.shape == full.shape
        np.testing.assert_allclose(incremental.numpy(), full.numpy(), atol=ATOL, rtol=0)
        # Linear cost: the decoder sees the new frames, its left context and the look-ahead only.
        assert decoded[0] <= end - emitted + hift.decode_left_reach()
        emitted = end - (0 if finalize else look)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_chunk_causal_last_chunk_computes_its_own_frames_only(model, monkeypatch):
    """stream_last_chunk="causal": the last chunk continues the state too (not the reference's audio)."""
    core = _core(model)
    synth_cls = getattr(streaming, FAMILIES[MODELS[model]].synthesizer)
    counter = _FrameCounter(core.flow.decoder.estimator, monkeypatch)
    c = _condition(prompt_tokens=25)
    synth = synth_cls(_stage(core, StreamingOptions(last_chunk="causal")), c, Draws(seed=0), stream=True)
    tokens = _tokens(120)
    for token in tokens:
        synth.add(token)
        if synth.ready():
            synth.next_chunk()
    done = synth.offset
    counter.frames.clear()
    assert synth.finish() is not None
    steps = core.flow.decoder.n_timesteps
    assert counter.frames == [(len(synth.kept) - done) * core.token_mel_ratio] * steps
    # Equal to the chunk-causal flow over the whole request, finalized.
    args = (torch.tensor([synth.kept], dtype=torch.int32), c.token, c.feat, c.embedding)
    full = core.flow.tokens_to_mel(*args, streaming=True, finalize=True)
    np.testing.assert_allclose(
        synth.flow_state.mel[:, :, c.token.size(1) * core.token_mel_ratio :].numpy(), full.numpy(), atol=ATOL, rtol=0
    )


def test_a_cache_over_budget_falls_back_to_the_full_rerun(monkeypatch):
    flow = _core("v3-tiny").flow
    c = _condition(prompt_tokens=25)
    tokens = torch.tensor([_tokens(200)], dtype=torch.int32)
    state = flow.stream_state()
    flow.tokens_to_mel_stream(state, tokens[:, :28], c.token, c.feat, c.embedding, streaming=True, finalize=False)
    assert state.reserved == state.cache.nbytes() == state.pool.in_use > 0
    state.pool.limit_bytes = state.pool.in_use  # the next call would outgrow it
    counter = _FrameCounter(flow.decoder.estimator, monkeypatch)
    args = (tokens[:, :128], c.token, c.feat, c.embedding)
    mel = flow.tokens_to_mel_stream(state, *args, streaming=True, finalize=False)
    assert state.over_budget and state.cache.nbytes() == 0 and state.pool.in_use == 0
    assert counter.frames[0] == (25 + 125) * 2  # from the first frame again
    np.testing.assert_allclose(
        mel.numpy(), flow.tokens_to_mel(*args, streaming=True, finalize=False).numpy(), atol=ATOL
    )


@pytest.mark.parametrize("hops", [(25, 25, 25), (50, 25, 75), (25, 30, 25)])
def test_v2_encoder_encodes_only_the_new_tokens_and_equals_the_full_encoder(hops, request):
    """The up-sampling conformer continued from a request's earlier calls: each streamed call embeds the
    tokens after the last chunk boundary only (all of them again after a call that ended off it), and its
    output equals the full chunk-masked encoder's over all tokens."""
    flow = _core("v2-tiny").flow
    chunk, lookahead = flow.encoder.static_chunk_size, flow.pre_lookahead_len
    c = _condition(prompt_tokens=chunk)
    tokens = torch.tensor([_tokens(sum(hops) + lookahead)], dtype=torch.int32)
    embedded = []
    hook = flow.encoder.embed.register_forward_pre_hook(lambda _, args: embedded.append(args[0].size(1)))
    request.addfinalizer(hook.remove)
    state = flow.stream_state()
    done = encoded = 0
    for hop in hops:
        n = done + hop + lookahead
        args = (tokens[:, :n], c.token, c.feat, c.embedding)
        embedded.clear()
        streamed = flow.condition(*args, finalize=False, streaming=True, stream=state).mu
        total = c.token.size(1) + done + hop
        expected_new = total - encoded if encoded % chunk == 0 else total
        encoded = total
        assert embedded == [expected_new, lookahead], embedded  # the new tokens, then their look-ahead context
        full = flow.condition(*args, finalize=False, streaming=True).mu
        np.testing.assert_allclose(streamed.numpy(), full.numpy(), atol=ATOL, rtol=0)
        done += hop
