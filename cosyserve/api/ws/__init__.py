"""Text-in, audio-out streaming over WebSocket: the session (:mod:`.session`) and its two protocols,
ElevenLabs' stream-input (:mod:`.elevenlabs`) and cosyserve's own (:mod:`.native`)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from cosyserve.api.deps import scope_state
from cosyserve.api.ws.elevenlabs import ElevenLabsSession
from cosyserve.api.ws.native import NativeSession

router = APIRouter()


@router.websocket("/v1/text-to-speech/{voice_id}/stream-input")
async def elevenlabs_stream_input(websocket: WebSocket, voice_id: str) -> None:
    await ElevenLabsSession(websocket, scope_state(websocket.scope), voice_id).run()


@router.websocket("/v1/audio/speech/stream")
async def speech_stream(websocket: WebSocket) -> None:
    await NativeSession(websocket, scope_state(websocket.scope)).run()
