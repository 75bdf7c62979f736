"""Captions, dubbing and continuity through live servers on the tiny models (127.0.0.1):

- ``/v1/audio/captioned_speech``: the segments' start / end are the sample boundaries of the segments (each
  segment synthesised alone with the same seed has the samples the JSON's span holds), the audio is the
  speech route's bytes, ``?captions=srt|vtt`` are well-formed files of those times;
- ``/v1/audio/dubbing``: every cue of a 40-cue SRT starts at its time (+-1 frame) and none runs past the next
  cue's start (v2-tiny), a cue that cannot fit is reported, malformed SRT is a 4xx naming the cue and line;
- continuity on the OpenAI route: a request continues a finished one by its X-Request-ID; unknown ids 404.
"""

from __future__ import annotations

import base64
import io
import json
import re
from functools import cache
from typing import Any

import numpy as np
import pytest
import requests
import soundfile as sf
from api_helpers import LiveServer, ServerPool, decode_wav
from golden import load_tiny
from websockets.sync.client import connect

from cosyserve.api import create_app
from cosyserve.engine.request import MAX_SPEED
from cosyserve.settings import Settings
from cosyserve.text.subtitles import Caption, format_srt, format_vtt, parse_srt

pytestmark = pytest.mark.slow

SEED = 11
TEXT = "<speak><s>The keeper walked the shore.</s><break time='250ms'/><s>He counted boats.</s><s>Home.</s></speak>"


engine = cache(load_tiny)


@pytest.fixture(scope="module")
def server_for():
    pool = ServerPool(engine)
    yield pool.get
    pool.close()


def voice(name: str) -> str:
    return engine(name).list_speakers()[0]


def wav_samples(body: bytes) -> np.ndarray:
    samples, _ = decode_wav(body)
    return samples


# -- captions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("v1-tiny", "v2-tiny", "v3-tiny"))
def test_caption_times_are_the_segments_sample_boundaries(name, server_for):
    server = server_for(name)
    body = {"input": TEXT, "voice": voice(name), "response_format": "wav", "seed": SEED}
    r = requests.post(f"{server.url}/v1/audio/captioned_speech", json=body, timeout=300)
    assert r.status_code == 200, r.text
    got = r.json()
    audio = wav_samples(base64.b64decode(got["audio"]))
    rate = got["sample_rate"]
    assert rate == engine(name).sample_rate
    # The same bytes as the speech route (the marks change no sample).
    plain = requests.post(f"{server.url}/v1/audio/speech", json=body, timeout=300)
    np.testing.assert_array_equal(wav_samples(plain.content), audio)
    segments = got["segments"]
    assert [s["index"] for s in segments] == [0, 1, 2]
    assert segments[0]["start"] == 0 and segments[-1]["end_sample"] == audio.shape[0]
    for s in segments:
        assert s["start"] == pytest.approx(s["start_sample"] / rate)
        assert s["end"] == pytest.approx(s["end_sample"] / rate)
    # The break's silence lies between the first two segments; the others touch.
    assert segments[1]["start_sample"] - segments[0]["end_sample"] == round(0.25 * rate)
    assert segments[2]["start_sample"] == segments[1]["end_sample"]
    # The first segment alone, same seed: the samples up to its end (later segments draw after it).
    first = {**body, "input": "<speak><s>The keeper walked the shore.</s></speak>"}
    alone = wav_samples(requests.post(f"{server.url}/v1/audio/speech", json=first, timeout=300).content)
    assert alone.shape[0] == segments[0]["end_sample"]
    np.testing.assert_array_equal(alone, audio[: segments[0]["end_sample"]])
    # The caption files say the same times.
    srt = requests.post(f"{server.url}/v1/audio/captioned_speech?captions=srt", json=body, timeout=300)
    assert srt.status_code == 200 and srt.headers["content-type"].startswith("application/x-subrip")
    cues = parse_srt(srt.content)
    assert [round(c.start, 3) for c in cues] == [round(s["start"], 3) for s in segments]
    assert [round(c.end, 3) for c in cues] == [round(s["end"], 3) for s in segments]
    assert srt.text == got["srt"]
    vtt = requests.post(f"{server.url}/v1/audio/captioned_speech?captions=vtt", json=body, timeout=300)
    assert vtt.headers["content-type"].startswith("text/vtt") and vtt.text.startswith("WEBVTT\n\n")
    assert vtt.text == got["vtt"]


