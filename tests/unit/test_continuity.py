"""Voice continuity on the tiny golden models: every segment after the first shows the previous one in its
LLM prompt (text ids after the prompt text, picked speech ids after the prompt speech) and in its flow
prompt (ids and mel); continuity off changes nothing; a later request continues a finished one
(previous_request_id, per owner) or a given text (previous_text, spoken without audio); the store is
bounded; the segment marks sit at the segments' real sample boundaries without changing the audio."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from golden import load_tiny

from cosyserve.engine import streaming
from cosyserve.engine.client import AsyncEngine
from cosyserve.engine.continuity import ContinuityLimits, ContinuityStore, SegmentContext, continued_input
from cosyserve.engine.inputs import SegmentInput
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.errors import InvalidRequest, PreviousRequestNotFound

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = ("v1-tiny", "v2-tiny", "v3-tiny")
# Three short sentences: three segments (SSML <s>), few text ids each (the tiny models stop at 20 per id).
TEXT = "<speak><s>The keeper walked the shore.</s><s>He counted the boats.</s><s>Then he went home.</s></speak>"


model = cache(load_tiny)


@dataclass
class Recorded:
    """What the LLM and the flow were given, per segment, and the ids each segment's LLM picked."""

    prefixes: list[tuple[list[int], list[int], list[int]]] = field(default_factory=list)  # text, prompt text, speech
    conditions: list[streaming.PromptCondition] = field(default_factory=list)
    picked: list[list[int]] = field(default_factory=list)
    flow_ids: list[list[int]] = field(default_factory=list)
    synthesizers: list[streaming.Synthesizer] = field(default_factory=list)


@pytest.fixture
def recorded(monkeypatch):
    """Records every prefix the named model's LLM builds and every synthesizer its runner makes."""

    def attach(name: str) -> Recorded:
        m = model(name)
        rec = Recorded()
        build = m.lm.build_prefix

        def build_prefix(text, prompt_text, prompt_speech, embedding=None):
            ids = (text.reshape(-1).tolist(), prompt_text.reshape(-1).tolist(), prompt_speech.reshape(-1).tolist())
            rec.prefixes.append(ids)
            return build(text, prompt_text, prompt_speech, embedding)

        base = m._synthesizer

        class Recording(base):  # type: ignore[misc, valid-type]
            def __init__(self, stage, condition, *args, **kwargs):
                super().__init__(stage, condition, *args, **kwargs)
                rec.conditions.append(condition)
                rec.synthesizers.append(self)
                self.picked: list[int] = []
                rec.picked.append(self.picked)

            def add(self, token):
                self.picked.append(token)
                super().add(token)

        monkeypatch.setattr(m.lm, "build_prefix", build_prefix)
        monkeypatch.setattr(m, "_synthesizer", Recording)
        return rec

    return attach


def sft(name: str, text: str = TEXT, seed: int = 7, **fields: Any) -> SynthesisRequest:
    spk = model(name).list_speakers()[0]
    return SynthesisRequest("sft", text, spk_id=spk, options=GenerationOptions(seed=seed), **fields)


def run(name: str, request: SynthesisRequest) -> np.ndarray:
    return np.concatenate(list(model(name).synthesize(request)))


@pytest.mark.parametrize("stream", (False, True))
@pytest.mark.parametrize("name", MODELS)
def test_every_segment_after_the_first_shows_the_previous_one_in_its_prompts(name, stream, recorded):
    rec = recorded(name)
    request = sft(name, continuity=True)
    run(name, replace(request, options=replace(request.options, stream=stream)))
    assert len(rec.prefixes) == 3
    lead = model(name).inputs.text_lead("sft")
    for i in range(1, 3):
        _, prompt_text, prompt_speech = rec.prefixes[i]
        own_previous = rec.prefixes[i - 1][0][lead if i == 1 else 0 :]
        assert own_previous, "the previous segment had text"
        assert prompt_text[-len(own_previous) :] == own_previous
        assert rec.picked[i - 1], "the previous segment made speech ids"
        assert prompt_speech[-len(rec.picked[i - 1]) :] == rec.picked[i - 1]
        # The flow continues the previous segment's own ids and their mel.
        flow_previous = rec.synthesizers[i - 1].flow_ids()
        condition = rec.conditions[i]
        first = rec.conditions[0]
        assert condition.token.reshape(-1).tolist() == first.token.reshape(-1).tolist() + flow_previous
        added = condition.feat.shape[1] - first.feat.shape[1]
        ratio = model(name).core.token_mel_ratio
        assert added > 0 and (not ratio or added == ratio * len(flow_previous))  # v2/v3: 2 frames per id
    assert rec.prefixes[0][2] == []  # sft: the first segment has no prompt speech


