"""Streaming encoders (wav, pcm, flac, mp3, opus, aac): every prefix is well-formed while streaming and
the finished body decodes to the whole audio, at every output rate."""

from __future__ import annotations

import importlib.util
import io
import itertools
import struct
import sys

import numpy as np
import pytest
import soundfile as sf
from helpers import load_settings

from cosyserve.audio.encode import (
    OUTPUT_RATES,
    FormatUnavailable,
    make_encoder,
    mp3_frame_length,
    output_rate,
    to_int16,
)
from cosyserve.errors import InvalidRequest
from cosyserve.settings import Settings, SettingsError, parse_voice_map

HAVE_AV = importlib.util.find_spec("av") is not None
CODEC_RATES = {"opus": (8000, 12000, 16000, 24000, 48000)}
MP3_SLACK = 1105 + 2 * 1152  # LAME's encoder delay plus up to two frames of padding (no Xing frame when streamed)
AAC_SLACK = 2 * 1024 + 1024  # priming plus padding to whole frames


def signal(rate: int, seconds: float = 1.3) -> np.ndarray:
    """A gliding tone with an overshoot past full scale in the middle (must clip, not wrap)."""
    t = np.arange(round(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * (200 + 150 * t) * t)
    x[len(x) // 2 : len(x) // 2 + 50] = 1.3
    return x.astype(np.float32)


def chunked(x: np.ndarray) -> list[np.ndarray]:
    """Uneven chunks, as a streaming engine yields them (one of them empty)."""
    cuts = sorted([0, 7, len(x) // 5, len(x) // 5, len(x) // 2 + 13, len(x) - 100, len(x)])
    return [x[a:b] for a, b in itertools.pairwise(cuts)]


def stream(fmt: str, rate: int, x: np.ndarray) -> list[bytes]:
    enc = make_encoder(fmt, rate)
    return [enc.header(), *(enc.encode(c) for c in chunked(x)), enc.finish()]


# -- format structure -----------------------------------------------------------------------------


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def ogg_pages(data: bytes) -> list[int]:
    """Header-type flags of the Ogg pages that make up ``data`` exactly (CRCs checked)."""
    flags, pos = [], 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS", f"no Ogg page at byte {pos}"
        nseg = data[pos + 26]
        size = 27 + nseg + sum(data[pos + 27 : pos + 27 + nseg])
        page = bytearray(data[pos : pos + size])
        assert len(page) == size, "truncated Ogg page"
        crc = struct.unpack("<I", page[22:26])[0]
        page[22:26] = b"\0\0\0\0"
        assert _ogg_crc(bytes(page)) == crc, f"bad CRC in the Ogg page at byte {pos}"
        flags.append(page[5])
        pos += size
    return flags


def mp3_frames(data: bytes) -> int:
    """Number of whole MPEG frames that make up ``data`` exactly."""
    pos = count = 0
    while pos < len(data):
        length = mp3_frame_length(data[pos : pos + 4])
        assert length, f"no MPEG frame header at byte {pos}"
        pos += length
        count += 1
    assert pos == len(data), "the data ends inside an MPEG frame"
    return count


def adts_frames(data: bytes) -> int:
    pos = count = 0
    while pos < len(data):
        assert data[pos] == 0xFF and data[pos + 1] & 0xF0 == 0xF0, f"no ADTS header at byte {pos}"
        pos += ((data[pos + 3] & 3) << 11) | (data[pos + 4] << 3) | (data[pos + 5] >> 5)
        count += 1
    assert pos == len(data), "the data ends inside an ADTS frame"
    return count


def check_prefix(fmt: str, pieces: list[bytes], k: int) -> None:
    """What a client holding the first ``k`` pieces has is well-formed (whole pages / frames)."""
    prefix = b"".join(pieces[:k])
    if fmt == "wav" and len(prefix) >= 44:
        samples, _ = sf.read(io.BytesIO(prefix), dtype="int16")
        assert len(samples) == (len(prefix) - 44) // 2
    elif fmt == "opus":
        flags = ogg_pages(prefix)
        assert not any(f & 4 for f in flags[:-1]), "end-of-stream before the end"
    elif fmt == "mp3":
        mp3_frames(prefix)
    elif fmt == "aac":
        adts_frames(prefix)
    elif fmt == "flac" and k > 1 and pieces[k - 1] and prefix[:4] == b"fLaC" and len(prefix) > len(pieces[k - 1]):
        assert pieces[k - 1][:2] == b"\xff\xf8", "a FLAC piece does not start on a frame"


def decode_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
        return np.concatenate(frames), container.streams.audio[0].rate


# -- tests ----------------------------------------------------------------------------------------

FORMATS = ("wav", "pcm", "flac", "mp3", "opus", *(("aac",) if HAVE_AV else ()))


@pytest.mark.parametrize("rate", OUTPUT_RATES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_body_is_valid_at_every_step_and_complete_at_the_end(fmt, rate):
    if rate not in CODEC_RATES.get(fmt, OUTPUT_RATES):
        with pytest.raises(InvalidRequest) as err:
            make_encoder(fmt, rate)
        assert err.value.param == "sample_rate"
        return
    x = signal(rate)
    pieces = stream(fmt, rate, x)
    for k in range(1, len(pieces) + 1):
        check_prefix(fmt, pieces, k)
    body = b"".join(pieces)
    whole = make_encoder(fmt, rate).encode_all(x)
    want = to_int16(x)
    if fmt == "pcm":
        np.testing.assert_array_equal(np.frombuffer(body, "<i2"), want)
        assert whole == body
        return
    if fmt == "aac":
        got, got_rate = decode_av(body)
        assert got_rate == rate and len(x) <= len(got) <= len(x) + AAC_SLACK
        assert got[-len(x) // 4 :].std() > 0.1, "the end of the audio is missing"
        return
    if fmt == "flac":
        # Streamed, STREAMINFO cannot hold the length; every audio frame is the whole file's.
        assert body[:4] == whole[:4] == b"fLaC" and body[42:] == whole[42:]
        body = whole
    got, got_rate = sf.read(io.BytesIO(body), dtype="int16")
    assert got_rate == rate
    if fmt in ("wav", "flac"):
        np.testing.assert_array_equal(got, want)  # lossless, and the overshoot clipped, not wrapped
        return
    if fmt == "opus":
        assert len(got) == len(x)  # the last page (end-of-stream) made it out with its granule position
        assert ogg_pages(body)[-1] & 4, "no end-of-stream page"
    else:
        assert len(x) <= len(got) <= len(x) + MP3_SLACK
    assert np.abs(got[-len(x) // 4 :].astype(np.float32)).max() > 0.2 * 32768, "the end of the audio is missing"


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
def test_whole_file_decodes_to_the_exact_length(fmt):
    rate = 24000
    x = signal(rate)
    got, _ = sf.read(io.BytesIO(make_encoder(fmt, rate).encode_all(x)))
    assert len(got) == len(x)  # mp3: the Xing frame's gapless info was rewritten at the end


def test_streamed_mp3_leaves_out_the_unfinished_xing_frame():
    pieces = stream("mp3", 24000, signal(24000))
    body = b"".join(pieces)
    first = body[: mp3_frame_length(body[:4])]
    assert first[4:].strip(b"\0") and b"Xing" not in first and b"Info" not in first
    assert mp3_frames(body) > 10


def test_audio_leaves_with_its_chunk():
    """Streaming containers must not sit on the audio: a second of input is mostly out after its write."""
    rate = 24000
    for fmt in ("mp3", "opus", "flac", *(("aac",) if HAVE_AV else ())):
        enc = make_encoder(fmt, rate)
        out = enc.header() + enc.encode(signal(rate, 1.0))
        assert len(out) > 0.5 * len(enc.finish() + out), f"{fmt} held back most of a second of audio"


def test_mp3_frame_length():
    assert mp3_frame_length(b"\xff\xfb\x90\x64") == 417  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz
    assert mp3_frame_length(b"\xff\xfb\x92\x64") == 418  # padded
    assert mp3_frame_length(b"\xff\xf3\x84\xc4") == 192  # MPEG-2, 64 kbit/s, 24 kHz
    assert mp3_frame_length(b"\xff\xe3\x88\xc4") == 576  # MPEG-2.5, 64 kbit/s, 8 kHz
    for bad in (b"ID3\x04", b"\xff\xfd\x90\x64", b"\xff\xfb\xf0\x64", b"\xff"):
        assert mp3_frame_length(bad) is None


def test_output_rate_defaults_and_errors():
    assert output_rate("wav", None, 22050) == 22050
    assert output_rate("opus", None, 22050) == 24000  # opus has no 22050 Hz
    assert output_rate("OPUS", None, 44100) == 48000
    assert output_rate("mp3", 8000, 24000) == 8000
    with pytest.raises(InvalidRequest) as err:
        output_rate("wav", 12345, 24000)
    assert err.value.param == "sample_rate" and all(str(r) in err.value.message for r in OUTPUT_RATES)
    with pytest.raises(InvalidRequest) as err:
        output_rate("opus", 44100, 24000)
    assert err.value.param == "sample_rate" and "48000" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        output_rate("ogg", None, 24000)
    assert err.value.param == "format"


def test_aac_without_pyav_is_a_clear_400(monkeypatch):
    from cosyserve.api.errors import status_for

    monkeypatch.setitem(sys.modules, "av", None)  # PyAV absent: importing it fails
    with pytest.raises(FormatUnavailable) as err:
        output_rate("aac", None, 24000)
    assert status_for(err.value) == 400 and "cosyserve[aac]" in err.value.message and err.value.param == "format"


def test_voice_map_and_pcm_rate_settings():
    assert parse_voice_map("alloy=中文女, echo = 英文男") == (("alloy", "中文女"), ("echo", "英文男"))
    assert parse_voice_map('{"nova": "my voice"}') == (("nova", "my voice"),)
    for bad in ("alloy", "alloy=", "{bad json", '{"a": 1}', '["alloy"]'):
        with pytest.raises(SettingsError):
            parse_voice_map(bad)
    env = {"COSYSERVE_VOICE_MAP": "alloy=a", "COSYSERVE_PCM_SAMPLE_RATE": "16000"}
    s = load_settings([], environ=env)
    assert s.voice_map == (("alloy", "a"),) and s.pcm_sample_rate == 16000
    assert load_settings(["--voice_map", "echo=b"], environ=env).voice_map == (("echo", "b"),)
    with pytest.raises(SettingsError):
        Settings(pcm_sample_rate=11025)
    with pytest.raises(SettingsError):
        load_settings([], environ={"COSYSERVE_VOICE_MAP": "nonsense"})
