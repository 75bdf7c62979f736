"""Unit tests of the HTTP layer against a stub engine (the real engine is in test_api_official.py)."""

from __future__ import annotations

import http.client
import io
import itertools
import logging
import socket
import threading
import time

import numpy as np
import pytest
import requests
from api_helpers import LiveServer, decode_pcm, decode_wav, wait_for, wav_bytes
from fastapi.testclient import TestClient

from cosyserve.api import create_app
from cosyserve.audio.encode import to_int16
from cosyserve.audio.prompt import PromptLimits
from cosyserve.errors import TextError, UnknownSpeaker
from cosyserve.settings import Settings

RATE = 24000
ALL_MODES = ("sft", "zero_shot", "cross_lingual", "instruct", "instruct2", "vc")


# The fields each mode reads, in the order the stub records them (the official API's argument order).
ARGS = {
    "sft": ("text", "spk_id"),
    "zero_shot": ("text", "prompt_text", "prompt_audio"),
    "cross_lingual": ("text", "prompt_audio"),
    "instruct": ("text", "spk_id", "instruct_text"),
    "instruct2": ("text", "instruct_text", "prompt_audio"),
    "vc": ("source_audio", "prompt_audio"),
}


class StubSequence:
    def __init__(self, request_id, chunks):
        self.request_id = request_id
        self.chunks = chunks
        self.failed = None


class StubLoop:
    """One chunk per running sequence per step, like the real generation loop's interface."""

    def __init__(self):
        self.sequences = []
        self.last_batch_size = self.llm_steps = self.llm_tokens = 0

    @property
    def scheduler(self):  # the stats the core reads
        return self

    def bind_thread(self):
        pass

    @property
    def has_work(self):
        return bool(self.sequences)

    @property
    def runnable(self):  # no stub sequence waits for streamed text
        return self.has_work

    def add(self, sequence):
        self.sequences.append(sequence)

    def remove(self, sequence):
        sequence.chunks.close()
        if sequence in self.sequences:
            self.sequences.remove(sequence)

    def step(self):
        out = []
        self.last_batch_size = len(self.sequences)
        for sequence in list(self.sequences):
            try:
                out.append((sequence, next(sequence.chunks)))
            except StopIteration:
                self.remove(sequence)
                out.append((sequence, None))
            except Exception as exc:
                sequence.failed = exc
                self.remove(sequence)
                out.append((sequence, None))
        return out


class StubModel:
    """A model stand-in under the real engine client and core: deterministic noise per seed (with
    overshoots beyond +-1), optional delays / failure, and a record of every request."""

    def __init__(self, family="cosyvoice2", modes=ALL_MODES, speakers=("spk_a", "spk_b"), chunks=3, chunk_len=480):
        self.family = family
        self.sample_rate = RATE
        self.token_rate = 25
        self.prompt_limits = PromptLimits()
        self.precision = {"llm": "fp32", "flow": "fp32", "vocoder": "fp32"}
        self.modes = frozenset(modes)
        self.model_dir = "/models/stub-model"
        self.speakers = list(speakers)
        self.n_chunks = chunks
        self.chunk_len = chunk_len
        self.delay = 0.0
        self.eager_delay = 0.0
        self.eager_error: Exception | None = None
        self.fail_at: int | None = None
        self.calls: list[tuple[str, tuple, dict]] = []
        self.records: list[dict] = []
        self.active = 0
        self.peak = 0
        self._lock = threading.Lock()

    def list_speakers(self):
        return list(self.speakers)

    def expected(self, seed, n_chunks=None):
        rng = np.random.default_rng(seed)
        return np.concatenate(
            [rng.uniform(-1.1, 1.1, self.chunk_len).astype(np.float32) for _ in range(n_chunks or self.n_chunks)]
        )

    def new_loop(self):
        return StubLoop()

    def prepare(self, request, *, request_id="", **overrides):
        mode, o = request.mode, request.options
        options = {"stream": o.stream, "speed": o.speed, "seed": o.seed}
        if request.spk_id is not None and "spk_id" not in ARGS[mode]:
            options["spk_id"] = request.spk_id
        self.calls.append((mode, tuple(getattr(request, f) for f in ARGS[mode]), options))
        time.sleep(self.eager_delay)
        if self.eager_error is not None:
            raise self.eager_error
        if "spk_id" in ARGS[mode] and request.spk_id not in self.speakers:
            known = ", ".join(self.speakers)
            raise UnknownSpeaker(f"unknown speaker '{request.spk_id}'; known speakers: {known}", "spk_id")
        record = {"produced": 0, "closed": False}
        self.records.append(record)

        def chunks():
            rng = np.random.default_rng(o.seed)
            with self._lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            try:
                for i in range(self.n_chunks):
                    if self.fail_at == i:
                        raise RuntimeError("stub failure")
                    time.sleep(self.delay)
                    record["produced"] += 1
                    yield rng.uniform(-1.1, 1.1, self.chunk_len).astype(np.float32)
            finally:
                record["closed"] = True
                with self._lock:
                    self.active -= 1

        return StubSequence(request_id, chunks())


