"""The mixed-load bench's reading of a response: reads of one chunk merge into a burst, gaps are between bursts."""

from __future__ import annotations

import io

import soundfile as sf

from cosyserve.bench_mixed import BURST_S, Timeline, long_prompt_wav


def test_reads_close_together_are_one_chunk_and_gaps_are_between_chunks():
    start = 100.0
    # chunk 1 in three reads, chunk 2 after 2 s, chunk 3 after 5 s in two reads
    reads = [101.0, 101.001, 101.002, 103.002, 108.0, 108.0 + BURST_S / 2]
    timeline = Timeline(start, arrivals=reads, nbytes=600, status=200)
    assert timeline.bursts() == [101.0, 103.002, 108.0]
    summary = timeline.summary()
    assert summary["chunks"] == 3 and summary["first_chunk_s"] == 1.0
    assert summary["gap_max_s"] == 4.998 and summary["gap_median_s"] == 3.5
    assert summary["total_s"] == round(reads[-1] - start, 3)


def test_a_response_with_no_audio_has_no_gaps():
    summary = Timeline(0.0, status=503, error="HTTP error").summary()
    assert summary["chunks"] == 0 and summary["first_chunk_s"] is None and summary["gap_max_s"] == 0.0


def test_the_long_prompt_is_a_wav_of_the_length_asked_for():
    wave, rate = sf.read(io.BytesIO(long_prompt_wav(2.5)))
    assert rate == 16000 and len(wave) == 40000 and 0.05 < abs(wave).max() <= 1.0