def test_captions_in_a_compressed_format_and_bad_queries(server_for):
    server = server_for("v2-tiny")
    body = {"input": "Hello there.", "voice": voice("v2-tiny"), "response_format": "flac", "seed": SEED}
    r = requests.post(f"{server.url}/v1/audio/captioned_speech", json=body, timeout=300)
    assert r.status_code == 200, r.text
    data, rate = sf.read(io.BytesIO(base64.b64decode(r.json()["audio"])))
    assert rate == 24000 and data.shape[0] == r.json()["segments"][-1]["end_sample"]
    bad = requests.post(f"{server.url}/v1/audio/captioned_speech?captions=ass", json=body, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "captions"
    sse = requests.post(f"{server.url}/v1/audio/captioned_speech", json={**body, "stream_format": "sse"}, timeout=60)
    assert sse.status_code == 400 and sse.json()["error"]["param"] == "stream_format"
    empty = requests.post(f"{server.url}/v1/audio/captioned_speech", json={**body, "input": " "}, timeout=60)
    assert empty.status_code == 400


def test_srt_and_vtt_formatting():
    caps = [Caption("Hello\nthere --> you", 0.0, 1.2345), Caption("Two", 3661.5, 3662.0)]
    assert format_srt(caps) == (
        "1\n00:00:00,000 --> 00:00:01,234\nHello there -> you\n\n2\n01:01:01,500 --> 01:01:02,000\nTwo\n"
    )
    assert format_vtt(caps) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.234\nHello there -> you\n\n01:01:01.500 --> 01:01:02.000\nTwo\n"
    )
    back = parse_srt(format_srt(caps).encode())
    assert [(c.number, c.start, c.end, c.text) for c in back] == [
        (1, 0.0, 1.234, "Hello there -> you"),
        (2, 3661.5, 3662.0, "Two"),
    ]


# -- dubbing --------------------------------------------------------------------------------------------


