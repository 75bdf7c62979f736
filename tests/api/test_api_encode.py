import io
import struct
import wave

import numpy as np
import pytest
import soundfile as sf

from cosyserve.audio.encode import ENCODERS, PcmEncoder, WavEncoder, make_encoder, to_int16, wav_header
from cosyserve.errors import InvalidRequest


def test_to_int16_scales_like_the_official_server_and_clips():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.08, -1.3, 0.99999, np.nan], dtype=np.float32)
    y = to_int16(x)
    assert y.dtype == np.dtype("<i2")
    # In range: the official (x * 32768).astype(int16), truncation included.
    np.testing.assert_array_equal(y[:3], (x[:3] * 32768).astype(np.int16))
    # Out of range: clipped, never wrapped to the opposite sign.
    assert y[3] == 32767 and y[4] == -32768 and y[5] == 32767 and y[6] == -32768
    assert y[7] == 32767
    assert y[8] == 0


def test_streaming_wav_header_has_unknown_sizes_and_decodes():
    rate = 24000
    enc = WavEncoder(rate)
    x = (0.5 * np.sin(np.arange(rate) / 7)).astype(np.float32)
    body = enc.header() + enc.encode(x[:1000]) + enc.encode(x[1000:]) + enc.finish()
    riff, riff_size, wave_id = struct.unpack("<4sI4s", body[:12])
    assert (riff, wave_id) == (b"RIFF", b"WAVE") and riff_size == 0xFFFFFFFF
    assert body[36:40] == b"data" and struct.unpack("<I", body[40:44])[0] == 0xFFFFFFFF
    samples, sr = sf.read(io.BytesIO(body), dtype="int16")
    assert sr == rate
    np.testing.assert_array_equal(samples, to_int16(x))


def test_exact_wav_header_reads_with_the_standard_library():
    x = np.linspace(-1, 1, 2205, dtype=np.float32)
    body = wav_header(22050, 1, x.shape[0]) + PcmEncoder(22050).encode(x)
    with wave.open(io.BytesIO(body)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (22050, 1, 2, x.shape[0])
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    np.testing.assert_array_equal(data, to_int16(x))
    assert struct.unpack("<I", body[4:8])[0] == len(body) - 8


def test_pcm_is_headerless_little_endian():
    enc = make_encoder("PCM", 16000)
    assert enc.header() == b"" and enc.media_type == "audio/pcm"
    assert enc.encode(np.array([0.5, -0.25], np.float32)) == struct.pack("<hh", 16384, -8192)


def test_unknown_format_is_a_client_error():
    with pytest.raises(InvalidRequest) as err:
        make_encoder("aiff", 24000)
    assert err.value.param == "format"
    for name in ENCODERS:
        assert name in err.value.message