PROMPT = wav_bytes(1.0, 16000)
SOURCE = wav_bytes(0.8, 44100, channels=2, seed=1)
TEXTS = {
    "tts_text": "你好，世界。",
    "spk_id": "spk_a",
    "prompt_text": "希望你以后能够做的比我还好呦。",
    "instruct_text": "慢一点",
}
NEEDS = {
    "sft": (("tts_text", "spk_id"), ()),
    "zero_shot": (("tts_text", "prompt_text"), ("prompt_wav",)),
    "cross_lingual": (("tts_text",), ("prompt_wav",)),
    "instruct": (("tts_text", "spk_id", "instruct_text"), ()),
    "instruct2": (("tts_text", "instruct_text"), ("prompt_wav",)),
    "vc": ((), ("source_wav", "prompt_wav")),
}


def form(mode, **extra):
    texts, uploads = NEEDS[mode]
    data = {k: TEXTS[k] for k in texts} | extra
    files = {k: (f"{k}.wav", PROMPT if k == "prompt_wav" else SOURCE, "audio/wav") for k in uploads}
    return data, files


@pytest.fixture
def stub():
    return StubModel()


@pytest.fixture
def client(stub):
    with TestClient(create_app(stub, Settings(max_text_length=50, max_upload_bytes=1_000_000))) as c:
        yield c


def assert_error(resp, status, code, param="<any>"):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param != "<any>":
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_every_route_with_form_body(client, stub, mode, method):
    data, files = form(mode, seed="7", format="pcm")
    resp = client.request(method, f"/inference_{mode}", data=data, files=files or None)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-sample-rate"] == str(RATE) and resp.headers["x-channels"] == "1"
    np.testing.assert_array_equal(decode_pcm(resp.content), to_int16(stub.expected(7)))
    called_mode, args, options = stub.calls[-1]
    assert called_mode == mode and options == {"stream": False, "speed": 1.0, "seed": 7}
    texts, uploads = NEEDS[mode]
    for value, name in zip(args, texts + uploads, strict=True):
        if name.endswith("_wav"):
            wave, sr = value  # decoded once by the HTTP layer: (channels, N) float32 and the file's rate
            assert sr == (16000 if name == "prompt_wav" else 44100) and wave.dtype == np.float32
            assert wave.shape[0] == (1 if name == "prompt_wav" else 2)
        else:
            assert value == TEXTS[name]


@pytest.mark.parametrize("mode", ["sft", "instruct"])
def test_get_with_query_parameters(client, stub, mode):
    data, _ = form(mode)
    resp = client.get(f"/inference_{mode}", params=data | {"seed": "3", "stream": "true"})
    assert resp.status_code == 200, resp.text
    samples, rate = decode_wav(resp.content)
    assert rate == RATE
    np.testing.assert_array_equal(samples, to_int16(stub.expected(3)))
    assert stub.calls[-1][2]["stream"] is True


