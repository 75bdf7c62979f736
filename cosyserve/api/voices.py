"""The voice library over HTTP: ``POST /v1/audio/voices``, ``GET`` and ``DELETE /v1/audio/voices/{id}``.

A voice is made once from a recording (multipart ``audio_sample``, ``name``, optional ``ref_text``, its
transcript): its speech tokens, prompt mel and speaker embedding are computed by the loaded model and
stored in the library under the data directory. Its id is its name. It then works as ``voice`` on
``/v1/audio/speech`` and as ``spk_id`` on the official routes: ``/inference_sft``, ``/inference_instruct``
and, in place of ``prompt_wav``, ``/inference_cross_lingual``, ``/inference_instruct2``,
``/inference_vc`` and ``/inference_zero_shot`` (which needs the transcript). ``GET /v1/audio/voices``
(in ``openai.py``) lists the voices the loaded model can use.

:func:`resolve_voice` is what every voice-centred route (``/v1/audio/speech``, the WebSocket sessions)
does with the ``voice`` a client names: a voice id, or an OpenAI voice name mapped through
``--voice_map``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from cosyserve.api.deps import server_state
from cosyserve.api.errors import error_responses, request_id
from cosyserve.api.parsing import Fields, audio_field, read_fields, text_field
from cosyserve.engine.voices import MAX_ID_LENGTH, VoiceCatalog, VoiceInfo, validate_voice_id
from cosyserve.errors import InvalidRequest, UnknownSpeaker

# fmt: off
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
# fmt: on
# OpenAI voice names (alloy...) -> voice ids: the server's --voice_map.
VoiceMap = tuple[tuple[str, str], ...]

router = APIRouter(tags=["voice library"])

_CREATE_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "audio_sample"],
                    "properties": {
                        "name": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_ID_LENGTH,
                            "description": f"The voice's name, which is also its id: 1-{MAX_ID_LENGTH} letters, "
                            "digits, spaces, '.', '_' or '-'; unique regardless of case.",
                        },
                        "audio_sample": {
                            "type": "string",
                            "format": "binary",
                            "description": "The recording: any common audio format, 0.5 to 30 s, at least 16 kHz.",
                        },
                        "model": {
                            "type": "string",
                            "description": "The served model that makes the voice (default: the default model); "
                            "the voice serves the models of its family and token rate.",
                        },
                        "ref_text": {
                            "type": "string",
                            "description": "Transcript of the recording. Without it the voice serves every mode "
                            "but zero_shot (on /v1/audio/speech it speaks cross-lingually).",
                        },
                    },
                }
            }
        },
    }
}


def voice_object(info: VoiceInfo, store: VoiceCatalog) -> dict[str, Any]:
    """A voice's metadata as the API shows it (no tensors)."""
    return {
        "id": info.id,
        "object": "audio.voice",
        "name": info.id,
        "created_at": info.created_at,
        "kind": "clone" if info.has_prompt else "speaker",
        "builtin": info.builtin,
        "ref_text": info.ref_text,
        "model_family": info.family,
        "token_rate": info.token_rate,
        "model": info.model,
        "duration": None if info.duration is None else round(info.duration, 3),
        "usable": store.usable(info),
    }


def voice_list(store: VoiceCatalog, voice_map: VoiceMap) -> list[dict[str, Any]]:
    """Voices for ``voice``: built-in speakers and the stored voices this model can use (as
    ``GET /v1/audio/voices/{id}`` shows them), then the mapped OpenAI names."""
    voices = [voice_object(store.info(voice_id), store) for voice_id in store.ids()]
    for name, target in voice_map:
        if target in store and name not in store:
            voices.append({"id": name, "object": "audio.voice", "name": name, "kind": "alias", "voice": target})
    return voices


