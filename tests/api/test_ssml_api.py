"""SSML through HTTP on every family's tiny model, a live server on 127.0.0.1: exact silence for a
<break> in the PCM (official route and OpenAI pcm, streamed and not), the ignored-tags header, and
malformed / hostile documents answered 4xx (line and column named) before any audio."""

from __future__ import annotations

import json
import time
from functools import cache
from typing import Any

import numpy as np
import pytest
import requests
from api_helpers import ServerPool, decode_pcm
from golden import load_tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MODELS = ("v1-tiny", "v2-tiny", "v3-tiny")
SEED = 11
BREAK_MS = 500
TEXT = f'<speak>Hello there.<break time="{BREAK_MS}ms"/>How are you today?</speak>'


engine = cache(load_tiny)


@pytest.fixture(scope="module")
def server_for():
    pool = ServerPool(engine)
    yield pool.get
    pool.close()


def zero_runs(samples: np.ndarray) -> list[int]:
    """Lengths of the runs of exact zeros, longest first."""
    zero = np.concatenate([[0], (samples == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    return sorted((edges[1::2] - edges[::2]).tolist(), reverse=True)


def frame(model: Any, rate: int) -> int:
    """One mel frame (the vocoder's hop) at the output rate: the tolerance of a pause's length."""
    return int(np.ceil(model.core.hop_size * rate / model.sample_rate))


def check_break(pcm: np.ndarray, model: Any, rate: int) -> None:
    runs = zero_runs(pcm)
    want = BREAK_MS / 1000 * rate
    assert runs, "no silence at all in the audio"
    assert abs(runs[0] - want) <= frame(model, rate), (runs[:3], want)
    # The rest of the audio is speech: no other run anywhere near as long.
    assert len(runs) < 2 or runs[1] < want / 4, runs[:3]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_break_is_exact_silence_on_the_official_route(name, stream, server_for):
    model = engine(name)
    server = server_for(name)
    data = {"tts_text": TEXT, "spk_id": model.list_speakers()[0], "format": "pcm", "seed": SEED}
    resp = requests.post(f"{server.url}/inference_sft", data={**data, "stream": str(stream).lower()}, timeout=120)
    assert resp.status_code == 200, resp.text
    rate = int(resp.headers["X-Sample-Rate"])
    assert rate == model.sample_rate
    check_break(decode_pcm(resp.content), model, rate)
    assert "X-SSML-Ignored-Tags" not in resp.headers


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_break_is_exact_silence_in_openai_pcm(name, stream, server_for):
    model = engine(name)
    server = server_for(name)
    body = {"input": TEXT, "voice": model.list_speakers()[0], "response_format": "pcm", "seed": SEED}
    resp = requests.post(f"{server.url}/v1/audio/speech", json={**body, "stream": stream}, timeout=120)
    assert resp.status_code == 200, resp.text
    rate = int(resp.headers["X-Sample-Rate"])
    assert rate == 24000  # OpenAI's pcm rate: the 22.05 kHz v1 model's audio is resampled
    check_break(decode_pcm(resp.content), model, rate)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_tags_are_spoken_and_named_once_in_a_header(name, server_for):
    model = engine(name)
    server = server_for(name)
    text = "<speak><foo>Hello</foo> <bar x='1'>there</bar> <foo>again</foo> <prosody pitch='high'>now</prosody></speak>"
    spk = model.list_speakers()[0]
    official = requests.post(
        f"{server.url}/inference_sft", data={"tts_text": text, "spk_id": spk, "format": "pcm"}, timeout=120
    )
    openai = requests.post(
        f"{server.url}/v1/audio/speech", json={"input": text, "voice": spk, "response_format": "pcm"}, timeout=120
    )
    for resp in (official, openai):
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-SSML-Ignored-Tags"] == "foo, bar, prosody@pitch"
        assert len(resp.content) > 0


MALFORMED = (
    ("<speak>Hello\n  <break time='500ms'>\n</speak>", 3, "mismatched tag"),
    ("<speak>Hello <break time='fast'/></speak>", 1, "<break time="),
    ("<speak>\n\n  <prosody rate='very'>x</prosody></speak>", 3, "<prosody rate="),
)


@pytest.mark.parametrize(("text", "line", "words"), MALFORMED)
def test_malformed_ssml_is_a_4xx_naming_line_and_column(text, line, words, server_for):
    model = engine("v2-tiny")
    server = server_for("v2-tiny")
    spk = model.list_speakers()[0]
    official = requests.post(f"{server.url}/inference_sft", data={"tts_text": text, "spk_id": spk}, timeout=60)
    openai = requests.post(f"{server.url}/v1/audio/speech", json={"input": text, "voice": spk}, timeout=60)
    assert official.status_code == 422 and openai.status_code == 400
    for resp in (official, openai):
        error = resp.json()["error"]
        assert error["code"] == "invalid_ssml"
        assert f"line {line}, column " in error["message"] and words in error["message"], error


XXE = '<?xml version="1.0"?>\n<!DOCTYPE speak [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n<speak>&x;</speak>'
BOMB = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">' for i in range(1, 10))
    + "]>\n<speak>&lol9;</speak>"
)


@pytest.mark.parametrize("text", [XXE, BOMB], ids=["external-entity", "entity-bomb"])
def test_dtds_and_entities_are_refused_quickly(text, server_for):
    model = engine("v1-tiny")
    server = server_for("v1-tiny")
    spk = model.list_speakers()[0]
    for path, payload in (
        ("/inference_sft", {"data": {"tts_text": text, "spk_id": spk}}),
        ("/v1/audio/speech", {"json": {"input": text, "voice": spk}}),
    ):
        started = time.perf_counter()
        resp = requests.post(server.url + path, timeout=60, **payload)
        assert time.perf_counter() - started < 2.0  # the parser's own bound (100 ms) is in tests/unit/test_ssml.py
        assert resp.status_code in (400, 422), resp.text
        error = resp.json()["error"]
        assert error["code"] == "invalid_ssml" and "DOCTYPE" in error["message"] and "line 2" in error["message"]
        assert "root:" not in resp.text  # nothing of /etc/passwd


def _ws_messages(url: str, opening: dict[str, Any], texts: list[dict[str, Any]], end: dict[str, Any]) -> list[Any]:
    from websockets.sync.client import connect

    seen: list[Any] = []
    with connect(url, open_timeout=60, max_size=None) as ws:
        ws.send(json.dumps(opening))
        for text in texts:
            ws.send(json.dumps(text))
        ws.send(json.dumps(end))
        for message in ws:
            seen.append(message if isinstance(message, bytes) else json.loads(message))
    return seen


@pytest.mark.parametrize("bistream", [False, True])
def test_a_whole_document_in_a_native_websocket_message(bistream, server_for):
    name = "v2-tiny"
    model = engine(name)
    url = server_for(name).url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    config = {"type": "session.config", "voice": model.list_speakers()[0], "seed": SEED, "bistream": bistream}
    document = f'<speak>Hi <foo>there</foo>.<break time="{BREAK_MS}ms"/>Bye.</speak>'
    texts = [{"type": "text", "text": t} for t in ("Before it. ", document, "<speak>")]
    seen = _ws_messages(url, config, texts, {"type": "close"})
    starts = [m for m in seen if isinstance(m, dict) and m["type"] == "segment.start"]
    assert [s["text"] for s in starts[:2]] == ["Before it." if not bistream else "Before it. ", document]
    assert "ssml_ignored_tags" not in starts[0] and starts[1]["ssml_ignored_tags"] == ["foo"]
    # The document's audio: the frames between its segment.start and segment.done.
    begin = seen.index(starts[1])
    done = next(i for i, m in enumerate(seen) if i > begin and isinstance(m, dict) and m["type"] == "segment.done")
    pcm = decode_pcm(b"".join(m for m in seen[begin:done] if isinstance(m, bytes)))
    check_break(pcm, model, 24000)
    errors = [m for m in seen if isinstance(m, dict) and m["type"] == "error"]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "invalid_ssml"  # the lone "<speak>"
    assert "line 1, column 8" in errors[0]["error"]["message"]


def test_sse_usage_counts_the_spoken_text(server_for):
    model = engine("v3-tiny")
    server = server_for("v3-tiny")
    document = '<speak>Hello <foo>there</foo>.<break time="200ms"/></speak>'
    body = {"input": document, "voice": model.list_speakers()[0], "response_format": "pcm", "stream_format": "sse"}
    resp = requests.post(f"{server.url}/v1/audio/speech", json=body, timeout=120)
    assert resp.status_code == 200 and resp.headers["X-SSML-Ignored-Tags"] == "foo"
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] == model.frontend.tokenize("Hello there.").shape[1]
