"""The pronunciation lexicon over HTTP: ``POST /v1/pronunciations``, ``GET /v1/pronunciations`` and
``DELETE /v1/pronunciations/{word}``, and the per-request ``pronunciations`` field every synthesis route
reads (:func:`request_pronunciations`).

An entry (``word`` and ``pinyin`` with tone numbers, ``cmu`` phonemes or a ``respelling``) is stored in the
voice library's database, in one scope: ``global`` (every request), a ``voice`` (requests speaking with it)
or ``api_key`` (requests carrying the caller's API key; the server must have keys). Posting a word stored in
that scope already replaces it (200; a new entry is 201). What a model does with an entry, and the limits:
:mod:`cosyserve.text.pronunciation`. A stored entry with only pinyin / CMU is skipped by models without inline
pronunciation tokens (every family but Fun-CosyVoice3); ``usable`` in the answer says whether the model
(the default one, or ``model``) speaks it.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cosyserve.api.auth import scope_key_id
from cosyserve.api.deps import server_state
from cosyserve.api.errors import error_responses
from cosyserve.api.parsing import parse_json_body, read_body
from cosyserve.engine.client import EngineClient
from cosyserve.engine.pronunciations import PronunciationStore
from cosyserve.engine.voice_library.base import StoredPronunciation
from cosyserve.engine.voices import validate_voice_id
from cosyserve.errors import InvalidRequest, UnknownSpeaker
from cosyserve.text.pronunciation import (
    GLOBAL_SCOPE,
    MAX_PRONUNCIATION_LENGTH,
    MAX_REQUEST_ENTRIES,
    MAX_STORED_PER_SCOPE,
    MAX_WORD_LENGTH,
    Pronunciation,
    key_scope,
    parse_pronunciations,
    voice_scope,
)
from cosyserve.text.pronunciation import check_word as _check_word

SCOPES = ("global", "voice", "api_key")
FIELD_DOC = (
    f"Pronunciations for this request (at most {MAX_REQUEST_ENTRIES}): "
    '{"word": "respelling"} or {"word": {"pinyin": "chong2 qing4"} | {"cmu": "HH AH0 L OW1"} | '
    '{"respelling": "..."}}, over the stored ones (POST /v1/pronunciations). Pinyin / CMU need '
    "Fun-CosyVoice3; other models speak the respelling."
)

router = APIRouter(tags=["pronunciation lexicon"])


class EntryBody(BaseModel):
    """The body of ``POST /v1/pronunciations``."""

    model_config = ConfigDict(extra="forbid")

    word: str = Field(description=f"The word (1-{MAX_WORD_LENGTH} characters; Latin words match whole words).")
    pinyin: str | None = Field(None, description="Pinyin with tone numbers 1-5 (chong2 qing4) or tone marks.")
    cmu: str | None = Field(None, description="CMU (ARPAbet) phonemes with stress digits (HH AH0 L OW1).")
    respelling: str | None = Field(
        None, description=f"What to say instead (at most {MAX_PRONUNCIATION_LENGTH} characters); every model."
    )
    voice: str | None = Field(None, description="The voice whose requests it serves (scope voice).")
    scope: str | None = Field(None, description="global (default), voice (with voice) or api_key (the caller's key).")
    model: str | None = Field(None, description="The served model that checks it (default: the default model).")


_CREATE_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": EntryBody.model_json_schema()}}}
}


def request_pronunciations(value: Any, param: str = "pronunciations") -> tuple[Pronunciation, ...]:
    """A request's ``pronunciations``: the object (JSON bodies) or its JSON text (form fields); None: none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequest(f"{param} is not valid JSON: {exc}", param=param) from exc
    return parse_pronunciations(value, param)


def _parse(body: bytes) -> EntryBody:
    return parse_json_body(EntryBody, body, 'send a JSON body: {"word": ..., "pinyin" | "cmu" | "respelling": ...}')