def resolve_voice(store: VoiceCatalog, voice_map: VoiceMap, voice: str | dict[str, str] | None) -> str:
    """The voice id a request's ``voice`` names (a string or ``{"id": ...}``; mapped OpenAI names
    followed, an unmapped one: the model's first voice); UnknownSpeaker lists the known ones."""
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice.strip():
        raise InvalidRequest(
            "voice is required (GET /v1/audio/voices lists them), or send ref_audio to clone a voice", param="voice"
        )
    mapping = dict(voice_map)
    target = mapping.get(voice, mapping.get(voice.lower()))
    if target is not None:
        if target not in store:
            raise UnknownSpeaker(f"voice '{voice}' maps to '{target}', which this model does not have", param="voice")
        return target
    if voice in store:
        return voice
    ids = store.ids()
    if voice.lower() in OPENAI_VOICES and ids:
        return ids[0]
    known = [v["id"] for v in voice_list(store, voice_map)]
    listing = ", ".join(known) if known else "none: send ref_audio (and ref_text) or store a voice first"
    raise UnknownSpeaker(f"unknown voice '{voice}'; known voices: {listing}", param="voice")


def _checked_id(store: VoiceCatalog, voice_id: str) -> str:
    # Built-in ids come from the model's spk2info.pt and are taken as they are.
    return voice_id if store.builtin(voice_id) else validate_voice_id(voice_id, param="voice_id")


def _optional_text(fields: Fields, name: str, max_length: int) -> str | None:
    value = fields.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return text_field(fields, name, max_length)


@router.post(
    "/v1/audio/voices",
    status_code=201,
    summary="Store a voice from a recording (multipart audio_sample, name, ref_text); use its id as voice / spk_id.",
    responses=error_responses(
        400,
        413,
        503,
        described={
            404: "model names no served model (model_not_found lists them)",
            409: "The name is taken (voice_exists) or the library is full (voice_limit_reached)",
        },
        success={201: {"description": "The stored voice's metadata; Location names it."}},
    ),
    openapi_extra=_CREATE_DOC,
)
async def create_voice(request: Request) -> JSONResponse:
    state = server_state(request)
    fields = await read_fields(request, state.settings.max_upload_bytes)
    try:
        model = fields.get("model")
        engine = await state.models.get(model if isinstance(model, str) else None)  # the voice is made by it
        name = text_field(fields, "name", state.settings.max_text_length)
        # Invalid, taken or over the cap: answered before the recording is decoded and analysed.
        name = await anyio.to_thread.run_sync(engine.voices.check_new, name)
        ref_text = _optional_text(fields, "ref_text", state.settings.max_text_length)
        audio = await audio_field(fields, "audio_sample", engine.info.prompt_limits)
    finally:
        for value in fields.values():
            if isinstance(value, UploadFile):
                await value.close()

    # Analysing the recording runs on the engine, queued with the syntheses (503 when the queue is full).
    info = await engine.add_voice(name, ref_text, audio, request_id(request))
    return JSONResponse(
        voice_object(info, engine.voices),
        status_code=201,
        headers={"Location": f"/v1/audio/voices/{quote(info.id)}"},
    )


@router.get(
    "/v1/audio/voices/{voice_id:path}",
    summary="A voice's metadata: stored voices (any model family; usable says whether the model, the default "
    "one or ?model=, can use it) and built-in speakers.",
    responses=error_responses(400, 404, 503),
)
async def get_voice(voice_id: str, request: Request, model: str | None = None) -> dict[str, Any]:
    store = (await server_state(request).models.get(model)).voices
    info = await anyio.to_thread.run_sync(store.info, _checked_id(store, voice_id), "voice_id")
    return voice_object(info, store)


@router.delete(
    "/v1/audio/voices/{voice_id:path}",
    summary="Delete a stored voice (of any model family); built-in speakers are read-only.",
    responses=error_responses(400, 404, 503),
)
async def delete_voice(voice_id: str, request: Request, model: str | None = None) -> dict[str, Any]:
    store = (await server_state(request).models.get(model)).voices
    info = await anyio.to_thread.run_sync(store.remove, _checked_id(store, voice_id))
    return {"id": info.id, "object": "audio.voice.deleted", "deleted": True}
