"""Band-limited resampling: torchaudio's default ``Resample`` for prompts, soxr for generated speech.

The reference computes every prompt feature from audio resampled with
``torchaudio.transforms.Resample(orig, new)`` (windowed sinc, Hann window, 6 zero crossings,
rolloff 0.99). Speech tokens are exact integers downstream of it, so we rebuild the same
polyphase kernel (in float64, cast to float32 as the transform does) and apply it with the same
strided convolution instead of using a different resampler.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import soxr
import torch
import torch.nn.functional as F

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99

_kernels: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
_kernels_lock = threading.Lock()


def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase kernel (new, 1, 2 * width + orig) for a gcd-reduced ratio, and its half width."""
    base_freq = min(orig, new) * ROLLOFF
    # Zero crossings of the low-pass sinc, measured in input samples.
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base_freq)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # One row per output phase. torchaudio forms the phase offsets -j / new from an integer
    # arange, i.e. in float32, before adding them to the float64 taps: keep that rounding.
    phase = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new
    t = phase + idx
    t = (t * base_freq).clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = sinc * window * (base_freq / orig)
    return kernel.to(torch.float32), width


def _kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    key = (orig, new)
    cached = _kernels.get(key)
    if cached is None:
        cached = _sinc_kernel(orig, new)
        with _kernels_lock:
            _kernels.setdefault(key, cached)
    return cached


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample ``wave`` (..., N) float from ``orig_sr`` to ``new_sr`` like torchaudio's ``Resample``.

    Returns (..., ceil(N * new_sr / orig_sr)); the input itself when the rates are equal.
    """
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if not wave.is_floating_point():
        raise TypeError(f"resample expects a floating-point waveform, got {wave.dtype}")
    if orig_sr == new_sr:
        return wave
    gcd = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // gcd, new_sr // gcd
    kernel, width = _kernel(orig, new)
    kernel = kernel.to(device=wave.device, dtype=wave.dtype)

    shape = wave.shape
    flat = wave.reshape(-1, shape[-1])  # (B, N)
    length = flat.shape[-1]
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded[:, None], kernel, stride=orig)  # (B, new, frames)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    target = math.ceil(new * length / orig)
    return out[..., :target].reshape(*shape[:-1], -1)


class OutputResampler:
    """Resamples generated speech (mono float32 chunks) to a client's rate with soxr, chunk by chunk.

    Not the prompt path: output needs no parity, only quality and continuity across streamed chunks.
    With equal rates chunks pass through unchanged.
    """

    def __init__(self, orig_sr: int, new_sr: int, quality: str = "HQ") -> None:
        self.orig_sr, self.new_sr = int(orig_sr), int(new_sr)
        self._stream = None
        if self.orig_sr != self.new_sr:
            self._stream = soxr.ResampleStream(self.orig_sr, self.new_sr, 1, dtype="float32", quality=quality)

    def __call__(self, chunk: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample the next chunk (1-D); ``last=True`` also flushes the filter's tail."""
        chunk = np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1)
        if self._stream is None:
            return chunk
        return self._stream.resample_chunk(chunk, last=last)
