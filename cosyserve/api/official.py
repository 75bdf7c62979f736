"""The official CosyVoice FastAPI routes (``/inference_*``), compatible and hardened.

Each route answers GET and POST. Fields come as multipart or urlencoded form fields (the official
client sends a GET with a form body) and also as query parameters (what a browser can send with a
GET). Everything a client can get wrong is checked before the first byte of audio, so a bad request
is a 4xx JSON error instead of a truncated 200.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from cosyserve.api.audio_response import start_generation
from cosyserve.api.auth import scope_key_id
from cosyserve.api.deps import server_state
from cosyserve.api.parsing import (
    MAX_SEED,
    Fields,
    audio_field,
    check_mode,
    option,
    parse_flag,
    parse_options,
    parse_sample_rate,
    read_fields,
    text_field,
)
from cosyserve.api.pronunciations import FIELD_DOC, request_pronunciations
from cosyserve.audio.encode import ENCODERS, OUTPUT_RATES, OutputFormat
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.errors import InvalidRequest


@dataclass(frozen=True)
class Endpoint:
    mode: str
    texts: tuple[str, ...]  # required text fields, in the engine's argument order
    audios: tuple[str, ...]  # required uploads, in the engine's argument order
    summary: str
    # Fields a stored voice given as spk_id stands in for (none: spk_id is no option of this mode).
    voice_replaces: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"/inference_{self.mode}"


ENDPOINTS = (
    Endpoint(
        "sft",
        ("tts_text", "spk_id"),
        (),
        "Speak with a built-in speaker (models that ship speakers, e.g. CosyVoice-300M-SFT).",
    ),
    Endpoint(
        "zero_shot",
        ("tts_text", "prompt_text"),
        ("prompt_wav",),
        "Clone the voice of a prompt recording, given its transcript.",
        ("prompt_text", "prompt_wav"),
    ),
    Endpoint(
        "cross_lingual",
        ("tts_text",),
        ("prompt_wav",),
        "Speak the text, in any supported language, in the voice of a prompt recording.",
        ("prompt_wav",),
    ),
    Endpoint(
        "instruct",
        ("tts_text", "spk_id", "instruct_text"),
        (),
        "Built-in speaker steered by an instruction (CosyVoice 1.0; only CosyVoice-300M-Instruct is trained for it).",
    ),
    Endpoint(
        "instruct2",
        ("tts_text", "instruct_text"),
        ("prompt_wav",),
        "Voice of a prompt recording steered by an instruction (CosyVoice2 / CosyVoice3).",
        ("prompt_wav",),
    ),
    Endpoint(
        "vc",
        (),
        ("source_wav", "prompt_wav"),
        "Voice conversion: re-speak source_wav in the voice of prompt_wav.",
        ("prompt_wav",),
    ),
)

FIELD_DOCS = {
    "tts_text": "Text to speak.",
    "spk_id": "Built-in speaker or stored voice (GET /speakers lists them; POST /v1/audio/voices stores one). "
    "On zero_shot, cross_lingual, instruct2 and vc a stored voice replaces prompt_wav (and prompt_text).",
    "prompt_text": "Transcript of prompt_wav.",
    "instruct_text": "Instruction: style, emotion, dialect, speed...",
    "prompt_wav": "Prompt recording: any common audio format, 0.5 to 30 s, at least 16 kHz.",
    "source_wav": "Recording to convert: any common audio format, 0.5 to 30 s, at least 16 kHz.",
    "stream": "Token-level streaming: audio starts after the first chunk of speech tokens instead of whole sentences.",
    "speed": "Speaking rate factor (1.0 = normal).",
    "seed": "Random seed: the same request with the same seed gives the same audio.",
    "format": "wav (default; header then 16-bit PCM), pcm (raw int16 little-endian, as the official server; "
    "the default when the server runs with --official_format pcm), mp3, opus (Ogg), flac, or aac (if the server "
    "has PyAV).",
    "sample_rate": "Output sample rate in Hz (default: the model's; opus takes 8000/16000/24000/48000).",
    "pronunciations": FIELD_DOC.replace("Pronunciations", "A JSON string: pronunciations", 1),
    "continuity": "Each sentence after the first continues the previous one (its text, speech tokens and mel join "
    "the prompt); the request can then be continued by a later one (previous_request_id).",
    "previous_request_id": "Continue the voice of a finished request of this API key made with continuity (its "
    "X-Request-ID, kept for a limited time). Implies continuity.",
}
# Not among the documented fields (servers with one model have nothing to choose): said in each description.
MODEL_NOTE = (
    " On a server with several models, an optional field (or query parameter) model names the one to use "
    "(its name, id or family, as GET /v1/models lists them); without it the default model answers."
)


# The engine request field each form field fills.
REQUEST_FIELDS = {
    "tts_text": "text",
    "spk_id": "spk_id",
    "prompt_text": "prompt_text",
    "instruct_text": "instruct_text",
    "prompt_wav": "prompt_audio",
    "source_wav": "source_audio",
}


def _voice_option(fields: Fields, endpoint: Endpoint) -> tuple[str | None, tuple[str, ...]]:
    """``(spk_id, fields it replaces)``: the stored voice a prompt mode got instead of prompt_wav, if any."""
    spk_id = option(fields, "spk_id") if endpoint.voice_replaces else None
    if spk_id is None:
        return None, ()
    if fields.get("prompt_wav") not in (None, ""):
        raise InvalidRequest("send prompt_wav or spk_id (a stored voice), not both", param="spk_id")
    return spk_id, endpoint.voice_replaces


async def synthesize(request: Request, endpoint: Endpoint) -> Response:
    state = server_state(request)
    queried = option(dict(request.query_params), "model")
    early = None
    if len(state.models.slots) == 1 or queried is not None:
        # A mode the model cannot serve is refused before the uploads are read (a form's model is not known yet).
        early = await state.models.get(queried)
        check_mode(early, endpoint.mode)
    fields = await read_fields(request, state.settings.max_upload_bytes)
    try:
        model = option(fields, "model")
        engine = early if early is not None and model == queried else None
        if engine is None:  # the form names the model (or another one than the query string)
            engine = await state.models.get(model)
            check_mode(engine, endpoint.mode)
        spk_id, replaced = _voice_option(fields, endpoint)
        values: dict[str, Any] = {
            REQUEST_FIELDS[name]: None if name in replaced else text_field(fields, name, state.settings.max_text_length)
            for name in endpoint.texts
        }
        options, fmt = parse_options(fields, state.settings.official_format)
        output = OutputFormat.checked(fmt, parse_sample_rate(fields), engine.info.sample_rate)
        limits = engine.info.prompt_limits
        for name in endpoint.audios:
            values[REQUEST_FIELDS[name]] = None if name in replaced else await audio_field(fields, name, limits)
        if spk_id is not None:
            values["spk_id"] = spk_id
        entries = request_pronunciations(option(fields, "pronunciations"))
        continuity = parse_flag(fields, "continuity") if endpoint.texts else False
        previous = option(fields, "previous_request_id") if endpoint.texts else None
    finally:
        for value in fields.values():
            if isinstance(value, UploadFile):
                await value.close()
    synthesis = SynthesisRequest(endpoint.mode, options=GenerationOptions(**options), **values)
    owner = scope_key_id(request.scope)
    synthesis = replace(
        synthesis, pronunciations=entries, lexicon_owner=owner, continuity=continuity, previous_request_id=previous
    )
    return await start_generation(request, engine, endpoint.path.lstrip("/"), synthesis, output)


# What text_field accepts: something besides white space (schema-driven clients must not send "").
NON_BLANK_TEXT: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": r"\S"}


def _schema(name: str) -> dict[str, Any]:
    if name.endswith("_wav"):
        return {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
    return {
        "tts_text": NON_BLANK_TEXT,
        "prompt_text": NON_BLANK_TEXT,
        "instruct_text": NON_BLANK_TEXT,
        "spk_id": NON_BLANK_TEXT,
        "stream": {"type": "boolean", "default": False},
        "continuity": {"type": "boolean", "default": False},
        "speed": {"type": "number", "default": 1.0, "exclusiveMinimum": 0},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "format": {"type": "string", "enum": list(ENCODERS)},
        "sample_rate": {"type": "integer", "enum": list(OUTPUT_RATES)},
    }.get(name, {"type": "string"})


_OPTIONAL = ("stream", "speed", "seed", "format", "sample_rate")


def _optional(endpoint: Endpoint) -> tuple[str, ...]:
    # The lexicon and continuity apply to text.
    optional = (*_OPTIONAL, "pronunciations", "continuity", "previous_request_id") if endpoint.texts else _OPTIONAL
    return ("spk_id", *optional) if endpoint.voice_replaces else optional


def _body_doc(endpoint: Endpoint) -> dict[str, Any]:
    names = (*endpoint.texts, *endpoint.audios, *_optional(endpoint))
    schema = {
        "type": "object",
        "required": [n for n in (*endpoint.texts, *endpoint.audios) if n not in endpoint.voice_replaces],
        "properties": {n: {**_schema(n), "description": FIELD_DOCS[n]} for n in names},
    }
    content = {"multipart/form-data": {"schema": schema}}
    if not endpoint.audios:
        content["application/x-www-form-urlencoded"] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


def _query_doc(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "parameters": [
            {
                "name": n,
                "in": "query",
                "required": n in endpoint.texts and n not in endpoint.voice_replaces,
                "schema": _schema(n),
                "description": FIELD_DOCS[n],
            }
            for n in (*endpoint.texts, *_optional(endpoint))
        ]
    }


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                k: {"type": "string", "nullable": k == "param"} for k in ("message", "type", "param", "code")
            },
        }
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Audio at the model's sample rate or sample_rate (headers X-Sample-Rate, X-Channels).",
        "content": {
            t: {"schema": {"type": "string", "format": "binary"}}
            for t in ("audio/wav", "audio/pcm", "audio/mpeg", "audio/ogg", "audio/flac", "audio/aac")
        },
    },
    **{
        status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
        for status, text in (
            (400, "The loaded model cannot serve this mode, or the body is not a form."),
            (404, "Unknown spk_id (the message lists the known ones)."),
            (413, "Request body over the upload limit."),
            (422, "Missing, empty or invalid field (text too long, audio unusable...)."),
            (503, "The model is still loading."),
        )
    },
}

router = APIRouter(tags=["official API"])


def _handler(endpoint: Endpoint) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        return await synthesize(request, endpoint)

    handler.__name__ = f"inference_{endpoint.mode}"
    return handler


for _endpoint in ENDPOINTS:
    _get_note = " GET takes the text fields as query parameters or, like the official client, as a form body" + (
        " (uploads need a multipart body)." if _endpoint.audios else "."
    )
    for _method, _doc in (("GET", _query_doc(_endpoint)), ("POST", _body_doc(_endpoint))):
        router.add_api_route(
            _endpoint.path,
            _handler(_endpoint),
            methods=[_method],
            summary=_endpoint.summary,
            description=_endpoint.summary + (_get_note if _method == "GET" else "") + MODEL_NOTE,
            operation_id=f"inference_{_endpoint.mode}_{_method.lower()}",
            response_class=Response,
            responses=_RESPONSES,
            openapi_extra=_doc,
        )
