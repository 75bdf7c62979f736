"""Prompt audio is measured before it is decoded (issue 14): a small upload cannot expand into gigabytes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from golden import REPO, model_dir
from resources import import_or_missing

from cosyserve.audio.io import MAX_INPUT_SAMPLE_RATE, decode_audio
from cosyserve.audio.prompt import PromptLimits
from cosyserve.errors import AudioError

MAX_PROMPT_SECONDS = int(PromptLimits().max_seconds)
RATE = 16000
BOMB_HOURS = 6
RSS_BUDGET_MB = 50


def silent_flac(path: Path, seconds: int, rate: int = RATE) -> bytes:
    """``seconds`` of digital silence as FLAC (6 hours are about 1.1 MB), written a minute at a time."""
    minute = np.zeros(rate * 60, dtype=np.int16)
    with sf.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(seconds // 60):
            f.write(minute)
        f.write(minute[: rate * (seconds % 60)])
    return path.read_bytes()


def without_declared_length(flac: bytes) -> bytes:
    """The same stream with STREAMINFO's 36-bit total-samples field zeroed ("unknown", as a live encoder writes)."""
    data = bytearray(flac)
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO must be the first metadata block"
    fields = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = fields.to_bytes(8, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "six-hours.flac"
    data = silent_flac(path, BOMB_HOURS * 3600)
    assert len(data) < 2_000_000, len(data)
    return path


_MEASURE = """
import json, resource, sys
from cosyserve.audio.io import decode_audio
from cosyserve.audio.prompt import PromptLimits
from cosyserve.errors import AudioError
MAX_PROMPT_SECONDS = PromptLimits().max_seconds
data = open(sys.argv[1], "rb").read()
decode_audio(open(sys.argv[2], "rb").read(), max_seconds=MAX_PROMPT_SECONDS)  # warm the decoder up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_audio(data, max_seconds=MAX_PROMPT_SECONDS)
    outcome = "decoded"
except AudioError as exc:
    outcome = exc.message
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "growth_mb": (after - before) / 1024}))
"""


def _peak_growth(path: Path, warm: Path) -> dict:
    """Peak RSS growth of decoding ``path`` in a fresh interpreter (ru_maxrss is the process's high-water mark)."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(warm)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("declared", [True, False], ids=["declared-length", "undeclared-length"])
def test_six_hour_flac_is_refused_within_50_mb(bomb, tmp_path, declared):
    path = bomb
    if not declared:
        path = tmp_path / "undeclared.flac"
        path.write_bytes(without_declared_length(bomb.read_bytes()))
        assert sf.info(str(path)).frames > BOMB_HOURS * 3600 * RATE, "the length must really be undeclared"
    warm = tmp_path / "warm.flac"
    silent_flac(warm, 2)
    result = _peak_growth(path, warm)
    assert "at most 30 s" in result["outcome"], result
    assert result["growth_mb"] < RSS_BUDGET_MB, result


def test_limit_is_inclusive_and_optional(tmp_path):
    data = silent_flac(tmp_path / "thirty.flac", int(MAX_PROMPT_SECONDS))
    wave, sr = decode_audio(data, max_seconds=MAX_PROMPT_SECONDS)
    assert wave.shape == (1, MAX_PROMPT_SECONDS * RATE) and sr == RATE
    over = silent_flac(tmp_path / "over.flac", int(MAX_PROMPT_SECONDS) + 1)
    with pytest.raises(AudioError, match=r"31\.0 s long"):
        decode_audio(over, max_seconds=MAX_PROMPT_SECONDS)
    with pytest.raises(AudioError, match="longer than 30 s"):
        decode_audio(without_declared_length(over), max_seconds=MAX_PROMPT_SECONDS)
    assert decode_audio(without_declared_length(over))[0].shape == (1, (MAX_PROMPT_SECONDS + 1) * RATE)


def test_absurd_declared_layouts_are_refused_before_decoding():
    header = io.BytesIO()
    sf.write(header, np.zeros(10, np.float32), 8000, format="WAV", subtype="PCM_16")
    data = bytearray(header.getvalue())
    data[24:28] = (MAX_INPUT_SAMPLE_RATE * 10).to_bytes(4, "little")
    with pytest.raises(AudioError, match="sample rate"):
        decode_audio(bytes(data))


def test_flac_bomb_is_a_422_on_the_official_route(bomb):
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(REPO / "tests" / "api"))
    from test_api_http import StubModel, form

    from cosyserve.api import create_app
    from cosyserve.settings import Settings

    stub = StubModel()
    with TestClient(create_app(stub, Settings(max_upload_bytes=4_000_000))) as client:
        data, _ = form("cross_lingual")
        resp = client.post("/inference_cross_lingual", data=data, files={"prompt_wav": ("b.flac", bomb.read_bytes())})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_audio" and error["param"] == "prompt_wav", error
    assert "21600.0 s long; at most 30 s" in error["message"], error
    assert stub.calls == []


def m4a_bytes(seconds: float, rate: int = 24000) -> bytes:
    """An AAC-LC tone in an MP4 (M4A) container, as a phone records it."""
    av = import_or_missing("av", "the aac extra (PyAV) writes the M4A fixture")
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        t = np.arange(round(seconds * rate)) / rate
        tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def test_m4a_prompt_decodes_through_pyav():
    wave, sr = decode_audio(m4a_bytes(2.0), max_seconds=MAX_PROMPT_SECONDS)
    assert sr == 24000 and wave.shape[0] == 1
    assert abs(wave.shape[1] / sr - 2.0) < 0.1, wave.shape
    assert 0.2 < np.abs(wave[0, sr // 2 : sr]).max() < 0.4  # the tone, not noise or silence


def test_long_m4a_is_refused_under_the_same_limit():
    with pytest.raises(AudioError, match="at most 30 s"):
        decode_audio(m4a_bytes(MAX_PROMPT_SECONDS + 3), max_seconds=MAX_PROMPT_SECONDS)


def test_m4a_without_pyav_names_the_extra(monkeypatch):
    data = m4a_bytes(1.0)
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(AudioError, match=r"cosyserve\[aac\]"):
        decode_audio(data)


def test_garbage_is_still_a_plain_decode_error():
    with pytest.raises(AudioError, match="could not decode audio"):
        decode_audio(b"\x00\x00\x00\x20ftypM4A " + b"garbage" * 10)  # PyAV refuses it
    with pytest.raises(AudioError, match="could not decode audio"):
        decode_audio(b"not audio at all" * 10)


_MEASURE_PYTHON_API = """
import json, resource, sys
from cosyserve.engine.pipeline import load_model
from cosyserve.errors import AudioError
model = load_model(sys.argv[2], text_frontend="none")
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    model.prompt(data)
    outcome = "decoded"
except AudioError as exc:
    outcome = f"{exc.param}: {exc.message}"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "growth_mb": (after - before) / 1024}))
"""


def test_python_api_prompt_is_measured_before_decoding(bomb):
    """The Python API's own prompt path (not only the HTTP routes) refuses the bomb before decoding it."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE_PYTHON_API, str(bomb), str(model_dir("v2-tiny"))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("prompt_wav: ") and "at most 30" in result["outcome"], result
    assert result["growth_mb"] < RSS_BUDGET_MB, result
