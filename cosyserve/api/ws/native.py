"""cosyserve's own WebSocket protocol, ``/v1/audio/speech/stream`` (docs/websocket.md): ``session.config``
with the fields of ``POST /v1/audio/speech``, text / flush / cancel / close messages, audio as binary
frames between ``segment.start`` and ``segment.done`` events."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cosyserve.api.auth import scope_has_valid_key
from cosyserve.api.metrics import mode_of
from cosyserve.api.openai import speech_output
from cosyserve.api.pronunciations import FIELD_DOC, request_pronunciations
from cosyserve.api.ws.session import Segment, SessionEnd, SessionSetup, SpeechSession, close_code_for
from cosyserve.engine.request import GenerationOptions
from cosyserve.errors import CosyServeError, InvalidApiKey, InvalidMessage, InvalidRequest
from cosyserve.text.segmenter import TextSegmenter

OPEN_TIMEOUT_S = 30.0  # session.config must come within this long


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
    pronunciations: dict[str, Any] | list[dict[str, Any]] | None = Field(None, description=FIELD_DOC)
    continuity: bool = Field(
        False,
        description="Each segment continues the one before it (the previous text is spoken first, silently, "
        "for its context; not with bistream).",
    )


class NativeSession(SpeechSession):
    """``/v1/audio/speech/stream`` (docs/websocket.md)."""

    route_name = "speech-stream"

    async def send_audio(self, data: bytes) -> None:
        await self.send(data)

    async def segment_started(self, segment: Segment) -> None:
        message: dict[str, Any] = {"type": "segment.start", "segment": segment.index, "text": segment.text}
        if segment.ssml_ignored:
            message["ssml_ignored_tags"] = list(segment.ssml_ignored)
        await self.send(message)

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
        engine = self.state.models.require(config.model)
        output = speech_output(
            config.response_format, config.sample_rate, self.settings.pcm_sample_rate, engine.info.sample_rate
        )
        if config.seed is not None and not 0 <= config.seed < 2**63:
            raise InvalidRequest(f"seed must be an integer in 0..2^63-1, not {config.seed}", param="seed")
        options = GenerationOptions(stream=config.stream, speed=config.speed, seed=config.seed)
        instructions = config.instructions if config.instructions and config.instructions.strip() else None
        entries = request_pronunciations(config.pronunciations)
        if config.continuity and config.bistream:
            raise InvalidRequest("continuity needs whole segments: not with bistream", param="continuity")
        setup = self.configure(
            engine, config.voice, options, instructions, output, TextSegmenter(), config.bistream, entries
        )
        return replace(setup, continuity=config.continuity)

    async def receive_messages(self) -> None:
        if not scope_has_valid_key(self.ws.scope):
            raise SessionEnd(1008, InvalidApiKey("missing or invalid API key: send 'Authorization: Bearer <key>'"))
        try:
            try:
                with anyio.fail_after(OPEN_TIMEOUT_S):
                    first = await self.receive_json()
            except TimeoutError as exc:
                raise InvalidMessage(f"no session.config within {OPEN_TIMEOUT_S:g} s", param="type") from exc
            if not isinstance(first, dict) or first.get("type") != "session.config":
                raise InvalidMessage('the first message must be {"type": "session.config", "voice": ...}', param="type")
            self.start(self._open(first))
            assert self.setup is not None
            await self.send(
                {
                    "type": "session.ready",
                    "format": self.setup.output.fmt,
                    "sample_rate": self.setup.output.rate,
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
                        raise InvalidMessage("text must be a string", param="text")
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
                    raise InvalidMessage("the session is configured already", param="type")
                elif not isinstance(message, dict):
                    raise InvalidMessage("each frame must be a JSON object with a type")
                else:
                    raise InvalidMessage(
                        f"unknown message type {kind!r}: one of text, flush, cancel, close", param="type"
                    )
            except InvalidMessage as exc:  # a bad frame is answered and ignored; the session goes on
                await self.send_error(exc)
        await self.finish()
