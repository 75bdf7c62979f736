"""Regression tests of issue 14's API findings, against the stub engine of test_api_http.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers import load_settings
from test_api_http import ALL_MODES, StubModel, assert_error, form

from cosyserve.api import create_app
from cosyserve.audio.encode import to_int16
from cosyserve.engine.voices import MAX_ID_LENGTH
from cosyserve.settings import Settings, SettingsError

# str.isdigit() takes these, int() / float() refuse or misread some of them: each must be a 400, never a 500.
NOT_ASCII_NUMBERS = ("²", "1²", "١٢", "𝟙", "½", "Ⅻ", "9" * 5000, "1_000", " 1 2", "0x10", "1e999", "nan", "-inf")


@pytest.fixture
def stub():
    return StubModel()


@pytest.fixture
def client(stub):
    with TestClient(create_app(stub, Settings(max_text_length=50, max_upload_bytes=1_000_000))) as c:
        yield c


@pytest.mark.parametrize("name", ["seed", "sample_rate", "speed"])
@pytest.mark.parametrize("raw", NOT_ASCII_NUMBERS, ids=lambda r: ascii(r)[:12])
def test_non_ascii_numbers_are_422_by_query_and_by_form(client, stub, name, raw):
    data, files = form("sft")
    by_query = client.get("/inference_sft", params={**data, name: raw})
    assert_error(by_query, 422, "invalid_request", name)
    data, files = form("zero_shot")
    by_multipart = client.post("/inference_zero_shot", data={**data, name: raw}, files=files)
    assert_error(by_multipart, 422, "invalid_request", name)
    assert stub.calls == []


@pytest.mark.parametrize("mode", ALL_MODES)
def test_plain_numbers_still_parse(client, stub, mode):
    data, files = form(mode, seed="12", speed="1.25", sample_rate="16000", format="pcm")
    resp = client.post(f"/inference_{mode}", data=data, files=files)
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Sample-Rate"] == "16000"
    assert stub.calls[-1][2] == {"stream": False, "speed": 1.25, "seed": 12}


@pytest.mark.parametrize("field", ["seed", "sample_rate", "speed"])
@pytest.mark.parametrize("raw", ["²", "١٢", "1e999", 1e300, "9" * 5000], ids=lambda r: ascii(r)[:12])
def test_openai_route_numbers_are_400(client, stub, field, raw):
    resp = client.post("/v1/audio/speech", json={"input": "hello", "voice": "spk_a", field: raw})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field
    assert stub.calls == []


# -- --official_format ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_official_format_pcm_makes_bodies_raw_int16(stub, mode):
    with TestClient(create_app(stub, Settings(official_format="pcm"))) as client:
        data, files = form(mode, seed="5")
        resp = client.post(f"/inference_{mode}", data=data, files=files)
        assert resp.status_code == 200, resp.text
        # The official server's body: the int16 samples, nothing else.
        assert resp.content == to_int16(stub.expected(5)).astype("<i2").tobytes()
        explicit = client.post(f"/inference_{mode}", data={**data, "format": "wav"}, files=files)
        assert explicit.content[:4] == b"RIFF"


def test_official_format_default_stays_wav(client):
    data, files = form("sft")
    assert client.post("/inference_sft", data=data, files=files).content[:4] == b"RIFF"


def test_official_format_setting_and_env_twin():
    assert load_settings([]).official_format == "wav"
    assert load_settings(["--official_format", "PCM"]).official_format == "pcm"
    assert load_settings([], {"COSYSERVE_OFFICIAL_FORMAT": "pcm"}).official_format == "pcm"
    assert load_settings(["--official_format", "wav"], {"COSYSERVE_OFFICIAL_FORMAT": "pcm"}).official_format == "wav"
    with pytest.raises(SettingsError):
        Settings(official_format="mp3")
    with pytest.raises(SettingsError):
        load_settings([], {"COSYSERVE_OFFICIAL_FORMAT": "mp3"})


# -- /v1/models ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("started_with", "model_dir", "expected"),
    [
        ("/srv/models/CosyVoice2-0.5B", "/srv/models/CosyVoice2-0.5B", "CosyVoice2-0.5B"),
        ("./relative/v2-tiny", "/home/u/relative/v2-tiny", "v2-tiny"),
        ("iic/CosyVoice2-0.5B", "/root/.cache/modelscope/hub/iic/CosyVoice2-0___5B", "iic/CosyVoice2-0.5B"),
        (
            "FunAudioLLM/CosyVoice2-0.5B",
            "/hf/models--FunAudioLLM--CosyVoice2-0.5B/snapshots/ab12",
            "FunAudioLLM/CosyVoice2-0.5B",
        ),
        ("iic/CosyVoice-300M", "/srv/other-model", "other-model"),  # not what it was started with: the dir's name
    ],
)
def test_model_id_is_a_name_never_a_local_path(stub, started_with, model_dir, expected):
    stub.model_dir = model_dir
    with TestClient(create_app(stub, Settings(model_dir=started_with))) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == [expected, "tts-1", "tts-1-hd"]
        assert client.get(f"/v1/models/{expected}").json()["id"] == expected
    assert not any(i.startswith(("/", ".")) for i in ids)


# -- 405 answers name every method of the path --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/inference_sft", "GET, POST"),
        ("DELETE", "/inference_zero_shot", "GET, POST"),
        ("PUT", "/v1/audio/voices", "GET, POST"),
        ("GET", "/v1/audio/speech", "POST"),
    ],
)
def test_405_lists_every_allowed_method(client, method, path, allowed):
    resp = client.request(method, path)
    assert_error(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == allowed


# -- CORS: voice-library writes are not open cross-origin by default --------------------------------------


def _unloaded_app(settings: Settings) -> TestClient:
    """An app whose model failed to load: every route that gets past the CORS guard answers 503."""

    def loader():
        raise RuntimeError("no model in this test")

    return TestClient(create_app(loader, settings))


EVIL = {"Origin": "https://evil.example"}


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/audio/voices"), ("DELETE", "/v1/audio/voices/someone")])
def test_cross_origin_voice_writes_are_refused_with_the_default_wildcard(method, path):
    with _unloaded_app(Settings()) as client:
        preflight = client.options(path, headers={**EVIL, "Access-Control-Request-Method": method})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
        write = client.request(method, path, headers=EVIL)
        assert_error(write, 403, "cross_origin_forbidden")
        assert "access-control-allow-origin" not in write.headers
        # Without Origin (curl, SDKs) or from the server's own pages, the write reaches the route.
        assert client.request(method, path).status_code == 503
        assert client.request(method, path, headers={"Origin": "http://testserver"}).status_code == 503


def test_cross_origin_reads_and_synthesis_stay_open():
    with _unloaded_app(Settings()) as client:
        listing = client.get("/v1/audio/voices", headers=EVIL)
        assert listing.headers["access-control-allow-origin"] == "*"
        preflight = client.options("/v1/audio/speech", headers={**EVIL, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"


def test_listed_origins_may_write_voices():
    settings = Settings(cors_origins=("https://studio.example",))
    with _unloaded_app(settings) as client:
        good = {"Origin": "https://studio.example", "Access-Control-Request-Method": "DELETE"}
        preflight = client.options("/v1/audio/voices/someone", headers=good)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://studio.example"
        assert client.delete("/v1/audio/voices/someone", headers=EVIL).status_code == 403


# -- the OpenAPI schema says what the server does -----------------------------------------------------


def test_schema_declares_that_text_fields_reject_blank(client):
    spec = client.get("/openapi.json").json()
    for mode in ALL_MODES:
        get = spec["paths"][f"/inference_{mode}"]["get"]
        for parameter in get["parameters"]:
            if parameter["name"] in ("tts_text", "prompt_text", "instruct_text", "spk_id"):
                assert parameter["schema"]["minLength"] == 1, (mode, parameter)
        post = spec["paths"][f"/inference_{mode}"]["post"]["requestBody"]["content"]["multipart/form-data"]
        for name in ("tts_text", "prompt_text", "instruct_text"):
            if name in post["schema"]["properties"]:
                assert post["schema"]["properties"][name]["minLength"] == 1, (mode, name)
    speech = spec["paths"]["/v1/audio/speech"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert speech["properties"]["input"]["minLength"] == 1
    voice = spec["paths"]["/v1/audio/voices"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert (voice["properties"]["name"]["minLength"], voice["properties"]["name"]["maxLength"]) == (1, MAX_ID_LENGTH)
    # ... and the server does reject what the schema excludes.
    assert_error(client.get("/inference_sft", params={"tts_text": " ", "spk_id": "spk_a"}), 422, "missing_field")
    assert client.post("/v1/audio/speech", json={"input": "", "voice": "spk_a"}).status_code == 400
    sample = {"audio_sample": ("a.wav", b"RIFF", "audio/wav")}
    for name in ("", "x" * (MAX_ID_LENGTH + 1)):
        assert client.post("/v1/audio/voices", data={"name": name}, files=sample).status_code == 400, name
    assert "404" in spec["paths"]["/v1/models/{name}"]["get"]["responses"]