def test_urlencoded_post(client, stub):
    resp = client.post(
        "/inference_sft",
        content="tts_text=hello&spk_id=spk_b&speed=1.5",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 200, resp.text
    assert stub.calls[-1][1] == ("hello", "spk_b") and stub.calls[-1][2]["speed"] == 1.5


def test_raw_utf8_urlencoded_body_like_curl_d(client, stub):
    # curl -d tts_text=你好 sends the UTF-8 bytes unencoded; they must not turn into mojibake.
    body = "tts_text=你好，世界&spk_id=spk_b&instruct_text=用四川话说".encode()
    resp = client.post(
        "/inference_instruct", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert resp.status_code == 200, resp.text
    assert stub.calls[-1][1] == ("你好，世界", "spk_b", "用四川话说")
    resp = client.post(
        "/inference_sft",
        content=b"tts_text=\xff&spk_id=spk_a",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_error(resp, 400, "malformed_body")


def test_wav_sizes_exact_unless_streaming(client, stub):
    data, _ = form("sft", seed="1")
    whole = client.post("/inference_sft", data=data)
    n = stub.n_chunks * stub.chunk_len
    assert whole.headers["content-type"] == "audio/wav"
    assert int(whole.headers["content-length"]) == len(whole.content) == 44 + 2 * n
    assert int.from_bytes(whole.content[40:44], "little") == 2 * n
    streamed = client.post("/inference_sft", data=data | {"stream": "true"})
    assert streamed.content[4:8] == b"\xff\xff\xff\xff" and streamed.content[40:44] == b"\xff\xff\xff\xff"
    assert streamed.content[44:] == whole.content[44:]
    samples, rate = decode_wav(whole.content)
    assert rate == RATE and samples.shape == (n,)
    assert samples.max() == 32767 and samples.min() == -32768  # overshoots clipped, not wrapped


@pytest.mark.parametrize(
    ("mode", "data", "status", "code", "param"),
    [
        ("sft", {"spk_id": "spk_a"}, 422, "missing_field", "tts_text"),
        ("sft", {"tts_text": "   ", "spk_id": "spk_a"}, 422, "missing_field", "tts_text"),
        ("sft", {"tts_text": "hi"}, 422, "missing_field", "spk_id"),
        ("sft", {"tts_text": "x" * 51, "spk_id": "spk_a"}, 422, "invalid_text", "tts_text"),
        ("zero_shot", {"tts_text": "hi", "prompt_text": "y" * 51}, 422, "invalid_text", "prompt_text"),
        ("sft", {"tts_text": "hi", "spk_id": "nobody"}, 404, "unknown_speaker", "spk_id"),
        ("sft", {"tts_text": "hi", "spk_id": "spk_a", "stream": "maybe"}, 422, "invalid_request", "stream"),
        ("sft", {"tts_text": "hi", "spk_id": "spk_a", "speed": "fast"}, 422, "invalid_request", "speed"),
        ("sft", {"tts_text": "hi", "spk_id": "spk_a", "speed": "-1"}, 422, "invalid_request", "speed"),
        ("sft", {"tts_text": "hi", "spk_id": "spk_a", "seed": "-3"}, 422, "invalid_request", "seed"),
        ("sft", {"tts_text": "hi", "spk_id": "spk_a", "format": "aiff"}, 422, "invalid_request", "format"),
        ("zero_shot", {"tts_text": "hi", "prompt_text": "p"}, 422, "missing_field", "prompt_wav"),
        (
            "zero_shot",
            {"tts_text": "hi", "prompt_text": "p", "prompt_wav": "x.wav"},
            422,
            "invalid_audio",
            "prompt_wav",
        ),
    ],
)
def test_bad_fields(client, mode, data, status, code, param):
    for method in ("GET", "POST"):
        err = assert_error(client.request(method, f"/inference_{mode}", data=data), status, code, param)
    if code == "unknown_speaker":
        assert "spk_a" in err["message"] and "spk_b" in err["message"]


@pytest.mark.parametrize(
    ("audio", "fragment"),
    [
        (b"", "empty"),
        (b"definitely not audio" * 10, "decode"),
        (wav_bytes(0.3, 16000), "0.5"),
        (wav_bytes(31.0, 16000, subtype="PCM_U8"), "30"),
        (wav_bytes(1.0, 8000), "16000"),
    ],
    ids=["empty", "garbage", "short", "long", "8k"],
)
@pytest.mark.parametrize("name", ["prompt_wav", "source_wav"])
def test_bad_audio(client, stub, audio, fragment, name):
    files = {"prompt_wav": ("p.wav", PROMPT), "source_wav": ("s.wav", SOURCE)} | {name: ("bad.wav", audio)}
    resp = client.post("/inference_vc", files=files)
    err = assert_error(resp, 422, "invalid_audio", name)
    assert fragment in err["message"]
    assert not stub.calls  # rejected before the engine was called


def test_upload_limit(client):
    big = wav_bytes(20.0, 16000, subtype="FLOAT")  # 1.28 MB > 1 MB
    data, _ = form("zero_shot")
    assert_error(
        client.post("/inference_zero_shot", data=data, files={"prompt_wav": ("p.wav", big)}), 413, "payload_too_large"
    )

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b"tts_text=" + b"a" * 600_000
        yield b"a" * 600_000

    resp = client.post(
        "/inference_sft", content=chunked(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_error(resp, 413, "payload_too_large")


def test_unparseable_bodies(client):
    assert_error(client.post("/inference_sft", json={"tts_text": "hi", "spk_id": "spk_a"}), 400, "malformed_body")
    resp = client.post("/inference_sft", content=b"garbage", headers={"Content-Type": "multipart/form-data"})
    assert_error(resp, 400, "malformed_body")


@pytest.mark.parametrize(
    ("family", "modes", "mode", "hint"),
    [
        ("cosyvoice2", ("zero_shot", "cross_lingual", "instruct2", "vc"), "instruct", "CosyVoice-300M-Instruct"),
        ("cosyvoice1", ("sft", "zero_shot", "cross_lingual", "instruct", "vc"), "instruct2", "CosyVoice2"),
        ("cosyvoice2", ("zero_shot", "cross_lingual", "instruct2", "vc"), "sft", "CosyVoice-300M-SFT"),
    ],
)
def test_unsupported_mode_says_which_model_would(family, modes, mode, hint):
    with TestClient(create_app(StubModel(family=family, modes=modes))) as c:
        data, files = form(mode)
        err = assert_error(c.post(f"/inference_{mode}", data=data, files=files or None), 400, "unsupported_mode")
        assert hint in err["message"]


def test_engine_validation_errors_are_4xx(client, stub):
    stub.eager_error = TextError("tts_text has nothing to speak", "tts_text")
    assert_error(client.post("/inference_sft", data=form("sft")[0]), 422, "invalid_text", "tts_text")


def test_unknown_route_and_method(client):
    assert_error(client.get("/inference_nothing"), 404, "not_found")
    assert_error(client.put("/inference_sft"), 405, "method_not_allowed")


def test_request_id(client):
    data, _ = form("sft")
    assert len(client.post("/inference_sft", data=data).headers["x-request-id"]) >= 16
    assert (
        client.post("/inference_sft", data=data, headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    assert client.get("/health", headers={"X-Request-ID": "bad id\twith junk"}).headers["x-request-id"] != "bad id"


def test_health_speakers_and_loading():
    release = threading.Event()
    model = StubModel()

    def loader():
        release.wait(20)
        return model

    with TestClient(create_app(loader)) as c:
        resp = c.get("/health")
        assert resp.status_code == 503 and resp.json()["status"] == "loading"
        resp = c.post("/inference_sft", data=form("sft")[0])
        assert_error(resp, 503, "model_not_ready")
        assert resp.headers.get("retry-after")
        release.set()
        wait_for(lambda: c.get("/health").status_code == 200, 10, "model loaded")
        body = c.get("/health").json()
        assert body["family"] == "cosyvoice2" and body["sample_rate"] == RATE and body["in_flight"] == 0
        assert body["modes"] == sorted(ALL_MODES)
        assert c.get("/speakers").json() == {"speakers": ["spk_a", "spk_b"]}


def test_health_after_failed_load():
    def loader():
        raise RuntimeError("no such model")

    with TestClient(create_app(loader)) as c:
        wait_for(lambda: c.get("/health").json()["status"] == "error", 10, "load failure")
        assert "no such model" in c.get("/health").json()["error"]
        assert "no such model" in assert_error(c.get("/speakers"), 503, "model_not_ready")["message"]


def test_cors_default_is_any_origin_without_credentials(client):
    pre = client.options(
        "/inference_zero_shot",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in pre.headers
    resp = client.post("/inference_sft", data=form("sft")[0], headers={"Origin": "https://app.example"})
    assert resp.headers["access-control-allow-origin"] == "*"
    exposed = resp.headers["access-control-expose-headers"].lower()
    assert "x-sample-rate" in exposed and "x-channels" in exposed


def test_cors_configured_origins():
    settings = Settings(cors_origins=("https://good.example",), cors_allow_credentials=True)
    with TestClient(create_app(StubModel(), settings)) as c:
        good = c.get("/health", headers={"Origin": "https://good.example"})
        assert good.headers["access-control-allow-origin"] == "https://good.example"
        assert good.headers["access-control-allow-credentials"] == "true"
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "https://evil.example"}).headers
    with TestClient(create_app(StubModel(), Settings(cors_origins=()))) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "https://x.example"}).headers


def test_openapi_documents_every_route_and_field(client):
    spec = client.get("/openapi.json").json()
    for mode, (texts, uploads) in NEEDS.items():
        ops = spec["paths"][f"/inference_{mode}"]
        assert set(ops) >= {"get", "post"}
        schema = ops["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        # A stored voice (spk_id) can stand in for the prompt recording and its transcript.
        prompt_fields = {"prompt_wav", "prompt_text"}
        takes_prompt = "prompt_wav" in uploads
        options = {"stream", "speed", "seed", "format", "sample_rate"} | ({"spk_id"} if takes_prompt else set())
        # The lexicon's entries for the text, and continuity (sentence to sentence, request to request).
        options |= {"pronunciations", "continuity", "previous_request_id"} if texts else set()
        assert set(schema["properties"]) == {*texts, *uploads} | options
        assert set(schema["required"]) == {*texts, *uploads} - (prompt_fields if takes_prompt else set())
        assert {p["name"] for p in ops["get"]["parameters"]} >= set(texts)
    assert {"/health", "/speakers"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


# -- behaviour on a real server: threads, disconnects, failures ----------------------------------------


def _raw_request(port, path, body: bytes, content_type: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


@pytest.mark.parametrize("stream", ["true", "false"])
def test_disconnect_stops_generation(stream):
    stub = StubModel(chunks=400)
    stub.delay = 0.02
    app = create_app(stub)
    with LiveServer(app) as server:
        sock = _raw_request(
            server.port,
            "/inference_sft",
            f"tts_text=hi&spk_id=spk_a&stream={stream}".encode(),
            "application/x-www-form-urlencoded",
        )
        wait_for(lambda: stub.records and stub.records[0]["produced"] >= 3, 10, "generation to start")
        if stream == "true":
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()
        closed_at = stub.records[0]["produced"]
        wait_for(lambda: stub.records[0]["closed"], 5, "generation to stop")
        assert stub.records[0]["produced"] <= closed_at + 2, "generation ran on after the disconnect"
        wait_for(lambda: app.state.cosyserve.in_flight.value == 0, 5, "in-flight count back to 0")
        assert requests.get(server.url + "/health").json()["in_flight"] == 0


def test_failure_mid_stream_cuts_the_stream_and_server_keeps_serving(caplog):
    stub = StubModel(chunks=4)
    stub.fail_at = 2
    app = create_app(stub)
    data = form("sft")[0]
    with LiveServer(app) as server, caplog.at_level(logging.ERROR, logger="cosyserve.api"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request(
            "POST",
            "/inference_sft",
            body="tts_text=hi&spk_id=spk_a&stream=true&format=pcm",
            headers={"Content-Type": "application/x-www-form-urlencoded", "X-Request-ID": "req-fail-1"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
        assert any("req-fail-1" in r.getMessage() for r in caplog.records)
        # Buffered (non-streaming WAV): nothing was sent yet, so it becomes a JSON 500.
        resp = requests.post(server.url + "/inference_sft", data=data)
        assert_error(resp, 500, "generation_failed")
        stub.fail_at = None
        resp = requests.post(server.url + "/inference_sft", data=data | {"seed": "5"})
        assert resp.status_code == 200
        np.testing.assert_array_equal(decode_wav(resp.content)[0], to_int16(stub.expected(5)))
        wait_for(lambda: app.state.cosyserve.in_flight.value == 0, 5, "in-flight count back to 0")


def test_concurrent_requests_overlap_and_get_their_own_audio():
    stub = StubModel(chunks=6)
    stub.delay = 0.03
    stub.eager_delay = 0.05
    with LiveServer(create_app(stub)) as server:
        results: dict[int, bytes] = {}

        def call(seed):
            data = form("zero_shot")[0] | {"seed": str(seed), "stream": "true"}
            resp = requests.post(
                server.url + "/inference_zero_shot",
                data=data,
                files={"prompt_wav": ("p.wav", io.BytesIO(PROMPT))},
                timeout=30,
            )
            assert resp.status_code == 200
            results[seed] = resp.content

        threads = [threading.Thread(target=call, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        # The event loop stays free while 8 generations run in their threads.
        start = time.monotonic()
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 1.0
        for t in threads:
            t.join(30)
    assert stub.peak >= 2, "requests did not run concurrently"
    for seed, body in results.items():
        np.testing.assert_array_equal(decode_wav(body)[0], to_int16(stub.expected(seed)))
    assert len(results) == 8


def test_admission_caps_running_generations_and_turns_away_beyond_the_queue():
    stub = StubModel(chunks=5)
    stub.delay = 0.05
    app = create_app(stub, Settings(max_concurrency=2, max_queue=2))
    with LiveServer(app) as server:
        statuses: list[int] = []

        def call(seed):
            resp = requests.post(server.url + "/inference_sft", data=form("sft")[0] | {"seed": str(seed)}, timeout=30)
            statuses.append(resp.status_code)
            if resp.status_code == 503:
                assert_error(resp, 503, "server_busy")
                assert resp.headers["Retry-After"]

        threads = [threading.Thread(target=call, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        wait_for(lambda: app.state.cosyserve.in_flight.value == 0, 5, "in-flight count back to 0")
    assert stub.peak <= 2, f"{stub.peak} generations ran at once with max_concurrency=2"
    assert statuses.count(200) >= 4, statuses  # 2 running + 2 queued at the least
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses


def test_waiting_requests_are_served_first_come_first_served():
    """16 identical clients, one slot: admission is first come, first served. Between two admissions of
    one client every other client is admitted at most once (each waits one round at most), and the worst
    wait stays within 1.5x the FIFO ideal (16 service times)."""
    stub = StubModel(chunks=2)
    stub.delay = 0.01
    clients, rounds = 16, 3
    app = create_app(stub, Settings(max_concurrency=1, max_queue=clients))
    waits: dict[int, list[float]] = {c: [] for c in range(clients)}
    with LiveServer(app) as server:
        start = threading.Barrier(clients)
        began = time.monotonic()

        def client(c):
            session = requests.Session()
            start.wait(10)
            for _ in range(rounds):
                sent = time.monotonic()
                data = {"tts_text": f"client {c}", "spk_id": "spk_a", "format": "pcm"}
                resp = session.post(server.url + "/inference_sft", data=data, timeout=60)
                assert resp.status_code == 200
                waits[c].append(time.monotonic() - sent)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - began
    assert all(len(w) == rounds for w in waits.values()), {c: len(w) for c, w in waits.items()}
    order = [int(args[0].split()[1]) for mode, args, _ in stub.calls]  # admission order, by client
    for c in range(clients):
        seen = [i for i, who in enumerate(order) if who == c]
        for first, second in itertools.pairwise(seen):
            others = order[first + 1 : second]
            assert max((others.count(o) for o in set(others)), default=0) <= 1, f"client {c} overtaken: {others}"
    service = elapsed / (clients * rounds)  # one slot: the requests were served one after another
    worst = max(x for w in waits.values() for x in w)
    print(f"FIFO: worst wait {worst:.2f} s, ideal {clients * service:.2f} s ({worst / (clients * service):.2f}x)")
    assert worst <= 1.5 * clients * service + 0.5, f"max wait {worst:.2f} s, FIFO ideal {clients * service:.2f} s"


@pytest.mark.parametrize(("fmt", "has_format"), [("pcm", True), ("wav", True), ("mp3", False), ("flac", False)])
def test_sample_format_header_only_on_raw_samples(client, fmt, has_format):
    resp = client.post("/inference_sft", data=form("sft")[0] | {"format": fmt})
    assert resp.status_code == 200, resp.text
    assert ("x-sample-format" in resp.headers) == has_format
    if has_format:
        assert resp.headers["x-sample-format"] == "s16le"
