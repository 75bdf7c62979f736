"""Long-form jobs' pure parts: the text cut into segments (nothing lost, each within its bounds, short
sentences merged), the per-segment seeds, the caption time stamps from sample boundaries."""

from __future__ import annotations

from cosyserve.api.job_runner import SEGMENT_CHARS, cut_segments, segment_seed
from cosyserve.api.jobs import captions
from cosyserve.engine.voice_library.base import JobRecord


def _squeezed(text: str) -> str:
    return "".join(text.split())


def test_segments_keep_every_character_within_bounds():
    text = "今天天气真好。我们一起去公园散步吧！明天呢？" * 40 + " Hello there. This is a test, with a clause. " * 20
    segments = cut_segments(text, 5000)
    assert _squeezed("".join(segments)) == _squeezed(text)
    assert all(0 < len(s) <= 300 for s in segments)
    # Short sentences are merged up to SEGMENT_CHARS; a segment never ends inside a sentence.
    assert any(len(s) > 12 for s in segments) and all(s[-1] in "。！？." for s in segments)
    merged = [s for s in segments if len(s) <= SEGMENT_CHARS]
    assert len(merged) >= len(segments) - 1
    assert cut_segments(text, 20) and all(len(s) <= 20 for s in cut_segments("字" * 100, 20))
    assert cut_segments("。。", 100) == []


def test_segment_seeds_are_deterministic_and_distinct():
    seeds = [segment_seed(42, i) for i in range(1000)]
    assert seeds == [segment_seed(42, i) for i in range(1000)] and len(set(seeds)) == 1000
    assert all(0 <= s < 2**63 for s in seeds) and segment_seed(43, 0) != seeds[0]


def test_captions_at_the_sample_boundaries():
    job = JobRecord("j", "", "m", "{}", ("一。", "二。", "三。"), 1, 24000, "n")
    recorded = [(24000 * 3600 + 24, 0), (48, 0)]  # the third segment is not done: no cue
    srt = captions(job, recorded, "srt")
    assert srt.split("\n")[:3] == ["1", "00:00:00,000 --> 01:00:00,001", "一。"]
    assert "2\n01:00:00,001 --> 01:00:00,003\n二。" in srt and "三" not in srt
    vtt = captions(job, recorded, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 01:00:00.001\n一。\n")
