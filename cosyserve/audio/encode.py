"""Output encoders: float waveform chunks in, bytes out, usable while the audio is still being made.

An encoder is made per response (``make_encoder``); ``header()`` gives the bytes that precede the
audio, ``encode(chunk)`` the bytes for each chunk, ``finish()`` whatever a container must write at
the end. What each call returns ends on a frame / page boundary, so a streamed body is playable at
every point, and ``finish`` makes it complete (final Ogg page, last MP3 frames, the FLAC tail).
``encode_all`` makes a whole file at once, with the sizes and seek tables a streamed file cannot carry.

wav / pcm are written here, flac / mp3 / opus (Ogg) by libsndfile, aac (ADTS) by PyAV when the
optional ``aac`` extra is installed.
"""

from __future__ import annotations

import io
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from cosyserve.audio.rates import OUTPUT_RATES
from cosyserve.errors import FormatUnavailable, InvalidRequest

SAMPLE_WIDTH = 2  # bytes per int16 sample
UNKNOWN_SIZE = 0xFFFFFFFF  # RIFF / data size of a WAV whose length is not known when the header is sent
_INT16_MAX = np.float32(32767.0 / 32768.0)


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> little-endian int16, as the official server scales them (x * 32768).

    Out-of-range samples are clipped instead of wrapping around (the official ``astype`` wraps, which
    turns a slight overshoot at chunk joins into a full-scale click); NaN becomes silence.
    """
    scaled = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0) * np.float32(32768.0)
    return np.clip(scaled, -32768.0, 32767.0).astype("<i2")


def _clipped(audio: np.ndarray) -> np.ndarray:
    """Float samples limited to the int16 range; codecs would otherwise wrap or distort overshoots."""
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(audio, -1.0, _INT16_MAX)


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
    """Encodes one response. ``media_type`` is the Content-Type of the bytes it produces.

    ``rates``: the sample rates the codec accepts (None: any).
    """

    media_type: str
    rates: tuple[int, ...] | None = None

    def __init__(self, sample_rate: int, channels: int = 1) -> None:
        self.sample_rate = sample_rate
        self.channels = channels

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this format cannot be produced here (a missing optional package), or None."""
        return None

    def header(self) -> bytes:
        return b""

    @abstractmethod
    def encode(self, chunk: np.ndarray) -> bytes:
        """Bytes for ``chunk`` (float32, shape (N,) mono or (N, channels))."""

    def finish(self) -> bytes:
        return b""

    def encode_all(self, audio: np.ndarray) -> bytes:
        """A whole file for ``audio``; use a fresh encoder (not one that streamed already)."""
        return self.header() + self.encode(audio) + self.finish()


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

    def encode_all(self, audio: np.ndarray) -> bytes:
        self.num_frames = np.asarray(audio).shape[0]
        return super().encode_all(audio)


