"""The OpenAI-compatible speech API: ``POST /v1/audio/speech``, ``GET /v1/models``, ``GET /v1/audio/voices``.

Works with the openai SDKs and the tools built on them (``base_url=http://host:port/v1``, any API
key). The engine mode follows from what a request carries:

- ``ref_audio`` + ``ref_text``: zero_shot; ``ref_audio`` alone: cross_lingual; with ``instructions``:
  instruct2 (CosyVoice2/3). ``voice`` is then ignored.
- ``voice`` naming a built-in speaker: sft; with ``instructions``: instruct on CosyVoice 1.0.
- ``voice`` naming a stored (cloned) voice: zero_shot, or cross_lingual when it has no transcript;
  with ``instructions``: instruct2 with the voice as prompt (instruct on 1.0).

OpenAI voice names (alloy, echo...) map to voices through ``Settings.voice_map``; unmapped, they
fall back to the model's first voice. Every client error is answered before the first byte, in the
OpenAI error shape, with status 400 (404 for an unknown model or voice).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Send

from cosyserve.api.audio_response import AudioResponse, start_generation
from cosyserve.api.auth import scope_key_id
from cosyserve.api.deps import server_state
from cosyserve.api.errors import error_body, error_responses
from cosyserve.api.parsing import check_audio, parse_json_body, read_body
from cosyserve.api.pronunciations import FIELD_DOC, request_pronunciations
from cosyserve.api.voices import VoiceMap, resolve_voice, voice_list
from cosyserve.audio.encode import ENCODERS, OUTPUT_RATES, OutputFormat
from cosyserve.engine.client import EngineClient
from cosyserve.engine.planning import plan_speech
from cosyserve.engine.registry import OPENAI_MODELS
from cosyserve.engine.request import MAX_SPEED, MIN_SPEED, GenerationOptions, SynthesisRequest
from cosyserve.errors import GenerationFailed, InvalidRequest, TextError

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class SpeechRequest(BaseModel):
    """The body of ``POST /v1/audio/speech``: OpenAI's fields, then cosyserve's extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        "tts-1",
        description="A served model's name, id or family (GET /v1/models); tts-1, tts-1-hd and gpt-4o-mini-tts "
        "reach the default model.",
    )
    # The schema says what _text enforces (not pydantic, whose message would be less clear than ours).
    input: str = Field(description="Text to speak.", json_schema_extra={"minLength": 1, "pattern": r"\S"})
    voice: str | dict[str, str] | None = Field(
        None,
        description="A built-in speaker, a stored voice id or an OpenAI voice name (GET /v1/audio/voices); "
        'also {"id": ...}. Not needed with ref_audio.',
    )
    response_format: str = Field("mp3", description=f"One of {', '.join(ENCODERS)} (aac needs PyAV).")
    speed: float = Field(1.0, description=f"Speaking rate, {MIN_SPEED} to {MAX_SPEED}.")
    instructions: str | None = Field(
        None, description="Style instruction: instruct2 on CosyVoice2/3, instruct on CosyVoice 1.0."
    )
    stream_format: str = Field(
        "audio", description="audio (the bytes) or sse (speech.audio.delta / speech.audio.done events)."
    )
    ref_audio: str | None = Field(
        None, description="Extension: a recording to clone, as a data URL or base64 (0.5-30 s, >= 16 kHz)."
    )
    ref_text: str | None = Field(None, description="Extension: transcript of ref_audio (none: cross-lingual).")
    sample_rate: int | None = Field(
        None,
        description=f"Extension: output rate, one of {', '.join(map(str, OUTPUT_RATES))} "
        "(default: the model's; pcm: 24000).",
    )
    seed: int | None = Field(None, description="Extension: same seed, same audio.")
    stream: bool = Field(False, description="Extension: token-level streaming (first audio sooner).")
    pronunciations: dict[str, Any] | list[dict[str, Any]] | None = Field(None, description="Extension: " + FIELD_DOC)
    continuity: bool = Field(
        False,
        description="Extension: each sentence after the first continues the previous one (its text, speech "
        "tokens and mel join the prompt), and the request can be continued by a later one (previous_request_id).",
    )
    previous_request_id: str | None = Field(
        None,
        description="Extension: continue the voice of a finished request of this API key made with continuity "
        "(its X-Request-ID; kept for a limited time). Implies continuity.",
    )
    previous_text: str | None = Field(
        None,
        description="Extension: the text said just before this one; its last sentence is spoken first, silently, "
        "for the first sentence to continue. Implies continuity.",
    )


# -- models ---------------------------------------------------------------------------------------


