"""End to end through the public inference API against the golden ``e2e`` cases.

The golden cases replace the LLM sampler by greedy argmax (or forced ids), so this runs each mode with
a greedy sampler and injects the reference's random draws (the v1 flow noise of each flow call, the
HiFT excitation of each vocoder call). Every flow call's tokens and mel, the generated speech tokens,
the chunking and the output waveform are compared.
"""

from __future__ import annotations

import threading
from functools import cache

import numpy as np
import pytest
import torch
from golden import TEST_DEVICE, assert_close, entries, golden_root, load_case, model_dir

from cosyserve.engine.core import EngineCore, Work
from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.engine.streaming import Draws
from cosyserve.nn.sampling import GreedySampler


@cache
def _model(model: str) -> TTSModel:
    # The golden used the normaliser-free text path, HEAD's 24 kHz prompt mel, HEAD's v3 EOS mask and
    # HEAD's full-context last chunk of a streamed request.
    return load_model(
        model_dir(model),
        text_frontend="none",
        prompt_mel_rate="reference",
        reference_eos_mask=True,
        stream_last_chunk="reference",
        device=TEST_DEVICE,
    )


class GoldenDraws(Draws):
    def __init__(self, case: dict[str, np.ndarray]) -> None:
        super().__init__(seed=0)
        self.case = case

    def flow_noise(self, call: int) -> torch.Tensor | None:
        z = self.case.get(f"flow{call}_z")
        return None if z is None else torch.from_numpy(z)

    def hift_source(self, call: int) -> torch.Tensor | None:
        return torch.from_numpy(self.case[f"hift{call}_source"])


class ForcedSampler:
    """The golden's forced ids, then the stop id."""

    def __init__(self, forced: np.ndarray, stop: int) -> None:
        self.forced = [int(t) for t in forced]
        self.stop = stop

    def __call__(self, logp: torch.Tensor, history: list[int]) -> int:
        return self.forced[len(history)] if len(history) < len(self.forced) else self.stop


def _wav(name: str) -> bytes:
    return (golden_root() / "audio" / name).read_bytes()


def _synthesis(meta: dict, name: str, stream: bool | None = None, seed: int | None = None) -> SynthesisRequest:
    mode = name.removesuffix("_stream").removesuffix("_silent")
    fields = {
        "sft": {"text": meta.get("tts_text"), "spk_id": meta.get("spk_id")},
        "zero_shot": {"text": meta.get("tts_text"), "prompt_text": meta.get("prompt_text")},
        "cross_lingual": {"text": meta.get("tts_text")},
        "instruct": {
            "text": meta.get("tts_text"),
            "spk_id": meta.get("spk_id"),
            "instruct_text": meta.get("instruct_text"),
        },
        "instruct2": {"text": meta.get("tts_text"), "instruct_text": meta.get("instruct_text")},
        "vc": {},
    }
    if mode not in fields:
        raise AssertionError(f"unknown e2e mode {name}")
    if meta.get("prompt_wav") and mode not in ("sft", "instruct"):
        fields[mode]["prompt_audio"] = _wav(meta["prompt_wav"])
    if mode == "vc":
        fields[mode]["source_audio"] = _wav(meta["source_wav"])
    options = GenerationOptions(stream=bool(meta["stream"]) if stream is None else stream, seed=seed)
    return SynthesisRequest(mode, options=options, **fields[mode])


def _request(model: TTSModel, meta: dict, name: str, draws: Draws, sampler):
    return model.synthesize(_synthesis(meta, name), draws=draws, sampler=sampler)