class _MemoryFile(io.RawIOBase):
    """A seekable in-memory file whose head can be handed out (``drain``) while writing goes on.

    Containers rewrite their header on close (FLAC STREAMINFO, the MP3 Xing frame); once that
    region has been sent the rewrite is dropped, which leaves the streaming form of the header
    (length unknown) that decoders accept.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffer = bytearray()  # bytes from offset self._base on
        self._base = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        end = self._base + len(self._buffer)
        self._pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: end}[whence] + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        start = max(self._pos - self._base, 0)
        stop = len(self._buffer) if size is None or size < 0 else start + size
        data = bytes(self._buffer[start:stop])
        self._pos = self._base + start + len(data)
        return data

    def write(self, data: Any) -> int:
        data = bytes(data)
        offset = self._pos - self._base
        keep = data[-offset:] if offset < 0 else data  # the part before `_base` is gone already
        offset = max(offset, 0)
        if keep:
            if offset > len(self._buffer):
                self._buffer.extend(bytes(offset - len(self._buffer)))
            self._buffer[offset : offset + len(keep)] = keep
        self._pos += len(data)
        return len(data)

    def drain(self) -> bytes:
        """Everything written so far that was not handed out yet."""
        data = bytes(self._buffer)
        self._base += len(data)
        self._buffer.clear()
        return data


class SoundFileEncoder(AudioEncoder):
    """A libsndfile container written into memory and handed out after every chunk."""

    container: str
    subtype: str

    def __init__(self, sample_rate: int, channels: int = 1) -> None:
        super().__init__(sample_rate, channels)
        self._out = _MemoryFile()
        self._file = sf.SoundFile(
            self._out, "w", samplerate=sample_rate, channels=channels, format=self.container, subtype=self.subtype
        )
        self._configure()

    def _configure(self) -> None:
        """Codec settings applied right after opening."""

    def _command(self, command: int, value: float | int) -> None:
        """libsndfile's ``sf_command`` (soundfile has no wrapper); skipped where soundfile's internals differ."""
        snd, ffi = getattr(sf, "_snd", None), getattr(sf, "_ffi", None)
        handle = getattr(self._file, "_file", None)
        if snd is None or ffi is None or handle is None:
            return
        ctype = "double" if isinstance(value, float) else "int"
        snd.sf_command(handle, command, ffi.new(f"{ctype}*", value), ffi.sizeof(ctype))

    def header(self) -> bytes:
        return self._out.drain()

    def _samples(self, audio: np.ndarray) -> np.ndarray:
        return _clipped(audio)

    def encode(self, chunk: np.ndarray) -> bytes:
        if np.size(chunk):
            self._file.write(self._samples(chunk))
        return self._out.drain()

    def finish(self) -> bytes:
        self._file.close()
        return self._out.drain()

    def encode_all(self, audio: np.ndarray) -> bytes:
        # Nothing is drained before close, so the header rewrites (lengths, seek info) land.
        self._file.write(self._samples(audio))
        self._file.close()
        return self._out.drain()


class FlacEncoder(SoundFileEncoder):
    """16-bit FLAC. Streamed, STREAMINFO says "length unknown" (it is only known at the end)."""

    media_type = "audio/flac"
    container, subtype = "FLAC", "PCM_16"

    def _samples(self, audio: np.ndarray) -> np.ndarray:
        return to_int16(audio)  # the very samples wav / pcm carry


class OpusEncoder(SoundFileEncoder):
    """Opus in Ogg. Pages are cut every ~100 ms so audio leaves with its chunk; ``finish`` writes
    the last page (with end-of-stream) so the final words are not lost."""

    media_type = "audio/ogg; codecs=opus"
    container, subtype = "OGG", "OPUS"
    rates = (8000, 12000, 16000, 24000, 48000)
    SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302
    PAGE_LATENCY_MS = 100.0

    def _configure(self) -> None:
        self._command(self.SFC_SET_OGG_PAGE_LATENCY_MS, self.PAGE_LATENCY_MS)


# MPEG audio frame header tables (layer III): kbit/s per bitrate index, Hz per rate index.
_MP3_BITRATES = {
    "1": (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    "2": (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def mp3_frame_length(header: bytes) -> int | None:
    """Byte length of the MPEG layer III frame starting with ``header`` (4 bytes); None if not one."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0 or (header[1] >> 1) & 3 != 1:
        return None
    version = (header[1] >> 3) & 3
    bitrate_index, rate_index, padding = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if version == 1 or rate_index == 3 or bitrate_index in (0, 15):
        return None
    kbps = _MP3_BITRATES["1" if version == 3 else "2"][bitrate_index]
    samples_per_frame = 1152 if version == 3 else 576
    return samples_per_frame // 8 * kbps * 1000 // _MP3_RATES[version][rate_index] + padding


def _is_tag_frame(frame: bytes) -> bool:
    """LAME's first frame: the Xing/Info tag, or its all-zero placeholder before the end rewrite."""
    return b"Xing" in frame or b"Info" in frame or not frame[4:].strip(b"\0")


class Mp3Encoder(SoundFileEncoder):
    """MPEG-1/2/2.5 layer III (LAME through libsndfile).

    Streamed, the bytes go out as whole frames, so every response chunk ends on a frame boundary.
    LAME starts the file with a Xing/Info frame that it can only fill in at the end; streamed, that
    frame would go out as an all-zero placeholder (libmpg123 then stops decoding early), so the
    streamed form leaves it out: plain constant-rate MPEG frames.
    """

    media_type = "audio/mpeg"
    container, subtype = "MP3", "MPEG_LAYER_III"
    rates = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
    SFC_SET_COMPRESSION_LEVEL = 0x1301
    SFC_SET_BITRATE_MODE = 0x1305
    # Constant bit rate: without the Xing frame, decoders and players estimate the duration from
    # the first frame's bit rate. 0.65 gives 64 kbit/s at 16-24 kHz, 128 kbit/s at 44.1-48 kHz.
    COMPRESSION_LEVEL = 0.65

    def __init__(self, sample_rate: int, channels: int = 1) -> None:
        super().__init__(sample_rate, channels)
        self._pending = b""  # the start of a frame LAME has not finished writing
        self._first_frame = True

    def _configure(self) -> None:
        self._command(self.SFC_SET_BITRATE_MODE, 0)  # SF_BITRATE_MODE_CONSTANT
        self._command(self.SFC_SET_COMPRESSION_LEVEL, self.COMPRESSION_LEVEL)

    def encode(self, chunk: np.ndarray) -> bytes:
        return self._whole_frames(super().encode(chunk))

    def finish(self) -> bytes:
        data = self._whole_frames(super().finish())
        rest, self._pending = self._pending, b""
        return data + rest

    def _whole_frames(self, data: bytes) -> bytes:
        buffer, out, pos = self._pending + data, bytearray(), 0
        while pos + 4 <= len(buffer):
            length = mp3_frame_length(buffer[pos : pos + 4])
            if length is None:  # not an MPEG frame (never seen from LAME): pass the rest on unaligned
                out += buffer[pos:]
                pos = len(buffer)
                break
            if pos + length > len(buffer):
                break
            frame = buffer[pos : pos + length]
            pos += length
            if not (self._first_frame and _is_tag_frame(frame)):
                out += frame
            self._first_frame = False
        self._pending = buffer[pos:]
        return bytes(out)


