"""The OpenAI-compatible API through the real ``openai`` SDK against a live server on the tiny golden models.

One server per model version in the manifest (its e2e cases give the texts, prompt and instructions).
Audio is checked against the engine's own output for the same inputs and seed: sample-exact for the
lossless formats, length and completeness for the lossy ones.
"""

from __future__ import annotations

import base64
import io
import json
from functools import cache
from typing import Any

import numpy as np
import openai
import pytest
import requests
import soundfile as sf
from api_helpers import LiveServer
from golden import entries, golden_root, model_dir, model_version
from resources import missing_mark
from test_openai_encode import AAC_SLACK, HAVE_AV, MP3_SLACK, adts_frames, decode_av, mp3_frames, ogg_pages

from cosyserve.api import create_app
from cosyserve.audio.encode import FlacEncoder, to_int16
from cosyserve.audio.resample import OutputResampler
from cosyserve.settings import Settings

# Slow: end-to-end on the golden models, servers, browsers or databases (the fast tier: -m "not slow").
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SEED = 7
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MAX_UPLOAD = 4 * 1024 * 1024


def _inputs() -> dict[str, dict[str, Any]]:
    """Per model version, the first model and inputs drawn from its e2e cases."""
    found: dict[str, dict[str, Any]] = {}
    for param in entries("e2e"):
        entry = param.values[0]
        if entry is None:
            return {}
        version, meta = model_version(entry["model"]), entry["meta"]
        case = found.setdefault(version, {"model": entry["model"]})
        if case["model"] != entry["model"]:
            continue
        if "tts_text" in meta and len(meta["tts_text"]) < len(case.get("text", meta["tts_text"] + "x")):
            case["text"] = meta["tts_text"]
        if "prompt_wav" in meta and "prompt_text" in meta:
            case.setdefault("prompt", (meta["prompt_wav"], meta["prompt_text"]))
        if "instruct_text" in meta:
            case.setdefault("instructions", meta["instruct_text"])
    return {v: c for v, c in found.items() if "text" in c and "prompt" in c}


INPUTS = _inputs()
VERSIONS = sorted(INPUTS) or [pytest.param(None, marks=missing_mark("no golden e2e cases"))]


@cache
def engine(version: str) -> Any:
    from cosyserve.engine.pipeline import load_model

    return load_model(model_dir(INPUTS[version]["model"]))


def voices_of(model: Any) -> tuple[str | None, str | None]:
    """(a built-in speaker, a stored voice with a prompt) of the model, where it has them."""
    ids = model.voices.ids()
    speakers = [v for v in ids if not model.voices.get(v).has_prompt]
    clones = [v for v in ids if model.voices.get(v).has_prompt]
    return (speakers[0] if speakers else None), (clones[0] if clones else None)


@pytest.fixture(scope="module")
def server_for():
    servers: dict[str, LiveServer] = {}

    def get(version: str) -> LiveServer:
        if version not in servers:
            model = engine(version)
            ids = model.voices.ids()
            clone = voices_of(model)[1]
            mapping = (("alloy", ids[0]),) + ((("echo", clone),) if clone else ())
            settings = Settings(voice_map=mapping, max_upload_bytes=MAX_UPLOAD)
            servers[version] = LiveServer(create_app(model, settings)).__enter__()
        return servers[version]

    yield get
    for server in servers.values():
        server.__exit__(None, None, None)


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def prompt_bytes(version: str) -> tuple[bytes, str]:
    name, text = INPUTS[version]["prompt"]
    return (golden_root() / "audio" / name).read_bytes(), text


def data_url(data: bytes) -> str:
    return "data:audio/wav;base64," + base64.b64encode(data).decode()


@cache
def direct(version: str, mode: str, args: tuple, spk_id: str | None, stream: bool, rate: int) -> np.ndarray:
    """The engine's own output, resampled chunk by chunk as the server does, as int16."""
    model = engine(version)
    kwargs = {"spk_id": spk_id} if spk_id is not None else {}
    chunks = getattr(model, f"inference_{mode}")(*args, **kwargs, stream=stream, seed=SEED)
    resampler = OutputResampler(model.sample_rate, rate)
    out = [resampler(c) for c in chunks]
    return to_int16(np.concatenate([*out, resampler(np.zeros(0, np.float32), last=True)]))