@pytest.mark.parametrize("entry", entries("e2e"))
def test_e2e(entry, monkeypatch):
    model = _model(entry["model"])
    case = load_case(entry)
    meta = entry["meta"]
    sampler = GreedySampler()
    if "forced_tokens" in case:
        sampler = ForcedSampler(case["forced_tokens"], int(meta["greedy_last_token"]))

    flow_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    flow_tokens_to_mel = model.core.flow.tokens_to_mel
    nested = []  # a streamed call that falls back to the full inference is recorded once

    def recording_flow(token, *args, **kwargs):
        out = flow_tokens_to_mel(token, *args, **kwargs)
        if not nested:
            flow_calls.append((token, out[0] if isinstance(out, tuple) else out))
        return out

    monkeypatch.setattr(model.core.flow, "tokens_to_mel", recording_flow)
    if hasattr(model.core.flow, "tokens_to_mel_stream"):  # v2/v3 streaming: the incremental flow
        flow_stream = model.core.flow.tokens_to_mel_stream

        def recording_stream(state, token, *args, **kwargs):
            nested.append(True)
            try:
                out = flow_stream(state, token, *args, **kwargs)
            finally:
                nested.pop()
            flow_calls.append((token, out))
            return out

        monkeypatch.setattr(model.core.flow, "tokens_to_mel_stream", recording_stream)
    # The engine picks every id through the request's sampler: record what it picks (stop ids excluded).
    picked: list[int] = []
    stop_ids = model.core.llm.stop_token_ids

    def recording_sampler(logp, history):
        token = sampler(logp, history)
        picked.append(int(token))
        return token

    chunks = list(_request(model, meta, entry["name"], draws=GoldenDraws(case), sampler=recording_sampler))
    generated = [t for t in picked if t not in stop_ids]

    if meta.get("greedy_last_token") is not None:
        np.testing.assert_array_equal(np.array(generated), case["speech_tokens"].reshape(-1), "speech tokens")
    n_flow = sum(1 for k in case if k.startswith("flow") and k.endswith("_mel"))
    assert len(flow_calls) == n_flow, f"{len(flow_calls)} flow calls, golden {n_flow}"
    for k, (token, mel) in enumerate(flow_calls):
        np.testing.assert_array_equal(token.reshape(-1).numpy(), case[f"flow{k}_token"].reshape(-1), f"flow{k} tokens")
        assert_close(mel, case[f"flow{k}_mel"], 2e-4, f"flow{k} mel")
    assert [len(c) for c in chunks] == case["out_chunk_len"].tolist(), "chunk lengths"
    assert_close(np.concatenate(chunks)[None], case["out_speech"], 1e-3, "out_speech")


class _Sink:
    """Collects one request's events from the engine core."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.outcome: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def started(self) -> None:
        pass

    def chunk(self, audio: np.ndarray) -> None:
        self.chunks.append(audio)

    def _end(self, outcome: str, error: BaseException | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.done.set()

    def rejected(self, error: BaseException) -> None:
        self._end("rejected", error)

    def failed(self, error: BaseException) -> None:
        self._end("failed", error)

    def finished(self) -> None:
        self._end("finished")


@pytest.mark.parametrize("entry", entries("e2e"))
def test_e2e_through_the_engine_core_sharing_the_batch(entry):
    """The golden case, run by the engine core while two other requests of the same model share its
    decode batch and its audio steps, gives the golden chunks and waveform."""
    model = _model(entry["model"])
    case = load_case(entry)
    meta = entry["meta"]
    sampler = GreedySampler()
    if "forced_tokens" in case:
        sampler = ForcedSampler(case["forced_tokens"], int(meta["greedy_last_token"]))
    core = EngineCore(model, max_running=4, max_queue=4).start()
    try:
        company = [_Sink(), _Sink()]
        for i, sink in enumerate(company):  # the same request with sampled tokens and other seeds
            core.submit(Work(f"company{i}", sink, request=_synthesis(meta, entry["name"], stream=i == 0, seed=i)))
        golden = _Sink()
        overrides = {"draws": GoldenDraws(case), "sampler": sampler}
        core.submit(Work("golden", golden, request=_synthesis(meta, entry["name"]), overrides=overrides))
        for sink in (golden, *company):
            assert sink.done.wait(300), "a request did not finish"
        assert golden.outcome == "finished", golden.error
        assert all(sink.outcome == "finished" for sink in company), [s.error for s in company]
        assert [len(c) for c in golden.chunks] == case["out_chunk_len"].tolist(), "chunk lengths"
        assert_close(np.concatenate(golden.chunks)[None], case["out_speech"], 1e-3, "out_speech")
    finally:
        core.stop()
