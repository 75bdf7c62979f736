"""``POST /v1/audio/captioned_speech``: the ``/v1/audio/speech`` body, answered with the audio and where each
segment (sentence) is spoken in it.

The times are the engine's segment marks (:class:`cosyserve.engine.client.SegmentSpan`): the real sample
where each segment's audio starts (after any silence before it) and ends (before any silence after it),
at the model's rate, in seconds. ``?captions=srt`` / ``?captions=vtt`` answer the caption file alone; the
default JSON carries the audio (base64 of ``response_format``), the segments, and both caption files.

No word-level times: the models do not align words to speech tokens (no duration model, no attention
alignment exposed), so any word time would be a guess from character counts; the segment times are exact.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cosyserve.api.deps import server_state
from cosyserve.api.errors import error_response, error_responses, request_id
from cosyserve.api.openai import SpeechRequest, parse_request, speech_output, speech_synthesis
from cosyserve.api.parsing import read_body
from cosyserve.audio.encode import OutputFormat
from cosyserve.audio.resample import OutputResampler
from cosyserve.engine.client import AudioStream, EngineClient
from cosyserve.engine.request import SynthesisRequest
from cosyserve.errors import GenerationFailed, InvalidRequest, UnsupportedMode
from cosyserve.text.subtitles import Caption, format_srt, format_vtt

CAPTION_FORMATS = ("json", "srt", "vtt")
SRT_MEDIA_TYPE = "application/x-subrip"
VTT_MEDIA_TYPE = "text/vtt"

router = APIRouter(tags=["OpenAI API"])


async def synthesize_all(
    request: Request, engine: EngineClient, synthesis: SynthesisRequest, rid: str | None = None
) -> tuple[np.ndarray, AudioStream]:
    """The whole audio of ``synthesis`` (float32 at the model's rate) and its stream (its segment spans)."""
    state = server_state(request)
    stream = await engine.synthesize(synthesis, rid or request_id(request))
    state.in_flight.enter()
    try:
        chunks = [chunk async for chunk in stream]
    finally:
        await stream.aclose()
        state.in_flight.leave()
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), stream


def encode_audio(audio: np.ndarray, output: OutputFormat, model_rate: int) -> bytes:
    """The whole audio in ``output``'s format and rate."""
    return output.encoder().encode_all(OutputResampler(model_rate, output.rate)(audio, last=True))


def captions_of(stream: AudioStream, samples: int, model_rate: int) -> list[Caption]:
    """Each segment's text and times (seconds) from the stream's marks."""
    if samples and not stream.segments:
        raise UnsupportedMode("this engine does not report where its segments are in the audio", param="captions")
    return [
        Caption(s.text, s.start / model_rate, (s.end if s.end is not None else samples) / model_rate)
        for s in stream.segments
    ]


@router.post(
    "/v1/audio/captioned_speech",
    summary="Text to speech with captions: the audio (base64) and each segment's text, start and end (seconds); "
    "?captions=srt or vtt answers the caption file alone.",
    response_class=JSONResponse,
    responses=error_responses(
        400,
        413,
        503,
        described={404: "Unknown model, voice or previous_request_id"},
        success={
            200: {
                "description": "JSON {audio, response_format, sample_rate, duration, request_id, segments, srt, vtt}, "
                "or the SRT / WebVTT file.",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    SRT_MEDIA_TYPE: {"schema": {"type": "string"}},
                    VTT_MEDIA_TYPE: {"schema": {"type": "string"}},
                },
            }
        },
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SpeechRequest.model_json_schema()}},
        }
    },
)
async def captioned_speech(request: Request, captions: str = "json") -> Response:
    kind = captions.strip().lower()
    if kind not in CAPTION_FORMATS:
        raise InvalidRequest(
            f"captions must be one of {', '.join(CAPTION_FORMATS)}, not {captions!r}", param="captions"
        )
    state = server_state(request)
    req = parse_request(await read_body(request, state.settings.max_upload_bytes))
    if req.stream_format != "audio":
        raise InvalidRequest("captioned_speech answers one JSON document: stream_format must be audio", "stream_format")
    engine = await state.models.get(req.model)
    output = speech_output(
        req.response_format, req.sample_rate, state.settings.pcm_sample_rate, engine.info.sample_rate
    )
    synthesis, _ = await speech_synthesis(request, req, engine)
    rate = engine.info.sample_rate
    try:
        audio, stream = await synthesize_all(request, engine, synthesis)
    except GenerationFailed:
        return error_response(
            f"audio generation failed (request {request_id(request)}); see the server log", "generation_failed", 500
        )
    found = captions_of(stream, audio.shape[0], rate)
    headers = {"X-Request-ID": stream.request_id, "Cache-Control": "no-store"}
    if kind == "srt":
        return Response(format_srt(found), media_type=SRT_MEDIA_TYPE, headers=headers)
    if kind == "vtt":
        return Response(format_vtt(found), media_type=VTT_MEDIA_TYPE, headers=headers)
    body: dict[str, Any] = {
        "audio": base64.b64encode(encode_audio(audio, output, rate)).decode(),
        "response_format": output.fmt,
        "sample_rate": output.rate,
        "duration": audio.shape[0] / rate,
        "request_id": stream.request_id,
        "segments": [
            {
                "index": s.index,
                "text": c.text,
                "start": c.start,
                "end": c.end,
                "start_sample": s.start,
                "end_sample": s.end,
            }
            for s, c in zip(stream.segments, found, strict=True)
        ],
        "model_sample_rate": rate,
        "srt": format_srt(found),
        "vtt": format_vtt(found),
    }
    return JSONResponse(body, headers=headers)
