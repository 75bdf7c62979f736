"""Decode prompt / source audio from bytes, paths or file objects into float32 waveforms.

Mirrors the reference's ``load_wav``: soundfile decoding to float32 in [-1, 1], mean over
channels, torchaudio-compatible resampling (``resample.py``). Every failure is an
:class:`~cosyserve.errors.AudioError` whose message can be shown to an API user.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

from cosyserve.audio.resample import resample
from cosyserve.errors import AudioError

# The reference refuses to resample audio recorded below 16 kHz (its speech tokenizer input rate).
MIN_SAMPLE_RATE = 16000

# Anything soundfile can open, or an already decoded ``(wave (C, N) or (N,), sample_rate)`` pair.
AudioInput = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO | tuple


def _source(data: AudioInput) -> BinaryIO | str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise AudioError("audio is empty (0 bytes)")
        return io.BytesIO(bytes(data))
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise AudioError(f"audio file not found: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"audio file is empty (0 bytes): {path}")
        return str(path)
    if hasattr(data, "read"):
        seekable = getattr(data, "seekable", None)
        if seekable is not None and seekable():
            return data
        # soundfile needs to seek (e.g. to sniff the container): buffer non-seekable streams.
        return _source(data.read())
    raise AudioError(f"unsupported audio input of type {type(data).__name__}")


def _from_decoded(data: tuple) -> tuple[np.ndarray, int]:
    if len(data) != 2:
        raise AudioError("decoded audio must be a (wave, sample_rate) pair")
    wave, sr = data
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        wave = wave[None]
    if wave.ndim != 2:
        raise AudioError(f"decoded audio must have shape (channels, samples), got {wave.shape}")
    return wave, int(sr)


def decode_audio(data: AudioInput) -> tuple[np.ndarray, int]:
    """Decode any container soundfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, ...).

    Returns ``(wave, sample_rate)`` with ``wave`` float32 of shape (channels, N), integer PCM
    scaled to [-1, 1) as torchaudio's soundfile backend does.
    """
    if isinstance(data, tuple):
        wave, sr = _from_decoded(data)
    else:
        src = _source(data)
        try:
            samples, sr = sf.read(src, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
            # libsndfile's own words, without the repr of our in-memory file object.
            reason = getattr(exc, "error_string", None) or str(exc).split(": ")[-1]
            raise AudioError(f"could not decode audio (not a supported audio file?): {reason}") from exc
        wave = np.ascontiguousarray(samples.T)
    if sr <= 0:
        raise AudioError(f"invalid sample rate {sr}")
    if wave.shape[0] == 0 or wave.shape[1] == 0:
        raise AudioError("audio is empty (no samples)")
    if not np.isfinite(wave).all():
        raise AudioError("audio contains NaN or infinite samples")
    return wave, int(sr)


def to_mono(wave: np.ndarray | torch.Tensor, sample_rate: int, target_sr: int) -> torch.Tensor:
    """Channel mean then resampling to ``target_sr``: (C, N) -> (1, N') float32."""
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioError(f"audio sample rate {sample_rate} Hz is too low: at least {MIN_SAMPLE_RATE} Hz is required")
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.ndim == 1:
        wave = wave[None]
    mono = wave.mean(dim=0, keepdim=True)
    return resample(mono, sample_rate, target_sr)


def load_audio(data: AudioInput, target_sr: int) -> torch.Tensor:
    """Decode, downmix and resample: the reference's ``load_wav(data, target_sr)`` -> (1, N) float32."""
    wave, sr = decode_audio(data)
    return to_mono(wave, sr, target_sr)


def duration_s(wave: np.ndarray | torch.Tensor, sample_rate: int) -> float:
    """Length in seconds of a (..., N) waveform."""
    return wave.shape[-1] / float(sample_rate)