def decode(fmt: str, body: bytes, pcm_rate: int) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        assert len(body) % 2 == 0
        return np.frombuffer(body, "<i2"), pcm_rate
    if fmt == "aac":
        samples, rate = decode_av(body)
        return to_int16(samples), rate
    return sf.read(io.BytesIO(body), dtype="int16")


def check_audio(fmt: str, got: np.ndarray, want: np.ndarray) -> None:
    """Lossless formats carry the exact samples; lossy ones the whole length (the end not cut off)."""
    assert want.size > 0
    if fmt in ("pcm", "wav", "flac"):
        np.testing.assert_array_equal(got, want)
    elif fmt == "opus":
        assert len(got) == len(want)
    else:
        assert len(want) <= len(got) <= len(want) + (MP3_SLACK if fmt == "mp3" else AAC_SLACK)
    assert np.abs(got.astype(np.int32)).max() > 0, "silent output"


def expected_rate(fmt: str, model: Any) -> int:
    if fmt == "pcm":
        return 24000  # OpenAI's pcm, unless sample_rate says otherwise
    if fmt == "opus" and model.sample_rate not in (8000, 12000, 16000, 24000, 48000):
        return 24000
    return model.sample_rate


def check_structure(fmt: str, body: bytes) -> None:
    """A streamed body is whole frames / pages, ending with a proper end of stream."""
    if fmt == "opus":
        flags = ogg_pages(body)
        assert flags[-1] & 4 and not any(f & 4 for f in flags[:-1])
    elif fmt == "mp3":
        mp3_frames(body)
    elif fmt == "aac":
        adts_frames(body)
    elif fmt == "wav":
        assert body[:4] == b"RIFF" and body[4:8] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize("version", VERSIONS)
def test_every_format_with_create_and_streaming_response(version, server_for):
    model, server = engine(version), server_for(version)
    text = INPUTS[version]["text"]
    speaker = model.voices.ids()[0]
    sdk = client(server)
    for fmt in FORMATS:
        request = {
            "model": "tts-1",
            "voice": "alloy",
            "input": text,
            "response_format": fmt,
            "extra_body": {"seed": SEED},
        }
        if fmt == "aac" and not HAVE_AV:
            with pytest.raises(openai.BadRequestError) as err:
                sdk.audio.speech.create(**request)
            assert err.value.code == "format_unavailable" and "cosyserve[aac]" in err.value.message
            continue
        rate = expected_rate(fmt, model)
        want = direct(version, "sft", (text, speaker), None, False, rate)
        created = sdk.audio.speech.create(**request)
        assert created.response.headers["x-sample-rate"] == str(rate)
        got, got_rate = decode(fmt, created.content, rate)
        assert got_rate == rate, fmt
        check_audio(fmt, got, want)

        with sdk.audio.speech.with_streaming_response.create(**request) as response:
            assert response.headers["content-type"].startswith("audio/")
            assert response.headers["content-disposition"].endswith(f'speech.{fmt}"')
            body = b"".join(response.iter_bytes())
        streamed, streamed_rate = decode(fmt, body, rate)
        assert streamed_rate == rate
        np.testing.assert_array_equal(streamed, got)


@pytest.mark.parametrize("version", VERSIONS)
def test_token_streaming_is_valid_for_every_format(version, server_for):
    """``stream: true`` (extension): token-level generation, every container in its streaming form."""
    model, server = engine(version), server_for(version)
    text, speaker = INPUTS[version]["text"], model.voices.ids()[0]
    for fmt in FORMATS:
        if fmt == "aac" and not HAVE_AV:
            continue
        rate = 16000 if fmt != "opus" else 48000  # resampled, too
        request = {"seed": SEED, "stream": True, "sample_rate": rate}
        with client(server).audio.speech.with_streaming_response.create(
            model="tts-1", voice=speaker, input=text, response_format=fmt, extra_body=request
        ) as response:
            assert response.headers["x-sample-rate"] == str(rate)
            body = b"".join(response.iter_bytes())
        want = direct(version, "sft", (text, speaker), None, True, rate)
        check_structure(fmt, body)
        if fmt == "flac":
            # Streamed FLAC cannot state its length up front; its frames are those of the complete file.
            assert body[42:] == FlacEncoder(rate).encode_all(want.astype(np.float32) / 32768)[42:]
            continue
        got, got_rate = decode(fmt, body, rate)
        assert got_rate == rate
        check_audio(fmt, got, want)


