"""Long-form jobs over HTTP (:mod:`cosyserve.api.job_runner` runs them).

- ``POST /v1/audio/jobs``: the ``/v1/audio/speech`` fields, ``input`` up to ``--max_job_text_length``
  characters (plain text) -> 202 with the job (its ``id``);
- ``GET /v1/audio/jobs`` (the caller's jobs), ``GET /v1/audio/jobs/{id}`` (``status``, ``progress``);
- ``GET /v1/audio/jobs/{id}/events``: server-sent ``progress`` events, then one ``done``;
- ``GET /v1/audio/jobs/{id}/audio``: the audio in the job's ``response_format`` (what is done so far while
  it runs); ``.../segments``: each segment's text and exact sample boundaries; ``.../captions.srt`` and
  ``.../captions.vtt``: one cue per segment;
- ``POST /v1/audio/jobs/{id}/cancel`` stops it (kept, ``cancelled``); ``DELETE`` cancels and removes it.

Jobs belong to the API key that created it (``scope_key_id``): another key sees 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cosyserve.api.auth import scope_key_id
from cosyserve.api.deps import ServerState, server_state
from cosyserve.api.errors import error_responses
from cosyserve.api.job_runner import MIN_FREE_BYTES, JobFiles, JobRunner, cut_segments, job_object
from cosyserve.api.openai import SpeechRequest, body_synthesis, parse_request, speech_output
from cosyserve.api.parsing import read_body
from cosyserve.audio.encode import AudioEncoder, WavEncoder
from cosyserve.audio.resample import OutputResampler
from cosyserve.engine.client import EngineClient
from cosyserve.engine.request import SynthesisRequest
from cosyserve.engine.voice_library import open_voice_library
from cosyserve.engine.voice_library.base import JobLimits, JobRecord, VoiceBackend
from cosyserve.errors import InsufficientStorage, InvalidRequest, JobNotReady, TextError, Unavailable, UnknownJob
from cosyserve.text.ssml import is_ssml
from cosyserve.text.subtitles import Caption, format_srt, format_vtt

logger = logging.getLogger("cosyserve.jobs")

EVENT_INTERVAL_S = 15.0  # an events stream repeats the job's state at least this often (keeps proxies open)
# The fields a job stores of its body (input is stored cut into segments; stream is always off).
_STORED_FIELDS = set(SpeechRequest.model_fields) - {"input", "stream", "stream_format"}

router = APIRouter(tags=["long-form jobs"])


class Jobs:
    """What the job routes share: the store (the voice library's database), the files, the runner."""

    def __init__(self, state: ServerState) -> None:
        settings = state.settings
        self.settings = settings
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if settings.data_dir:
            data_dir: Path | None = Path(settings.data_dir).expanduser()
            root = Path(settings.data_dir).expanduser() / "jobs"
        else:  # no data directory: jobs live as long as the process
            data_dir = None
            self._tmp = tempfile.TemporaryDirectory(prefix="cosyserve-jobs-")
            root = Path(self._tmp.name)
        self.store: VoiceBackend = open_voice_library(settings.voice_store, data_dir, settings.max_voices)
        self.files = JobFiles(root)
        self.limits = JobLimits(settings.max_jobs_per_key, settings.max_job_storage_bytes)
        self.runner = JobRunner(
            self.store, self.files, state.models, self._build, settings.max_running_jobs, self.limits.max_bytes
        )

    async def _build(self, job: JobRecord, text: str, seed: int, engine: EngineClient) -> SynthesisRequest:
        body = {**json.loads(job.body), "input": text, "seed": seed, "stream": False}
        req = SpeechRequest.model_validate(body)
        synthesis, _ = await body_synthesis(
            req, engine, self.settings.voice_map, self.settings.max_text_length, job.owner or None
        )
        return replace(synthesis, options=replace(synthesis.options, stream=False, seed=seed))

    def close(self) -> None:
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()


class JobService:
    """Opens the jobs' store and starts the runner: at start-up when the data directory holds jobs (to resume
    them), else on the first job request (a server that never takes a job opens nothing)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.jobs: Jobs | None = None
        self.error: str | None = None
        self._lock = asyncio.Lock()

    def has_jobs_on_disk(self) -> bool:
        data_dir = self.state.settings.data_dir
        return bool(data_dir) and (Path(data_dir).expanduser() / "jobs").is_dir()

    async def get(self) -> Jobs:
        async with self._lock:
            if self.jobs is None and self.error is None:
                try:
                    self.jobs = await asyncio.to_thread(Jobs, self.state)
                    self.jobs.runner.start()
                except Exception as exc:  # the server still serves speech; the job routes answer 503
                    logger.warning("long-form jobs are unavailable: %s", exc)
                    self.error = str(exc)
        if self.jobs is None:
            raise Unavailable(f"long-form jobs are not available on this server: {self.error}", retry_after=None)
        return self.jobs

    async def close(self) -> None:
        if self.jobs is not None:
            await self.jobs.runner.close()
            await asyncio.to_thread(self.jobs.close)
            self.jobs = None


@contextlib.asynccontextmanager
async def job_service(app: FastAPI) -> AsyncIterator[None]:
    """The job service for the app's lifetime (the app's lifespan enters it)."""
    service = JobService(app.state.cosyserve)
    app.state.cosyserve_jobs = service
    if service.has_jobs_on_disk():
        with contextlib.suppress(Unavailable):
            await service.get()
    try:
        yield
    finally:
        await service.close()


async def _jobs(request: Request) -> Jobs:
    service: JobService | None = getattr(request.app.state, "cosyserve_jobs", None)
    if service is None:
        raise Unavailable("long-form jobs are not available: the server has not started up", retry_after=None)
    return await service.get()


def _owner(request: Request) -> str:
    return scope_key_id(request.scope) or ""


async def _job(request: Request, job_id: str) -> tuple[Jobs, JobRecord]:
    jobs = await _jobs(request)
    job = await asyncio.to_thread(jobs.store.job, job_id, _owner(request))
    if job is None:
        raise UnknownJob(f"no job '{job_id}' (GET /v1/audio/jobs lists yours)", param="id")
    return jobs, job


def _shown(jobs: Jobs, job: JobRecord) -> dict[str, Any]:
    return job_object(job, jobs.runner.eta_seconds(job))


def _local(jobs: Jobs, job: JobRecord) -> None:
    if job.node != jobs.runner.node:
        raise JobNotReady("this job's audio is stored on another server (its data directory): ask that one")


@router.post(
    "/v1/audio/jobs",
    status_code=202,
    summary="Queue a long-form job: the /v1/audio/speech fields, input up to --max_job_text_length characters.",
    responses=error_responses(
        400,
        413,
        described={
            404: "Unknown model or voice",
            429: "This API key has --max_jobs_per_key jobs queued or running (job_limit_reached)",
            507: "This API key's stored job audio reached --max_job_storage_mb, or the disk is full",
        },
        success={202: {"description": "The job, queued (its id, status and progress)."}},
    ),
)
async def create_job(request: Request) -> JSONResponse:
    jobs = await _jobs(request)
    state = server_state(request)
    settings = state.settings
    req = parse_request(await read_body(request, settings.max_upload_bytes))
    if not req.input.strip():
        raise TextError("input is empty", param="input")
    if len(req.input) > settings.max_job_text_length:
        raise TextError(
            f"input has {len(req.input)} characters; a job accepts at most {settings.max_job_text_length}",
            param="input",
        )
    if is_ssml(req.input):
        raise TextError("a job's input is plain text: SSML is not accepted here (use /v1/audio/speech)", param="input")
    if req.stream or req.stream_format != "audio":
        raise InvalidRequest("a job is not streamed: leave stream and stream_format out", param="stream")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise InvalidRequest(f"seed must be an integer in 0..2^63-1, not {req.seed}", param="seed")
    engine = await state.models.get(req.model)
    speech_output(req.response_format, req.sample_rate, settings.pcm_sample_rate, engine.info.sample_rate)
    segments = cut_segments(req.input, settings.max_text_length)
    if not segments:
        raise TextError("input has nothing to speak (punctuation only)", param="input")
    # Every error the segments' requests would raise, now: the voice, ref_audio, pronunciations, the mode.
    await body_synthesis(
        req.model_copy(update={"input": segments[0]}), engine, settings.voice_map, settings.max_text_length, None
    )
    body = req.model_dump(include=_STORED_FIELDS, exclude_none=True)
    body["model"] = req.model
    job = JobRecord(
        id=f"job_{uuid.uuid4().hex}",
        owner=_owner(request),
        model=req.model,
        body=json.dumps(body, ensure_ascii=False),
        segments=tuple(segments),
        seed=req.seed if req.seed is not None else secrets.randbelow(2**63),
        sample_rate=engine.info.sample_rate,
        node=jobs.runner.node,
        created_at=time.time(),
    )
    if await asyncio.to_thread(jobs.files.free_bytes) < 2 * MIN_FREE_BYTES:
        raise InsufficientStorage("the server's data directory is out of disk space")
    await asyncio.to_thread(jobs.store.create_job, job, jobs.limits)
    jobs.runner.wake()
    response = JSONResponse(_shown(jobs, job), status_code=202)
    response.headers["Location"] = f"/v1/audio/jobs/{job.id}"
    return response


@router.get("/v1/audio/jobs", summary="The caller's jobs, newest first.")
async def list_jobs(request: Request) -> dict[str, Any]:
    jobs = await _jobs(request)
    found = await asyncio.to_thread(jobs.store.jobs, _owner(request))
    return {"object": "list", "data": [_shown(jobs, job) for job in reversed(found)]}


@router.get(
    "/v1/audio/jobs/{job_id}",
    summary="A job: status (queued, running, completed, failed, cancelled) and progress.",
    responses=error_responses(described={404: "No such job for this API key"}),
)
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    jobs, job = await _job(request, job_id)
    return _shown(jobs, job)


@router.get(
    "/v1/audio/jobs/{job_id}/events",
    summary="Server-sent events: 'progress' with the job at every change, then 'done' once it ended.",
    response_class=StreamingResponse,
    responses=error_responses(described={404: "No such job for this API key"}),
)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    jobs, job = await _job(request, job_id)
    owner = _owner(request)

    async def events() -> AsyncIterator[bytes]:
        current: JobRecord | None = job
        last: str | None = None
        while True:
            if current is None:
                yield b'event: done\ndata: {"status": "deleted"}\n\n'
                return
            data = json.dumps(_shown(jobs, current), ensure_ascii=False)
            kind = "progress" if current.active else "done"
            if data != last or not current.active:
                yield f"event: {kind}\ndata: {data}\n\n".encode()
                last = data
            if not current.active:
                return
            await jobs.runner.changed(job_id, EVENT_INTERVAL_S)
            current = await asyncio.to_thread(jobs.store.job, job_id, owner)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.get(
    "/v1/audio/jobs/{job_id}/segments",
    summary="Each recorded segment: its text and exact sample boundaries at the model's rate.",
    responses=error_responses(described={404: "No such job for this API key"}),
)
async def job_segments(job_id: str, request: Request) -> dict[str, Any]:
    jobs, job = await _job(request, job_id)
    return {"sample_rate": job.sample_rate, "segments": _boundaries(job, await _recorded(jobs, job))}


async def _recorded(jobs: Jobs, job: JobRecord) -> list[tuple[int, int]]:
    return await asyncio.to_thread(jobs.store.job_segments, job.id)


def _boundaries(job: JobRecord, recorded: list[tuple[int, int]]) -> list[dict[str, Any]]:
    out, start = [], 0
    for index, (samples, _) in enumerate(recorded):
        out.append({"index": index, "text": job.segments[index], "start_sample": start, "end_sample": start + samples})
        start += samples
    return out


@router.get(
    "/v1/audio/jobs/{job_id}/audio",
    summary="The job's audio in its response_format (while it runs: the segments done so far).",
    response_class=Response,
    responses=error_responses(
        described={404: "No such job for this API key", 409: "No segment is done yet (job_not_ready)"}
    ),
)
async def job_audio(job_id: str, request: Request) -> Response:
    jobs, job = await _job(request, job_id)
    _local(jobs, job)
    recorded = await _recorded(jobs, job)
    if not recorded:
        raise JobNotReady(f"job '{job_id}' has no audio yet ({job.status}): wait for its first segment")
    body = json.loads(job.body)
    output = speech_output(
        body.get("response_format", "mp3"), body.get("sample_rate"), jobs.settings.pcm_sample_rate, job.sample_rate
    )
    total = sum(samples for samples, _ in recorded)
    encoder: AudioEncoder
    if output.fmt == "wav" and output.rate == job.sample_rate:
        encoder = WavEncoder(output.rate, num_frames=total)
    else:
        encoder = output.encoder()
    resampler = OutputResampler(job.sample_rate, output.rate)

    def encoded() -> Iterator[bytes]:
        yield encoder.header()
        for index in range(len(recorded)):
            yield encoder.encode(resampler(jobs.files.read(job_id, index)))
        yield encoder.encode(resampler(np.zeros(0, np.float32), last=True)) + encoder.finish()

    async def chunks() -> AsyncIterator[bytes]:
        iterator = encoded()
        while (data := await anyio.to_thread.run_sync(next, iterator, None)) is not None:
            if data:
                yield data

    headers = {
        "Content-Disposition": f'attachment; filename="{job_id}.{output.fmt}"',
        "X-Job-Status": job.status,
        "X-Segments": str(len(recorded)),
    }
    return StreamingResponse(chunks(), media_type=encoder.media_type, headers=headers)


def captions(job: JobRecord, recorded: list[tuple[int, int]], kind: str) -> str:
    """SRT or WebVTT: one cue per recorded segment, from its first sample to its last (milliseconds,
    rounded from the exact sample boundaries of ``.../segments``)."""
    rate = job.sample_rate
    cues = [
        Caption(cue["text"], cue["start_sample"] / rate, cue["end_sample"] / rate) for cue in _boundaries(job, recorded)
    ]
    return format_srt(cues) if kind == "srt" else format_vtt(cues)


@router.get(
    "/v1/audio/jobs/{job_id}/captions.{kind}",
    summary="Captions (srt or vtt): one cue per segment, at its exact sample boundaries.",
    response_class=Response,
    responses=error_responses(described={404: "No such job for this API key, or not srt / vtt"}),
)
async def job_captions(job_id: str, kind: str, request: Request) -> Response:
    if kind not in ("srt", "vtt"):
        raise UnknownJob(f"captions come as captions.srt or captions.vtt, not captions.{kind}", param="kind")
    jobs, job = await _job(request, job_id)
    text = captions(job, await _recorded(jobs, job), kind)
    media = "application/x-subrip" if kind == "srt" else "text/vtt"
    return Response(text, media_type=f"{media}; charset=utf-8")


@router.post(
    "/v1/audio/jobs/{job_id}/cancel",
    summary="Stop a queued or running job; it stays (cancelled) with the audio done so far.",
    responses=error_responses(described={404: "No such job for this API key"}),
)
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    jobs, job = await _job(request, job_id)
    await jobs.runner.cancel(job.id)
    found = await asyncio.to_thread(jobs.store.job, job_id)
    return _shown(jobs, found or job)


@router.delete(
    "/v1/audio/jobs/{job_id}",
    summary="Cancel a job and remove it with its audio.",
    responses=error_responses(described={404: "No such job for this API key"}),
)
async def delete_job(job_id: str, request: Request) -> dict[str, Any]:
    jobs, job = await _job(request, job_id)
    await jobs.runner.delete(job.id)
    return {"id": job.id, "object": "audio.job", "deleted": True}
