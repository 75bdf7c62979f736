"""Decode prompt / source audio from bytes, paths or file objects into float32 waveforms.

Mirrors the reference's ``load_wav``: soundfile decoding to float32 in [-1, 1], mean over
channels, torchaudio-compatible resampling (``resample.py``). Every failure is an
:class:`~cosyserve.errors.AudioError` whose message can be shown to an API user.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
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


def decode_audio(data: AudioInput, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode any container soundfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, ...), and M4A / AAC
    through PyAV when the ``aac`` extra is installed.

    Returns ``(wave, sample_rate)`` with ``wave`` float32 of shape (channels, N), integer PCM
    scaled to [-1, 1) as torchaudio's soundfile backend does. With ``max_seconds``, audio longer
    than that is refused before it is decoded when the container declares its length, and decoding
    stops one block past the limit when it does not: a small upload cannot expand into gigabytes.
    """
    if isinstance(data, tuple):
        wave, sr = _from_decoded(data)
    else:
        src = _source(data)
        try:
            wave, sr = _decode_soundfile(src, max_seconds)
        except _Unrecognised as exc:
            if not _looks_like_mp4_or_aac(src):
                raise AudioError(f"could not decode audio (not a supported audio file?): {exc}") from None
            wave, sr = _decode_pyav(src, max_seconds)
    if sr <= 0:
        raise AudioError(f"invalid sample rate {sr}")
    if wave.shape[0] == 0 or wave.shape[1] == 0:
        raise AudioError("audio is empty (no samples)")
    if not np.isfinite(wave).all():
        raise AudioError("audio contains NaN or infinite samples")
    return wave, int(sr)


class _Unrecognised(Exception):
    """libsndfile cannot open the container at all (it may still be one PyAV reads)."""


# Containers may declare anything; beyond these the upload is not a recording anyone means to send.
MAX_INPUT_SAMPLE_RATE = 384000
MAX_INPUT_CHANNELS = 8
_BLOCK_FRAMES = 65536


def _too_long(seconds: float, max_seconds: float) -> AudioError:
    return AudioError(f"audio is {seconds:.1f} s long; at most {max_seconds:g} s is accepted")


def _check_layout(sample_rate: int, channels: int) -> None:
    if not 0 < sample_rate <= MAX_INPUT_SAMPLE_RATE:
        raise AudioError(f"audio declares a sample rate of {sample_rate} Hz; at most {MAX_INPUT_SAMPLE_RATE} Hz")
    if not 0 < channels <= MAX_INPUT_CHANNELS:
        raise AudioError(f"audio declares {channels} channels; at most {MAX_INPUT_CHANNELS} are accepted")


def _decode_soundfile(src: BinaryIO | str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    try:
        sound = sf.SoundFile(src)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        raise _Unrecognised(_libsndfile_reason(exc)) from exc
    try:
        with sound:
            sr, channels = sound.samplerate, sound.channels
            _check_layout(sr, channels)
            # libsndfile reports an undeclared length as a huge frame count: the block cap covers it.
            declared = sound.frames if 0 < sound.frames < 2**62 else None
            limit = None if max_seconds is None else math.floor(max_seconds * sr)
            if limit is not None and declared is not None and declared > limit:
                raise _too_long(declared / sr, max_seconds)
            read = sound.read if declared is not None else _reader_to_unknown_end(sound)
            blocks: list[np.ndarray] = []
            total = 0
            while True:
                block = read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                blocks.append(block)
                total += len(block)
                if limit is not None and total > limit:
                    raise AudioError(f"audio is longer than {max_seconds:g} s; at most {max_seconds:g} s is accepted")
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        raise AudioError(f"could not decode audio (not a supported audio file?): {_libsndfile_reason(exc)}") from exc
    samples = np.concatenate(blocks) if blocks else np.zeros((0, channels), dtype=np.float32)
    return np.ascontiguousarray(samples.T), sr


def _reader_to_unknown_end(sound: sf.SoundFile) -> Callable[..., np.ndarray]:
    """``sound.read`` for a stream whose length is not declared (FLAC with total samples 0...).

    soundfile's ``read`` raises on libsndfile's error flag, which libsndfile 1.2 sets when such a
    stream ends inside a block (a failed seek), dropping that block; the C call returns the count.
    """

    def read(frames: int, dtype: str, always_2d: bool) -> np.ndarray:
        out = np.empty((frames, sound.channels), dtype=np.float32)
        got = sf._snd.sf_readf_float(sound._file, sf._ffi.cast("float *", out.ctypes.data), frames)
        return out[: max(int(got), 0)]

    return read


def _libsndfile_reason(exc: BaseException) -> str:
    # libsndfile's own words, without the repr of our in-memory file object.
    return getattr(exc, "error_string", None) or str(exc).split(": ")[-1]


def _head(src: BinaryIO | str, n: int = 16) -> bytes:
    if isinstance(src, str):
        with open(src, "rb") as f:
            return f.read(n)
    src.seek(0)
    head = src.read(n)
    src.seek(0)
    return head


def _looks_like_mp4_or_aac(src: BinaryIO | str) -> bool:
    """An MP4 / M4A box stream (``ftyp`` first) or ADTS AAC frames (12-bit sync word, layer 0)."""
    head = _head(src)
    return head[4:8] == b"ftyp" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0)


