"""Several models in one server (v1 + v2 + v3 tiny): each route reaches the model it names, the voice
library is shared and filtered per family, a bad model name is a 404 listing the served ones, lazy
loading, the settings, and the Ray deployment's shared-store rule (no Ray needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest
import requests
from api_helpers import wait_for
from fastapi.testclient import TestClient
from golden import REPO, golden_root, manifest, model_dir
from helpers import load_settings
from resources import needs

from cosyserve.api import create_app
from cosyserve.cli import server_loaders
from cosyserve.engine.pipeline import load_model
from cosyserve.engine.voices import VoiceLibrary
from cosyserve.settings import Settings, SettingsError

MODELS = {"v1": "v1-tiny", "v2": "v2-tiny", "v3": "v3-tiny"}
FAMILIES = {"v1": "cosyvoice1", "v2": "cosyvoice2", "v3": "cosyvoice3"}
SPEAKER = "中文女"
TEXT = "今天天气真好。"

pytestmark = [
    pytest.mark.slow,
    needs(set(MODELS.values()) <= set(manifest()["models"]), f"tiny v1/v2/v3 models not in {golden_root()}"),
]


def _settings(**overrides: Any) -> Settings:
    spec = ",".join(f"{name}={model_dir(tiny)}" for name, tiny in MODELS.items())
    return Settings(model_dir=spec, **overrides)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Any]:
    library = VoiceLibrary(tmp_path_factory.mktemp("multi-voices"))
    return {name: load_model(model_dir(tiny), text_frontend="none", library=library) for name, tiny in MODELS.items()}


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models, _settings(default_model="v2"))) as c:
        yield c


@pytest.fixture(scope="module")
def prompt_wav() -> bytes:
    name = manifest().get("inputs", {}).get("e2e", {}).get("prompt_wav", "zero_shot_prompt")
    return (golden_root() / "audio" / f"{name}.wav").read_bytes()


def _tokens(client: TestClient) -> dict[str, int]:
    """LLM tokens each model's engine has decoded so far (by served name)."""
    return {m["name"]: m["engine"]["llm_tokens"] for m in client.get("/health").json()["models"]}


def _served_by(client: TestClient, call: Any) -> tuple[Any, str]:
    """The response of ``call()`` and the one model whose engine decoded tokens for it."""
    before = _tokens(client)
    response = call()
    assert response.status_code == 200, response.text
    grown = [name for name, count in _tokens(client).items() if count > before[name]]
    assert len(grown) == 1, f"tokens decoded by {grown}"
    return response, grown[0]


def _speech(client: TestClient, model: str, **fields: Any) -> Any:
    body = {"model": model, "input": TEXT, "voice": SPEAKER, "response_format": "wav", "seed": 1} | fields
    return client.post("/v1/audio/speech", json=body)


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.json()
    return response.json()["error"]["message"]


def test_models_and_health_list_every_model(client):
    ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert ids == ["v1", "v2", "v3", "tts-1", "tts-1-hd"]
    assert client.get("/v1/models/cosyvoice3").json()["id"] == "v3"
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert [(m["name"], m["status"], m["family"]) for m in body["models"]] == [
        (name, "ok", FAMILIES[name]) for name in MODELS
    ]
    assert body["family"] == "cosyvoice2"  # the default model's description, as with one model


@pytest.mark.parametrize("name", list(MODELS))
def test_openai_route_reaches_the_model_named(client, name):
    response, served = _served_by(client, lambda: _speech(client, name))
    assert served == name
    # by family too, and the OpenAI names reach the default model
    assert _served_by(client, lambda: _speech(client, FAMILIES[name]))[1] == name
    sample_rate = 22050 if name == "v1" else 24000
    assert response.headers["x-sample-rate"] == str(sample_rate)


def test_openai_names_reach_the_default_model(client):
    for name in ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"):
        assert _served_by(client, lambda n=name: _speech(client, n))[1] == "v2"


def test_official_routes_use_the_default_or_the_model_field(client):
    form = {"tts_text": TEXT, "spk_id": SPEAKER, "seed": "1"}
    assert _served_by(client, lambda: client.post("/inference_sft", data=form))[1] == "v2"
    assert _served_by(client, lambda: client.post("/inference_sft", data=form | {"model": "v1"}))[1] == "v1"
    assert _served_by(client, lambda: client.get("/inference_sft", params=form | {"model": "v3"}))[1] == "v3"
    # The mode is checked against the model named: only CosyVoice 1.0 has instruct.
    instruct = form | {"instruct_text": "请用温柔的语气说这句话。"}
    _error(client.post("/inference_instruct", data=instruct), 400, "unsupported_mode")
    assert _served_by(client, lambda: client.post("/inference_instruct", data=instruct | {"model": "v1"}))[1] == "v1"
    assert client.get("/speakers", params={"model": "v1"}).json()["speakers"][0] == SPEAKER


