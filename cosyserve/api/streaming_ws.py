"""Text-in, audio-out streaming over WebSocket: text arrives in fragments (an LLM writing), audio goes
back per sentence while the rest is still being written.

Two routes share one session engine (:class:`SpeechSession`):

- ``/v1/text-to-speech/{voice_id}/stream-input``: ElevenLabs' ``stream-input`` protocol (what LiveKit,
  Pipecat and the ElevenLabs SDKs speak): JSON frames in, ``{"audio": base64, "isFinal": false}`` out.
- ``/v1/audio/speech/stream``: cosyserve's own small protocol (docs/websocket.md): ``session.config``
  with the fields of ``POST /v1/audio/speech``, text / flush / cancel / close messages, audio as
  binary frames between ``segment.start`` and ``segment.done`` events.

Text is buffered until a sentence (or, past a length, a clause) ends: cutting anywhere else breaks the
prosody. Each segment becomes one engine request as soon as its text is complete; up to
:data:`SEGMENTS_AHEAD` generate at once, and their audio is sent strictly in order.

With ``bistream`` (CosyVoice2 / Fun-CosyVoice3) nothing is buffered: an utterance is ONE engine request
whose text arrives while it is spoken (:meth:`EngineClient.synthesize_bistream`), each fragment passed on
as it comes; a flush or the end of the text closes it (the next text opens another), and so does a
sentence end once it holds :data:`BISTREAM_UTTERANCE_CHARS` characters (one request's audio is bounded).

Every segment is resampled on its own (so it matches ``/v1/audio/speech`` for the same text, seed and rate); the
encoder runs over the whole session (one continuous stream). A client that stops reading blocks the
send; after :data:`SEND_TIMEOUT_S` the session ends and its generation is aborted, as on a disconnect.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from cosyserve.api.auth import ApiKeys, scope_has_valid_key
from cosyserve.api.deps import ServerState
from cosyserve.api.metrics import mode_of, route_template
from cosyserve.api.openai import resolve_voice
from cosyserve.audio.encode import AudioEncoder, make_encoder, output_rate
from cosyserve.audio.resample import OutputResampler
from cosyserve.engine.client import AudioStream, EngineClient
from cosyserve.engine.planning import plan_speech
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.engine.text_feed import TextFeed
from cosyserve.errors import CosyServeError, GenerationFailed, InvalidRequest, ServerBusy, TextError
from cosyserve.text.normalize import _CLOSING_QUOTES, _COMMAS, _EN_STOPS, _ZH_STOPS, is_only_punctuation

logger = logging.getLogger("cosyserve.api")

SEND_TIMEOUT_S = 30.0  # a client that takes no frame for this long is not reading: the session ends
SEGMENTS_AHEAD = 2  # segments generating at once per session: the one being sent and the next
MAX_SEGMENT_CHARS = 300  # a buffer this long without a boundary is cut at its last space
CLAUSE_CHARS = 80  # a clause mark (comma, colon) ends a segment only after this many characters
BISTREAM_UTTERANCE_CHARS = 600  # bistream: an utterance this long ends at its next sentence end
CLOSE_TIMEOUT_S = 2.0
OPEN_TIMEOUT_S = 30.0  # the native route's session.config must come within this long
# The pipeline generation a task sends for; frames of a cancelled one are dropped (see SpeechSession.send).
_SENDER_EPOCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("sender_epoch", default=None)

# The marks the model's own splitter cuts after (text/normalize.py), in two strengths: sentence ends
# cut at once, clause marks only once a segment is long enough (a comma every few words is too often).
_CLAUSE_MARKS = frozenset(_COMMAS | {"、", ":", "："})
_SENTENCE_ENDS = frozenset((_ZH_STOPS | _EN_STOPS) - _CLAUSE_MARKS)
_CLOSERS = frozenset(_CLOSING_QUOTES | set("')]}’」』）】"))


# -- text buffering -------------------------------------------------------------------------------


class TextSegmenter:
    """Collects text fragments and hands out segments that end on a sentence or clause boundary.

    An ASCII mark counts once whitespace follows it ("3.5", "e.g.x" are not boundaries), so a
    sentence is complete when the next fragment starts or its fragment ends with a space; full-width
    marks (。！？) count at once. ``clause_chars(n)``: the clause threshold of the n-th segment.
    """

    def __init__(self, clause_chars: Callable[[int], int] = lambda _: CLAUSE_CHARS, max_chars: int = MAX_SEGMENT_CHARS):
        self.buffer = ""
        self.clause_chars = clause_chars
        self.max_chars = max_chars
        self.cut = 0  # segments handed out

    def add(self, text: str) -> list[str]:
        self.buffer += text
        segments = []
        while (end := self._boundary()) is not None:
            segments += self._take(end)
        return segments

    def flush(self) -> list[str]:
        return self._take(len(self.buffer))

    def clear(self) -> None:
        self.buffer = ""

    def _take(self, end: int) -> list[str]:
        segment, self.buffer = self.buffer[:end].strip(), self.buffer[end:].lstrip()
        if not segment or is_only_punctuation(segment):
            return []
        self.cut += 1
        return [segment]

    def _boundary(self) -> int | None:
        text, clause = self.buffer, self.clause_chars(self.cut)
        for i, ch in enumerate(text):
            if ch in _SENTENCE_ENDS or (ch in _CLAUSE_MARKS and len(text[:i].strip()) >= clause):
                end = i + 1
                while end < len(text) and text[end] in _CLOSERS:
                    end += 1
                if not ch.isascii():
                    return end
                if end < len(text) and text[end].isspace():
                    return end
        if len(text) >= self.max_chars:
            space = text.rfind(" ", 0, self.max_chars)
            return space if space > 0 else self.max_chars
        return None


# -- the session ----------------------------------------------------------------------------------


class SessionEnd(Exception):
    """Ends a session: ``code`` is the WebSocket close code, ``error`` what to tell the client first."""

    def __init__(self, code: int, error: CosyServeError | None = None, reason: str = "") -> None:
        super().__init__(reason or (error.message if error else ""))
        self.code = code
        self.error = error
        self.reason = reason


class ProtocolError(InvalidRequest):
    """A client frame that is not what the protocol allows."""

    code = "invalid_message"


class NotReading(CosyServeError):
    code = "client_not_reading"


@dataclass(eq=False)
class Utterance:
    """Bistream: the text of one engine request, passed on fragment by fragment while it is spoken."""

    feed: TextFeed
    text: str = ""
    queued_chars: int = 0  # text received before its request started (counts as waiting text)
    submitted: bool = False

    def add(self, text: str) -> None:
        self.feed.append(text)
        self.text += text
        if not self.submitted:
            self.queued_chars += len(text)


@dataclass(eq=False)
class Segment:
    index: int
    text: str
    stream: AudioStream | None = None
    error: CosyServeError | None = None
    submitted_at: float = 0.0
    utterance: Utterance | None = None  # bistream: the text of this segment, still arriving


@dataclass
class SessionSetup:
    """What a session needs once its opening message is understood."""

    plan: Callable[[str], SynthesisRequest]
    fmt: str
    rate: int
    label: str
    segmenter: TextSegmenter
    bistream: bool = False  # one request per utterance, its text streamed into it (no buffering)


class SpeechSession:
    """One WebSocket's text-to-speech session; the protocol subclasses read frames and shape events."""

    route_name = ""

    def __init__(self, websocket: WebSocket, state: ServerState) -> None:
        self.ws = websocket
        self.state = state
        self.settings = state.settings
        self.engine: EngineClient | None = None
        self.setup: SessionSetup | None = None
        self.encoder: AudioEncoder | None = None
        self.send_lock = anyio.Lock()
        self.open_segments: set[Segment] = set()
        self.next_index = 0
        self.close_code = 1000
        self.ended: SessionEnd | None = None
        self.epoch = 0
        self._reset_pipeline()

    # ---- protocol hooks
    async def receive_messages(self) -> None:
        raise NotImplementedError

    async def segment_started(self, segment: Segment) -> None:
        pass

    async def send_audio(self, data: bytes) -> None:
        raise NotImplementedError

    async def segment_done(self, segment: Segment, seconds: float) -> None:
        pass

    async def segment_failed(self, segment: Segment, error: CosyServeError) -> None:
        """Tell the client; raise SessionEnd to end the session."""
        raise SessionEnd(close_code_for(error), error)

    async def finished(self) -> None:
        pass

    async def send_error(self, error: CosyServeError) -> None:
        raise NotImplementedError

    # ---- the pipeline: text segments -> engine requests (SEGMENTS_AHEAD at once) -> audio in order
    def _reset_pipeline(self) -> None:
        self.utterance: Utterance | None = None  # bistream: the one text is streamed into now
        self.pending: asyncio.Queue[str | Utterance | None] = asyncio.Queue()
        self.ordered: asyncio.Queue[Segment | None] = asyncio.Queue()
        self.slots = asyncio.Semaphore(SEGMENTS_AHEAD)
        self.pending_chars = 0
        self.pipeline_scope = anyio.CancelScope()
        self.drained = asyncio.Event()

    def _backlog_error(self) -> SessionEnd:
        return SessionEnd(
            1008,
            TextError(
                f"more than {self.settings.max_text_length} characters of text are waiting to be spoken; "
                "send text no faster than it is spoken",
                param="text",
            ),
        )

    def queue_text(self, segments: list[str]) -> None:
        for text in segments:
            self.pending_chars += len(text)
            self.pending.put_nowait(text)
        if (
            self.setup is not None
            and self.pending_chars + len(self.setup.segmenter.buffer) > self.settings.max_text_length
        ):
            raise self._backlog_error()

    def add_text(self, text: str) -> None:
        """A client fragment: buffered into segments, or (bistream) passed on to the open utterance."""
        assert self.setup is not None
        if not self.setup.bistream:
            self.queue_text(self.setup.segmenter.add(text))
            return
        if not text:
            return
        if self.utterance is None:
            if not text.strip():
                return  # whitespace alone opens nothing
            self.utterance = Utterance(TextFeed())
            self.pending.put_nowait(self.utterance)
        utterance = self.utterance
        utterance.add(text)
        if not utterance.submitted:
            self.pending_chars += len(text)
        if self.pending_chars > self.settings.max_text_length or len(utterance.text) > self.settings.max_text_length:
            raise self._backlog_error()
        tail = text.rstrip()
        if len(utterance.text) >= BISTREAM_UTTERANCE_CHARS and tail and tail[-1] in _SENTENCE_ENDS | _CLOSERS:
            self.flush_text()

    def flush_text(self) -> None:
        """Speak what is buffered now (bistream: end the open utterance)."""
        assert self.setup is not None
        if not self.setup.bistream:
            self.queue_text(self.setup.segmenter.flush())
        elif self.utterance is not None:
            self.utterance.feed.close()
            self.utterance = None

    def end_of_text(self) -> None:
        self.pending.put_nowait(None)

    async def cancel(self) -> None:
        """Barge-in: abort every segment generating, drop the text not yet spoken."""
        self.epoch += 1
        self.pipeline_scope.cancel()
        for segment in list(self.open_segments):
            await self._close_segment(segment)
        assert self.setup is not None
        self.setup.segmenter.clear()
        if self.utterance is not None:
            self.utterance.feed.close()
        self._reset_pipeline()

    async def _generate(self) -> None:
        assert self.setup is not None and self.engine is not None
        pending, ordered, slots, epoch = self.pending, self.ordered, self.slots, self.epoch
        while (item := await pending.get()) is not None:
            await slots.acquire()
            if epoch != self.epoch:  # cancelled while waiting (before the cancellation reached this task)
                return
            utterance = item if isinstance(item, Utterance) else None
            text = item.text if utterance is not None else item
            segment = Segment(self.next_index, text, submitted_at=time.perf_counter(), utterance=utterance)
            self.next_index += 1
            self.pending_chars -= utterance.queued_chars if utterance is not None else len(text)
            try:
                if utterance is not None:
                    utterance.submitted = True
                    segment.stream = await self.engine.synthesize_bistream(self.setup.plan(""), utterance.feed)
                else:
                    segment.stream = await self.engine.synthesize(self.setup.plan(text))
                if epoch != self.epoch:
                    await segment.stream.aclose()
                    return
                self.open_segments.add(segment)
                self.state.in_flight.enter()
            except CosyServeError as exc:
                segment.error = exc
            ordered.put_nowait(segment)
        ordered.put_nowait(None)

    async def _send(self) -> None:
        assert self.setup is not None
        ordered, slots = self.ordered, self.slots
        _SENDER_EPOCH.set(self.epoch)
        while (segment := await ordered.get()) is not None:
            try:
                if segment.error is not None:
                    await self.segment_failed(segment, segment.error)
                    continue
                await self.segment_started(segment)
                assert segment.stream is not None
                resampler = OutputResampler(self.engine.info.sample_rate, self.setup.rate)
                try:
                    async for chunk in segment.stream:
                        await self._send_audio(resampler(chunk))
                except GenerationFailed as exc:
                    await self.segment_failed(segment, exc)
                    continue
                await self._send_audio(resampler(np.zeros(0, np.float32), last=True))
                await self.segment_done(segment, segment.stream.samples / self.engine.info.sample_rate)
            finally:
                await self._close_segment(segment)
                slots.release()
        self.drained.set()

    async def _send_audio(self, samples: np.ndarray) -> None:
        assert self.setup is not None
        if self.encoder is None:
            self.encoder = make_encoder(self.setup.fmt, self.setup.rate)
            data = self.encoder.header() + self.encoder.encode(samples)
        else:
            data = self.encoder.encode(samples) if samples.size else b""
        if data:
            await self.send_audio(data)

    async def _close_segment(self, segment: Segment) -> None:
        if segment in self.open_segments:
            self.open_segments.discard(segment)
            self.state.in_flight.leave()
            self._record(segment)
        if segment.stream is not None:
            await segment.stream.aclose()
        if segment.utterance is not None:
            segment.utterance.feed.close()

    async def _pipeline(self) -> None:
        """Runs the generate / send pair until the text ends or a cancel (which makes new queues)."""
        with self.pipeline_scope:
            async with anyio.create_task_group() as group:
                group.start_soon(self._guard, self._generate)
                group.start_soon(self._guard, self._send)

    # ---- sending
    async def send(self, message: dict[str, Any] | bytes, timeout: float | None = None) -> None:
        """Sends one frame; a client that does not take it within the send timeout ends the session."""
        limit = SEND_TIMEOUT_S if timeout is None else timeout
        async with self.send_lock:
            if _SENDER_EPOCH.get() not in (None, self.epoch):
                return  # a cancelled pipeline's sender that ran once more before its cancellation arrived
            try:
                with anyio.fail_after(limit):
                    if isinstance(message, bytes):
                        await self.ws.send_bytes(message)
                    else:
                        await self.ws.send_text(json.dumps(message, ensure_ascii=False))
            except TimeoutError as exc:
                raise SessionEnd(1008, reason=f"client not reading: no frame taken for {limit:g} s") from exc
            except (WebSocketDisconnect, OSError, RuntimeError) as exc:  # closed under us (uvicorn raises these)
                raise SessionEnd(1006, reason="client went away") from exc

    async def _watch_disconnect(self) -> None:
        """After the client's last text: frames are ignored, a disconnect still aborts what is generating."""
        while (await self.ws.receive())["type"] != "websocket.disconnect":
            pass
        raise SessionEnd(1006, reason="client went away")

    async def receive_json(self) -> Any:
        """The next client frame as JSON; a ProtocolError for one that is not JSON text."""
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise SessionEnd(1006, reason="client went away")
        text = message.get("text")
        if text is None:
            raise ProtocolError("binary frames are not accepted: send JSON text frames")
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ProtocolError(f"the frame is not valid JSON: {exc}") from exc

    # ---- running
    async def run(self) -> None:
        await self.ws.accept()
        started = time.perf_counter()
        reason = ""
        try:
            async with anyio.create_task_group() as group:
                self.group = group
                group.start_soon(self._guard, self._conversation)
            end = self.ended or SessionEnd(1011, reason="session ended unexpectedly")
            self.close_code, reason = end.code, end.reason
            if end.error is not None and end.code != 1006:
                reason = end.error.message
                with contextlib.suppress(SessionEnd):
                    await self.send_error(end.error)
        finally:
            await self.cancel_all()
            await self._close(reason)
            self._count()
            logger.info(
                "%s session %s: %d segments, close %d%s in %.2f s",
                self.route_name,
                self.setup.label if self.setup else "-",
                self.next_index,
                self.close_code,
                f" ({reason})" if reason else "",
                time.perf_counter() - started,
            )

    async def _conversation(self) -> None:
        await self.receive_messages()
        raise SessionEnd(1000)

    async def _guard(self, step: Callable[[], Any]) -> None:
        """Runs one of the session's tasks; the first to end the session ends them all."""
        try:
            await step()
        except SessionEnd as end:
            self._end(end)
        except Exception as exc:
            logger.exception("%s session failed", self.route_name)
            self._end(SessionEnd(1011, _Internal(f"internal server error: {type(exc).__name__}")))

    def _end(self, end: SessionEnd) -> None:
        if self.ended is None:
            self.ended = end
        self.group.cancel_scope.cancel()

    async def cancel_all(self) -> None:
        self.pipeline_scope.cancel()
        for segment in list(self.open_segments):
            await self._close_segment(segment)

    async def _close(self, reason: str) -> None:
        if self.close_code == 1006 or self.ws.application_state == WebSocketState.DISCONNECTED:
            return
        with anyio.move_on_after(CLOSE_TIMEOUT_S), contextlib.suppress(Exception):
            await self.ws.close(self.close_code, reason.encode()[:120].decode(errors="ignore"))

    def start(self, setup: SessionSetup) -> None:
        """The opening message was understood: start generating."""
        self.setup = setup
        self.group.start_soon(self._guard, self._pipeline)

    async def finish(self) -> None:
        """The client's text is over: speak what is buffered, send the rest of the audio, close."""
        assert self.setup is not None
        self.flush_text()
        self.end_of_text()
        self.group.start_soon(self._guard, self._watch_disconnect)
        drained = self.drained
        await drained.wait()
        if self.encoder is not None:
            tail = self.encoder.finish()
            if tail:
                await self.send_audio(tail)
        await self.finished()

    # ---- metrics
    def _record(self, segment: Segment) -> None:
        """A segment's generation in the metrics, whether its audio was all sent or not."""
        metrics = getattr(self.ws.app.state, "metrics", None)
        if metrics is None or segment.stream is None or self.engine is None:
            return
        seconds = segment.stream.samples / self.engine.info.sample_rate
        route, mode = route_template(self.ws.scope), mode_of(self.setup.label if self.setup else "")
        if segment.stream.first_chunk_at is not None:
            metrics.first_chunk.labels(route, mode).observe(
                max(0.0, segment.stream.first_chunk_at - segment.submitted_at)
            )
        if seconds > 0:
            metrics.audio_seconds.labels(route, mode).inc(seconds)

    def _count(self) -> None:
        metrics = getattr(self.ws.app.state, "metrics", None)
        if metrics is not None:
            mode = mode_of(self.setup.label) if self.setup else ""
            metrics.requests.labels(route_template(self.ws.scope), "WEBSOCKET", mode, str(self.close_code)).inc()