def sse_events(sdk: openai.OpenAI, **request: Any) -> tuple[list[dict[str, Any]], str]:
    with sdk.audio.speech.with_streaming_response.create(stream_format="sse", **request) as response:
        content_type = response.headers["content-type"]
        lines = list(response.iter_lines())
    events = [json.loads(line[len("data:") :]) for line in lines if line.startswith("data:")]
    assert all(not line or line.startswith("data:") for line in lines), lines
    return events, content_type


@pytest.mark.parametrize("version", VERSIONS)
def test_sse_deltas_concatenate_to_the_audio_response(version, server_for):
    model, sdk = engine(version), client(server_for(version))
    text = INPUTS[version]["text"]
    for fmt in ("pcm", "mp3", "wav", "opus", "flac"):
        request = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": fmt}
        events, content_type = sse_events(sdk, **request, extra_body={"seed": SEED})
        assert content_type.startswith("text/event-stream")
        *deltas, done = events
        assert deltas and all(e["type"] == "speech.audio.delta" for e in deltas)
        assert done["type"] == "speech.audio.done"
        assert all(isinstance(done["usage"][k], int) for k in ("input_tokens", "output_tokens", "total_tokens"))
        body = b"".join(base64.b64decode(e["audio"]) for e in deltas)
        plain = sdk.audio.speech.create(**request, extra_body={"seed": SEED}).content
        rate = expected_rate(fmt, model)
        if fmt in ("pcm", "mp3"):
            assert body == plain
        elif fmt == "flac":  # the plain response was sent whole, with the length in its header
            assert body[42:] == plain[42:]
        else:
            np.testing.assert_array_equal(decode(fmt, body, rate)[0], decode(fmt, plain, rate)[0])


@pytest.mark.parametrize("version", VERSIONS)
def test_voice_and_extensions_select_the_mode(version, server_for):
    model, sdk = engine(version), client(server_for(version))
    rate, text = model.sample_rate, INPUTS[version]["text"]
    instructions = INPUTS[version].get("instructions")
    prompt, prompt_text = prompt_bytes(version)
    speaker, clone = voices_of(model)

    def speak(**request: Any) -> np.ndarray:
        extra = {"seed": SEED, "sample_rate": rate} | request.pop("extra", {})
        body = sdk.audio.speech.create(model="tts-1", input=text, response_format="pcm", extra_body=extra, **request)
        return np.frombuffer(body.content, "<i2")

    def engine_out(mode: str, *args: Any, spk_id: str | None = None) -> np.ndarray:
        return direct(version, mode, (text, *args), spk_id, False, rate)

    if speaker:
        want = engine_out("sft", speaker)
        np.testing.assert_array_equal(speak(voice=speaker), want)
        np.testing.assert_array_equal(speak(voice={"id": speaker}), want)
    if clone:
        np.testing.assert_array_equal(speak(voice=clone), engine_out("zero_shot", "", spk_id=clone))
        np.testing.assert_array_equal(speak(voice="echo"), speak(voice=clone))  # configured OpenAI name
    # An OpenAI name without a mapping falls back to the model's first voice, as 'alloy' is mapped here.
    np.testing.assert_array_equal(speak(voice="nova"), speak(voice="alloy"))

    # One-off cloning: ref_audio + ref_text is zero-shot, ref_audio alone cross-lingual (voice ignored).
    got = speak(voice="ignored", extra={"ref_audio": data_url(prompt), "ref_text": prompt_text})
    np.testing.assert_array_equal(got, engine_out("zero_shot", prompt_text, prompt))
    got = speak(voice="alloy", extra={"ref_audio": base64.b64encode(prompt).decode()})
    np.testing.assert_array_equal(got, engine_out("cross_lingual", prompt))

    if instructions is None:
        return
    if "instruct" in model.modes:  # CosyVoice 1.0: built-in speaker + instruction
        got = speak(voice=speaker, instructions=instructions)
        np.testing.assert_array_equal(got, engine_out("instruct", speaker, instructions))
        with pytest.raises(openai.BadRequestError) as err:
            speak(voice="alloy", instructions=instructions, extra={"ref_audio": data_url(prompt)})
        assert err.value.param == "instructions"
    else:  # CosyVoice2/3: instruct2 with the prompt of ref_audio or of a stored voice
        got = speak(voice="alloy", instructions=instructions, extra={"ref_audio": data_url(prompt)})
        np.testing.assert_array_equal(got, engine_out("instruct2", instructions, prompt))
        if clone:
            got = speak(voice=clone, instructions=instructions)
            np.testing.assert_array_equal(got, engine_out("instruct2", instructions, spk_id=clone))
        if speaker:
            with pytest.raises(openai.BadRequestError) as err:
                speak(voice=speaker, instructions=instructions)
            assert err.value.param == "instructions" and "ref_audio" in err.value.message