@pytest.mark.parametrize("name", MODELS)
def test_continuity_off_leaves_the_prompts_and_the_audio_alone(name, recorded):
    rec = recorded(name)
    plain = run(name, sft(name))
    assert [p[1:] for p in rec.prefixes] == [([], [])] * 3
    again = run(name, sft(name))
    np.testing.assert_array_equal(plain, again)


def test_the_prompt_stays_within_the_limit_trimmed_from_the_oldest_end():
    x = SegmentInput(
        text=torch.tensor([[1, 2, 3]], dtype=torch.int32),
        prompt_text=torch.tensor([[9]], dtype=torch.int32),
        llm_prompt_speech=torch.tensor([[50, 51]], dtype=torch.int32),
        llm_embedding=torch.zeros(0, 4),
        flow_prompt_speech=torch.tensor([[50, 51]], dtype=torch.int32),
        prompt_mel=torch.zeros(1, 4, 2),
        flow_embedding=torch.zeros(1, 4),
    )
    mel = torch.arange(16, dtype=torch.float32).reshape(1, 2, 8)  # (1, C, T): 8 frames, 2 per id
    context = SegmentContext.of(torch.tensor([[4, 5, 6, 7]]), [10, 11, 12, 13], [10, 11, 12, 13], mel)
    assert context is not None
    whole = continued_input(x, 0, context, max_prompt=100)
    assert whole.prompt_text.tolist() == [[9, 4, 5, 6, 7]]
    assert whole.llm_prompt_speech.tolist() == [[50, 51, 10, 11, 12, 13]]
    assert whole.prompt_mel.shape == (1, 12, 2)
    cut = continued_input(x, 1, context, max_prompt=4)  # room for 2 of the 4 previous ids: the newest
    assert cut.llm_prompt_speech.tolist() == [[50, 51, 12, 13]]
    assert cut.flow_prompt_speech.tolist() == [[50, 51, 12, 13]]
    assert cut.prompt_text.tolist() == [[9, 1, 6, 7]]  # the lead id moved, the newest half of the text
    assert cut.text.tolist() == [[2, 3]]
    torch.testing.assert_close(cut.prompt_mel[0, 4:], mel[0, :, 4:].T)
    assert continued_input(x, 0, context, max_prompt=2) is x  # no room: the segment as it was


def test_the_store_is_bounded_by_count_bytes_and_time_and_kept_per_owner():
    now = [0.0]
    ctx = SegmentContext.of(torch.tensor([[1, 2]]), [3, 4], [3, 4], torch.zeros(1, 80, 4))
    assert ctx is not None
    store = ContinuityStore(ContinuityLimits(max_entries=2, max_bytes=3 * ctx.nbytes, ttl_s=10), clock=lambda: now[0])
    store.put("a", "r1", ctx)
    store.put("a", "r2", ctx)
    store.put("a", "r3", ctx)
    assert len(store) == 2
    with pytest.raises(PreviousRequestNotFound):
        store.get("a", "r1")  # the oldest went first
    assert store.get("a", "r3") is ctx
    with pytest.raises(PreviousRequestNotFound):
        store.get("b", "r3")  # another key's
    now[0] = 11
    with pytest.raises(PreviousRequestNotFound):
        store.get("a", "r3")  # expired
    assert len(store) == 0 and store.nbytes == 0
    small = ContinuityStore(ContinuityLimits(max_bytes=ctx.nbytes + 1))
    small.put(None, "x", ctx)
    small.put(None, "y", ctx)
    assert len(small) == 1


