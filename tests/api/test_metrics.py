"""/metrics after real requests on a tiny model: every kind of metric is there and non-zero, labelled by
route template, engine mode and status; the engine's stats() gauges appear when the model has them;
two apps in one process keep separate registries."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from golden import golden_root, manifest, model_dir
from prometheus_client.parser import text_string_to_metric_families
from resources import needs

from cosyserve.api import create_app
from cosyserve.api.metrics import mode_of
from cosyserve.engine.pipeline import load_model
from cosyserve.settings import Settings

MODEL = "v2-tiny"
KEY = "metrics-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

pytestmark = [pytest.mark.slow, needs(MODEL in manifest()["models"], f"no golden {MODEL} in {golden_root()}")]


def _samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics")  # exempt from the key
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The sum over the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert found, f"no sample {name}{labels}; have {sorted({n for n, _ in samples})}"
    return sum(found)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data_dir = tmp_path_factory.mktemp("metrics-voices")

    def load() -> Any:
        return load_model(model_dir(MODEL), text_frontend="none", data_dir=data_dir)

    app = create_app(load, Settings(api_keys=(KEY,), data_dir=str(data_dir)))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield client


def test_metrics_after_requests(client: TestClient) -> None:
    official = client.post(
        "/inference_sft",
        data={"tts_text": "你好。", "spk_id": "中文女", "format": "pcm", "stream": "true"},
        headers=AUTH,
    )
    assert official.status_code == 200 and official.content
    speech = client.post(
        "/v1/audio/speech",
        json={"input": "你好。", "voice": "中文女", "response_format": "wav", "instructions": None},
        headers=AUTH,
    )
    assert speech.status_code == 200 and speech.content
    assert client.get("/v1/audio/voices/nobody", headers=AUTH).status_code == 404
    assert client.get("/speakers").status_code == 401
    assert client.get("/no/such/path", headers=AUTH).status_code == 404

    samples = _samples(client)
    requests = "cosyserve_requests_total"
    assert _value(samples, requests, route="/inference_sft", method="POST", mode="sft", status="200") == 1
    assert _value(samples, requests, route="/v1/audio/speech", mode="sft", status="200") == 1
    # Route templates, never raw paths; refusals before routing still name their route.
    assert _value(samples, requests, route="/v1/audio/voices/{voice_id:path}", mode="", status="404") == 1
    assert _value(samples, requests, route="/speakers", status="401") == 1
    assert _value(samples, requests, route="unmatched", status="404") == 1
    assert not [labels for name, labels in samples if ("route", "/v1/audio/voices/nobody") in labels]

    for route in ("/inference_sft", "/v1/audio/speech"):
        assert _value(samples, "cosyserve_first_chunk_seconds_count", route=route, mode="sft") == 1
        assert _value(samples, "cosyserve_first_chunk_seconds_sum", route=route) > 0
        assert _value(samples, "cosyserve_request_duration_seconds_count", route=route, mode="sft") == 1
        assert _value(samples, "cosyserve_audio_seconds_total", route=route, mode="sft") > 0
    first = _value(samples, "cosyserve_first_chunk_seconds_sum", route="/inference_sft")
    total = _value(samples, "cosyserve_request_duration_seconds_sum", route="/inference_sft")
    assert 0 < first <= total
    assert _value(samples, "cosyserve_real_time_factor_count", mode="sft") == 2
    assert _value(samples, "cosyserve_real_time_factor_sum", mode="sft") > 0
    assert _value(samples, "cosyserve_model_load_seconds") > 0
    assert _value(samples, "cosyserve_in_flight_requests") == 0
    # The engine's own gauges: idle again, and it decoded tokens for the two requests.
    assert _value(samples, "cosyserve_engine_queue_depth") == 0
    assert _value(samples, "cosyserve_engine_running_requests") == 0
    assert _value(samples, "cosyserve_engine_llm_tokens_per_second") > 0


def test_engine_stats_gauges(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    model = client.app.state.cosyserve.models.require()
    stats = {"queue_depth": 3, "running": 2, "batch_size": 4, "llm_tokens_per_s": 812.5, "other": "ignored"}
    monkeypatch.setattr(model, "stats", lambda: stats, raising=False)
    samples = _samples(client)
    assert _value(samples, "cosyserve_engine_queue_depth") == 3
    assert _value(samples, "cosyserve_engine_running_requests") == 2
    assert _value(samples, "cosyserve_engine_batch_size") == 4
    assert _value(samples, "cosyserve_engine_llm_tokens_per_second") == 812.5

    def broken() -> dict[str, float]:
        raise RuntimeError("engine stopped")

    monkeypatch.setattr(model, "stats", broken, raising=False)
    assert "cosyserve_engine_" not in client.get("/metrics").text  # a failing stats() does not break the scrape


def test_each_app_has_its_own_registry(client: TestClient) -> None:
    other = TestClient(create_app(client.app.state.cosyserve.models.require(), Settings(data_dir="")))
    assert other.get("/speakers").status_code == 200
    theirs = _samples(other)
    assert _value(theirs, "cosyserve_requests_total", route="/speakers", status="200") == 1
    assert not [labels for name, labels in theirs if name == "cosyserve_requests_total" and ("mode", "sft") in labels]


def test_mode_of_generation_labels() -> None:
    assert mode_of("inference_zero_shot") == "zero_shot"
    assert mode_of("v1/audio/speech (instruct2, Web Voice)") == "instruct2"
    assert mode_of("v1/audio/speech (cross_lingual)") == "cross_lingual"
    assert mode_of("something else") == ""
