"""--dtype: parsing, and the engine running its stages in bf16 / int8 (the vocoder stays fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import model_dir

from cosyserve.engine.client import AsyncEngine
from cosyserve.engine.memory import available_memory_bytes
from cosyserve.engine.pipeline import load_model
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.errors import ModelLoadError
from cosyserve.precision import cpu_flags, fast_dtypes, parse_dtypes
from cosyserve.settings import Settings, SettingsError


def test_parse_dtypes():
    assert parse_dtypes("fp32") == {"llm": "fp32", "flow": "fp32"}
    assert parse_dtypes("bf16") == {"llm": "bf16", "flow": "bf16"}
    assert parse_dtypes("int8") == {"llm": "int8", "flow": "fp32"}  # int8 is an LLM-only option
    assert parse_dtypes("llm=int8, flow=bf16") == {"llm": "int8", "flow": "bf16"}
    for bad, word in (("fp8", "fp8"), ("flow=int8", "flow dtype"), ("vocoder=bf16", "vocoder")):
        with pytest.raises(ValueError, match=word):
            parse_dtypes(bad)
    with pytest.raises(SettingsError):
        Settings(dtype="llm=fp64")


@pytest.mark.parametrize("dtype", ["bf16", "llm=int8,flow=bf16"])
def test_engine_runs_in_lower_precision(dtype):
    model = load_model(model_dir("v2-tiny"), text_frontend="none", dtype=dtype, flow_steps=5)
    core = model.core
    assert core.flow.decoder.n_timesteps == 5
    assert next(core.flow.decoder.estimator.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in core.hift.parameters()), "the vocoder must stay fp32"
    if dtype == "bf16":
        assert core.llm.speech_embedding.weight.dtype == torch.bfloat16
    else:
        assert any("Quantized" in type(m).__name__ or "quantized" in type(m).__module__ for m in core.llm.modules())
    request = SynthesisRequest(
        "sft", "今天天气真好。", spk_id=model.list_speakers()[0], options=GenerationOptions(seed=3)
    )
    audio = np.concatenate(list(model.synthesize(request)))
    assert audio.size > 0 and np.isfinite(audio).all() and audio.dtype == np.float32


def test_bad_flow_steps_is_a_load_error():
    with pytest.raises(ModelLoadError, match="flow_steps"):
        load_model(model_dir("v2-tiny"), text_frontend="none", flow_steps=0)


def test_streaming_options_reach_each_request_state():
    model = load_model(model_dir("v2-tiny"), text_frontend="none", stream_last_chunk="reference", stream_cache_mb=7)
    request = SynthesisRequest(
        "sft", "今天天气真好。", spk_id=model.list_speakers()[0], options=GenerationOptions(seed=3, stream=True)
    )
    sequence = model.prepare(request)
    loop = model.new_loop()
    loop.add(sequence)
    loop.step()  # the first segment starts: its synthesizer holds the request's streaming state
    synthesizer = sequence.segments[0].synthesizer
    assert synthesizer.full_context_last_chunk is True
    pool = synthesizer.flow_state.pool
    assert pool is model.audio_stage.streaming.cache and pool.limit_bytes == 7 << 20  # one pool per model
    loop.remove(sequence)
    default = load_model(model_dir("v2-tiny"), text_frontend="none")
    assert default.audio_stage.streaming.last_chunk == "causal"
    limit = default.audio_stage.streaming.cache.limit_bytes  # automatic: half the memory available
    assert 0 < limit <= available_memory_bytes()


def test_bad_streaming_options_are_refused():
    with pytest.raises(ModelLoadError, match="stream_last_chunk"):
        load_model(model_dir("v2-tiny"), text_frontend="none", stream_last_chunk="full")
    with pytest.raises(SettingsError, match="stream_last_chunk"):
        Settings(stream_last_chunk="full")
    with pytest.raises(SettingsError, match="stream_cache_mb"):
        Settings(stream_cache_mb=-1)


def test_fast_picks_bf16_only_on_a_cpu_with_bf16_instructions():
    avx2 = frozenset({"sse4_2", "avx2", "fma"})
    assert parse_dtypes("fast", flags=avx2) == {"llm": "int8", "flow": "fp32"}
    for bf16 in ("avx512_bf16", "amx_bf16"):
        assert parse_dtypes("FAST", flags=avx2 | {"avx512f", bf16}) == {"llm": "int8", "flow": "bf16"}
    assert parse_dtypes("fast") == fast_dtypes(cpu_flags())  # this machine's own flags by default


def test_the_resolved_precision_is_what_the_model_reports():
    model = load_model(model_dir("v2-tiny"), text_frontend="none", dtype="fast")
    assert model.precision == {**fast_dtypes(cpu_flags()), "vocoder": "fp32"}
    engine = AsyncEngine(model)
    try:
        assert engine.info.precision == model.precision
    finally:
        engine.core.stop()