def test_bad_continuity_fields_are_refused():
    with pytest.raises(InvalidRequest, match="previous_request_id or previous_text"):
        sft("v2-tiny", previous_request_id="x", previous_text="hello")
    with pytest.raises(InvalidRequest, match="previous_request_id"):
        sft("v2-tiny", previous_request_id="x" * 129)
    with pytest.raises(InvalidRequest, match="vc"):
        SynthesisRequest("vc", continuity=True)
    assert sft("v2-tiny", previous_text="Before.").continuity


@pytest.mark.parametrize("name", ("v2-tiny",))
def test_a_request_continues_a_finished_one_of_its_owner(name, recorded):
    rec = recorded(name)
    engine = AsyncEngine(model(name), max_running=2, max_queue=4)

    async def both() -> tuple[Any, Any]:
        first = await engine.synthesize(sft(name, continuity=True, lexicon_owner="k1"), "req-1")
        async for _ in first:
            pass
        with pytest.raises(PreviousRequestNotFound):
            await engine.synthesize(sft(name, "Next.", previous_request_id="req-1", lexicon_owner="k2"))
        with pytest.raises(PreviousRequestNotFound):
            await engine.synthesize(sft(name, "Next.", previous_request_id="nope", lexicon_owner="k1"))
        second = await engine.synthesize(sft(name, "Next one.", previous_request_id="req-1", lexicon_owner="k1"))
        async for _ in second:
            pass
        return first, second

    try:
        first, _ = asyncio.run(both())
    finally:
        asyncio.run(engine.close())
    assert first.request_id == "req-1"
    assert len(rec.prefixes) == 4
    last_text, last_picked = rec.prefixes[2][0], rec.picked[2]
    _, prompt_text, prompt_speech = rec.prefixes[3]
    assert prompt_text[-len(last_text) :] == last_text
    assert prompt_speech[-len(last_picked) :] == last_picked


@pytest.mark.parametrize("name", ("v2-tiny", "v3-tiny"))
def test_previous_text_is_spoken_first_for_the_context_only(name, recorded):
    rec = recorded(name)
    engine = AsyncEngine(model(name), max_running=1, max_queue=2)

    async def go() -> tuple[Any, np.ndarray]:
        stream = await engine.synthesize(sft(name, "Then he went home.", previous_text="He counted the boats."))
        chunks = [c async for c in stream]
        return stream, np.concatenate(chunks)

    try:
        stream, audio = asyncio.run(go())
    finally:
        asyncio.run(engine.close())
    assert len(rec.prefixes) == 2
    lead = model(name).inputs.text_lead("sft")
    previous_text = rec.prefixes[0][0][lead:]
    assert rec.prefixes[1][1][-len(previous_text) :] == previous_text
    assert rec.prefixes[1][2][-len(rec.picked[0]) :] == rec.picked[0]
    # Only the request's own segment is heard and marked.
    assert [(s.index, s.start, s.end) for s in stream.segments] == [(0, 0, audio.shape[0])]


@pytest.mark.parametrize("name", MODELS)
def test_segment_marks_are_the_segments_sample_boundaries_and_change_no_sample(name):
    text = "<speak><s>The keeper walked.</s><break time='300ms'/><s>He counted boats.</s><s>Home.</s></speak>"
    plain = run(name, sft(name, text, seed=3))
    engine = AsyncEngine(model(name), max_running=1, max_queue=2)

    async def go() -> tuple[Any, np.ndarray]:
        stream = await engine.synthesize(sft(name, text, seed=3))
        return stream, np.concatenate([c async for c in stream])

    try:
        stream, audio = asyncio.run(go())
    finally:
        asyncio.run(engine.close())
    np.testing.assert_array_equal(audio, plain)  # the marks add no sample
    spans = stream.segments
    assert [s.index for s in spans] == [0, 1, 2]
    assert spans[0].start == 0 and spans[-1].end == audio.shape[0]
    pause = round(0.3 * model(name).sample_rate)
    assert spans[1].start - spans[0].end == pause  # the break lies between them, exact zeros
    assert not audio[spans[0].end : spans[1].start].any()
    assert spans[2].start == spans[1].end
    assert all(s.end is not None and s.end > s.start for s in spans)
    assert [s.text for s in spans] == model(name).inputs.planned_texts(sft(name, text))[0]