def test_bad_model_name_is_404_listing_the_served_ones(client):
    for response in (
        _speech(client, "CosyVoice-9B"),
        client.post("/inference_sft", data={"tts_text": TEXT, "spk_id": SPEAKER, "model": "CosyVoice-9B"}),
        client.get("/v1/audio/voices", params={"model": "CosyVoice-9B"}),
        client.get("/v1/models/CosyVoice-9B"),
    ):
        message = _error(response, 404, "model_not_found")
        assert "CosyVoice-9B" in message and all(name in message for name in MODELS), message


def test_one_voice_library_filtered_per_family(client, prompt_wav):
    made = client.post(
        "/v1/audio/voices",
        data={"name": "multi-v3-voice", "ref_text": "希望你以后能够做的比我还好呦。", "model": "v3"},
        files={"audio_sample": ("voice.wav", prompt_wav, "audio/wav")},
    )
    assert made.status_code == 201, made.text
    assert made.json()["model_family"] == "cosyvoice3"

    def listed(model: str) -> bool:
        voices = client.get("/v1/audio/voices", params={"model": model}).json()["voices"]
        return "multi-v3-voice" in [v["id"] for v in voices]

    assert listed("v3") and not listed("v2") and not listed("v1") and not listed("tts-1")
    assert client.get("/v1/audio/voices/multi-v3-voice", params={"model": "v3"}).json()["usable"] is True
    assert client.get("/v1/audio/voices/multi-v3-voice").json()["usable"] is False  # the default is v2
    assert _served_by(client, lambda: _speech(client, "v3", voice="multi-v3-voice"))[1] == "v3"
    _error(_speech(client, "v1", voice="multi-v3-voice"), 400, "incompatible_voice")
    assert client.delete("/v1/audio/voices/multi-v3-voice").status_code == 200
    assert not listed("v3")


def test_lazy_load_loads_a_model_on_its_first_request(models):
    calls: list[str] = []

    def loader(name: str) -> Any:
        def load() -> Any:
            calls.append(name)
            return models[name]

        return load

    loaders = {name: loader(name) for name in ("v1", "v3")}
    settings = Settings(model_dir=f"v1={model_dir('v1-tiny')},v3={model_dir('v3-tiny')}", lazy_load=True)
    with TestClient(create_app(loaders, settings)) as c:
        health = c.get("/health")
        assert health.status_code == 200 and [m["status"] for m in health.json()["models"]] == ["not_loaded"] * 2
        assert calls == []
        assert _speech(c, "v3").status_code == 200
        assert calls == ["v3"]
        assert [m["status"] for m in c.get("/health").json()["models"]] == ["not_loaded", "ok"]
        assert _speech(c, "tts-1").status_code == 200  # the default, v1, now
        assert calls == ["v3", "v1"]


def test_failed_model_makes_health_503_and_names_it(models):
    def broken() -> Any:
        raise RuntimeError("no such weights")

    settings = Settings(model_dir=f"good={model_dir('v2-tiny')},bad=/nowhere")
    with TestClient(create_app({"good": models["v2"], "bad": broken}, settings)) as c:
        wait_for(lambda: c.get("/health").json()["status"] == "error", 10, "the load failure")
        health = c.get("/health")
        assert health.status_code == 503 and "bad: no such weights" in health.json()["error"]
        assert _speech(c, "good").status_code == 200
        assert "failed to load" in _error(_speech(c, "bad"), 503, "model_not_ready")


def test_settings_take_several_models():
    settings = load_settings(["--model_dir", "a=/m/one", "--model_dir", "/m/two", "--default_model", "/m/two"])
    assert [(m.name, m.source) for m in settings.models] == [("a", "/m/one"), ("", "/m/two")]
    env = load_settings([], {"COSYSERVE_MODEL_DIR": "x=iic/CosyVoice-300M-SFT, FunAudioLLM/CosyVoice2-0.5B"})
    assert [(m.name, m.source) for m in env.models] == [
        ("x", "iic/CosyVoice-300M-SFT"),
        ("", "FunAudioLLM/CosyVoice2-0.5B"),
    ]
    assert load_settings(["--model_dir", "/only"], {"COSYSERVE_MODEL_DIR": "/a,/b"}).model_dir == "/only"
    assert [m.source for m in Settings(model_dir="/data/a=b/model").models] == ["/data/a=b/model"]
    for bad in ("a=/x,a=/y", "bad name=/x", "a=", ","):
        with pytest.raises(SettingsError):
            Settings(model_dir=bad)
    with pytest.raises(SettingsError, match="default_model"):
        Settings(model_dir="a=/x", default_model="b")


