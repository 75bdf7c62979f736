"""Text-in, audio-out streaming over WebSocket: text arrives in fragments (an LLM writing), audio goes
back per sentence while the rest is still being written.

Two routes (:mod:`cosyserve.api.ws.elevenlabs`, :mod:`cosyserve.api.ws.native`) share this session engine
(:class:`SpeechSession`):

- ``/v1/text-to-speech/{voice_id}/stream-input``: ElevenLabs' ``stream-input`` protocol (what LiveKit,
  Pipecat and the ElevenLabs SDKs speak): JSON frames in, ``{"audio": base64, "isFinal": false}`` out.
- ``/v1/audio/speech/stream``: cosyserve's own small protocol (docs/websocket.md): ``session.config``
  with the fields of ``POST /v1/audio/speech``, text / flush / cancel / close messages, audio as
  binary frames between ``segment.start`` and ``segment.done`` events.

Text is buffered until a sentence (or, past a length, a clause) ends (:class:`TextSegmenter`): cutting
anywhere else breaks the prosody. Each segment becomes one engine request as soon as its text is complete; up to
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
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
import numpy as np
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from cosyserve.api.auth import scope_key_id
from cosyserve.api.deps import ServerState
from cosyserve.api.metrics import mode_of, route_template
from cosyserve.api.voices import resolve_voice
from cosyserve.audio.encode import AudioEncoder, OutputFormat
from cosyserve.audio.resample import OutputResampler
from cosyserve.engine.client import AudioStream, EngineClient
from cosyserve.engine.planning import plan_speech
from cosyserve.engine.request import MAX_PREVIOUS_TEXT_LENGTH, GenerationOptions, SynthesisRequest
from cosyserve.engine.text_feed import TextFeed
from cosyserve.errors import (
    CosyServeError,
    GenerationFailed,
    InternalError,
    InvalidMessage,
    InvalidRequest,
    TextError,
    Unavailable,
)
from cosyserve.text.pronunciation import Lexicon, Pronunciation
from cosyserve.text.segmenter import TextSegmenter, ends_sentence
from cosyserve.text.ssml import is_ssml

logger = logging.getLogger("cosyserve.api")

SEND_TIMEOUT_S = 30.0  # a client that takes no frame for this long is not reading: the session ends
SEGMENTS_AHEAD = 2  # segments generating at once per session: the one being sent and the next
BISTREAM_UTTERANCE_CHARS = 600  # bistream: an utterance this long ends at its next sentence end
CLOSE_TIMEOUT_S = 2.0
# The pipeline generation a task sends for; frames of a cancelled one are dropped (see SpeechSession.send).
_SENDER_EPOCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("sender_epoch", default=None)


class SessionEnd(Exception):
    """Ends a session: ``code`` is the WebSocket close code, ``error`` what to tell the client first."""

    def __init__(self, code: int, error: CosyServeError | None = None, reason: str = "") -> None:
        super().__init__(reason or (error.message if error else ""))
        self.code = code
        self.error = error
        self.reason = reason


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
    ssml_ignored: tuple[str, ...] = ()  # an SSML segment's ignored tags (X-SSML-Ignored-Tags on HTTP)


@dataclass
class SessionSetup:
    """What a session needs once its opening message is understood."""

    engine: EngineClient
    plan: Callable[[str], SynthesisRequest]
    output: OutputFormat
    label: str
    segmenter: TextSegmenter
    bistream: bool = False  # one request per utterance, its text streamed into it (no buffering)
    continuity: bool = False  # each segment continues the one before (its text as previous_text)


class SpeechSession:
    """One WebSocket's text-to-speech session; the protocol subclasses read frames and shape events."""

    route_name = ""

    def __init__(self, websocket: WebSocket, state: ServerState) -> None:
        self.ws = websocket
        self.state = state
        self.settings = state.settings
        self.setup: SessionSetup | None = None
        self.encoder: AudioEncoder | None = None
        self.send_lock = anyio.Lock()
        self.open_segments: set[Segment] = set()
        self.next_index = 0
        self.previous_text: str | None = None  # continuity: the last segment's text
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
            and self.pending_chars + self.setup.segmenter.buffered_chars > self.settings.max_text_length
        ):
            raise self._backlog_error()

    def add_text(self, text: str) -> None:
        """A client fragment: buffered into segments, or (bistream) passed on to the open utterance. A
        fragment that is a whole SSML document (``<speak>...``) is one segment of its own, after what
        came before it."""
        assert self.setup is not None
        if is_ssml(text):
            self.flush_text()
            self.queue_text([text])
            return
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
        if len(utterance.text) >= BISTREAM_UTTERANCE_CHARS and ends_sentence(text):
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
        assert self.setup is not None
        engine = self.setup.engine
        pending, ordered, slots, epoch = self.pending, self.ordered, self.slots, self.epoch
        while (item := await pending.get()) is not None:
            await slots.acquire()
            if epoch != self.epoch:  # cancelled while waiting (before the cancellation reached this task)
                return
            utterance, text = (item, item.text) if isinstance(item, Utterance) else (None, item)
            segment = Segment(self.next_index, text, submitted_at=time.perf_counter(), utterance=utterance)
            self.next_index += 1
            self.pending_chars -= utterance.queued_chars if utterance is not None else len(text)
            try:
                if utterance is not None:
                    utterance.submitted = True
                    segment.stream = await engine.synthesize_bistream(self.setup.plan(""), utterance.feed)
                else:
                    request = self.setup.plan(text)
                    if self.setup.continuity:
                        previous = self.previous_text[-MAX_PREVIOUS_TEXT_LENGTH:] if self.previous_text else None
                        request = replace(request, continuity=True, previous_text=previous)
                        self.previous_text = text
                    segment.ssml_ignored = request.ssml.ignored if request.ssml is not None else ()
                    segment.stream = await engine.synthesize(request)
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
        model_rate, output_rate = self.setup.engine.info.sample_rate, self.setup.output.rate
        ordered, slots = self.ordered, self.slots
        _SENDER_EPOCH.set(self.epoch)
        while (segment := await ordered.get()) is not None:
            try:
                if segment.error is not None:
                    await self.segment_failed(segment, segment.error)
                    continue
                await self.segment_started(segment)
                assert segment.stream is not None
                resampler = OutputResampler(model_rate, output_rate)
                try:
                    async for chunk in segment.stream:
                        await self._send_audio(resampler(chunk))
                except GenerationFailed as exc:
                    await self.segment_failed(segment, exc)
                    continue
                await self._send_audio(resampler(np.zeros(0, np.float32), last=True))
                await self.segment_done(segment, segment.stream.samples / model_rate)
            finally:
                await self._close_segment(segment)
                slots.release()
        self.drained.set()

    async def _send_audio(self, samples: np.ndarray) -> None:
        assert self.setup is not None
        if self.encoder is None:
            self.encoder = self.setup.output.encoder()
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
        """The next client frame as JSON; a InvalidMessage for one that is not JSON text."""
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise SessionEnd(1006, reason="client went away")
        text = message.get("text")
        if text is None:
            raise InvalidMessage("binary frames are not accepted: send JSON text frames")
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InvalidMessage(f"the frame is not valid JSON: {exc}") from exc

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
            self._end(SessionEnd(1011, InternalError(f"internal server error: {type(exc).__name__}")))

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

    def configure(
        self,
        engine: EngineClient,
        voice: str | dict[str, str],
        options: GenerationOptions,
        instructions: str | None,
        output: OutputFormat,
        segmenter: TextSegmenter,
        bistream: bool,
        pronunciations: tuple[Pronunciation, ...] = (),
    ) -> SessionSetup:
        """The session's setup for ``voice``: the request for each segment's text. The voice and mode
        (and, with ``bistream``, that the model takes streamed text in this mode), and that the model can
        use the session's ``pronunciations``, are checked now, before any text arrives."""
        spk_id = resolve_voice(engine.voices, self.settings.voice_map, voice)
        stored = engine.voices.usable_info(spk_id, param="voice")
        family = engine.info.family
        if pronunciations:
            Lexicon(engine.pronunciations.target, requested=pronunciations)  # its 4xx now, not per segment
        owner = scope_key_id(self.ws.scope)

        def plan(text: str) -> SynthesisRequest:
            request = plan_speech(engine.modes, family, stored, text, options, spk_id=spk_id, instructions=instructions)
            return replace(request, pronunciations=pronunciations, lexicon_owner=owner)

        mode = plan("-").mode
        if bistream and mode not in engine.bistream_modes:
            served = ", ".join(sorted(engine.bistream_modes))
            raise InvalidRequest(
                f"bistream needs a CosyVoice2 or Fun-CosyVoice3 model and one of the modes it serves with streamed "
                f"text ({served or 'none on this model'}); this session is {mode} on {family}",
                param="bistream",
            )
        label = f"{self.route_name} ({mode}, {spk_id})"
        return SessionSetup(engine, plan, output, label, segmenter, bistream)

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
        if metrics is None or segment.stream is None or self.setup is None:
            return
        seconds = segment.stream.samples / self.setup.engine.info.sample_rate
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


def close_code_for(error: CosyServeError) -> int:
    """1008 (policy violation) for the client's mistakes, 1013 (try again later) when busy or loading."""
    if isinstance(error, InvalidRequest):
        return 1008
    return 1013 if isinstance(error, Unavailable) else 1011
