"""``POST /v1/audio/dubbing``: an SRT file spoken cue by cue into one track, each cue at its start time.

Multipart fields: ``file`` (the SRT document), ``voice``, and as on ``/v1/audio/speech``: ``model``,
``response_format`` (default wav), ``sample_rate``, ``speed`` (the base rate), ``seed``, ``instructions``;
``report=json`` answers JSON (the track as base64 and the report) instead of the audio alone.

Each cue is synthesised at the base speed first (a first pass: its real duration); a cue longer than its
slot (its start to its end, or to the next cue's start when that comes sooner) is synthesised again with
the same seed (the same speech tokens) at the speed that fits it, within the engine's MIN_SPEED..MAX_SPEED
(the mel is stretched, the pitch kept). Each cue's audio starts at the sample of its start time; silence
fills the rest. A cue that still does not fit is cut at the next cue's start and reported (the
``X-Dubbing-Unfit`` header lists their numbers; the JSON report says by how much), never cut silently.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from cosyserve.api.captions import encode_audio, synthesize_all
from cosyserve.api.deps import server_state
from cosyserve.api.errors import error_responses, request_id
from cosyserve.api.openai import SpeechRequest, speech_output, speech_synthesis
from cosyserve.api.parsing import MAX_SEED, option, parse_integer, parse_number, parse_sample_rate, read_fields
from cosyserve.engine.client import EngineClient
from cosyserve.engine.request import MAX_SPEED, MIN_SPEED, GenerationOptions, SynthesisRequest
from cosyserve.errors import InvalidRequest, MissingField
from cosyserve.text.subtitles import MAX_SRT_BYTES, Cue, parse_srt

# Cues synthesised at once (the engine batches them); the rest wait their turn.
DUBBING_CONCURRENCY = 4
# A cue's second pass aims this much under its slot (a stretched mel's length is rounded down, the vocoder's
# is not exactly proportional).
FIT_MARGIN = 0.02

router = APIRouter(tags=["OpenAI API"])


@dataclass
class Placed:
    """One cue in the track: where it starts (samples at the model's rate), its audio and how it was fitted."""

    cue: Cue
    offset: int  # the sample of its start time
    limit: int | None  # the samples it may take before the next cue starts (None: the last cue)
    slot: int  # the samples between its start and its end (or the next cue's start, if sooner)
    speed: float
    audio: np.ndarray  # as placed (cut to ``limit`` when it did not fit)
    spoken: int  # the samples its audio had before any cut

    @property
    def fits(self) -> bool:
        return self.limit is None or self.spoken <= self.limit

    def report(self, rate: int) -> dict[str, Any]:
        return {
            "cue": self.cue.number,
            "text": self.cue.text,
            "start": self.cue.start,
            "end": self.cue.end,
            "start_sample": self.offset,
            "samples": int(self.audio.shape[0]),
            "duration": self.spoken / rate,
            "speed": self.speed,
            "fits": self.fits,
            "cut_seconds": 0.0 if self.fits else (self.spoken - self.audio.shape[0]) / rate,
        }


def _form(fields: dict[str, Any]) -> tuple[bytes | UploadFile, SpeechRequest, str]:
    file = fields.get("file")
    if file is None or file == "":
        raise MissingField("file is required: upload the SRT document (multipart/form-data)", param="file")
    voice = option(fields, "voice")
    if voice is None:
        raise MissingField("voice is required: a built-in speaker or a stored voice (GET /v1/audio/voices)", "voice")
    report = (option(fields, "report") or "header").lower()
    if report not in ("header", "json"):
        raise InvalidRequest(f"report must be header or json, not {report!r}", param="report")
    speed = 1.0
    if (raw := option(fields, "speed")) is not None:
        speed = parse_number(raw, "speed", f"a number within {MIN_SPEED}..{MAX_SPEED}")
    seed = None
    if (raw := option(fields, "seed")) is not None:
        seed = parse_integer(raw, "seed", MAX_SEED, "an integer in 0..2^63-1")
    body = SpeechRequest.model_validate(
        {
            "model": option(fields, "model") or "tts-1",
            "input": "-",
            "voice": voice,
            "response_format": option(fields, "response_format") or "wav",
            "speed": speed,
            "seed": seed,
            "sample_rate": parse_sample_rate(fields),
            "instructions": option(fields, "instructions"),
        }
    )
    GenerationOptions(speed=speed)  # its range error now, before any work
    return file, body, report


async def _srt(file: bytes | UploadFile) -> list[Cue]:
    if not isinstance(file, UploadFile):
        data = file.encode() if isinstance(file, str) else file
    else:
        data = await file.read(MAX_SRT_BYTES + 1)
    return parse_srt(data)


async def _fit(
    request: Request, engine: EngineClient, base: SynthesisRequest, cue: Cue, nxt: Cue | None, rid: str
) -> Placed:
    rate = engine.info.sample_rate
    offset = round(cue.start * rate)
    limit = round(nxt.start * rate) - offset if nxt is not None else None
    slot = round(cue.end * rate) - offset
    if limit is not None:
        slot = min(slot, limit)
    synthesis = replace(base, text=cue.text)
    speed = synthesis.options.speed
    audio, _ = await synthesize_all(request, engine, synthesis, f"{rid}-cue{cue.number}")
    if audio.shape[0] > slot > 0 and speed < MAX_SPEED:
        wanted = min(speed * audio.shape[0] / (slot * (1 - FIT_MARGIN)), MAX_SPEED)
        faster = replace(synthesis, options=replace(synthesis.options, speed=wanted))
        audio, _ = await synthesize_all(request, engine, faster, f"{rid}-cue{cue.number}-fit")
        speed = wanted
    spoken = int(audio.shape[0])
    if limit is not None and spoken > limit:
        audio = audio[: max(limit, 0)]
    return Placed(cue, offset, limit, slot, speed, audio, spoken)


def _track(placed: list[Placed], rate: int) -> np.ndarray:
    end = max(max(p.offset + p.audio.shape[0] for p in placed), round(placed[-1].cue.end * rate))
    track = np.zeros(end, np.float32)
    for p in placed:
        track[p.offset : p.offset + p.audio.shape[0]] = p.audio
    return track


@router.post(
    "/v1/audio/dubbing",
    summary="Speak an SRT file: each cue at its start time in one track, sped up (within the engine's range) to "
    "fit its slot; cues that still do not fit are reported (X-Dubbing-Unfit, or report=json).",
    response_class=Response,
    responses=error_responses(
        400, 413, 503, described={404: "Unknown model or voice"}, success={200: {"description": "The track."}}
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "voice"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": "The SRT document."},
                            "voice": {"type": "string"},
                            "model": {"type": "string"},
                            "response_format": {"type": "string", "default": "wav"},
                            "sample_rate": {"type": "integer"},
                            "speed": {"type": "number", "default": 1.0},
                            "seed": {"type": "integer"},
                            "instructions": {"type": "string"},
                            "report": {"type": "string", "enum": ["header", "json"], "default": "header"},
                        },
                    }
                }
            },
        }
    },
)
async def dubbing(request: Request) -> Response:
    state = server_state(request)
    fields = await read_fields(request, state.settings.max_upload_bytes)
    try:
        file, body, report = _form(fields)
        cues = await _srt(file)
    finally:
        for value in fields.values():
            if isinstance(value, UploadFile):
                await value.close()
    engine = await state.models.get(body.model)
    output = speech_output(
        body.response_format, body.sample_rate, state.settings.pcm_sample_rate, engine.info.sample_rate
    )
    for cue in cues:
        if len(cue.text) > state.settings.max_text_length:
            raise InvalidRequest(
                f"cue {cue.number} (line {cue.line}) has {len(cue.text)} characters; at most "
                f"{state.settings.max_text_length} are accepted",
                param="file",
            )
    # One seed for every cue and both passes (a cue's second pass then speaks the same tokens faster).
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    base, _ = await speech_synthesis(request, body.model_copy(update={"seed": seed}), engine)
    rid = request_id(request)
    gate = asyncio.Semaphore(DUBBING_CONCURRENCY)

    async def one(i: int) -> Placed:
        async with gate:
            nxt = cues[i + 1] if i + 1 < len(cues) else None
            return await _fit(request, engine, base, cues[i], nxt, rid)

    placed = list(await asyncio.gather(*(one(i) for i in range(len(cues)))))
    rate = engine.info.sample_rate
    track = _track(placed, rate)
    unfit = ",".join(str(p.cue.number) for p in placed if not p.fits)
    headers = {"X-Dubbing-Cues": str(len(cues)), "X-Dubbing-Unfit": unfit, "X-Seed": str(seed)}
    audio = encode_audio(track, output, rate)
    if report == "json":
        return JSONResponse(
            {
                "audio": base64.b64encode(audio).decode(),
                "response_format": output.fmt,
                "sample_rate": output.rate,
                "model_sample_rate": rate,
                "duration": track.shape[0] / rate,
                "seed": seed,
                "cues": [p.report(rate) for p in placed],
                "unfit": [p.cue.number for p in placed if not p.fits],
            },
            headers=headers,
        )
    return Response(audio, media_type=output.encoder().media_type, headers=headers)