def make_planner(
    engine: EngineClient, state: ServerState, voice: str, options: GenerationOptions, instructions: str | None
) -> tuple[Callable[[str], SynthesisRequest], str]:
    """The request for each segment's text in ``voice``, and the session's label; the voice and mode
    are checked now, before any text arrives."""
    spk_id = resolve_voice(engine, state.settings, voice)
    stored = engine.voices.usable_info(spk_id, param="voice")

    def plan(text: str) -> SynthesisRequest:
        return plan_speech(engine.modes, stored, text, options, spk_id=spk_id, instructions=instructions)

    mode = plan("-").mode
    return plan, f"({mode}, {spk_id})"


def check_bistream(engine: EngineClient, plan: Callable[[str], SynthesisRequest]) -> None:
    """Refuse a bistream session the model cannot serve, before any text arrives."""
    mode = plan("-").mode
    if mode not in engine.bistream_modes:
        served = ", ".join(sorted(engine.bistream_modes))
        raise InvalidRequest(
            f"bistream needs a CosyVoice2 or Fun-CosyVoice3 model and one of the modes it serves with streamed "
            f"text ({served or 'none on this model'}); this session is {mode} on {engine.info.family}",
            param="bistream",
        )


def session_engine(state: ServerState, model: str | None = None) -> EngineClient:
    """The engine of the model a session names (default: the server's default model)."""
    slot = state.find(model)  # an unknown name: ModelNotFound, listing the served ones
    if slot.engine is not None:
        return slot.engine
    if slot.load_error is not None:
        raise _NotReady(f"the model {slot.name} failed to load: {slot.load_error}")
    raise _NotReady(f"the model {slot.name} is still loading, retry shortly")


