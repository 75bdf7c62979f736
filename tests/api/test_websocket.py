"""Text-in WebSocket streaming against a live uvicorn server on the tiny models of the three families.

Clients: a plain ``websockets`` client replaying the documented frames (both routes) and the official
``elevenlabs`` SDK. Audio of every segment is compared with ``POST /v1/audio/speech`` of the same text,
seed, rate and streaming mode (the same engine request), sample for sample.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
import pytest
import requests
import soundfile as sf
import websockets
from api_helpers import LiveServer, decode_pcm, decode_wav, wait_for
from golden import golden_root
from resources import missing
from websockets.sync.client import connect

from cosyserve.api import create_app
from cosyserve.api.ws import session as ws_session
from cosyserve.api.ws.elevenlabs import parse_output_format
from cosyserve.audio.encode import OutputFormat
from cosyserve.errors import InvalidRequest
from cosyserve.settings import Settings
from cosyserve.text.segmenter import TextSegmenter

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = pytest.mark.slow

SEED = 11
VERSIONS = ("v1-tiny", "v2-tiny", "v3-tiny")
RATES = {"v1-tiny": 22050, "v2-tiny": 16000, "v3-tiny": 24000}  # per family a different output rate
SENTENCES = ("Hello there, this is a test.", "The second sentence is a little longer.", "And a short third one!")
TIMEOUT = 60  # seconds any one exchange may take on a loaded machine


def _model_path(version: str) -> str:
    path = golden_root() / "models" / version
    if not path.is_dir():
        missing(f"golden model {version} not available")
    return str(path)


@cache
def model(version: str) -> Any:
    from cosyserve.engine.pipeline import load_model

    return load_model(_model_path(version))


@pytest.fixture(scope="module")
def server_for():
    servers: dict[str, LiveServer] = {}

    def get(version: str, **settings: Any) -> LiveServer:
        key = version + repr(sorted(settings.items()))
        if key not in servers:
            servers[key] = LiveServer(create_app(model(version), Settings(**settings))).__enter__()
        return servers[key]

    yield get
    for server in servers.values():
        server.__exit__(None, None, None)


def speaker(version: str) -> str:
    return model(version).voices.ids()[0]


def ws_url(server: LiveServer, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def engine_idle(server: LiveServer) -> bool:
    state = server.app.state.cosyserve
    stats = state.models.require().stats()
    return stats["running"] == 0 and stats["queue_depth"] == 0 and state.in_flight.value == 0


def http_pcm(server: LiveServer, version: str, text: str, rate: int, stream: bool = True) -> np.ndarray:
    body = {
        "model": "tts-1",
        "voice": speaker(version),
        "input": text,
        "response_format": "pcm",
        "sample_rate": rate,
        "seed": SEED,
        "stream": stream,
    }
    response = requests.post(server.url + "/v1/audio/speech", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return decode_pcm(response.content)


def words(sentences: tuple[str, ...]) -> list[list[str]]:
    """Each sentence as the fragments an LLM would stream: words with their trailing space."""
    return [[w + " " for w in s.split(" ")] for s in sentences]


def metric_value(server: LiveServer, name: str, **labels: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- text buffering and formats (no server) ------------------------------------------------------


def test_segmenter_cuts_at_sentence_ends_once_whitespace_follows():
    seg = TextSegmenter()
    assert seg.add("It costs 3.5 dollars") == []
    assert seg.add(".") == []  # "dollars." may still become "dollars.com": wait for the space
    assert seg.add(" Next one") == ["It costs 3.5 dollars."]
    assert seg.add("? Yes") == ["Next one?"]
    assert seg.add("你好。世界") == ["Yes你好。"]  # full-width marks cut at once
    assert seg.flush() == ["世界"]
    assert seg.flush() == [] and seg.add("... ") == []  # punctuation alone is never a segment
    assert seg.cut == 4


def test_segmenter_clause_and_length_limits():
    seg = TextSegmenter(clause_chars=lambda n: 20, max_chars=60)
    assert seg.add("Short, ") == []  # a comma before 20 characters does not cut
    assert seg.add("but now it is long enough, ") == ["Short, but now it is long enough,"]
    long = "word " * 20
    out = seg.add(long)
    assert out and all(len(s) <= 60 for s in out) and all(not s.endswith("wor") for s in out)
    assert (" ".join(out) + " " + seg.buffer).split() == long.split()
    seg.clear()
    assert seg.buffer == ""


def test_parse_output_format():
    assert parse_output_format("pcm_16000", 24000) == OutputFormat("pcm", 16000)
    assert parse_output_format("mp3_44100_128", 24000) == OutputFormat("mp3", 44100)
    for bad in ("ulaw_8000", "pcm_11025", "pcm_16000_32", "wav", "mp3_12345_64"):
        with pytest.raises(InvalidRequest) as err:
            parse_output_format(bad, 24000)
        assert err.value.param == "output_format" and bad in err.value.message


# -- the native protocol ---------------------------------------------------------------------------


async def _streamed_session(server: LiveServer, config: dict[str, Any], groups: list[list[str]]) -> dict[str, Any]:
    """Sends ``config``, then each group of text fragments but the last, fragment by fragment; the last
    group only once audio came (or after TIMEOUT s); then closes. Records every event and when things happened."""
    events: list[Any] = []
    got_audio = asyncio.Event()
    times: dict[str, float] = {}
    async with websockets.connect(ws_url(server, "/v1/audio/speech/stream"), max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.config", **config}))

        async def reader() -> None:
            async for message in ws:
                if isinstance(message, bytes) and not got_audio.is_set():
                    times["first_audio"] = time.perf_counter()
                    got_audio.set()
                events.append(message if isinstance(message, bytes) else json.loads(message))

        task = asyncio.create_task(reader())
        for group in groups[:-1]:
            for fragment in group:
                await ws.send(json.dumps({"type": "text", "text": fragment}))
                await asyncio.sleep(0.01)
            times.setdefault("first_group_sent", time.perf_counter())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(got_audio.wait(), TIMEOUT)
        times["last_fragment"] = time.perf_counter()
        for fragment in groups[-1]:
            await ws.send(json.dumps({"type": "text", "text": fragment}))
        await ws.send(json.dumps({"type": "close"}))
        await asyncio.wait_for(task, TIMEOUT)
        return {"events": events, "times": times, "close": ws.close_code}


async def _native_session(server: LiveServer, version: str, rate: int) -> dict[str, Any]:
    """Streams SENTENCES word by word; the last sentence only once audio came (or after TIMEOUT s)."""
    config = {"voice": speaker(version), "seed": SEED, "sample_rate": rate}
    return await _streamed_session(server, config, words(SENTENCES))


def split_segments(events: list[Any]) -> dict[int, dict[str, Any]]:
    """Per segment: its text and its audio (the binary frames between segment.start and segment.done)."""
    segments: dict[int, dict[str, Any]] = {}
    current = None
    for event in events:
        if isinstance(event, bytes):
            assert current is not None, "audio outside a segment"
            current["audio"] += event
        elif event["type"] == "segment.start":
            assert current is None
            current = segments[event["segment"]] = {"text": event["text"], "audio": b""}
        elif event["type"] == "segment.done":
            assert current is not None and segments[event["segment"]] is current
            current["seconds"] = event["audio_seconds"]
            current = None
    return segments


@pytest.mark.parametrize("version", VERSIONS)
def test_native_audio_before_the_last_fragment_and_equal_to_http(version, server_for):
    server, rate = server_for(version), RATES[version]
    result = asyncio.run(_native_session(server, version, rate))
    events, times = result["events"], result["times"]
    assert result["close"] == 1000
    assert events[0] == {"type": "session.ready", "format": "pcm", "sample_rate": rate, "channels": 1, "mode": "sft"}
    assert events[-1] == {"type": "session.closed"}
    assert "first_audio" in times and times["first_audio"] < times["last_fragment"], "audio waited for all the text"
    segments = split_segments(events)
    assert [segments[i]["text"] for i in sorted(segments)] == list(SENTENCES)
    for index, text in enumerate(SENTENCES):
        got = decode_pcm(segments[index]["audio"])
        want = http_pcm(server, version, text, rate)
        assert want.size > 0 and np.abs(want).max() > 0
        np.testing.assert_array_equal(got, want, err_msg=f"segment {index}: {text}")
        assert segments[index]["seconds"] == pytest.approx(got.size / rate, abs=0.01)
    wait_for(lambda: engine_idle(server), 10, "the engine to be idle")
    print(f"{version}: first audio {times['first_audio'] - times['first_group_sent']:.3f} s after the first sentence")


@contextlib.contextmanager
def _native(server: LiveServer, version: str, **config: Any) -> Iterator[Any]:
    with connect(ws_url(server, "/v1/audio/speech/stream"), open_timeout=TIMEOUT, max_size=None) as ws:
        ws.send(json.dumps({"type": "session.config", "voice": speaker(version), "seed": SEED, **config}))
        ready = json.loads(ws.recv(TIMEOUT))
        assert ready["type"] == "session.ready", ready
        yield ws


def _until(ws: Any, kind: str) -> list[Any]:
    """Messages up to and including the first JSON message of type ``kind``."""
    seen = []
    while True:
        message = ws.recv(TIMEOUT)
        seen.append(message if isinstance(message, bytes) else json.loads(message))
        if isinstance(seen[-1], dict) and seen[-1]["type"] == kind:
            return seen


def test_native_flush_keeps_the_session_open(server_for):
    server = server_for("v2-tiny")
    with _native(server, "v2-tiny") as ws:
        ws.send(json.dumps({"type": "text", "text": "No full stop here"}))
        ws.send(json.dumps({"type": "flush"}))
        seen = _until(ws, "segment.done")
        assert seen[0] == {"type": "segment.start", "segment": 0, "text": "No full stop here"}
        assert any(isinstance(m, bytes) for m in seen)
        ws.send(json.dumps({"type": "text", "text": "Still open. "}))
        seen = _until(ws, "segment.done")
        assert seen[0]["text"] == "Still open." and seen[0]["segment"] == 1
        ws.send(json.dumps({"type": "close"}))
        assert _until(ws, "session.closed")[-1] == {"type": "session.closed"}
    assert ws.close_code == 1000


def test_native_wav_is_one_stream_over_the_session(server_for):
    server = server_for("v2-tiny")
    with _native(server, "v2-tiny", response_format="wav", sample_rate=22050) as ws:
        ws.send(json.dumps({"type": "text", "text": " ".join(SENTENCES[:2])}))
        ws.send(json.dumps({"type": "close"}))
        seen = _until(ws, "session.closed")
    samples, rate = decode_wav(b"".join(m for m in seen if isinstance(m, bytes)))
    want = np.concatenate([http_pcm(server, "v2-tiny", text, 22050) for text in SENTENCES[:2]])
    assert rate == 22050
    np.testing.assert_array_equal(samples, want)


def test_native_cancel_aborts_generation_and_drops_the_buffer(server_for):
    server = server_for("v3-tiny")
    long_text = " ".join(f"Sentence number {n} goes on for a while to make audio." for n in range(12))
    with _native(server, "v3-tiny", stream=True) as ws:
        ws.send(json.dumps({"type": "text", "text": long_text + " and this is still buffered"}))
        while not isinstance(ws.recv(TIMEOUT), bytes):  # audio flows
            pass
        ws.send(json.dumps({"type": "cancel"}))
        _until(ws, "cancelled")  # everything of the cancelled text comes before this
        wait_for(lambda: engine_idle(server), 10, "the engine to stop the cancelled segments")
        ws.send(json.dumps({"type": "text", "text": "After the barge in. "}))
        ws.send(json.dumps({"type": "close"}))
        after = _until(ws, "session.closed")
    starts = [m for m in after if isinstance(m, dict) and m["type"] == "segment.start"]
    assert [m["text"] for m in starts] == ["After the barge in."]  # the buffered rest was dropped
    assert starts[0]["segment"] >= 1 and any(isinstance(m, bytes) for m in after)
    assert ws.close_code == 1000


def test_native_bad_frames_are_answered_and_the_session_goes_on(server_for):
    server = server_for("v1-tiny")
    with _native(server, "v1-tiny") as ws:
        bad = ["not json", json.dumps([1, 2]), json.dumps({"type": "nope"}), json.dumps({"type": "text", "text": 5})]
        for frame in bad:
            ws.send(frame)
        ws.send(b"\x00\x01")
        ws.send(json.dumps({"type": "session.config", "voice": speaker("v1-tiny")}))
        errors = [json.loads(ws.recv(TIMEOUT)) for _ in range(6)]
        assert all(e["type"] == "error" and e["error"]["code"] == "invalid_message" for e in errors), errors
        messages = [e["error"]["message"] for e in errors]
        assert "not valid JSON" in messages[0] and "unknown message type 'nope'" in messages[2]
        assert errors[3]["error"]["param"] == "text" and "binary frames" in messages[4]
        assert "configured already" in messages[5]
        ws.send(json.dumps({"type": "text", "text": "Still working. "}))
        ws.send(json.dumps({"type": "close"}))
        seen = _until(ws, "session.closed")
        assert any(isinstance(m, bytes) for m in seen)


@pytest.mark.parametrize(
    ("first", "code", "words_in_message"),
    [
        ({"type": "session.config", "voice": "nobody"}, "unknown_speaker", ["unknown voice 'nobody'", "中文女"]),
        ({"type": "session.config", "voice": "中文女", "response_format": "xyz"}, "invalid_request", ["xyz"]),
        ({"type": "session.config", "voice": "中文女", "speed": 9}, "invalid_request", ["speed"]),
        ({"type": "session.config", "voice": "中文女", "temperature": 1}, "invalid_request", ["temperature"]),
        ({"type": "text", "text": "hi"}, "invalid_message", ["session.config"]),
    ],
)
def test_native_bad_session_config_is_an_error_and_a_close(first, code, words_in_message, server_for):
    server = server_for("v2-tiny")
    with connect(ws_url(server, "/v1/audio/speech/stream"), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps(first))
        error = json.loads(ws.recv(TIMEOUT))
        assert error["type"] == "error" and error["error"]["code"] == code, error
        assert all(w in error["error"]["message"] for w in words_in_message), error
        with pytest.raises(websockets.ConnectionClosed):
            ws.recv(TIMEOUT)
    assert ws.close_code == 1008


@pytest.mark.parametrize("after_close", [False, True])
def test_disconnect_mid_audio_aborts_generation(after_close, server_for):
    server = server_for("v2-tiny")
    before = metric_value(server, "cosyserve_requests_total", route="/v1/audio/speech/stream", status="1006")
    with _native(server, "v2-tiny") as ws:
        ws.send(json.dumps({"type": "text", "text": "A sentence to speak. " * 12}))
        if after_close:  # the text is complete: the server no longer waits for frames, only sends
            ws.send(json.dumps({"type": "close"}))
        while not isinstance(ws.recv(TIMEOUT), bytes):
            pass
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone without a close frame
        ws.socket.close()
    wait_for(lambda: engine_idle(server), 10, "the engine to abort the session's segments")
    wait_for(
        lambda: (
            metric_value(server, "cosyserve_requests_total", route="/v1/audio/speech/stream", status="1006") > before
        ),
        10,
        "the session to be counted as gone",
    )


def test_client_that_stops_reading_ends_the_session(monkeypatch):
    monkeypatch.setattr(ws_session, "SEND_TIMEOUT_S", 1.0)
    route = "/v1/audio/speech/stream"
    server = LiveServer(create_app(model("v2-tiny"), Settings()))
    # Small socket buffers on both ends (accepted sockets inherit the listener's): they fill in a few frames.
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with server:
        sock.connect(("127.0.0.1", server.port))
        with connect(
            ws_url(server, route), sock=sock, max_queue=1, compression=None, open_timeout=TIMEOUT, close_timeout=1
        ) as ws:
            ws.send(json.dumps({"type": "session.config", "voice": speaker("v2-tiny"), "sample_rate": 48000}))
            text = " ".join(f"This is sentence {n} of a long text nobody listens to." for n in range(80))
            ws.send(json.dumps({"type": "text", "text": text}))
            ws.send(json.dumps({"type": "flush"}))
            started = time.perf_counter()
            # Never reading: the server's sends block; it gives up after SEND_TIMEOUT_S and stops generating.
            wait_for(
                lambda: metric_value(server, "cosyserve_requests_total", route=route, status="1008") > 0,
                TIMEOUT,
                "the server to end the session",
            )
            print(f"session ended {time.perf_counter() - started:.2f} s after the text was sent")
            wait_for(lambda: engine_idle(server), 10, "the engine to stop")
            # 80 sentences make some 200 s of audio: the session stopped long before.
            spoken = metric_value(server, "cosyserve_audio_seconds_total", route=route)
            assert 0 < spoken < 80, f"{spoken} s of audio generated for a client that did not read"


# -- the ElevenLabs protocol -----------------------------------------------------------------------


def _eleven_url(server: LiveServer, voice: str, **query: Any) -> str:
    from urllib.parse import quote, urlencode

    return ws_url(server, f"/v1/text-to-speech/{quote(voice)}/stream-input?{urlencode(query)}")


@pytest.mark.parametrize("version", VERSIONS)
def test_elevenlabs_frames_replayed(version, server_for):
    server, rate = server_for(version), RATES[version]
    url = _eleven_url(server, speaker(version), model_id="eleven_flash_v2_5", output_format=f"pcm_{rate}", seed=SEED)
    fragments = words(SENTENCES)
    audio, messages = b"", []
    with connect(url, open_timeout=TIMEOUT, max_size=None) as ws:
        opening = {
            "text": " ",
            "voice_settings": {"stability": 0.5, "similarity_boost": 0.8, "speed": 1.0},
            "generation_config": {"chunk_length_schedule": [120, 160, 250, 290]},
        }
        ws.send(json.dumps(opening))
        for sentence in fragments[:-1]:
            for word in sentence:
                ws.send(json.dumps({"text": word, "try_trigger_generation": False}))
        first = json.loads(ws.recv(TIMEOUT))  # audio arrives before the last sentence is sent
        assert first["audio"] and first["isFinal"] is False, first
        assert first["normalizedAlignment"] is None and first["alignment"] is None
        messages.append(first)
        ws.send(json.dumps({"text": "".join(fragments[-1]), "flush": True}))
        ws.send(json.dumps({"text": ""}))
        for raw in ws:
            messages.append(json.loads(raw))
    assert ws.close_code == 1000
    assert messages[-1]["isFinal"] is True and not messages[-1]["audio"]
    assert all(m["isFinal"] is False and m["audio"] for m in messages[:-1])
    audio = b"".join(base64.b64decode(m["audio"]) for m in messages[:-1])
    want = np.concatenate([http_pcm(server, version, text, rate) for text in SENTENCES])
    np.testing.assert_array_equal(decode_pcm(audio), want)
    wait_for(lambda: engine_idle(server), 10, "the engine to be idle")


@pytest.mark.parametrize(
    ("voice", "query", "error"),
    [
        ("nobody", {"output_format": "pcm_16000"}, "unknown_speaker"),
        ("中文女", {"output_format": "ulaw_8000"}, "invalid_request"),
        ("中文女", {"model_id": "gpt-9"}, "model_not_found"),
        ("中文女", {"inactivity_timeout": "999"}, "invalid_request"),
    ],
)
def test_elevenlabs_bad_session_is_an_error_and_a_close(voice, query, error, server_for):
    server = server_for("v2-tiny")
    with connect(_eleven_url(server, voice, **query), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"text": " "}))
        message = json.loads(ws.recv(TIMEOUT))
        assert message["error"] == error and message["code"] == 1008 and message["message"], message
        with pytest.raises(websockets.ConnectionClosed):
            ws.recv(TIMEOUT)
    assert ws.close_code == 1008


def test_elevenlabs_bad_frame_closes(server_for):
    server = server_for("v2-tiny")
    with connect(_eleven_url(server, "中文女", output_format="pcm_16000"), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"text": " "}))
        ws.send(json.dumps({"text": 3}))
        message = json.loads(ws.recv(TIMEOUT))
        assert message["error"] == "invalid_message" and "text must be a string" in message["message"]
        with pytest.raises(websockets.ConnectionClosed):
            ws.recv(TIMEOUT)
    assert ws.close_code == 1008


def test_elevenlabs_inactivity_timeout(server_for):
    server = server_for("v2-tiny")
    url = _eleven_url(server, "中文女", output_format="pcm_16000", inactivity_timeout=1)
    with connect(url, open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"text": " "}))
        message = json.loads(ws.recv(TIMEOUT))  # nothing more is sent: the server gives up after 1 s
        assert message["error"] == "input_timeout_exceeded" and "1 seconds" in message["message"]
        with pytest.raises(websockets.ConnectionClosed):
            ws.recv(TIMEOUT)
    assert ws.close_code == 1008


def test_model_still_loading_is_try_again_later():
    loaded = threading.Event()

    def loader() -> Any:
        loaded.wait(TIMEOUT)
        return model("v2-tiny")

    with LiveServer(create_app(loader, Settings())) as server:
        try:
            with connect(ws_url(server, "/v1/audio/speech/stream"), open_timeout=TIMEOUT) as ws:
                ws.send(json.dumps({"type": "session.config", "voice": "中文女"}))
                error = json.loads(ws.recv(TIMEOUT))
                assert error["error"]["code"] == "model_not_ready", error
                with pytest.raises(websockets.ConnectionClosed):
                    ws.recv(TIMEOUT)
            assert ws.close_code == 1013
        finally:
            loaded.set()


def test_elevenlabs_sdk_convert_realtime(server_for):
    from elevenlabs.client import ElevenLabs

    server = server_for("v2-tiny")
    client = ElevenLabs(base_url=server.url, api_key="not-needed")
    # The SDK turns any base URL into wss:// (it assumes TLS); a plain local server speaks ws://.
    client.text_to_speech._ws_base_url = server.url.replace("http://", "ws://")
    pcm = b"".join(
        client.text_to_speech.convert_realtime(
            speaker("v2-tiny"), text=iter(SENTENCES), model_id="eleven_flash_v2_5", output_format="pcm_16000"
        )
    )
    samples = decode_pcm(pcm)
    assert samples.size > 16000 * 0.5 and np.abs(samples).max() > 0
    mp3 = b"".join(
        client.text_to_speech.convert_realtime(
            speaker("v2-tiny"), text=iter(SENTENCES[:1]), output_format="mp3_44100_128"
        )
    )
    decoded, rate = sf.read(io.BytesIO(mp3), dtype="int16")
    assert rate == 44100 and decoded.size > 44100 * 0.3
    from elevenlabs.core.api_error import ApiError

    with pytest.raises(ApiError) as err:
        b"".join(client.text_to_speech.convert_realtime("nobody", text=iter(["Hi. "]), output_format="pcm_16000"))
    assert err.value.body["error"] == "unknown_speaker"
    wait_for(lambda: engine_idle(server), 10, "the engine to be idle")


# -- API keys and metrics --------------------------------------------------------------------------


def test_api_keys_on_both_routes(server_for):
    server = server_for("v2-tiny", api_keys=("s3cret",))
    native = ws_url(server, "/v1/audio/speech/stream")
    with pytest.raises(websockets.InvalidStatus):
        connect(native, open_timeout=TIMEOUT).close()
    with connect(native, additional_headers={"Authorization": "Bearer s3cret"}, open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"type": "session.config", "voice": "中文女"}))
        assert json.loads(ws.recv(TIMEOUT))["type"] == "session.ready"
    for url, headers in (
        (_eleven_url(server, "中文女", output_format="pcm_16000", api_key="s3cret"), {}),
        (_eleven_url(server, "中文女", output_format="pcm_16000"), {"xi-api-key": "s3cret"}),
    ):
        with connect(url, additional_headers=headers, open_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"text": " "}))
            ws.send(json.dumps({"text": "Hi there. "}))
            ws.send(json.dumps({"text": ""}))
            assert json.loads(ws.recv(TIMEOUT))["audio"]
    with pytest.raises(websockets.InvalidStatus):
        connect(_eleven_url(server, "中文女", api_key="wrong"), open_timeout=TIMEOUT).close()


def test_api_key_in_the_opening_message_on_an_exempt_route(server_for):
    exempt = ("/health", "/metrics", "/v1/text-to-speech/*")
    server = server_for("v2-tiny", api_keys=("s3cret",), auth_exempt=exempt)
    url = _eleven_url(server, "中文女", output_format="pcm_16000")
    with connect(url, open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"text": " ", "xi_api_key": "s3cret"}))
        ws.send(json.dumps({"text": "Hi there. "}))
        ws.send(json.dumps({"text": ""}))
        assert json.loads(ws.recv(TIMEOUT))["audio"]
    with connect(url, open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"text": " ", "xi_api_key": "wrong"}))
        assert json.loads(ws.recv(TIMEOUT))["error"] == "invalid_api_key"
    assert ws.close_code == 1008


def test_sessions_in_metrics(server_for):
    server = server_for("v3-tiny")
    route = "/v1/text-to-speech/{voice_id}/stream-input"
    before = metric_value(server, "cosyserve_requests_total", route=route, method="WEBSOCKET", status="1000")
    with connect(_eleven_url(server, "中文女", output_format="pcm_24000"), open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"text": " "}))
        ws.send(json.dumps({"text": "Count me. "}))
        ws.send(json.dumps({"text": ""}))
        for _ in ws:
            pass
    wait_for(
        lambda: (
            metric_value(server, "cosyserve_requests_total", route=route, method="WEBSOCKET", status="1000") > before
        ),
        10,
        "the session to be counted",
    )
    assert metric_value(server, "cosyserve_audio_seconds_total", route=route, mode="sft") > 0
    assert metric_value(server, "cosyserve_first_chunk_seconds_count", route=route, mode="sft") > 0


# -- bistream: the text streamed into the model as it arrives ---------------------------------------


async def _bistream_session(server: LiveServer, version: str) -> dict[str, Any]:
    """Streams SENTENCES word by word into one bistream utterance; the last word only once audio came."""
    config = {"voice": speaker(version), "seed": SEED, "bistream": True}
    return await _streamed_session(server, config, [[w] for sentence in words(SENTENCES) for w in sentence])


@pytest.mark.parametrize("version", ["v2-tiny", "v3-tiny"])
def test_bistream_audio_before_the_last_fragment(version, server_for):
    server = server_for(version)
    result = asyncio.run(_bistream_session(server, version))
    events, times = result["events"], result["times"]
    assert result["close"] == 1000 and events[0]["type"] == "session.ready" and events[-1] == {"type": "session.closed"}
    assert "first_audio" in times and times["first_audio"] < times["last_fragment"], "audio waited for all the text"
    segments = split_segments(events)
    assert list(segments) == [0], "one utterance for the whole text"
    done = next(e for e in events if isinstance(e, dict) and e["type"] == "segment.done")
    assert done["text"] == " ".join(SENTENCES)
    audio = decode_pcm(segments[0]["audio"])
    assert audio.size > 0 and np.abs(audio).max() > 0
    assert segments[0]["seconds"] == pytest.approx(audio.size / 24000, abs=0.01)
    wait_for(lambda: engine_idle(server), 10, "the engine to be idle")


def test_bistream_flush_ends_an_utterance_and_cancel_drops_it(server_for):
    server = server_for("v2-tiny")
    with _native(server, "v2-tiny", bistream=True) as ws:
        for word in words(SENTENCES[:1])[0]:
            ws.send(json.dumps({"type": "text", "text": word}))
        ws.send(json.dumps({"type": "flush"}))
        seen = _until(ws, "segment.done")
        assert seen[0]["type"] == "segment.start" and seen[0]["segment"] == 0
        assert seen[-1]["text"] == SENTENCES[0] and any(isinstance(m, bytes) for m in seen)
        ws.send(json.dumps({"type": "text", "text": "A long text that is cut off by a barge in " * 4}))
        while not isinstance(ws.recv(TIMEOUT), bytes):  # the second utterance speaks before its text ends
            pass
        ws.send(json.dumps({"type": "cancel"}))
        _until(ws, "cancelled")
        wait_for(lambda: engine_idle(server), 10, "the engine to stop the cancelled utterance")
        ws.send(json.dumps({"type": "text", "text": "After the barge in."}))
        ws.send(json.dumps({"type": "close"}))
        after = _until(ws, "session.closed")
    done = [m for m in after if isinstance(m, dict) and m["type"] == "segment.done"]
    assert [m["text"] for m in done] == ["After the barge in."]
    assert ws.close_code == 1000


def test_bistream_disconnect_mid_text_leaves_the_engine_idle(server_for):
    server = server_for("v2-tiny")
    with _native(server, "v2-tiny", bistream=True) as ws:
        ws.send(json.dumps({"type": "text", "text": "A sentence to speak while more text is still to come. " * 3}))
        while not isinstance(ws.recv(TIMEOUT), bytes):
            pass
        assert server.app.state.cosyserve.models.require().stats()["running"] == 1  # waiting for the rest of the text
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone without a close frame, the text never closed
        ws.socket.close()
    wait_for(lambda: engine_idle(server), 10, "the engine to abort the utterance")


@pytest.mark.parametrize(
    ("version", "route", "words_in_message"),
    [
        ("v1-tiny", "native", ["bistream needs a CosyVoice2", "cosyvoice1"]),
        ("v2-tiny", "native-bad-type", ["bistream"]),
        ("v1-tiny", "elevenlabs", ["bistream needs a CosyVoice2"]),
        ("v2-tiny", "elevenlabs-bad-value", ["bistream must be true or false"]),
    ],
)
def test_bistream_bad_use_is_an_error_frame_and_a_close(version, route, words_in_message, server_for):
    server = server_for(version)
    if route.startswith("native"):
        value = "yes please" if route == "native-bad-type" else True
        with connect(ws_url(server, "/v1/audio/speech/stream"), open_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"type": "session.config", "voice": speaker(version), "bistream": value}))
            error = json.loads(ws.recv(TIMEOUT))
            assert error["type"] == "error" and error["error"]["param"] == "bistream", error
            message = error["error"]["message"]
            with pytest.raises(websockets.ConnectionClosed):
                ws.recv(TIMEOUT)
    else:
        value = "maybe" if route == "elevenlabs-bad-value" else "true"
        url = _eleven_url(server, speaker(version), output_format="pcm_16000", bistream=value)
        with connect(url, open_timeout=TIMEOUT) as ws:
            ws.send(json.dumps({"text": " "}))
            error = json.loads(ws.recv(TIMEOUT))
            assert error["param"] == "bistream" and error["code"] == 1008, error
            message = error["message"]
            with pytest.raises(websockets.ConnectionClosed):
                ws.recv(TIMEOUT)
    assert all(w in message for w in words_in_message), message
    assert ws.close_code == 1008


def test_elevenlabs_bistream(server_for):
    server = server_for("v3-tiny")
    url = _eleven_url(server, speaker("v3-tiny"), output_format="pcm_24000", seed=SEED, bistream="true")
    fragments = [w for sentence in words(SENTENCES) for w in sentence]
    with connect(url, open_timeout=TIMEOUT, max_size=None) as ws:
        ws.send(json.dumps({"text": " "}))
        for word in fragments[:-1]:
            ws.send(json.dumps({"text": word}))
        first = json.loads(ws.recv(TIMEOUT))  # audio before the last word is sent
        assert first["audio"] and first["isFinal"] is False, first
        ws.send(json.dumps({"text": fragments[-1]}))
        ws.send(json.dumps({"text": ""}))
        messages = [first] + [json.loads(raw) for raw in ws]
    assert ws.close_code == 1000 and messages[-1]["isFinal"] is True
    assert decode_pcm(b"".join(base64.b64decode(m["audio"]) for m in messages[:-1])).size > 0
    wait_for(lambda: engine_idle(server), 10, "the engine to be idle")