def test_served_models_share_one_voice_library():
    settings = _settings(data_dir="", text_frontend="none", threads=1)
    loaded = [load() for load in server_loaders(settings).values()]
    assert len({id(model.voices.library) for model in loaded}) == 1


def test_ray_needs_a_shared_voice_store_for_several_replicas():
    from cosyserve.deploy.ray_serve import RayOptions, check_shared_store

    settings = Settings(data_dir="/srv/voices")
    check_shared_store(settings, RayOptions(num_replicas=1), {})
    with pytest.raises(SettingsError, match="postgresql://"):
        check_shared_store(settings, RayOptions(num_replicas=2), {})
    with pytest.raises(SettingsError, match="3 replicas"):
        check_shared_store(settings, RayOptions(min_replicas=1, max_replicas=3), {})
    with pytest.raises(SettingsError, match="not a postgresql"):
        check_shared_store(settings, RayOptions(num_replicas=2), {"COSYSERVE_VOICE_STORE": "sqlite:///x"})
    check_shared_store(settings, RayOptions(num_replicas=2), {"COSYSERVE_VOICE_STORE": "postgresql://u@db/voices"})
    check_shared_store(settings, RayOptions(num_replicas=2, single_node_sqlite=True), {})
    with pytest.raises(SettingsError, match="in memory"):
        check_shared_store(Settings(data_dir=""), RayOptions(num_replicas=2, single_node_sqlite=True), {})
    with pytest.raises(SettingsError):
        RayOptions(min_replicas=2)


def test_the_plain_server_never_imports_ray():
    code = (
        "import sys, cosyserve.cli, cosyserve.api; from cosyserve.cli import build_parser; "
        "build_parser('serve'); build_parser('ray'); "
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_serve_config_args_become_settings(monkeypatch):
    from cosyserve.deploy.ray_serve import settings_from_build_args

    monkeypatch.setenv("COSYSERVE_VOICE_STORE", "")  # restored after the test: the builder sets it
    args = {
        "model_dir": ["a=/m/one", "/m/two"],
        "default_model": "a",
        "lazy_load": True,
        "max_concurrency": 8,
        "voice_store": "postgresql://u@db/voices",
        "min_replicas": 1,
        "max_replicas": 3,
        "ray_num_gpus": 1,
    }
    settings, options = settings_from_build_args(args)
    assert (settings.model_dir, settings.default_model, settings.lazy_load) == ("a=/m/one,/m/two", "a", True)
    assert settings.max_concurrency == 8
    assert (options.min_replicas, options.max_replicas, options.num_gpus, options.num_cpus) == (1, 3, 1.0, 1.0)
    from cosyserve.deploy.ray_serve import check_shared_store, voice_store

    assert voice_store(settings) == "postgresql://u@db/voices"
    check_shared_store(settings, options)
    with pytest.raises(SettingsError, match="--no_such_flag"):
        settings_from_build_args({"no_such_flag": 1})


def test_cosyserve_serve_with_two_models_and_the_env_twin(tmp_path):
    """The command line: two --model_dir, a third model from the env twin would be replaced by them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "cosyserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--model_dir", f"one={model_dir('v1-tiny')}", "--model_dir", f"two={model_dir('v2-tiny')}",
        "--default_model", "two", "--data_dir", str(tmp_path / "voices"), "--text_frontend", "none",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COSYSERVE_MODEL_DIR": "/not/used"}
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:

        def ready() -> bool:
            assert server.poll() is None, log.read_text()
            try:
                return requests.get(f"{url}/health", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(ready, 120, "both models to load")
        health = requests.get(f"{url}/health").json()
        assert [(m["name"], m["family"]) for m in health["models"]] == [("one", "cosyvoice1"), ("two", "cosyvoice2")]
        assert health["family"] == "cosyvoice2"
        ids = [card["id"] for card in requests.get(f"{url}/v1/models").json()["data"]]
        assert ids == ["one", "two", "tts-1", "tts-1-hd"]
        speech = {"model": "one", "input": TEXT, "voice": SPEAKER, "response_format": "wav"}
        assert requests.post(f"{url}/v1/audio/speech", json=speech).headers["x-sample-rate"] == "22050"
    finally:
        server.terminate()
        server.wait(30)