def close_code_for(error: CosyServeError) -> int:
    """1008 (policy violation) for the client's mistakes, 1013 (try again later) when busy or loading."""
    if isinstance(error, InvalidRequest):
        return 1008
    return 1013 if isinstance(error, (ServerBusy, _NotReady)) else 1011


class _NotReady(CosyServeError):
    code = "model_not_ready"


class _Internal(CosyServeError):
    code = "internal_error"


# -- the ElevenLabs stream-input protocol ----------------------------------------------------------

# ElevenLabs' default; its chunk_length_schedule entries must lie in this range.
_SCHEDULE_RANGE = (50, 500)
_OUTPUT_FORMAT = re.compile(r"^(pcm|mp3)_(\d+)(?:_(\d+))?$")
_INACTIVITY_DEFAULT, _INACTIVITY_MAX = 20.0, 180.0


def parse_output_format(value: str, native_rate: int) -> tuple[str, int]:
    """``<codec>_<rate>[_<kbps>]`` (ElevenLabs' names) as (cosyserve format, rate)."""
    match = _OUTPUT_FORMAT.match(value.strip().lower())
    supported = "pcm_8000, pcm_16000, pcm_22050, pcm_24000, pcm_44100, pcm_48000, mp3_22050_32, mp3_44100_<kbps>"
    if match is None:
        raise InvalidRequest(
            f"unsupported output_format '{value}'; supported: {supported} (ulaw, alaw and opus are not)",
            param="output_format",
        )
    codec, rate, kbps = match.group(1), int(match.group(2)), match.group(3)
    if codec == "pcm" and kbps is not None:
        raise InvalidRequest(f"output_format '{value}': pcm takes no bit rate (pcm_<rate>)", param="output_format")
    try:
        return codec, output_rate(codec, rate, native_rate)
    except InvalidRequest as exc:
        raise InvalidRequest(f"output_format '{value}': {exc.message}", param="output_format") from exc


