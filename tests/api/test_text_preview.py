"""``POST /v1/text/preview`` on every family's tiny model, a live server on 127.0.0.1: the segments it
answers are those the engine builds for the same body (texts, text-token counts, speeds, breaks), with the
request's pronunciations and SSML applied; bad bodies get the speech route's 4xx."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import requests
from api_helpers import LiveServer, ServerPool
from golden import load_tiny

from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.text.pronunciation import parse_pronunciations

pytestmark = pytest.mark.slow

MODELS = ("v1-tiny", "v2-tiny", "v3-tiny")


engine = cache(load_tiny)


@pytest.fixture(scope="module")
def server_for():
    pool = ServerPool(engine)
    yield pool.get
    pool.close()


def preview(server: LiveServer, **body: Any) -> requests.Response:
    return requests.post(f"{server.url}/v1/text/preview", json=body, timeout=60)


def built(name: str, text: str, speed: float = 1.0, pronunciations: Any = None) -> list[Any]:
    """The text ids of each segment the engine builds for an sft request with the model's first speaker."""
    model = engine(name)
    request = SynthesisRequest(
        "sft",
        text,
        spk_id=model.list_speakers()[0],
        options=GenerationOptions(speed=speed),
        pronunciations=parse_pronunciations(pronunciations),
    )
    inputs, plans = model.inputs.build_planned(request)
    return [(i.text_length, p.speed) for i, p in zip(inputs, plans, strict=True)]


@pytest.mark.parametrize("name", MODELS)
def test_preview_is_what_the_engine_builds(name, server_for):
    model = engine(name)
    text = "Hello there, I use nginx every day. It has 3 workers! 今天天气很好。"
    entries = {"nginx": "engine x"}
    resp = preview(server_for(name), input=text, voice=model.list_speakers()[0], speed=1.5, pronunciations=entries)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["mode"] == "sft" and body["ssml"] is False and body["ssml_ignored_tags"] == []
    segments = body["segments"]
    assert [(s["text_tokens"], s["speed"]) for s in segments] == built(name, text, 1.5, entries)
    assert body["text_tokens"] == sum(s["text_tokens"] for s in segments)
    joined = " ".join(s["text"] for s in segments)
    assert "engine x" in joined and "nginx" not in joined  # the respelling is what the model reads
    assert all(s["break_before_ms"] == s["break_after_ms"] == 0 for s in segments)


@pytest.mark.parametrize("name", MODELS)
def test_ssml_preview_shows_breaks_speeds_and_ignored_tags(name, server_for):
    model = engine(name)
    ssml = (
        '<speak><break time="200ms"/>Hello there.<break time="500ms"/>'
        '<prosody rate="50%">How are <foo>you</foo> today?</prosody></speak>'
    )
    resp = preview(server_for(name), input=ssml, voice=model.list_speakers()[0])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ssml"] is True and body["ssml_ignored_tags"] == ["foo"]
    segments = body["segments"]
    assert [(s["text_tokens"], s["speed"]) for s in segments] == built(name, ssml)
    assert segments[0]["break_before_ms"] == 200 and segments[0]["break_after_ms"] == 500
    assert segments[0]["speed"] == 1.0 and segments[-1]["speed"] == 0.5
    assert "you today" in segments[-1]["text"] and "<foo>" not in segments[-1]["text"]


def test_v3_preview_shows_the_inline_pronunciation_tokens(server_for):
    model = engine("v3-tiny")
    ssml = '<speak>我去<phoneme alphabet="pinyin" ph="chong2 qing4">重庆</phoneme>。你好。</speak>'
    resp = preview(server_for("v3-tiny"), input=ssml, voice=model.list_speakers()[0], pronunciations={"你好": "您好"})
    assert resp.status_code == 200, resp.text
    text = "".join(s["text"] for s in resp.json()["segments"])
    assert "[ch][óng][q][ìng]" in text and "重庆" not in text and "您好" in text


@pytest.mark.parametrize(
    ("name", "body", "status", "words"),
    [
        ("v2-tiny", {"input": "我去重庆。", "pronunciations": {"重庆": {"pinyin": "chong2 qing4"}}}, 400, "cosyvoice2"),
        ("v2-tiny", {"input": "<speak>Hello\n <break time='1s'>\n</speak>"}, 400, "line 3"),
        ("v2-tiny", {"input": "   "}, 400, "input is empty"),
        ("v2-tiny", {"input": "Hello.", "voice": "nobody-has-this-voice"}, 404, "nobody-has-this-voice"),
        ("v1-tiny", {"input": "Hello.", "pronunciations": {"hello": {"cmu": "HH AH0 L OW1"}}}, 400, "cosyvoice1"),
    ],
)
def test_bad_bodies_get_the_speech_routes_4xx(name, body, status, words, server_for):
    model = engine(name)
    resp = preview(server_for(name), **{"voice": model.list_speakers()[0], **body})
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]["message"]