@pytest.mark.parametrize("version", VERSIONS)
def test_models_and_voices_are_listed(version, server_for):
    model, server = engine(version), server_for(version)
    sdk = client(server)
    own = model_dir(INPUTS[version]["model"]).name
    assert [m.id for m in sdk.models.list()] == [own, "tts-1", "tts-1-hd"]
    assert sdk.models.retrieve("tts-1-hd").id == "tts-1-hd"
    assert sdk.models.retrieve(own).owned_by == "cosyserve"
    for name in (own, own.upper(), model.family, "tts-1-hd", "gpt-4o-mini-tts"):
        body = sdk.audio.speech.create(model=name, voice="alloy", input="你好。", response_format="pcm")
        assert len(body.content) > 0
    voices = requests.get(server.url + "/v1/audio/voices", timeout=30).json()["voices"]
    by_id = {v["id"]: v for v in voices}
    assert [v["id"] for v in voices[: len(model.voices.ids())]] == model.voices.ids()
    assert all(v["name"] == v["id"] for v in voices)
    speaker, clone = voices_of(model)
    assert by_id["alloy"] == {
        "id": "alloy",
        "object": "audio.voice",
        "name": "alloy",
        "kind": "alias",
        "voice": model.voices.ids()[0],
    }
    if speaker:
        assert by_id[speaker]["kind"] == "speaker"
    if clone:
        assert by_id[clone]["kind"] == "clone" and by_id["echo"]["voice"] == clone


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("version", VERSIONS[:1])
def test_client_errors_come_before_any_audio(version, server_for):
    model, server = engine(version), server_for(version)
    sdk = client(server)
    text = INPUTS[version]["text"]
    prompt, _ = prompt_bytes(version)
    not_audio = base64.b64encode(b"RIFF....WAVEfmt junk").decode()
    short = io.BytesIO()
    sf.write(short, np.zeros(1600, np.float32), 16000, format="WAV")
    bad_requests = [
        ({"input": ""}, "input"),
        ({"input": "   "}, "input"),
        ({"input": "长" * 5001}, "input"),
        ({"voice": ""}, "voice"),
        ({"response_format": "aiff"}, "format"),
        ({"speed": 4.5}, "speed"),
        ({"speed": 0.1}, "speed"),
        ({"stream_format": "chunks"}, "stream_format"),
        ({"extra_body": {"sample_rate": 12345}}, "sample_rate"),
        ({"response_format": "opus", "extra_body": {"sample_rate": 44100}}, "sample_rate"),
        ({"extra_body": {"seed": -1}}, "seed"),
        ({"extra_body": {"seed": "abc"}}, "seed"),
        ({"extra_body": {"ref_audio": "not base64 !"}}, "ref_audio"),
        ({"extra_body": {"ref_audio": "https://example.com/a.wav"}}, "ref_audio"),
        ({"extra_body": {"ref_audio": "data:audio/wav,plain"}}, "ref_audio"),
        ({"extra_body": {"ref_audio": not_audio}}, "ref_audio"),
        ({"extra_body": {"ref_audio": data_url(short.getvalue())}}, "ref_audio"),
        ({"extra_body": {"ref_text": "transcript without audio"}}, "ref_text"),
    ]
    for change, param in bad_requests:
        extra = change.pop("extra_body", {})
        request = {"model": "tts-1", "voice": "alloy", "input": text} | change
        with pytest.raises(openai.BadRequestError) as err:
            sdk.audio.speech.with_raw_response.create(**request, extra_body=extra)
        error = _error(err.value)
        assert error["param"] == param and error["type"] == "invalid_request_error", (change, error)

    with pytest.raises(openai.NotFoundError) as err:
        sdk.audio.speech.create(model="tts-9", voice="alloy", input=text)
    assert _error(err.value)["code"] == "model_not_found" and "tts-1" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        sdk.audio.speech.create(model="tts-1", voice="nobody", input=text)
    message = _error(err.value)["message"]
    assert err.value.param == "voice" and all(v in message for v in model.voices.ids()) and "alloy" in message
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")

    url = server.url + "/v1/audio/speech"
    for body, headers in (
        (b"{not json", {"Content-Type": "application/json"}),
        (b"", {}),
        (b"input=hi&voice=alloy", {"Content-Type": "application/x-www-form-urlencoded"}),
        (b'{"voice": "alloy"}', {"Content-Type": "application/json"}),
    ):
        resp = requests.post(url, data=body, headers=headers, timeout=30)
        assert resp.status_code == 400 and resp.json()["error"]["message"], resp.text
    huge = {"model": "tts-1", "input": text, "ref_audio": data_url(prompt * (MAX_UPLOAD // len(prompt) + 1))}
    resp = requests.post(url, json=huge, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    resp = requests.get(server.url + "/v1/no/such/route", timeout=30)
    assert resp.status_code == 404 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert requests.get(server.url + "/health", timeout=30).json()["in_flight"] == 0


@pytest.mark.parametrize("version", VERSIONS[:1])
def test_official_routes_take_sample_rate_and_the_new_formats(version, server_for):
    model, server = engine(version), server_for(version)
    text, speaker = INPUTS[version]["text"], model.voices.ids()[0]
    if model.voices.get(speaker).has_prompt:
        pytest.skip("the model's first voice is not a built-in speaker")
    url = server.url + "/inference_sft"
    fields = {"tts_text": text, "spk_id": speaker, "seed": str(SEED)}
    for fmt, rate in (("mp3", 8000), ("flac", 48000), ("pcm", 16000), ("opus", None), ("wav", 44100)):
        resp = requests.post(url, data=fields | {"format": fmt} | ({"sample_rate": str(rate)} if rate else {}))
        assert resp.status_code == 200, resp.text
        rate = rate or expected_rate(fmt, model)
        assert resp.headers["x-sample-rate"] == str(rate)
        got, got_rate = decode(fmt, resp.content, rate)
        assert got_rate == rate
        check_audio(fmt, got, direct(version, "sft", (text, speaker), None, False, rate))
    for change in ({"sample_rate": "12345"}, {"sample_rate": "fast"}, {"format": "opus", "sample_rate": "22050"}):
        resp = requests.post(url, data=fields | change)
        assert resp.status_code == 422 and resp.json()["error"]["param"] == "sample_rate", resp.text
    if not HAVE_AV:
        resp = requests.post(url, data=fields | {"format": "aac"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "format_unavailable"


class FailingAfterFirstChunk:
    """The engine, except that generation breaks after its first chunk."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def new_loop(self) -> Any:
        """The real generation loop, whose requests break right after their first chunk."""
        loop = self._model.new_loop()
        step = loop.step

        def breaking_step() -> list:
            events = step()
            for sequence, chunk in list(events):
                if chunk is not None and sequence.failed is None:
                    sequence.failed = RuntimeError("broken on purpose")
                    if not any(s is sequence and c is None for s, c in events):  # not ended in this step yet
                        loop.remove(sequence)
                        events.append((sequence, None))
            return events

        loop.step = breaking_step
        return loop


@pytest.mark.parametrize("version", VERSIONS[:1])
def test_a_failure_midway_is_an_sse_error_event_or_a_cut_stream(version):
    model = engine(version)
    text = INPUTS[version]["text"]
    with LiveServer(create_app(FailingAfterFirstChunk(model), Settings())) as server:
        sdk = client(server)
        request = {"model": "tts-1", "voice": model.voices.ids()[0], "input": text, "extra_body": {"seed": SEED}}
        events, _ = sse_events(sdk, **request, response_format="pcm")
        assert [e["type"] for e in events] == ["speech.audio.delta", "error"]
        assert events[-1]["error"]["code"] == "generation_failed"
        # Buffered (wav): still a JSON error; streamed (mp3): the connection is cut, never a clean end.
        with pytest.raises(openai.InternalServerError):
            sdk.audio.speech.create(**request, response_format="wav")
        body = {"model": "tts-1", "voice": model.voices.ids()[0], "input": text, "response_format": "mp3"}
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            _ = requests.post(server.url + "/v1/audio/speech", json=body, timeout=60).content