def _model_card(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


# -- request parsing ------------------------------------------------------------------------------


def parse_request(body: bytes) -> SpeechRequest:
    return parse_json_body(
        SpeechRequest, body, "send a JSON body (Content-Type: application/json) with at least input and voice"
    )


def _text(value: str, max_length: int) -> str:
    if not value.strip():
        raise TextError("input is empty", param="input")
    if len(value) > max_length:
        raise TextError(f"input has {len(value)} characters; at most {max_length} are accepted", param="input")
    return value


def decode_ref_audio(value: str) -> bytes:
    """The bytes of ``ref_audio``: a ``data:<type>;base64,`` URL or bare (standard or URL-safe) base64."""
    value = value.strip()
    if value.startswith("data:"):
        header, comma, payload = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequest("ref_audio must be a base64 data URL (data:audio/wav;base64,...)", param="ref_audio")
    elif _URL.match(value):
        raise InvalidRequest("ref_audio must be a data URL or base64: URLs are not fetched", param="ref_audio")
    else:
        payload = value
    payload = "".join(payload.split()).replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("ref_audio is not valid base64", param="ref_audio") from exc
    if not data:
        raise InvalidRequest("ref_audio is empty", param="ref_audio")
    return data


def speech_output(fmt: str, sample_rate: int | None, pcm_rate: int, model_rate: int) -> OutputFormat:
    """What ``/v1/audio/speech`` and the native WebSocket send for a ``response_format`` and ``sample_rate``
    (none: the model's rate, but ``pcm_rate`` for pcm, as OpenAI's pcm is 24 kHz)."""
    fmt = fmt.strip().lower()
    return OutputFormat.checked(fmt, sample_rate or (pcm_rate if fmt == "pcm" else None), model_rate)


def _options(req: SpeechRequest) -> GenerationOptions:
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise InvalidRequest(f"seed must be an integer in 0..2^63-1, not {req.seed}", param="seed")
    if req.stream_format not in ("audio", "sse"):
        raise InvalidRequest(f"stream_format must be audio or sse, not {req.stream_format!r}", param="stream_format")
    if req.ref_text and not req.ref_audio:
        raise InvalidRequest("ref_text is the transcript of ref_audio: send ref_audio too", param="ref_text")
    return GenerationOptions(stream=req.stream, speed=req.speed, seed=req.seed)


# -- responses ------------------------------------------------------------------------------------


def _speech_tokens(engine: EngineClient, text: str, seconds: float) -> tuple[int, int]:
    """(text tokens, speech tokens) for SSE usage; speech tokens from the duration at the token rate."""
    return engine.count_text_tokens(text), round(seconds * engine.info.token_rate)


class SpeechEvents(AudioResponse):
    """``stream_format=sse``: ``speech.audio.delta`` events carrying base64 of the encoded bytes as they
    are made, then ``speech.audio.done`` with usage; a failure midway is an ``error`` event."""

    # (text tokens, speech tokens) for a duration in seconds; the route sets it.
    usage: Callable[[float], tuple[int, int]] | None = None

    def body_media_type(self) -> str:
        return "text/event-stream"

    async def _send_streamed(self, send: Send) -> None:
        await send(self._start_message())
        pending = self.encoder.header()
        try:
            async for chunk in self.generation:
                pending += self.encoder.encode(self.resampler(chunk))
                if pending:
                    await self._event(send, {"type": "speech.audio.delta", "audio": base64.b64encode(pending).decode()})
                    pending = b""
            pending += self.tail()
            if pending:
                await self._event(send, {"type": "speech.audio.delta", "audio": base64.b64encode(pending).decode()})
            seconds = self.generation.samples / self.resampler.orig_sr
            text_tokens, speech_tokens = self.usage(seconds) if self.usage else (0, 0)
            usage = {"input_tokens": text_tokens, "output_tokens": speech_tokens}
            last = {"type": "speech.audio.done", "usage": {**usage, "total_tokens": text_tokens + speech_tokens}}
        except GenerationFailed as exc:
            last = {"type": "error", **error_body(str(exc), "generation_failed", status=500)}
        await self._event(send, last)
        self.sent = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _event(self, send: Send, event: dict[str, Any]) -> None:
        data = f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
        await send({"type": "http.response.body", "body": data, "more_body": True})


_EXTENSIONS = {"opus": "opus", "mp3": "mp3", "aac": "aac", "flac": "flac", "wav": "wav", "pcm": "pcm"}

router = APIRouter(tags=["OpenAI API"])

_BODIES = {
    t: {"schema": {"type": "string", "format": "binary"}}
    for t in ("audio/mpeg", "audio/ogg", "audio/aac", "audio/flac", "audio/wav", "audio/pcm")
} | {"text/event-stream": {"schema": {"type": "string"}}}
_SPEECH_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SpeechRequest.model_json_schema()}},
    }
}


