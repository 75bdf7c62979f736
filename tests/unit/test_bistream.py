"""Bi-streaming text input (spec §9.4) on the tiny v2 / v3 models. There is no golden data for it, so
the tests check properties:

- the positions fed to the LLM are the spec's interleave, rebuilt here from its rules (5 text : 15
  speech groups, fill markers at ``next_fill_index``, the rest of the text + task id at the end), with
  no eos (or any special id but fill) possible before the text has ended;
- the incremental computation is exact: each step's log-probs equal one full forward pass over the
  whole fed sequence, also when the row left and rejoined the batch while other requests decoded;
- the feed's text is tokenised fragment by fragment, whitespace moved to the next fragment;
- bad use is a clear error, and an aborted request frees everything.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from functools import cache

import pytest
import torch
from golden import TEST_DEVICE, golden_root, model_dir

from cosyserve.engine.client import AsyncEngine
from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.engine.text_feed import FeedReader, TextFeed
from cosyserve.errors import InvalidRequest, TextError, UnsupportedMode
from cosyserve.models.cosyvoice3.llm import ENDOFPROMPT_ID

LOGP_ATOL = 1e-4  # the golden LLM tolerance
TEXT = (
    "Streaming text arrives one word at a time while the speech for the words before it is already "
    "being generated, so the listener hears audio long before the sentence is complete."
)
OTHERS = ("A request decoding next to it.", "今天天气真好，我们一起去公园散步吧。")


@cache
def _model(name: str) -> TTSModel:
    return load_model(model_dir(name), text_frontend="none", device=TEST_DEVICE)


@cache
def _prompt_wav() -> bytes:
    return (golden_root() / "audio" / "zero_shot_prompt.wav").read_bytes()


def _request(model: TTSModel, mode: str) -> SynthesisRequest:
    options = GenerationOptions(seed=3, stream=True)
    if mode == "sft":
        return SynthesisRequest("sft", spk_id=model.list_speakers()[0], options=options)
    if mode == "zero_shot":
        return SynthesisRequest(
            "zero_shot", prompt_text="希望你以后能够做的比我还好呦。", prompt_audio=_prompt_wav(), options=options
        )
    return SynthesisRequest(
        "instruct2", instruct_text="Speak slowly and calmly.", prompt_audio=_prompt_wav(), options=options
    )


class SpeechSampler:
    """Greedy over the speech ids (never picks fill itself, so fills come only where they are forced),
    eos ``final_len`` picks into the final stage; records the scores it is given and checks the masks."""

    def __init__(self, llm, final_len: int = 12) -> None:
        self.size, self.fill, self.eos = llm.speech_token_size, llm.fill_token, llm.eos_token
        self.final_len = final_len
        self.rows: list[torch.Tensor] = []
        self.final_picks = 0
        self.text_phase_calls = 0

    def __call__(self, scores: torch.Tensor, history: list[int]) -> int:
        self.rows.append(scores.detach().clone())
        special = scores[self.size :]
        if torch.isfinite(scores[self.fill]):  # the text goes on: every special id but fill is masked
            self.text_phase_calls += 1
            assert torch.isneginf(special).sum() == special.numel() - 1, "a special id other than fill is open"
        else:
            assert torch.isneginf(special).sum() >= special.numel() - 1
            self.final_picks += 1
            if self.final_picks > self.final_len and torch.isfinite(scores[self.eos]):
                return self.eos
        return int(torch.argmax(scores[: self.size]))


def _words(text: str) -> list[str]:
    return [w + " " for w in text.split(" ")]


def _spec_interleave(
    head: list[int], prompt_text: list[int], prompt_speech: list[int], text: list[int], out: list[int], fill: int
) -> tuple[list[tuple[str, int]], list[int]]:
    """The positions spec §9.4 feeds for these inputs, given the ids that came out (fill markers
    included), and where the fills must be; built from the rules, independently of the engine."""
    seq = [("sos", 0)] + [("text", i) for i in head]
    queue = [("text", i) for i in prompt_text + text]
    speech = [("speech", i) for i in prompt_speech]
    while speech and len(queue) >= 5:  # prompt groups: 5 text, 15 prompt speech
        seq += queue[:5] + speech[:15]
        queue, speech = queue[5:], speech[15:]
    in_text = True
    if speech or (not prompt_speech and len(queue) < 5):  # the text ended before decoding could start
        seq += [*queue, ("task", 0), *speech]
        in_text, queue = False, []
    elif not prompt_speech:  # no prompt speech: decoding starts after 5 text tokens
        seq += queue[:5]
        queue = queue[5:]
    p = len(prompt_speech)
    next_fill = (p // 15 + 1) * 15 - p
    fills = []
    for k, token in enumerate(out):
        if token != fill:
            seq.append(("speech", token))
            continue
        assert in_text, f"a fill at {k} after the text ended"
        fills.append(next_fill)
        next_fill += 16
        if len(queue) >= 5:
            seq += queue[:5]
            queue = queue[5:]
        else:
            seq += [*queue, ("task", 0)]
            in_text, queue = False, []
    return seq, fills


def _run_with_others(model: TTSModel, request: SynthesisRequest, fragments: list[str], sampler: SpeechSampler):
    """Steps one scheduler holding the bistream request and two ordinary ones; one fragment every
    other step. Returns the bistream state and, per step, (bistream row in the batch, batch size)."""
    feed = TextFeed()
    loop = model.new_loop()
    sequence = model.prepare(request, sampler=sampler, text_feed=feed)
    loop.add(sequence)
    others = [model.prepare(SynthesisRequest("sft", t, spk_id=model.list_speakers()[0])) for t in OTHERS]
    segment = None
    membership = []
    step = 0
    while loop.has_work:
        if step == 2:
            for other in others:
                loop.add(other)
        if step % 2 == 0 and fragments:
            feed.append(fragments.pop(0))
            if not fragments:
                feed.close()
        assert loop.runnable or fragments, "the scheduler waits although all the text is there"
        if loop.runnable:
            loop.step()
        segment = segment or (sequence.segments[0] if sequence.segments else None)
        in_batch = segment is not None and segment in loop.runner.batch
        membership.append((in_batch, len(loop.runner.batch)))
        step += 1
        assert step < 5000
    assert sequence.failed is None, sequence.failed
    return segment.bistream, membership


@pytest.mark.parametrize("name", ["v2-tiny", "v3-tiny"])
@pytest.mark.parametrize("mode", ["sft", "zero_shot", "instruct2"])
def test_interleave_and_exact_incremental_logprobs(name, mode):
    model = _model(name)
    llm = model.core.llm
    request = _request(model, mode)
    sampler = SpeechSampler(llm)
    state, membership = _run_with_others(model, request, _words(TEXT), sampler)

    # (a) the interleave of spec §9.4, rebuilt from its rules
    prepared = model.prepare(request, text_feed=TextFeed())  # the prompt parts, as the engine built them
    model_input = prepared.inputs[0]
    prompt_ids = model_input.prompt_text.reshape(-1).tolist()
    if name == "v3-tiny":
        assert ENDOFPROMPT_ID in prompt_ids
        end = prompt_ids.index(ENDOFPROMPT_ID) + 1
        head, prompt_rest = prompt_ids[:end], prompt_ids[end:]
    else:
        head, prompt_rest = [], prompt_ids
    prompt_speech = model_input.llm_prompt_speech.reshape(-1).tolist()
    assert (len(prompt_speech) > 0) == (mode == "zero_shot")
    words = TEXT.split(" ")
    text = [i for n, w in enumerate(words) for i in model._text_ids(w if n == 0 else " " + w)]
    assert state.target_text == len(text)
    expected, fills = _spec_interleave(head, prompt_rest, prompt_speech, text, state.out, llm.fill_token)
    assert state.fed == expected
    assert [k for k, t in enumerate(state.out) if t == llm.fill_token] == fills and len(fills) >= 2
    assert ("task", 0) in state.fed and sampler.text_phase_calls > 0 and sampler.final_picks > sampler.final_len
    assert all(t < llm.speech_token_size or t == llm.fill_token for t in state.out)  # eos ended it, after the text

    # (b) every sampled step's log-probs equal one full forward pass over the same inputs
    with torch.inference_mode():
        hidden = llm.llm(llm.embed_inputs(state.fed))[0]
        full = llm.logp(hidden)
    sampled = [end for s, end in enumerate(state.step_ends) if s not in state.forced_steps]
    assert len(sampled) == len(sampler.rows)
    size = llm.speech_token_size
    for n, (end, row) in enumerate(zip(sampled, sampler.rows, strict=True)):
        torch.testing.assert_close(row[:size], full[end - 1, :size], atol=LOGP_ATOL, rtol=0, msg=f"step {n}")
    # ... while it left the batch and rejoined it, with other requests decoding
    rejoined = sum(1 for (a, _), (b, _) in itertools.pairwise(membership) if not a and b)
    assert rejoined >= 2, membership
    assert any(inside and size_ > 1 for inside, size_ in membership), "never batched with the others"


def test_feed_reader_moves_whitespace_forward():
    seen = []
    feed = TextFeed()
    reader = FeedReader(feed, lambda s: seen.append(s) or [len(s)], first="  Hello ")
    feed.append("there, ")
    feed.append("")
    feed.append(" ")
    feed.append("friend")
    assert reader.read() == ([5, 7, 8], False)
    assert seen == ["Hello", " there,", "  friend"]
    feed.append("!  ")
    feed.close()
    assert reader.read() == ([1], True) and seen[-1] == "!"
    assert not reader.has_news
    with pytest.raises(TextError):
        feed.append("late")


def test_bad_use_is_a_clear_error():
    v1 = _model("v1-tiny")
    with pytest.raises(UnsupportedMode, match="CosyVoice2 or Fun-CosyVoice3"):
        v1.prepare(SynthesisRequest("sft", spk_id=v1.list_speakers()[0]), text_feed=TextFeed())
    v2 = _model("v2-tiny")
    with pytest.raises(UnsupportedMode, match="not vc"):
        v2.prepare(SynthesisRequest("vc", source_audio=_prompt_wav(), prompt_audio=_prompt_wav()), text_feed=TextFeed())
    v3 = _model("v3-tiny")
    request = SynthesisRequest("zero_shot", prompt_text="no end of prompt marker", prompt_audio=_prompt_wav())
    with pytest.raises(InvalidRequest):  # the v3 frontend adds the system prompt; without it the LLM refuses
        v3.core.llm.new_bistream([1, 2, 3], [], None, 100)
    assert v3.prepare(request, text_feed=TextFeed()).inputs[0].text.numel() == 0


def test_engine_waits_without_spinning_and_abort_frees_everything():
    model = _model("v2-tiny")
    engine = AsyncEngine(model, max_running=4)

    async def scenario() -> None:
        feed = TextFeed()
        stream = await engine.synthesize_bistream(_request(model, "sft"), feed)
        for word in _words(TEXT)[:12]:
            feed.append(word)
        first = await asyncio.wait_for(stream.__anext__(), 60)  # audio before the text is complete
        assert first.size > 0
        steps = engine.core.scheduler.llm_steps
        await asyncio.sleep(0.3)
        waiting = engine.core.scheduler.llm_steps
        await asyncio.sleep(0.3)
        assert engine.core.scheduler.llm_steps == waiting >= steps  # idle while it waits for text
        assert engine.stats()["running"] == 1
        await stream.aclose()  # the client went away mid-text
        for _ in range(100):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.05)
        stats = engine.stats()
        assert stats["running"] == 0 and stats["queue_depth"] == 0
        scheduler = engine.core.scheduler
        assert not scheduler.sequences and engine.core.loop.runner.idle
        after_abort = scheduler.llm_steps
        feed.append("more text after the abort goes nowhere ")  # no error, no work
        await asyncio.sleep(0.2)
        assert scheduler.llm_steps == after_abort and not scheduler.sequences

        feed = TextFeed()  # a whole request still works, and ends when its text does
        stream = await engine.synthesize_bistream(_request(model, "sft"), feed)

        def write() -> None:
            for word in _words(TEXT):
                feed.append(word)
                time.sleep(0.005)
            feed.close()

        threading.Thread(target=write).start()
        chunks = [c async for c in stream]
        assert sum(c.size for c in chunks) > 0

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.close())
