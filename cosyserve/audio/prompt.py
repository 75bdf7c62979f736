"""The one check of a prompt (or vc source) recording: decoded once, within one set of limits.

The HTTP layer checks an upload as soon as it arrives (before the request waits in a queue) and the
engine checks what reaches it from elsewhere (the Python API); both call :func:`check_prompt_audio`
with the engine's :class:`PromptLimits`, and audio already checked is not decoded again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cosyserve.audio.io import MIN_SAMPLE_RATE, AudioInput, decode_audio
from cosyserve.errors import AudioError


@dataclass(frozen=True)
class PromptLimits:
    """What a prompt recording must be: long enough to carry a voice, short enough for the speech tokenizer."""

    min_seconds: float = 0.5
    max_seconds: float = 30.0
    min_sample_rate: int = MIN_SAMPLE_RATE  # the speech tokenizer's input rate: no up-sampling


class CheckedAudio(NamedTuple):
    """A decoded recording that passed :func:`check_prompt_audio` (a ``(wave, sample_rate)`` pair)."""

    wave: np.ndarray  # (channels, samples) float32
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.wave.shape[-1] / self.sample_rate


def check_prompt_audio(audio: AudioInput | CheckedAudio | None, param: str, limits: PromptLimits) -> CheckedAudio:
    """Decode ``audio`` (unless it was checked before) and enforce ``limits``; errors name ``param``."""
    if audio is None:
        raise AudioError(f"{param} is required", param=param)
    if isinstance(audio, CheckedAudio):
        wave, sr = audio
    else:
        try:
            wave, sr = decode_audio(audio, max_seconds=limits.max_seconds)
        except AudioError as exc:
            raise AudioError(f"{param}: {exc.message}", param=param) from exc
        except Exception as exc:  # a decoder crash on hostile input is still the input's fault
            raise AudioError(f"{param} does not decode as audio: {exc}", param=param) from exc
    checked = CheckedAudio(wave, int(sr))
    seconds, rate = checked.seconds, checked.sample_rate
    if rate < limits.min_sample_rate:
        raise AudioError(f"{param} is sampled at {rate} Hz; at least {limits.min_sample_rate} Hz is needed", param)
    if seconds < limits.min_seconds:
        raise AudioError(f"{param} is {seconds:.2f} s long; at least {limits.min_seconds:g} s is needed", param)
    if seconds > limits.max_seconds:
        raise AudioError(f"{param} is {seconds:.1f} s long; at most {limits.max_seconds:g} s is accepted", param)
    return checked