class ElevenLabsSession(SpeechSession):
    """``/v1/text-to-speech/{voice_id}/stream-input``.

    Client frames: ``{"text": " ", "voice_settings": {...}, "generation_config": {"chunk_length_schedule":
    [...]}, "xi_api_key": ...}`` to open, ``{"text": "...", "flush": true?, "try_trigger_generation": ...}``
    fragments, ``{"text": ""}`` to end. Server frames: ``{"audio": base64, "isFinal": false,
    "normalizedAlignment": null, "alignment": null}``, then ``{"isFinal": true}`` and a normal close.
    Errors: ``{"message", "error", "code"}`` and a close with that code (1008: the client's fault).
    ``voice_settings.speed`` sets the speaking rate; the other voice settings have no CosyVoice meaning
    and are ignored. Alignment is not produced (null). Extension: ``seed`` in the query.
    """

    route_name = "stream-input"

    def __init__(self, websocket: WebSocket, state: ServerState, voice_id: str) -> None:
        super().__init__(websocket, state)
        self.voice_id = voice_id

    async def send_audio(self, data: bytes) -> None:
        audio = base64.b64encode(data).decode()
        await self.send({"audio": audio, "isFinal": False, "normalizedAlignment": None, "alignment": None})

    async def finished(self) -> None:
        await self.send({"audio": None, "isFinal": True, "normalizedAlignment": None, "alignment": None})

    async def send_error(self, error: CosyServeError) -> None:
        await self.send(
            {"message": error.message, "error": error.code, "code": self.close_code, "param": error.param}, timeout=1
        )

    def _query(self, name: str) -> str | None:
        return self.ws.query_params.get(name)

    def _open(self, first: dict[str, Any]) -> SessionSetup:
        model = self._query("model_id")
        # ElevenLabs' own model ids (eleven_*) mean the default model; otherwise a served model's name.
        engine = self.engine = session_engine(self.state, None if not model or model.startswith("eleven_") else model)
        fmt, rate = parse_output_format(self._query("output_format") or "mp3_44100_128", engine.info.sample_rate)
        seed = self._query("seed")
        if seed is not None and not (seed.isdigit() and int(seed) < 2**63):
            raise InvalidRequest(f"seed must be an integer in 0..2^63-1, not {seed!r}", param="seed")
        settings = first.get("voice_settings") or {}
        if not isinstance(settings, dict):
            raise ProtocolError("voice_settings must be an object", param="voice_settings")
        speed = settings.get("speed", 1.0)
        if speed is None:
            speed = 1.0
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise ProtocolError("voice_settings.speed must be a number", param="voice_settings.speed")
        options = GenerationOptions(stream=True, speed=speed, seed=int(seed) if seed is not None else None)
        plan, label = make_planner(engine, self.state, self.voice_id, options, None)
        config = first.get("generation_config") or {}
        chunks = (config.get("chunk_length_schedule") if isinstance(config, dict) else None) or [CLAUSE_CHARS]
        low, high = _SCHEDULE_RANGE
        if not isinstance(chunks, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and low <= c <= high for c in chunks
        ):
            raise ProtocolError(
                f"generation_config.chunk_length_schedule must be a list of integers within {low}..{high}",
                param="generation_config.chunk_length_schedule",
            )
        # The schedule's n-th entry: how long the n-th segment must be before a clause mark may end it.
        segmenter = TextSegmenter(lambda n: chunks[min(n, len(chunks) - 1)])
        bistream = (self._query("bistream") or "false").strip().lower()
        if bistream not in ("true", "false", "1", "0"):
            raise InvalidRequest(f"bistream must be true or false, not {bistream!r}", param="bistream")
        if bistream in ("true", "1"):
            check_bistream(engine, plan)
        return SessionSetup(plan, fmt, rate, f"stream-input {label}", segmenter, bistream in ("true", "1"))

    def _check_key(self, first: dict[str, Any]) -> None:
        if scope_has_valid_key(self.ws.scope):
            return
        key = first.get("xi_api_key") or first.get("xi-api-key")
        authorization = first.get("authorization")
        if not key and isinstance(authorization, str) and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if not isinstance(key, str) or not ApiKeys(self.settings.api_keys).valid(key):
            raise SessionEnd(1008, _AuthError("missing or invalid API key (xi-api-key)"))

    async def _next_message(self, timeout: float) -> dict[str, Any]:
        try:
            with anyio.fail_after(timeout):
                message = await self.receive_json()
        except TimeoutError as exc:
            raise SessionEnd(
                1008, _Timeout(f"no text received for {timeout:g} seconds (inactivity_timeout): closing")
            ) from exc
        if not isinstance(message, dict):
            raise ProtocolError("each frame must be a JSON object")
        text = message.get("text")
        if text is not None and not isinstance(text, str):
            raise ProtocolError("text must be a string", param="text")
        if "flush" in message and not isinstance(message["flush"], bool):
            raise ProtocolError("flush must be true or false", param="flush")
        return message

    async def receive_messages(self) -> None:
        timeout = self._query("inactivity_timeout")
        try:
            inactivity = float(timeout) if timeout is not None else _INACTIVITY_DEFAULT
        except ValueError:
            inactivity = -1.0
        try:
            first = await self._next_message(inactivity if 0 < inactivity <= _INACTIVITY_MAX else _INACTIVITY_DEFAULT)
            if not 0 < inactivity <= _INACTIVITY_MAX:
                raise InvalidRequest(
                    f"inactivity_timeout must be a number of seconds within 1..{_INACTIVITY_MAX:g}",
                    param="inactivity_timeout",
                )
            self._check_key(first)
            self.start(self._open(first))
            if (first.get("text") or "").strip():
                self.add_text(first["text"])
            while True:
                message = await self._next_message(inactivity)
                text = message.get("text")
                if text == "":
                    break
                if text:
                    self.add_text(text)
                if message.get("flush"):
                    self.flush_text()
            await self.finish()
        except CosyServeError as exc:
            raise SessionEnd(close_code_for(exc), exc) from exc