@router.post(
    "/v1/audio/speech",
    summary="Text to speech, OpenAI-compatible (works with the openai SDK's client.audio.speech.create).",
    response_class=Response,
    responses=error_responses(
        400,
        413,
        503,
        described={404: "Unknown model or voice (the message lists the known voices)"},
        success={200: {"description": "The audio (stream_format=audio) or an event stream (sse).", "content": _BODIES}},
    ),
    openapi_extra=_SPEECH_DOC,
)
async def create_speech(request: Request) -> Response:
    state = server_state(request)
    settings = state.settings
    req = parse_request(await read_body(request, settings.max_upload_bytes))
    engine = await state.models.get(req.model)
    # Format and rate errors before the audio is decoded.
    output = speech_output(req.response_format, req.sample_rate, settings.pcm_sample_rate, engine.info.sample_rate)
    synthesis, spk_id = await speech_synthesis(request, req, engine)
    sse = req.stream_format == "sse"
    response = await start_generation(
        request,
        engine,
        f"v1/audio/speech ({synthesis.mode}{f', {spk_id}' if spk_id else ''})",
        synthesis,
        output,
        buffered=False if sse else None,
        response_class=SpeechEvents if sse else AudioResponse,
    )
    response.headers["X-Accel-Buffering"] = "no"  # proxies must not hold streamed audio back
    if isinstance(response, SpeechEvents):
        spoken = synthesis.ssml.text if synthesis.ssml is not None else str(synthesis.text)
        response.usage = lambda seconds: _speech_tokens(engine, spoken, seconds)
    else:
        response.headers["Content-Disposition"] = f'attachment; filename="speech.{_EXTENSIONS[output.fmt]}"'
    return response


async def speech_synthesis(
    request: Request, req: SpeechRequest, engine: EngineClient
) -> tuple[SynthesisRequest, str | None]:
    """What a speech body asks ``engine`` for (its mode from the voice / ref_audio / instructions, the
    request's pronunciations and the caller's lexicon scope), and the voice it names (None with ref_audio)."""
    settings = server_state(request).settings
    return await body_synthesis(req, engine, settings.voice_map, settings.max_text_length, scope_key_id(request.scope))


async def body_synthesis(
    req: SpeechRequest, engine: EngineClient, voice_map: VoiceMap, max_text_length: int, key_id: str | None
) -> tuple[SynthesisRequest, str | None]:
    """:func:`speech_synthesis` without the HTTP request: ``key_id`` the caller's API key id (the lexicon
    scope). Long-form jobs build each segment's request with it."""
    text = _text(req.input, max_text_length)
    options = _options(req)
    entries = request_pronunciations(req.pronunciations)
    prompt = None
    if req.ref_audio:
        limits = engine.info.prompt_limits
        prompt = await anyio.to_thread.run_sync(check_audio, "ref_audio", decode_ref_audio(req.ref_audio), limits)
    instructions = req.instructions if req.instructions and req.instructions.strip() else None
    spk_id = voice = None
    if prompt is None:
        spk_id = resolve_voice(engine.voices, voice_map, req.voice)
        voice = engine.voices.usable_info(spk_id, param="voice")
    synthesis = plan_speech(
        engine.modes,
        engine.info.family,
        voice,
        text,
        options,
        spk_id=spk_id,
        instructions=instructions,
        prompt_audio=prompt,
        ref_text=req.ref_text or None,
    )
    synthesis = replace(
        synthesis,
        pronunciations=entries,
        lexicon_owner=key_id,
        continuity=req.continuity,
        previous_request_id=req.previous_request_id,
        previous_text=req.previous_text,
    )
    return synthesis, spk_id


@router.get("/v1/models", summary="The models /v1/audio/speech accepts (OpenAI list shape).")
async def list_models(request: Request) -> dict[str, Any]:
    models = server_state(request).models
    if not models.lazy_load:
        models.require()  # 503 while the default model loads
    own = [_model_card(slot.model_id, "cosyserve") for slot in models.slots]
    return {"object": "list", "data": own + [_model_card(n, "openai") for n in OPENAI_MODELS]}


@router.get(
    "/v1/models/{name:path}",
    summary="One model of GET /v1/models.",
    responses=error_responses(described={404: "Not a model this server serves"}),
)
async def get_model(name: str, request: Request) -> JSONResponse:
    models = server_state(request).models
    if not models.lazy_load:
        models.require()
    if name.lower() in OPENAI_MODELS:
        return JSONResponse(_model_card(name.lower(), "openai"))
    return JSONResponse(_model_card(models.find(name).model_id, "cosyserve"))


@router.get(
    "/v1/audio/voices",
    summary='Voices for /v1/audio/speech: {"voices": [{"id", "name", "kind"}]} (kind: speaker, clone, alias); '
    "those of the default model, or of ?model=.",
    responses=error_responses(described={404: "?model= names no served model (model_not_found lists them)"}),
)
async def list_voices(request: Request, model: str | None = None) -> dict[str, list[dict[str, Any]]]:
    state = server_state(request)
    return {"voices": voice_list((await state.models.get(model)).voices, state.settings.voice_map)}