def _scope(request: Request, engine: EngineClient, scope: str | None, voice: str | None, *, new: bool) -> str:
    """The stored scope a request names (``new``: a voice's must exist)."""
    kind = scope or ("voice" if voice else "global")
    if kind not in SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}", param="scope")
    if kind != "voice" and voice:
        raise InvalidRequest(f"voice is for scope voice, not {kind}", param="voice")
    if kind == "voice":
        if not voice:
            raise InvalidRequest("scope voice needs voice (the voice id)", param="voice")
        store = engine.voices
        voice_id = voice if store.builtin(voice) else validate_voice_id(voice, param="voice")
        if new and voice_id not in store:
            raise UnknownSpeaker(f"unknown voice '{voice_id}' (GET /v1/audio/voices lists them)", param="voice")
        return voice_scope(voice_id)
    if kind == "api_key":
        owner = scope_key_id(request.scope)
        if owner is None:
            raise InvalidRequest(
                "scope api_key needs the server started with --api_key and the request carrying one "
                "(Authorization: Bearer <key>)",
                param="scope",
            )
        return key_scope(owner)
    return GLOBAL_SCOPE


def pronunciation_object(stored: StoredPronunciation, store: PronunciationStore) -> dict[str, Any]:
    return {
        "object": "pronunciation",
        **stored.entry.as_dict(),
        "scope": stored.kind,
        "voice": stored.voice,
        "created_at": stored.created_at,
        "usable": store.usable(stored.entry),
    }


@router.post(
    "/v1/pronunciations",
    status_code=201,
    summary="Store a pronunciation (word + pinyin, cmu or respelling) for every request, a voice or an API key.",
    responses=error_responses(
        400,
        413,
        503,
        described={
            404: "voice names no voice, or model no served model",
            409: f"The scope holds {MAX_STORED_PER_SCOPE} entries (pronunciation_limit_reached)",
        },
        success={
            200: {"description": "The word was stored in this scope already: replaced."},
            201: {"description": "The stored entry; Location names it."},
        },
    ),
    openapi_extra=_CREATE_DOC,
)
async def create_pronunciation(request: Request) -> JSONResponse:
    state = server_state(request)
    body = _parse(await read_body(request, state.settings.max_upload_bytes))
    engine = await state.models.get(body.model)
    entry = Pronunciation(body.word, body.pinyin, body.cmu, body.respelling)
    scope = _scope(request, engine, body.scope, body.voice, new=True)
    store = engine.pronunciations
    store.check(entry)  # a syllable / phone this model's tokenizer has no token for: 400 now
    voice = body.voice if scope.startswith("voice:") else None
    stored, created = await anyio.to_thread.run_sync(store.put, entry, scope, voice)
    headers = {"Location": f"/v1/pronunciations/{quote(stored.entry.word)}"}
    return JSONResponse(pronunciation_object(stored, store), status_code=201 if created else 200, headers=headers)


@router.get(
    "/v1/pronunciations",
    summary="Stored pronunciations: those every request, the voices and the caller's API key reach, or of one "
    "scope (?scope=global|voice|api_key, ?voice=).",
    responses=error_responses(400, 404, 503),
)
async def list_pronunciations(
    request: Request, scope: str | None = None, voice: str | None = None, model: str | None = None
) -> dict[str, Any]:
    engine = await server_state(request).models.get(model)
    store = engine.pronunciations
    if scope is None and voice is None:
        owner = scope_key_id(request.scope)
        scopes = [GLOBAL_SCOPE] + ([key_scope(owner)] if owner else [])

        def everything() -> list[StoredPronunciation]:
            found = store.entries(scopes)
            first = [s for s in found if s.scope == GLOBAL_SCOPE]
            return first + store.voice_entries() + [s for s in found if s.scope != GLOBAL_SCOPE]

        entries = await anyio.to_thread.run_sync(everything)
    elif scope == "voice" and voice is None:
        entries = await anyio.to_thread.run_sync(store.voice_entries)
    else:
        entries = await anyio.to_thread.run_sync(store.entries, [_scope(request, engine, scope, voice, new=False)])
    return {"object": "list", "data": [pronunciation_object(s, store) for s in entries]}


@router.delete(
    "/v1/pronunciations/{word:path}",
    summary="Delete a stored pronunciation (of the global scope, or ?voice= / ?scope=api_key).",
    responses=error_responses(400, 404, 503),
)
async def delete_pronunciation(
    word: str, request: Request, scope: str | None = None, voice: str | None = None, model: str | None = None
) -> dict[str, Any]:
    engine = await server_state(request).models.get(model)
    word = _check_word(word)
    removed = await anyio.to_thread.run_sync(
        engine.pronunciations.remove, _scope(request, engine, scope, voice, new=False), word
    )
    return {"object": "pronunciation.deleted", "word": removed.entry.word, "scope": removed.kind, "deleted": True}
