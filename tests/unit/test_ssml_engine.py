"""SSML in the engine, on every family's tiny model: the text the LLM receives (say-as, sub, emphasis,
segments), the per-segment speed of <prosody rate>, and <break> as exact zeros in the audio."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import numpy as np
import pytest
from golden import load_tiny

from cosyserve.engine.inputs import SegmentPlan
from cosyserve.engine.request import MAX_SPEED, MIN_SPEED, GenerationOptions, SynthesisRequest
from cosyserve.errors import TextError
from cosyserve.families import FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = ("v1-tiny", "v2-tiny", "v3-tiny")
SEED = 5


model = cache(load_tiny)


def request(name: str, text: str, **options: Any) -> SynthesisRequest:
    return SynthesisRequest("sft", text, spk_id=model(name).list_speakers()[0], options=GenerationOptions(**options))


def text_ids(name: str, text: str, **options: Any) -> list[list[int]]:
    """The text ids of each segment the LLM receives."""
    inputs = model(name).inputs.build(request(name, text, **options))
    return [i.text.reshape(-1).tolist() for i in inputs]


def plans(name: str, text: str, **options: Any) -> list[SegmentPlan]:
    return model(name).inputs.build_planned(request(name, text, **options))[1]


def audio(name: str, text: str, stream: bool = False, **options: Any) -> np.ndarray:
    chunks = model(name).synthesize(request(name, text, stream=stream, seed=SEED, **options))
    return np.concatenate(list(chunks))


def encode(name: str, text: str) -> list[int]:
    return list(model(name).frontend.tokenizer.encode(text))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    ("ssml", "plain"),
    [
        (
            '<speak>Call <say-as interpret-as="characters">abc</say-as> at <say-as interpret-as="telephone">'
            '555-0100</say-as>, <sub alias="doctor">Dr.</sub> Smith.</speak>',
            "Call A B C at five five five, zero one zero zero, doctor Smith.",
        ),
        (
            '<speak>It is <say-as interpret-as="ordinal">2</say-as> on <say-as interpret-as="date">2024-03-05</say-as>'
            ' at <say-as interpret-as="time">9:30</say-as>, <say-as interpret-as="cardinal">1,234</say-as>.</speak>',
            "It is second on March fifth, twenty twenty four at nine thirty, one thousand two hundred and thirty four.",
        ),
        (
            '<speak>电话<say-as interpret-as="telephone">110</say-as>，第<say-as interpret-as="digits">42</say-as>号'
            '，<say-as interpret-as="cardinal">305</say-as>人。</speak>',
            "电话幺幺零，第四二号，三百零五人。",
        ),
    ],
)
def test_say_as_and_sub_change_the_text_the_llm_receives(name, ssml, plain):
    got = text_ids(name, ssml)
    assert got == text_ids(name, plain)
    # ... and differ from the same text without the markup's readings.
    assert got != text_ids(name, re.sub(r"<[^>]+>", "", ssml))


@pytest.mark.parametrize("name", MODELS)
def test_emphasis_is_the_family_strong_tag(name):
    got = text_ids(name, "<speak>I <emphasis>really</emphasis> like it.</speak>")
    tags = FAMILIES[model(name).family].emphasis
    if tags is None:  # v1: spoken plainly
        assert got == text_ids(name, "I really like it.")
        return
    (ids,) = got
    opening, closing = encode(name, tags[0]), encode(name, tags[1])
    assert len(opening) == 1 and len(closing) == 1, "the tags are special tokens"
    start, end = ids.index(opening[0]), ids.index(closing[0])
    assert ids[start + 1 : end] == encode(name, "really")
    assert ids[:start] + ids[end + 1 :] != ids  # the tags are there, in a text that is otherwise plain
    # A v3 segment carries the system prompt before its text; the emphasised words follow it.
    assert ids.index(opening[0]) > 0


@pytest.mark.parametrize("name", MODELS)
def test_paragraphs_and_sentences_are_segments_and_spans_one_text(name):
    plain = text_ids(name, "One two. Three four.")
    assert len(plain) == 1  # short sentences are merged into one segment
    assert len(text_ids(name, "<speak><p>One two.</p><p>Three four.</p></speak>")) == 2
    assert len(text_ids(name, "<speak><s>One two.</s> Three four.</speak>")) == 2
    # Inline markup does not cut a sentence: the spans are spoken as one text.
    assert text_ids(name, "<speak>One <foo>two.</foo> Three <lang xml:lang='en'>four.</lang></speak>") == plain


def test_prosody_rate_is_the_segment_speed_clamped_to_the_engine_range():
    doc = '<speak>a.<prosody rate="x-slow">b.</prosody><prosody rate="200%">c.</prosody></speak>'
    assert [p.speed for p in plans("v2-tiny", doc)] == [1.0, 0.5, 2.0]
    assert [p.speed for p in plans("v2-tiny", doc, speed=3.0)] == [3.0, 1.5, MAX_SPEED]
    assert [p.speed for p in plans("v2-tiny", doc, speed=0.4)] == [0.4, MIN_SPEED, 0.8]


def test_pauses_are_carried_by_the_plans_in_samples():
    rate = model("v1-tiny").sample_rate
    got = plans("v1-tiny", '<speak><break time="100ms"/>a.<break time="250ms"/>b.<break/></speak>')
    assert got == [SegmentPlan(1.0, round(0.1 * rate), round(0.25 * rate)), SegmentPlan(1.0, 0, round(0.5 * rate))]
    with pytest.raises(TextError, match="nothing to speak"):
        plans("v1-tiny", '<speak><break time="1s"/> <foo> </foo></speak>')


def test_text_frontend_off_takes_the_spans_as_given():
    assert text_ids("v2-tiny", "<speak>2 cats<break/>3 dogs</speak>", text_frontend=False) == [
        encode("v2-tiny", "2 cats"),
        encode("v2-tiny", "3 dogs"),
    ]


def _zero_runs(samples: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of exact zeros."""
    zero = np.concatenate([[0], (samples == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    return list(zip(edges[::2].tolist(), (edges[1::2] - edges[::2]).tolist(), strict=True))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_breaks_are_exact_zeros_at_the_model_rate(name, stream):
    rate = model(name).sample_rate
    wave = audio(name, '<speak><break time="200ms"/>Hello there.<break time="500ms"/>How are you?</speak>', stream)
    lead, middle = round(0.2 * rate), round(0.5 * rate)
    # The speech itself is the plain text's: the same samples, with exact silence around them.
    plain = audio(name, "<speak>Hello there.</speak>", stream)
    assert not wave[:lead].any() and wave[lead] != 0
    end = lead + plain.size
    assert not wave[end : end + middle].any() and wave[end + middle] != 0
    assert all(length < rate // 20 for start, length in _zero_runs(wave) if start not in (0, end))
    assert np.array_equal(wave[lead : lead + plain.size], plain)


@pytest.mark.parametrize("name", MODELS)
def test_prosody_rate_changes_the_duration_of_its_span(name):
    def after_break(text: str) -> int:
        wave = audio(name, text)
        start, length = max(_zero_runs(wave), key=lambda r: r[1])
        return wave.size - (start + length)

    normal = after_break('<speak>Hi.<break time="300ms"/>How are you doing today?</speak>')
    slow = after_break('<speak>Hi.<break time="300ms"/><prosody rate="50%">How are you doing today?</prosody></speak>')
    fast = after_break(
        '<speak>Hi.<break time="300ms"/><prosody rate="x-fast">How are you doing today?</prosody></speak>'
    )
    assert slow / normal == pytest.approx(2.0, rel=0.1)
    assert fast / normal == pytest.approx(1 / 1.5, rel=0.1)


def test_ssml_is_not_streamed_text():
    from cosyserve.engine.text_feed import TextFeed
    from cosyserve.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="SSML needs the whole text"):
        model("v2-tiny").prepare(request("v2-tiny", "<speak>Hi</speak>"), text_feed=TextFeed())
