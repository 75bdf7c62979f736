"""Long-form jobs: a text of up to ``--max_job_text_length`` characters synthesised in the background,
durably, segment by segment.

At submission the text is cut once into segments (:func:`cut_segments`: the text segmenter's sentence
and clause boundaries, short sentences merged) and the job is stored in the voice library's database with
that list, so a resumed job has the same segments and count. The :class:`JobRunner` then runs at most
``--max_running_jobs`` jobs at once, each one segment at a time: every segment is its own **non-streamed**
engine request (the job's voice and options, a seed derived from the job's), i.e. offline work that the
engine's scheduler runs in the background while an interactive (streamed) request runs, so a live first
chunk never waits behind a job. A finished segment's audio is written to
``<data_dir>/jobs/<id>/<index>.f32`` (raw float32 at the model's rate: written to a temporary name,
fsync'd, renamed, the directory fsync'd) and only then recorded in the database (one transaction with
the job's counters). A kill -9 therefore loses at most the segment in progress: a restarted server on the
same data directory resumes every queued or running job of its node from its first unrecorded segment.

A job's files live on the server whose data directory holds them (its ``node``): with a shared PostgreSQL
library, each server runs and serves the audio of its own node's jobs only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cosyserve.engine.client import EngineClient
from cosyserve.engine.registry import ModelRegistry
from cosyserve.engine.request import SynthesisRequest
from cosyserve.engine.voice_library.base import ACTIVE_JOB_STATUSES, JobRecord, VoiceBackend
from cosyserve.errors import (
    CosyServeError,
    InsufficientStorage,
    InvalidRequest,
    ModelNotReady,
    PreviousRequestNotFound,
    ServerBusy,
)
from cosyserve.text.segmenter import MAX_SEGMENT_CHARS, TextSegmenter

logger = logging.getLogger("cosyserve.jobs")

SEGMENT_CHARS = 40  # consecutive short sentences are merged into one segment up to this many characters
NODE_FILE = "node-id"
SEGMENT_SUFFIX = ".f32"
RETRY_BUSY_S = 0.5  # a segment refused with 503 (engine queue full) is submitted again after this
RESCAN_S = 5.0  # the runner looks for runnable jobs at least this often
MIN_FREE_BYTES = 64 * 1024 * 1024  # the data directory's disk keeps this much free (else 507)

# Builds the engine request of one segment: (job, the segment's text, its seed, the engine) -> request.
RequestBuilder = Callable[[JobRecord, str, int, EngineClient], Awaitable[SynthesisRequest]]


def cut_segments(text: str, max_chars: int) -> list[str]:
    """``text`` cut where the model's sentence splitter would cut (:class:`TextSegmenter`), consecutive
    pieces merged while they fit in :data:`SEGMENT_CHARS`; no segment over ``max_chars``."""
    segmenter = TextSegmenter(max_chars=min(max_chars, MAX_SEGMENT_CHARS))
    pieces = segmenter.add(text) + segmenter.flush()
    segments: list[str] = []
    for piece in (p.strip() for p in pieces):
        if not piece:
            continue
        if segments and len(segments[-1]) + len(piece) + 1 <= min(SEGMENT_CHARS, max_chars):
            joiner = " " if segments[-1][-1:].isascii() and piece[:1].isascii() else ""
            segments[-1] = segments[-1] + joiner + piece
        else:
            segments.append(piece)
    return segments


def segment_seed(seed: int, index: int) -> int:
    """The seed of segment ``index`` of a job seeded ``seed`` (deterministic, distinct per segment)."""
    return (seed + index * 0x9E37_79B9_7F4A_7C15) % 2**63


def segment_request_id(job_id: str, index: int) -> str:
    return f"job-{job_id}-{index}"


class JobFiles:
    """The audio files of the jobs under ``<data_dir>/jobs`` and this data directory's node id."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        node_file = root / NODE_FILE
        if not node_file.exists():
            _durable_write(node_file, uuid.uuid4().hex.encode())
        self.node = node_file.read_text().strip()

    def path(self, job_id: str, index: int) -> Path:
        return self.root / job_id / f"{index:06d}{SEGMENT_SUFFIX}"

    def write(self, job_id: str, index: int, audio: np.ndarray) -> int:
        """Write one segment durably (temporary name, fsync, rename, directory fsync); its size in bytes."""
        path = self.path(job_id, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
        if shutil.disk_usage(path.parent).free < len(data) + MIN_FREE_BYTES:
            raise InsufficientStorage(f"the server's data directory {self.root} is out of disk space")
        _durable_write(path, data)
        return len(data)

    def read(self, job_id: str, index: int) -> np.ndarray:
        return np.fromfile(self.path(job_id, index), dtype="<f4")

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def _durable_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def job_error(exc: BaseException) -> str:
    """What a failed job stores as its error: JSON of the code and message."""
    if isinstance(exc, CosyServeError):
        return json.dumps({"code": exc.code, "message": exc.message}, ensure_ascii=False)
    return json.dumps({"code": "generation_failed", "message": f"{type(exc).__name__}: {exc}"})


@dataclass
class _Run:
    """One job's run in this process: when it began and what it did since (for the time left)."""

    started: float
    chars: int = 0


class JobRunner:
    """Runs this node's queued and running jobs, at most ``max_running`` at once, oldest first."""

    def __init__(
        self,
        store: VoiceBackend,
        files: JobFiles,
        models: ModelRegistry,
        build: RequestBuilder,
        max_running: int,
        max_bytes: int,
    ) -> None:
        self.store = store
        self.files = files
        self.models = models
        self.build = build
        self.max_running = max_running
        self.max_bytes = max_bytes
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runs: dict[str, _Run] = {}
        self._changes: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def node(self) -> str:
        return self.files.node

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._schedule())

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def wake(self) -> None:
        self._wake.set()

    # -- what the routes see ------------------------------------------------------------------------

    def notify(self, job_id: str) -> None:
        event = self._changes.pop(job_id, None)
        if event is not None:
            event.set()

    async def changed(self, job_id: str, timeout: float) -> None:
        """Return when the job changes (a segment recorded, a new status) or after ``timeout`` seconds."""
        event = self._changes.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def eta_seconds(self, job: JobRecord) -> float | None:
        """Seconds left at this run's pace (characters per second); None before its first segment."""
        run = self._runs.get(job.id)
        if job.status != "running" or run is None or run.chars == 0:
            return None
        elapsed = time.monotonic() - run.started
        done_chars = sum(len(s) for s in job.segments[: job.segments_done])
        return round((job.chars_total - done_chars) * elapsed / run.chars, 1)

    async def cancel(self, job_id: str) -> bool:
        """Stop a queued or running job (its audio so far kept); False if it was not active."""
        moved = await asyncio.to_thread(self.store.set_job_status, job_id, "cancelled", at=time.time())
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.notify(job_id)
        return moved

    async def delete(self, job_id: str) -> JobRecord | None:
        """Cancel and remove a job: its row, its segments' rows, its files."""
        await self.cancel(job_id)
        removed = await asyncio.to_thread(self.store.delete_job, job_id)
        await asyncio.to_thread(self.files.remove, job_id)
        self.notify(job_id)
        return removed

    # -- running ------------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            try:
                jobs = await asyncio.to_thread(self.store.jobs, None, ACTIVE_JOB_STATUSES, self.node)
            except CosyServeError as exc:
                logger.warning("cannot read the jobs: %s", exc)
                jobs = []
            for job in jobs:
                if len(self._tasks) >= self.max_running:
                    break
                if job.id not in self._tasks:
                    self._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job.id))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESCAN_S)

    async def _engine(self, model: str) -> EngineClient:
        while True:
            try:
                return await self.models.get(model or None)
            except ModelNotReady as exc:
                if exc.retry_after is None:  # failed to load: it will not come
                    raise
                await asyncio.sleep(exc.retry_after)

    async def _segment_request(
        self, job: JobRecord, index: int, previous: str | None, engine: EngineClient
    ) -> SynthesisRequest:
        """THE place a segment's engine request is built: the job's voice and options, the segment's text
        and seed, and continuity with the segment before. ``previous`` is that segment's request id
        (:func:`segment_request_id`) when the engine still keeps it; None for the first segment, and where
        the engine no longer knows it (a resumed job, an evicted entry): the previous text is then spoken
        silently first as the context (``previous_text``)."""
        request = await self.build(job, job.segments[index], segment_seed(job.seed, index), engine)
        if index and previous is not None:
            return replace(request, continuity=True, previous_request_id=previous)
        if index:
            return replace(request, continuity=True, previous_text=job.segments[index - 1])
        return replace(request, continuity=True)

    async def _synthesize(self, engine: EngineClient, request: SynthesisRequest, request_id: str) -> np.ndarray:
        while True:
            try:
                stream = await engine.synthesize(request, request_id)
                break
            except ServerBusy:
                await asyncio.sleep(RETRY_BUSY_S)
        chunks = []
        async with stream:
            async for chunk in stream:
                chunks.append(chunk)
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    async def _run(self, job_id: str) -> None:
        try:
            job = await asyncio.to_thread(self.store.job, job_id)
            if job is None or not job.active:
                return
            moved = await asyncio.to_thread(
                self.store.set_job_status, job_id, "running", at=time.time(), only_from=("queued",)
            )
            if not moved and job.status != "running":
                return
            self.notify(job_id)
            engine = await self._engine(job.model)
            if engine.info.sample_rate != job.sample_rate:  # the server now serves another model under that name
                raise InvalidRequest(
                    f"the job's model '{job.model}' now runs at {engine.info.sample_rate} Hz, its audio is at "
                    f"{job.sample_rate} Hz: it cannot be resumed on this model"
                )
            self._runs[job_id] = run = _Run(time.monotonic())
            index = job.segments_done
            stored = await asyncio.to_thread(self.store.job_stored_bytes, job.owner)
            resumed_at = index  # segments made before (by another process) are not in the engine's memory
            while index < len(job.segments):
                previous = segment_request_id(job_id, index - 1) if index > resumed_at else None
                request = await self._segment_request(job, index, previous, engine)
                try:
                    audio = await self._synthesize(engine, request, segment_request_id(job_id, index))
                except PreviousRequestNotFound:  # evicted from the engine's bounded store: continue from text
                    request = await self._segment_request(job, index, None, engine)
                    audio = await self._synthesize(engine, request, segment_request_id(job_id, index))
                if stored + audio.nbytes > self.max_bytes:
                    raise InsufficientStorage(
                        f"this API key's jobs hold {stored} bytes of audio; the next segment would pass the most "
                        f"it may ({self.max_bytes}): delete finished jobs"
                    )
                nbytes = await asyncio.to_thread(self.files.write, job_id, index, audio)
                if not await asyncio.to_thread(self.store.record_job_segment, job_id, index, audio.shape[0], nbytes):
                    return  # cancelled or deleted meanwhile
                stored += nbytes
                run.chars += len(job.segments[index])
                index += 1
                job = await asyncio.to_thread(self.store.job, job_id) or job
                self.notify(job_id)
            await asyncio.to_thread(self.store.set_job_status, job_id, "completed", at=time.time())
            logger.info("job %s completed: %d segments", job_id, len(job.segments))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, CosyServeError):
                logger.exception("job %s failed", job_id)
            else:
                logger.warning("job %s failed: %s", job_id, exc)
            with contextlib.suppress(CosyServeError):
                await asyncio.to_thread(
                    self.store.set_job_status, job_id, "failed", error=job_error(exc), at=time.time()
                )
        finally:
            self._tasks.pop(job_id, None)
            self._runs.pop(job_id, None)
            self.notify(job_id)
            self.wake()


def job_object(job: JobRecord, eta_seconds: float | None) -> dict[str, Any]:
    """A job as the API shows it."""
    body = json.loads(job.body)
    total = len(job.segments)
    error = json.loads(job.error) if job.error else None
    return {
        "id": job.id,
        "object": "audio.job",
        "status": job.status,
        "model": job.model,
        "voice": body.get("voice"),
        "response_format": body.get("response_format", "mp3"),
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "characters": job.chars_total,
        "progress": {
            "segments_done": job.segments_done,
            "segments_total": total,
            "percent": round(100 * job.segments_done / total, 2) if total else 100.0,
            "audio_seconds": round(job.samples_done / job.sample_rate, 3),
            "eta_seconds": 0.0 if job.status == "completed" else eta_seconds,
        },
        "error": error,
    }