class AacEncoder(AudioEncoder):
    """AAC-LC in ADTS frames (a self-framing stream, playable from any prefix), through PyAV."""

    media_type = "audio/aac"
    rates = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import av  # noqa: F401
        except ImportError:
            return "aac needs the optional PyAV package: pip install 'cosyserve[aac]'"
        return None

    def __init__(self, sample_rate: int, channels: int = 1) -> None:
        import av

        super().__init__(sample_rate, channels)
        self._av = av
        self._out = _MemoryFile()
        self._container = av.open(self._out, mode="w", format="adts")
        self._layout = "mono" if channels == 1 else "stereo"
        self._stream = self._container.add_stream("aac", rate=sample_rate, layout=self._layout)

    def encode(self, chunk: np.ndarray) -> bytes:
        if not np.size(chunk):
            return self._out.drain()
        samples = _clipped(chunk).reshape(-1, self.channels)
        frame = self._av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples.reshape(1, -1)), format="flt", layout=self._layout
        )
        frame.sample_rate = self.sample_rate
        self._mux(frame)
        return self._out.drain()

    def finish(self) -> bytes:
        self._mux(None)
        self._container.close()
        return self._out.drain()

    def _mux(self, frame: Any) -> None:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)


ENCODERS: dict[str, Callable[[int, int], AudioEncoder]] = {
    "wav": WavEncoder,
    "pcm": PcmEncoder,
    "mp3": Mp3Encoder,
    "opus": OpusEncoder,
    "flac": FlacEncoder,
    "aac": AacEncoder,
}


def _factory(fmt: str) -> Any:
    factory = ENCODERS.get(fmt.lower())
    if factory is None:
        raise InvalidRequest(f"unsupported format {fmt!r}; use one of: {', '.join(ENCODERS)}", param="format")
    reason = factory.unavailable() if isinstance(factory, type) else None
    if reason:
        raise FormatUnavailable(f"format {fmt.lower()!r} is not available on this server: {reason}", param="format")
    return factory


def output_rate(fmt: str, requested: int | None, native: int) -> int:
    """The rate to encode ``fmt`` at: ``requested`` once checked, else ``native`` or, where the codec
    cannot take it (opus at 22050 Hz), the next rate up that it can.

    Raises InvalidRequest for an unknown or unavailable format (param ``format``) or a rate outside
    :data:`OUTPUT_RATES` or the codec's rates (param ``sample_rate``).
    """
    factory = _factory(fmt)
    rates = getattr(factory, "rates", None)
    if requested is None:
        if rates is None or native in rates:
            return native
        return min((r for r in rates if r >= native), default=max(rates))
    if requested not in OUTPUT_RATES:
        raise InvalidRequest(
            f"sample_rate must be one of {', '.join(map(str, OUTPUT_RATES))}, not {requested}", param="sample_rate"
        )
    if rates is not None and requested not in rates:
        usable = ", ".join(str(r) for r in OUTPUT_RATES if r in rates)
        raise InvalidRequest(f"{fmt.lower()} cannot be encoded at {requested} Hz; use {usable}", param="sample_rate")
    return requested


@dataclass(frozen=True)
class OutputFormat:
    """What a response sends, checked once: the format's name and the rate it is encoded at."""

    fmt: str
    rate: int

    @classmethod
    def checked(cls, fmt: str, requested: int | None, native: int) -> OutputFormat:
        """``fmt`` (any case, spaces around it) at ``requested`` or the native rate; InvalidRequest as
        :func:`output_rate` raises it."""
        fmt = fmt.strip().lower()
        return cls(fmt, output_rate(fmt, requested, native))

    def encoder(self, channels: int = 1) -> AudioEncoder:
        return make_encoder(self.fmt, self.rate, channels)


def make_encoder(fmt: str, sample_rate: int, channels: int = 1) -> AudioEncoder:
    """The encoder for format name ``fmt``; raises InvalidRequest (param ``format``) for unknown or
    unavailable names (aac without PyAV) and (param ``sample_rate``) for a rate the codec lacks."""
    factory = _factory(fmt)
    rates = getattr(factory, "rates", None)
    if rates is not None and sample_rate not in rates:
        raise InvalidRequest(f"{fmt.lower()} cannot be encoded at {sample_rate} Hz", param="sample_rate")
    return factory(sample_rate, channels)
