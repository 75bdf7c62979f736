"""The voice library over HTTP on the tiny golden models: create, read, list, use (official routes and
/v1/audio/speech), delete, restart, and every refusal (duplicate, bad id, unknown id, the cap, another
model family)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from api_helpers import decode_wav, wait_for
from fastapi.testclient import TestClient
from golden import REPO, golden_root, manifest, model_dir
from resources import missing_mark

from cosyserve.api import create_app
from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.settings import Settings

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

SEED = 7
TEXT = "今天天气真好。"
INSTRUCT = "请用温柔的语气说这句话。"


def _models() -> list[Any]:
    names = list(manifest()["models"])
    return names or [pytest.param(None, marks=missing_mark(f"no golden models in {golden_root()}"))]


def _audio(key: str, default: str) -> bytes:
    name = manifest().get("inputs", {}).get("e2e", {}).get(key, default)
    return (golden_root() / "audio" / f"{name}.wav").read_bytes()


@pytest.fixture(scope="module")
def prompt_wav() -> bytes:
    return _audio("prompt_wav", "zero_shot_prompt")


@pytest.fixture(scope="module")
def source_wav() -> bytes:
    return _audio("vc_source", "zero_shot_prompt")


@pytest.fixture(scope="module")
def prompt_text() -> str:
    return manifest().get("inputs", {}).get("prompt_text", "希望你以后能够做的比我还好呦。")


def _client(name: str, data_dir: Path, **options: Any) -> tuple[TestClient, TTSModel]:
    """A fresh model and app on ``data_dir``: what a server (re)start does."""
    model = load_model(model_dir(name), text_frontend="none", data_dir=data_dir, **options)
    return TestClient(create_app(model, Settings(data_dir=str(data_dir)))), model


def _create(client: TestClient, name: str, audio: bytes, ref_text: str | None = None) -> requests.Response:
    data = {"name": name} | ({"ref_text": ref_text} if ref_text is not None else {})
    return client.post("/v1/audio/voices", data=data, files={"audio_sample": ("voice.wav", audio, "audio/wav")})


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error", error
    return error["message"]


def _pcm(client: TestClient, path: str, fields: dict[str, str], files: dict[str, bytes] | None = None) -> bytes:
    fields = {**fields, "format": "pcm", "seed": str(SEED)}
    response = client.post(path, data=fields, files={k: (f"{k}.wav", v) for k, v in (files or {}).items()})
    assert response.status_code == 200, f"{path}: {response.text}"
    assert len(response.content) > 0
    return response.content


def _has_route(client: TestClient, method: str, path: str) -> bool:
    return any(getattr(r, "path", None) == path and method in getattr(r, "methods", ()) for r in client.app.routes)


@pytest.mark.parametrize("name", _models())
def test_voice_lifecycle(name, tmp_path, prompt_wav, source_wav, prompt_text):
    client, model = _client(name, tmp_path)
    created = _create(client, "My Voice", prompt_wav, prompt_text)
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["id"], body["name"], body["object"], body["kind"]) == ("My Voice", "My Voice", "audio.voice", "clone")
    assert (body["ref_text"], body["model_family"], body["usable"], body["builtin"]) == (
        prompt_text,
        model.family,
        True,
        False,
    )
    assert body["token_rate"] == model.core.token_frame_rate and body["created_at"] <= time.time() + 1
    assert created.headers["location"] == "/v1/audio/voices/My%20Voice"
    assert client.get(created.headers["location"]).json() == body  # metadata only: no tensors

    assert "My Voice" in client.get("/speakers").json()["speakers"]
    if _has_route(client, "GET", "/v1/audio/voices"):
        assert "My Voice" in [v["id"] for v in client.get("/v1/audio/voices").json()["voices"]]

    # As spk_id on the official routes; in place of the recording, it gives what the recording gives.
    _pcm(client, "/inference_sft", {"tts_text": TEXT, "spk_id": "My Voice"})
    by_id = _pcm(client, "/inference_zero_shot", {"tts_text": TEXT, "spk_id": "My Voice"})
    by_audio = _pcm(
        client, "/inference_zero_shot", {"tts_text": TEXT, "prompt_text": prompt_text}, {"prompt_wav": prompt_wav}
    )
    assert by_id == by_audio, "zero_shot: the stored voice differs from its recording"
    by_id = _pcm(client, "/inference_cross_lingual", {"tts_text": TEXT, "spk_id": "my voice"})  # any case
    assert by_id == _pcm(client, "/inference_cross_lingual", {"tts_text": TEXT}, {"prompt_wav": prompt_wav})
    if "instruct2" in model.modes:
        by_id = _pcm(
            client, "/inference_instruct2", {"tts_text": TEXT, "instruct_text": INSTRUCT, "spk_id": "My Voice"}
        )
        fields = {"tts_text": TEXT, "instruct_text": INSTRUCT}
        assert by_id == _pcm(client, "/inference_instruct2", fields, {"prompt_wav": prompt_wav})
    _pcm(client, "/inference_vc", {"spk_id": "My Voice"}, {"source_wav": source_wav})
    both = client.post(
        "/inference_cross_lingual",
        data={"tts_text": TEXT, "spk_id": "My Voice"},
        files={"prompt_wav": ("p.wav", prompt_wav)},
    )
    assert "not both" in _error(both, 422, "invalid_request")

    if _has_route(client, "POST", "/v1/audio/speech"):
        speech = client.post(
            "/v1/audio/speech",
            json={"model": "tts-1", "input": TEXT, "voice": "My Voice", "response_format": "wav", "seed": SEED},
        )
        assert speech.status_code == 200, speech.text
        samples, rate = decode_wav(speech.content)
        assert rate == model.sample_rate and samples.size > 0

    # One name, one voice; built-in speakers keep theirs.
    assert "already exists" in _error(_create(client, "MY VOICE", prompt_wav), 409, "voice_exists")
    if model.voices.ids()[0] != "My Voice":
        builtin = model.voices.ids()[0]
        assert "built-in" in _error(_create(client, builtin, prompt_wav), 409, "voice_exists")
        _error(client.delete(f"/v1/audio/voices/{builtin}"), 400, "read_only_voice")

    deleted = client.delete("/v1/audio/voices/My Voice")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": "My Voice",
        "object": "audio.voice.deleted",
        "deleted": True,
    }
    _error(client.get("/v1/audio/voices/My Voice"), 404, "unknown_speaker")
    _error(client.delete("/v1/audio/voices/My Voice"), 404, "unknown_speaker")
    _error(client.post("/inference_sft", data={"tts_text": TEXT, "spk_id": "My Voice"}), 404, "unknown_speaker")
    assert "My Voice" not in client.get("/speakers").json()["speakers"]


def test_voice_without_transcript(tmp_path, prompt_wav):
    client, _ = _client(_models()[0], tmp_path)
    created = _create(client, "no text", prompt_wav, "  ")  # blank counts as none
    assert created.status_code == 201 and created.json()["ref_text"] is None
    message = _error(
        client.post("/inference_zero_shot", data={"tts_text": TEXT, "prompt_text": "ignored", "spk_id": "no text"}),
        422,
        "invalid_request",
    )
    assert "no transcript" in message and "cross_lingual" in message
    _pcm(client, "/inference_cross_lingual", {"tts_text": TEXT, "spk_id": "no text"})
    if _has_route(client, "POST", "/v1/audio/speech"):  # speaks cross-lingually there
        body = {"input": TEXT, "voice": "no text", "response_format": "wav"}
        assert client.post("/v1/audio/speech", json=body).status_code == 200


def test_bad_requests(tmp_path, prompt_wav):
    client, _ = _client(_models()[0], tmp_path)
    for bad in ("a%2Fb", "..%2F..%2Fetc", "x*y", "a" * 65, "%20lead", "trail."):
        _error(client.get(f"/v1/audio/voices/{bad}"), 400, "invalid_request")
        _error(client.delete(f"/v1/audio/voices/{bad}"), 400, "invalid_request")
    _error(client.get("/v1/audio/voices/nobody"), 404, "unknown_speaker")
    for bad in ("../escape", "a/b", "", "x" * 65):
        response = _create(client, bad, prompt_wav)
        assert response.status_code == 400 and response.json()["error"]["param"] == "name", response.text
    missing = client.post("/v1/audio/voices", data={"name": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "audio_sample"
    short = _create(client, "short", prompt_wav[: len(prompt_wav) // 10])
    assert short.status_code == 400 and short.json()["error"]["param"] == "audio_sample"
    assert _create(client, "ok", prompt_wav).status_code == 201


def test_cap(tmp_path, prompt_wav):
    client, _ = _client(_models()[0], tmp_path, max_voices=1)
    assert _create(client, "first", prompt_wav).status_code == 201
    message = _error(_create(client, "second", prompt_wav), 409, "voice_limit_reached")
    assert "1 of 1" in message and "--max_voices" in message
    assert client.delete("/v1/audio/voices/first").status_code == 200
    assert _create(client, "second", prompt_wav).status_code == 201


def test_voice_of_another_model_family_is_refused(tmp_path, prompt_wav, prompt_text):
    names = _models()
    client, maker = _client(names[0], tmp_path)
    assert _create(client, "theirs", prompt_wav, prompt_text).status_code == 201
    for other in names[1:]:
        client, model = _client(other, tmp_path)
        meta = client.get("/v1/audio/voices/theirs").json()
        same = (model.family, model.core.token_frame_rate) == (maker.family, maker.core.token_frame_rate)
        assert meta["usable"] == same and meta["model_family"] == maker.family
        response = client.post("/inference_sft", data={"tts_text": TEXT, "spk_id": "theirs"})
        if same:
            assert response.status_code == 200
            continue
        message = _error(response, 400, "incompatible_voice")
        for part in (
            maker.family,
            f"{maker.core.token_frame_rate} Hz",
            model.family,
            f"{model.core.token_frame_rate} Hz",
        ):
            assert part in message
        assert "theirs" not in client.get("/speakers").json()["speakers"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(port: int, model: str, log: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "cosyserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--model_dir", str(model_dir(model)), *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)} | env,
    )

    def ready() -> bool:
        assert server.poll() is None, log.read_text()
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(ready, 120, "the server to load its model")
    return server


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(30)


def test_voice_survives_a_server_restart(tmp_path, prompt_wav, prompt_text):
    name, data_dir, port = _models()[0], tmp_path / "data", _free_port()
    url = f"http://127.0.0.1:{port}"
    request = {"tts_text": TEXT, "spk_id": "kept", "format": "pcm", "seed": str(SEED)}

    server = _serve(port, name, tmp_path / "first.log", ["--data_dir", str(data_dir)], {})
    try:
        files = {"audio_sample": ("v.wav", prompt_wav, "audio/wav")}
        created = requests.post(f"{url}/v1/audio/voices", data={"name": "kept", "ref_text": prompt_text}, files=files)
        assert created.status_code == 201, created.text
        before = requests.post(f"{url}/inference_sft", data=request)
        assert before.status_code == 200 and before.content
    finally:
        _stop(server)

    # The environment twin names the same directory this time.
    server = _serve(port, name, tmp_path / "second.log", [], {"COSYSERVE_DATA_DIR": str(data_dir)})
    try:
        assert requests.get(f"{url}/v1/audio/voices/kept").json() == created.json()
        after = requests.post(f"{url}/inference_sft", data=request)
        assert after.status_code == 200 and after.content == before.content
        assert requests.delete(f"{url}/v1/audio/voices/kept").status_code == 200
    finally:
        _stop(server)
    client, _ = _client(name, data_dir)
    _error(client.get("/v1/audio/voices/kept"), 404, "unknown_speaker")


def test_voice_creation_waits_for_a_slot_and_is_refused_when_the_queue_is_full(tmp_path, prompt_wav):
    """Storing a voice runs the speech tokenizer and speaker encoder on the engine: it counts against
    the same running slots and queue as synthesis, so a full engine answers 503 with Retry-After."""
    model = load_model(model_dir("v2-tiny"), data_dir=tmp_path, text_frontend="none")
    app = create_app(model, Settings(data_dir=str(tmp_path), max_concurrency=1, max_queue=0))
    engine = app.state.cosyserve.models.require()
    release = threading.Event()
    original = model.prepare

    def held_prepare(*args, **kwargs):  # the running request holds the only slot until released
        release.wait(30)
        return original(*args, **kwargs)

    model.prepare = held_prepare
    with TestClient(app) as client:
        speaker = model.list_speakers()[0]
        holder = threading.Thread(
            target=lambda: client.post("/inference_sft", data={"tts_text": "你好。", "spk_id": speaker}), daemon=True
        )
        holder.start()
        wait_for(lambda: engine.core.stats().running == 1, 10, "the first request to take the slot")
        busy = _create(client, "queued-voice", prompt_wav)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy", busy.text
        assert int(busy.headers["Retry-After"]) > 0
        release.set()
        holder.join(60)
        model.prepare = original
        assert _create(client, "queued-voice", prompt_wav).status_code == 201