def _decode_pyav(src: BinaryIO | str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """M4A / AAC (what phones record) through PyAV, under the same length limit as libsndfile's formats."""
    try:
        import av
    except ImportError:
        raise AudioError(
            "M4A / AAC audio needs the optional PyAV package: install the aac extra (pip install 'cosyserve[aac]') "
            "or send WAV, FLAC, MP3 or Ogg"
        ) from None
    try:
        with av.open(src, mode="r") as container:
            if not container.streams.audio:
                raise AudioError("the file has no audio stream")
            stream = container.streams.audio[0]
            sr, channels = stream.codec_context.sample_rate, stream.codec_context.channels
            _check_layout(sr, channels)
            if max_seconds is not None and container.duration is not None:
                seconds = container.duration / av.time_base
                if seconds > max_seconds + 1:  # the container's figure is rounded: the decoded count decides
                    raise _too_long(seconds, max_seconds)
            limit = None if max_seconds is None else math.floor(max_seconds * sr)
            blocks: list[np.ndarray] = []
            total = 0
            for frame in container.decode(stream):
                raw = frame.to_ndarray()
                raw = raw.reshape(channels, -1) if frame.format.is_planar else raw.reshape(-1, channels).T
                if np.issubdtype(raw.dtype, np.integer):
                    block = raw.astype(np.float32) / float(np.iinfo(raw.dtype).max + 1)
                else:
                    block = raw.astype(np.float32, copy=False)
                blocks.append(block)
                total += block.shape[1]
                if limit is not None and total > limit:
                    raise AudioError(f"audio is longer than {max_seconds:g} s; at most {max_seconds:g} s is accepted")
    except AudioError:
        raise
    except Exception as exc:  # PyAV's errors carry the FFmpeg reason
        raise AudioError(f"could not decode audio (not a supported audio file?): {exc}") from exc
    wave = np.concatenate(blocks, axis=1) if blocks else np.zeros((channels, 0), dtype=np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32), sr


def to_mono(wave: np.ndarray | torch.Tensor, sample_rate: int, target_sr: int) -> torch.Tensor:
    """Channel mean then resampling to ``target_sr``: (C, N) -> (1, N') float32."""
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioError(f"audio sample rate {sample_rate} Hz is too low: at least {MIN_SAMPLE_RATE} Hz is required")
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.ndim == 1:
        wave = wave[None]
    mono = wave.mean(dim=0, keepdim=True)
    return resample(mono, sample_rate, target_sr)


def duration_s(wave: np.ndarray | torch.Tensor, sample_rate: int) -> float:
    """Length in seconds of a (..., N) waveform."""
    return wave.shape[-1] / float(sample_rate)
