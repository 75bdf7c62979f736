"""``POST /v1/text/preview``: what a speech request's text becomes, without synthesising it.

The body is ``/v1/audio/speech``'s (``model``, ``input`` as text or SSML, ``voice`` / ``ref_audio`` /
``instructions``, ``speed``, ``pronunciations``), read the same way, so the answer is exactly what that
request would synthesise: its mode and, per segment, the text after normalisation and the lexicon, the text
ids the LLM reads for it, its speed and the silence around it; plus the SSML tags it ignores. The output
fields (``response_format``, ``sample_rate``...) are read but change nothing here.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cosyserve.api.deps import server_state
from cosyserve.api.errors import error_responses
from cosyserve.api.openai import SpeechRequest, parse_request, speech_synthesis
from cosyserve.api.parsing import read_body

router = APIRouter(tags=["OpenAI API"])

_PREVIEW_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SpeechRequest.model_json_schema()}},
    }
}


@router.post(
    "/v1/text/preview",
    summary="The segments a /v1/audio/speech body would synthesise (normalised text, pronunciations applied, "
    "text tokens, speed, breaks) and its mode, without synthesising.",
    responses=error_responses(400, 413, 503, described={404: "Unknown model or voice"}),
    openapi_extra=_PREVIEW_DOC,
)
async def preview_text(request: Request) -> JSONResponse:
    state = server_state(request)
    req = parse_request(await read_body(request, state.settings.max_upload_bytes))
    engine = await state.models.get(req.model)
    synthesis, spk_id = await speech_synthesis(request, req, engine)
    preview = await engine.preview(synthesis)
    segments: list[dict[str, Any]] = [
        {
            "text": s.text,
            "text_tokens": s.text_tokens,
            "speed": s.speed,
            "break_before_ms": round(s.pause_before_s * 1000),
            "break_after_ms": round(s.pause_after_s * 1000),
        }
        for s in preview.segments
    ]
    return JSONResponse(
        {
            "mode": preview.mode,
            "voice": spk_id,
            "ssml": synthesis.ssml is not None,
            "segments": segments,
            "text_tokens": sum(s["text_tokens"] for s in segments),
            "ssml_ignored_tags": list(preview.ssml_ignored),
        }
    )