def _stamp(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def srt_of(cues: list[tuple[float, float, str]]) -> bytes:
    return "\n".join(
        f"{i}\r\n{_stamp(a)} --> {_stamp(b)}\r\n{t}\r\n" for i, (a, b, t) in enumerate(cues, start=1)
    ).encode()


def dub(server: LiveServer, srt: bytes, **fields: Any) -> requests.Response:
    data = {"voice": voice("v2-tiny"), "seed": str(SEED), "report": "json", **fields}
    return requests.post(
        f"{server.url}/v1/audio/dubbing",
        files={"file": ("subs.srt", srt, "application/x-subrip")},
        data=data,
        timeout=900,
    )


WORDS = ("Hello.", "Good morning to you.", "Yes.", "The boats came back late.", "Run!", "We will see.")


def test_forty_cues_each_start_at_their_time_and_none_runs_into_the_next(server_for):
    server = server_for("v2-tiny")
    rng = np.random.default_rng(3)
    cues, t = [], 0.5
    for i in range(40):
        length = float(rng.uniform(0.3, 1.3))  # some cues need speeding up, a few cannot fit
        cues.append((round(t, 3), round(t + length, 3), WORDS[i % len(WORDS)]))
        t += length + float(rng.uniform(0.0, 0.6))
    r = dub(server, srt_of(cues))
    assert r.status_code == 200, r.text
    got = r.json()
    rate = got["sample_rate"]
    track = wav_samples(base64.b64decode(got["audio"]))
    frame = rate // 50  # one mel frame (v2: 480 samples at 24 kHz)
    report = got["cues"]
    assert len(report) == 40 and got["unfit"] == [c["cue"] for c in report if not c["fits"]]
    for i, (c, (start, _, _)) in enumerate(zip(report, cues, strict=True)):
        assert abs(c["start_sample"] - start * rate) <= frame
        placed_end = c["start_sample"] + c["samples"]
        if i + 1 < len(cues):
            assert placed_end <= round(cues[i + 1][0] * rate), f"cue {c['cue']} runs into the next"
            assert not track[placed_end : round(cues[i + 1][0] * rate)].any(), "silence between cues"
        assert 1.0 <= c["speed"] <= MAX_SPEED
        if c["fits"]:
            assert c["cut_seconds"] == 0
        else:
            assert c["speed"] == MAX_SPEED and c["cut_seconds"] > 0
    assert not track[: round(cues[0][0] * rate)].any()
    faster = [i for i, c in enumerate(report) if c["speed"] > 1.0]
    assert faster, "no cue needed speeding up: the test would not test the fitting"
    assert any(c["fits"] for i, c in enumerate(report) if i in faster)
    # The audio at each cue's place is that cue spoken alone with the reported speed and the same seed.
    for k in (0, faster[0], faster[-1], 39):
        c = report[k]
        body = {"input": c["text"], "voice": voice("v2-tiny"), "response_format": "wav", "seed": got["seed"]}
        alone = wav_samples(
            requests.post(f"{server.url}/v1/audio/speech", json={**body, "speed": c["speed"]}, timeout=300).content
        )
        np.testing.assert_array_equal(
            track[c["start_sample"] : c["start_sample"] + c["samples"]], alone[: c["samples"]]
        )
    # The audio-only answer: the same track, the unfit cues in a header.
    plain = dub(server, srt_of(cues), report="header")
    assert plain.status_code == 200 and plain.headers["X-Dubbing-Cues"] == "40"
    assert plain.headers["X-Dubbing-Unfit"] == ",".join(str(n) for n in got["unfit"])
    np.testing.assert_array_equal(wav_samples(plain.content), track)


def test_a_cue_that_cannot_fit_is_reported_not_cut_silently(server_for):
    server = server_for("v2-tiny")
    long = "The keeper walked along the rocky shore every morning, counting all the boats that came back."
    r = dub(server, srt_of([(0.0, 0.1, long), (0.12, 1.0, "Yes.")]))
    assert r.status_code == 200, r.text
    first = r.json()["cues"][0]
    assert first["fits"] is False and first["speed"] == MAX_SPEED and first["cut_seconds"] > 0
    assert r.json()["unfit"] == [1]
    assert first["samples"] == round(0.12 * r.json()["sample_rate"])


@pytest.mark.parametrize(
    ("srt", "where"),
    [
        ("1\n00:00:01,000 --> 00:00:02,000\nHi\n\nx\n00:00:03,000 --> 00:00:04,000\nYo\n", "cue 2, line 5"),
        ("1\n00:00:01,000 -> 00:00:02,000\nHi\n", "cue 1, line 2"),
        ("1\n00:00:02,000 --> 00:00:01,000\nHi\n", "cue 1, line 2"),
        ("1\n00:00:01,000 --> 00:00:02,000\n<i></i>\n", "cue 1, line 3"),
        ("1\n00:00:05,000 --> 00:00:06,000\nHi\n\n2\n00:00:01,000 --> 00:00:02,000\nYo\n", "cue 2, line 6"),
        ("1\n", "cue 1, line 2"),
        ("\n\n", "line 1"),
    ],
)
def test_malformed_srt_is_a_4xx_naming_the_cue_and_line(server_for, srt, where):
    r = dub(server_for("v2-tiny"), srt.encode())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_srt" and error["param"] == "file"
    assert where in error["message"]


def test_dubbing_field_errors(server_for):
    server = server_for("v2-tiny")
    srt = srt_of([(0.0, 1.0, "Hi.")])
    assert dub(server, srt, voice="nobody").status_code == 404
    assert dub(server, srt, speed="9").status_code == 400
    assert dub(server, srt, report="xml").status_code == 400
    assert dub(server, srt, response_format="wma").status_code == 400
    no_file = requests.post(f"{server.url}/v1/audio/dubbing", data={"voice": voice("v2-tiny")}, timeout=60)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    binary = dub(server, b"\xff\xfe\x00bad")
    assert binary.status_code == 400 and binary.json()["error"]["code"] == "invalid_srt"


# -- continuity over HTTP -------------------------------------------------------------------------------


def test_a_request_continues_a_finished_one_by_its_request_id(server_for):
    server = server_for("v2-tiny")
    body = {"input": TEXT, "voice": voice("v2-tiny"), "response_format": "wav", "seed": SEED}
    first = requests.post(f"{server.url}/v1/audio/speech", json={**body, "continuity": True}, timeout=300)
    assert first.status_code == 200
    rid = first.headers["X-Request-ID"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]+", rid)
    nxt = {**body, "input": "Then he went home.", "previous_request_id": rid}
    follow = requests.post(f"{server.url}/v1/audio/speech", json=nxt, timeout=300)
    assert follow.status_code == 200, follow.text
    alone = requests.post(f"{server.url}/v1/audio/speech", json={**nxt, "previous_request_id": None}, timeout=300)
    assert not np.array_equal(wav_samples(follow.content), wav_samples(alone.content))  # the prompt changed it
    unknown = requests.post(f"{server.url}/v1/audio/speech", json={**nxt, "previous_request_id": "nope"}, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "previous_request_not_found"
    plain = requests.post(f"{server.url}/v1/audio/speech", json=body, timeout=300)  # continuity off: not kept
    later = {**nxt, "previous_request_id": plain.headers["X-Request-ID"]}
    assert requests.post(f"{server.url}/v1/audio/speech", json=later, timeout=60).status_code == 404
    both = {**nxt, "previous_text": "Before."}
    assert requests.post(f"{server.url}/v1/audio/speech", json=both, timeout=60).status_code == 400
    official = requests.post(
        f"{server.url}/inference_sft",
        data={"tts_text": "Then he went home.", "spk_id": voice("v2-tiny"), "previous_request_id": "nope"},
        timeout=60,
    )
    assert official.status_code == 404 and official.json()["error"]["param"] == "previous_request_id"
    official = requests.post(
        f"{server.url}/inference_sft",
        data={"tts_text": "Then he went home.", "spk_id": voice("v2-tiny"), "continuity": "maybe"},
        timeout=60,
    )
    assert official.status_code == 422 and official.json()["error"]["param"] == "continuity"


def test_a_websocket_session_with_continuity_continues_each_segment_from_the_one_before(server_for):
    server = server_for("v2-tiny")
    sentences = ("The keeper walked the shore.", "He counted the boats.")
    config = {"type": "session.config", "voice": voice("v2-tiny"), "seed": SEED, "stream": False, "continuity": True}
    frames: dict[int, bytes] = {}
    texts: dict[int, str] = {}
    with connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream", open_timeout=60, max_size=None) as ws:
        ws.send(json.dumps(config))
        assert json.loads(ws.recv(60))["type"] == "session.ready"
        for sentence in sentences:
            ws.send(json.dumps({"type": "text", "text": sentence + " "}))
        ws.send(json.dumps({"type": "close"}))
        current = None
        while True:
            message = ws.recv(300)
            if isinstance(message, bytes):
                assert current is not None
                frames[current] += message
                continue
            event = json.loads(message)
            if event["type"] == "segment.start":
                current = event["segment"]
                frames[current], texts[current] = b"", event["text"]
            elif event["type"] == "session.closed":
                break
    assert [texts[i] for i in sorted(texts)] == list(sentences)
    body = {"voice": voice("v2-tiny"), "seed": SEED, "response_format": "pcm"}
    first = requests.post(f"{server.url}/v1/audio/speech", json={**body, "input": sentences[0]}, timeout=300)
    second = requests.post(
        f"{server.url}/v1/audio/speech",
        json={**body, "input": sentences[1], "previous_text": sentences[0]},
        timeout=300,
    )
    alone = requests.post(f"{server.url}/v1/audio/speech", json={**body, "input": sentences[1]}, timeout=300)
    assert frames[0] == first.content
    assert frames[1] == second.content and frames[1] != alone.content
    with connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream", open_timeout=60) as ws:
        ws.send(json.dumps({**config, "bistream": True}))
        error = json.loads(ws.recv(60))
        assert error["type"] == "error" and error["error"]["param"] == "continuity"


def test_only_the_same_api_key_continues_a_request():
    keys = ("key-one-0123456789", "key-two-0123456789")
    app = create_app(engine("v2-tiny"), Settings(data_dir="", api_keys=keys))
    with LiveServer(app) as server:
        body = {"input": "The keeper walked the shore.", "voice": voice("v2-tiny"), "seed": SEED, "continuity": True}
        first = requests.post(
            f"{server.url}/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {keys[0]}"}, timeout=300
        )
        assert first.status_code == 200, first.text
        nxt = {**body, "input": "Home.", "previous_request_id": first.headers["X-Request-ID"]}
        other = requests.post(
            f"{server.url}/v1/audio/speech", json=nxt, headers={"Authorization": f"Bearer {keys[1]}"}, timeout=60
        )
        assert other.status_code == 404 and other.json()["error"]["code"] == "previous_request_not_found"
        same = requests.post(
            f"{server.url}/v1/audio/speech", json=nxt, headers={"Authorization": f"Bearer {keys[0]}"}, timeout=300
        )
        assert same.status_code == 200, same.text
