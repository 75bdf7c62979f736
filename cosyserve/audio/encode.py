"""Output encoders: float waveform chunks in, bytes out, usable while the audio is still being made.

An encoder is made per response (``make_encoder``); ``header()`` gives the bytes that precede the
audio, ``encode(chunk)`` the bytes for each chunk, ``finish()`` whatever a container must write at
the end. New formats (mp3, opus, flac, aac) register a factory in ``ENCODERS``.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from cosyserve.errors import InvalidRequest

SAMPLE_WIDTH = 2  # bytes per int16 sample
UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF / data size of a WAV whose length is not known when the header is sent


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> little-endian int16, as the official server scales them (x * 32768).

    Out-of-range samples are clipped instead of wrapping around (the official ``astype`` wraps, which
    turns a slight overshoot at chunk joins into a full-scale click); NaN becomes silence.
    """
    scaled = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0) * np.float32(32768.0)
    return np.clip(scaled, -32768.0, 32767.0).astype("<i2")


def wav_header(sample_rate: int, channels: int = 1, num_frames: int | None = None) -> bytes:
    """A 44-byte PCM16 WAV header; with ``num_frames=None`` both sizes are 0xFFFFFFFF (length unknown)."""
    block_align = channels * SAMPLE_WIDTH
    if num_frames is None:
        riff_size = data_size = UNKNOWN_SIZE
    else:
        data_size = num_frames * block_align
        if data_size + 36 > UNKNOWN_SIZE:
            raise ValueError("audio too long for a WAV file")
        riff_size = data_size + 36
    return (
        struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE")
        + struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, sample_rate, sample_rate * block_align, block_align, 16)
        + struct.pack("<4sI", b"data", data_size)
    )


class AudioEncoder(ABC):
    """Encodes one response. ``media_type`` is the Content-Type of the bytes it produces."""

    media_type: str

    def __init__(self, sample_rate: int, channels: int = 1) -> None:
        self.sample_rate = sample_rate
        self.channels = channels

    def header(self) -> bytes:
        return b""

    @abstractmethod
    def encode(self, chunk: np.ndarray) -> bytes:
        """Bytes for ``chunk`` (float32, shape (N,) mono or (N, channels))."""

    def finish(self) -> bytes:
        return b""


class PcmEncoder(AudioEncoder):
    """Headerless int16 little-endian samples: the official server's byte stream."""

    media_type = "audio/pcm"

    def encode(self, chunk: np.ndarray) -> bytes:
        return to_int16(chunk).tobytes()


class WavEncoder(PcmEncoder):
    """PCM16 in a WAV container. Pass ``num_frames`` when the length is known before the first byte."""

    media_type = "audio/wav"

    def __init__(self, sample_rate: int, channels: int = 1, num_frames: int | None = None) -> None:
        super().__init__(sample_rate, channels)
        self.num_frames = num_frames

    def header(self) -> bytes:
        return wav_header(self.sample_rate, self.channels, self.num_frames)


ENCODERS: dict[str, Callable[[int, int], AudioEncoder]] = {"wav": WavEncoder, "pcm": PcmEncoder}


def make_encoder(fmt: str, sample_rate: int, channels: int = 1) -> AudioEncoder:
    """The encoder for format name ``fmt``; raises InvalidRequest (param ``format``) for unknown names."""
    factory = ENCODERS.get(fmt.lower())
    if factory is None:
        raise InvalidRequest(f"unsupported format {fmt!r}; use one of: {', '.join(ENCODERS)}", param="format")
    return factory(sample_rate, channels)