class _AuthError(InvalidRequest):
    code = "invalid_api_key"


class _Timeout(InvalidRequest):
    code = "input_timeout_exceeded"


# -- the native protocol --------------------------------------------------------------------------


class SessionConfig(BaseModel):
    """``{"type": "session.config", ...}``: the fields of ``POST /v1/audio/speech`` that apply."""

    model_config = ConfigDict(extra="forbid")

    type: str
    voice: str | dict[str, str]
    model: str = "tts-1"
    response_format: str = Field("pcm", description="pcm (default), wav, mp3, opus, flac, aac.")
    sample_rate: int | None = None
    speed: float = 1.0
    seed: int | None = None
    instructions: str | None = None
    stream: bool = Field(True, description="Token-level streaming inside each segment (first audio sooner).")
    bistream: bool = Field(
        False,
        description="CosyVoice2/3: stream the text into the model as it arrives (no sentence buffering).",
    )


class NativeSession(SpeechSession):
    """``/v1/audio/speech/stream`` (docs/websocket.md)."""

    route_name = "speech-stream"

    async def send_audio(self, data: bytes) -> None:
        await self.send(data)

    async def segment_started(self, segment: Segment) -> None:
        await self.send({"type": "segment.start", "segment": segment.index, "text": segment.text})

    async def segment_done(self, segment: Segment, seconds: float) -> None:
        message: dict[str, Any] = {"type": "segment.done", "segment": segment.index, "audio_seconds": round(seconds, 4)}
        if segment.utterance is not None:  # bistream: the whole text is known only now
            message["text"] = segment.utterance.text.strip()
        await self.send(message)

    async def segment_failed(self, segment: Segment, error: CosyServeError) -> None:
        # One segment failing (busy server, unspeakable text) leaves the session usable.
        await self.send_error(error, segment=segment.index)

    async def finished(self) -> None:
        await self.send({"type": "session.closed"})

    async def send_error(self, error: CosyServeError, segment: int | None = None) -> None:
        body: dict[str, Any] = {"message": error.message, "code": error.code, "param": error.param}
        message: dict[str, Any] = {"type": "error", "error": body}
        if segment is not None:
            message["segment"] = segment
        await self.send(message, timeout=None if segment is not None else 1)

    def _open(self, message: dict[str, Any]) -> SessionSetup:
        try:
            config = SessionConfig.model_validate(message)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise InvalidRequest(f"session.config {param}: {first['msg']}", param=param) from exc
        engine = self.engine = session_engine(self.state, config.model)
        fmt = config.response_format.strip().lower()
        rate = output_rate(
            fmt,
            config.sample_rate or (self.settings.pcm_sample_rate if fmt == "pcm" else None),
            engine.info.sample_rate,
        )
        if config.seed is not None and not 0 <= config.seed < 2**63:
            raise InvalidRequest(f"seed must be an integer in 0..2^63-1, not {config.seed}", param="seed")
        options = GenerationOptions(stream=config.stream, speed=config.speed, seed=config.seed)
        instructions = config.instructions if config.instructions and config.instructions.strip() else None
        plan, label = make_planner(engine, self.state, config.voice, options, instructions)
        if config.bistream:
            check_bistream(engine, plan)
        return SessionSetup(plan, fmt, rate, f"speech-stream {label}", TextSegmenter(), config.bistream)

    async def receive_messages(self) -> None:
        if not scope_has_valid_key(self.ws.scope):
            raise SessionEnd(1008, _AuthError("missing or invalid API key: send 'Authorization: Bearer <key>'"))
        try:
            try:
                with anyio.fail_after(OPEN_TIMEOUT_S):
                    first = await self.receive_json()
            except TimeoutError as exc:
                raise ProtocolError(f"no session.config within {OPEN_TIMEOUT_S:g} s", param="type") from exc
            if not isinstance(first, dict) or first.get("type") != "session.config":
                raise ProtocolError('the first message must be {"type": "session.config", "voice": ...}', param="type")
            self.start(self._open(first))
            assert self.setup is not None
            await self.send(
                {
                    "type": "session.ready",
                    "format": self.setup.fmt,
                    "sample_rate": self.setup.rate,
                    "channels": 1,
                    "mode": mode_of(self.setup.label),
                }
            )
        except CosyServeError as exc:
            raise SessionEnd(close_code_for(exc), exc) from exc
        while True:
            try:
                message = await self.receive_json()
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == "text":
                    text = message.get("text")
                    if not isinstance(text, str):
                        raise ProtocolError("text must be a string", param="text")
                    self.add_text(text)
                elif kind == "flush":
                    self.flush_text()
                elif kind == "cancel":
                    await self.cancel()
                    self.group.start_soon(self._guard, self._pipeline)
                    await self.send({"type": "cancelled"})
                elif kind == "close":
                    break
                elif kind == "session.config":
                    raise ProtocolError("the session is configured already", param="type")
                elif not isinstance(message, dict):
                    raise ProtocolError("each frame must be a JSON object with a type")
                else:
                    raise ProtocolError(
                        f"unknown message type {kind!r}: one of text, flush, cancel, close", param="type"
                    )
            except ProtocolError as exc:  # a bad frame is answered and ignored; the session goes on
                await self.send_error(exc)
        await self.finish()


# -- routes ---------------------------------------------------------------------------------------

router = APIRouter()


def _state(websocket: WebSocket) -> ServerState:
    return websocket.app.state.cosyserve


@router.websocket("/v1/text-to-speech/{voice_id}/stream-input")
async def elevenlabs_stream_input(websocket: WebSocket, voice_id: str) -> None:
    await ElevenLabsSession(websocket, _state(websocket), voice_id).run()


@router.websocket("/v1/audio/speech/stream")
async def speech_stream(websocket: WebSocket) -> None:
    await NativeSession(websocket, _state(websocket)).run()
