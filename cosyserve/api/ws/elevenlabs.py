"""ElevenLabs' ``stream-input`` WebSocket protocol (what LiveKit, Pipecat and the ElevenLabs SDKs speak):
``/v1/text-to-speech/{voice_id}/stream-input``, JSON frames in, ``{"audio": base64, "isFinal": false}`` out."""

from __future__ import annotations

import base64
import re
from typing import Any

import anyio
from fastapi import WebSocket

from cosyserve.api.auth import ApiKeys, scope_has_valid_key
from cosyserve.api.deps import ServerState
from cosyserve.api.pronunciations import request_pronunciations
from cosyserve.api.ws.session import SessionEnd, SessionSetup, SpeechSession, close_code_for
from cosyserve.audio.encode import OutputFormat
from cosyserve.engine.request import GenerationOptions
from cosyserve.errors import CosyServeError, InputTimeout, InvalidApiKey, InvalidMessage, InvalidRequest
from cosyserve.text.segmenter import CLAUSE_CHARS, TextSegmenter

# ElevenLabs' default; its chunk_length_schedule entries must lie in this range.
_SCHEDULE_RANGE = (50, 500)
_OUTPUT_FORMAT = re.compile(r"^(pcm|mp3)_(\d+)(?:_(\d+))?$")
_INACTIVITY_DEFAULT, _INACTIVITY_MAX = 20.0, 180.0


def parse_output_format(value: str, native_rate: int) -> OutputFormat:
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
        return OutputFormat.checked(codec, rate, native_rate)
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
    and are ignored. Alignment is not produced (null). Extensions: ``seed`` in the query, ``pronunciations``
    (as on ``/v1/audio/speech``) in the opening frame.
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
        engine = self.state.models.require(None if not model or model.startswith("eleven_") else model)
        output = parse_output_format(self._query("output_format") or "mp3_44100_128", engine.info.sample_rate)
        seed = self._query("seed")
        if seed is not None and not (seed.isdigit() and int(seed) < 2**63):
            raise InvalidRequest(f"seed must be an integer in 0..2^63-1, not {seed!r}", param="seed")
        settings = first.get("voice_settings") or {}
        if not isinstance(settings, dict):
            raise InvalidMessage("voice_settings must be an object", param="voice_settings")
        speed = settings.get("speed", 1.0)
        if speed is None:
            speed = 1.0
        if isinstance(speed, bool) or not isinstance(speed, (int, float)):
            raise InvalidMessage("voice_settings.speed must be a number", param="voice_settings.speed")
        options = GenerationOptions(stream=True, speed=speed, seed=int(seed) if seed is not None else None)
        config = first.get("generation_config") or {}
        chunks = (config.get("chunk_length_schedule") if isinstance(config, dict) else None) or [CLAUSE_CHARS]
        low, high = _SCHEDULE_RANGE
        if not isinstance(chunks, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and low <= c <= high for c in chunks
        ):
            raise InvalidMessage(
                f"generation_config.chunk_length_schedule must be a list of integers within {low}..{high}",
                param="generation_config.chunk_length_schedule",
            )
        # The schedule's n-th entry: how long the n-th segment must be before a clause mark may end it.
        segmenter = TextSegmenter(lambda n: chunks[min(n, len(chunks) - 1)])
        bistream = (self._query("bistream") or "false").strip().lower()
        if bistream not in ("true", "false", "1", "0"):
            raise InvalidRequest(f"bistream must be true or false, not {bistream!r}", param="bistream")
        entries = request_pronunciations(first.get("pronunciations"))
        return self.configure(
            engine, self.voice_id, options, None, output, segmenter, bistream in ("true", "1"), entries
        )

    def _check_key(self, first: dict[str, Any]) -> None:
        if scope_has_valid_key(self.ws.scope):
            return
        key = first.get("xi_api_key") or first.get("xi-api-key")
        authorization = first.get("authorization")
        if not key and isinstance(authorization, str) and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if not isinstance(key, str) or not ApiKeys(self.settings.api_keys).valid(key):
            raise SessionEnd(1008, InvalidApiKey("missing or invalid API key (xi-api-key)"))

    async def _next_message(self, timeout: float) -> dict[str, Any]:
        try:
            with anyio.fail_after(timeout):
                message = await self.receive_json()
        except TimeoutError as exc:
            raise SessionEnd(
                1008, InputTimeout(f"no text received for {timeout:g} seconds (inactivity_timeout): closing")
            ) from exc
        if not isinstance(message, dict):
            raise InvalidMessage("each frame must be a JSON object")
        text = message.get("text")
        if text is not None and not isinstance(text, str):
            raise InvalidMessage("text must be a string", param="text")
        if "flush" in message and not isinstance(message["flush"], bool):
            raise InvalidMessage("flush must be true or false", param="flush")
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
