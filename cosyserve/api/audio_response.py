"""The streaming audio response: encodes an engine's audio stream as it arrives, watching for the
client going away (which aborts the request in the engine)."""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

import anyio
import numpy as np
from fastapi import Request
from fastapi.responses import Response
from starlette.types import Message, Receive, Scope, Send

from cosyserve.api.deps import InFlight, server_state
from cosyserve.api.errors import error_response, request_id
from cosyserve.api.metrics import AUDIO_SCOPE_KEY
from cosyserve.audio.encode import OutputFormat
from cosyserve.audio.resample import OutputResampler
from cosyserve.engine.client import AudioStream, EngineClient
from cosyserve.engine.request import SynthesisRequest
from cosyserve.errors import GenerationFailed

logger = logging.getLogger("cosyserve.api")

# Formats whose header holds the length: sent whole (exact header) unless the client asked to stream.
LENGTH_IN_HEADER = ("wav", "flac")
# Formats whose body carries 16-bit little-endian samples as such (compressed ones do not).
PCM_SAMPLE_FORMATS = ("wav", "pcm")
# What an SSML request's document had that the server does not do (its text was spoken): each name once.
SSML_IGNORED_HEADER = "X-SSML-Ignored-Tags"


def ssml_ignored_header(names: tuple[str, ...]) -> str:
    """The header's value: the names, comma-separated, anything outside printable ASCII percent-encoded."""
    return ", ".join(quote(name, safe="@=()-_.:/ ") for name in names)


class AudioResponse(Response):
    """Sends a generation's audio, watching for the client going away.

    ``output``: the format and rate sent (chunks come at ``model_rate`` and are resampled). ``buffered``:
    wait for the whole audio so the container header carries exact sizes (and a generation failure can
    still be a JSON 500); otherwise bytes go out as chunks arrive.
    """

    def __init__(
        self,
        generation: AudioStream,
        output: OutputFormat,
        model_rate: int,
        buffered: bool,
        in_flight: InFlight | None = None,
        label: str = "",
    ) -> None:
        self.generation = generation
        self.in_flight = in_flight
        self.label = label
        self.started_at = time.perf_counter()
        self.fmt = output.fmt
        self.sample_rate = output.rate
        self.buffered = buffered
        self.sent = False  # the whole response is out
        self.resampler = OutputResampler(model_rate, output.rate)
        self.encoder = output.encoder()
        headers = {"X-Sample-Rate": str(output.rate), "X-Channels": "1", "Cache-Control": "no-store"}
        if output.fmt in PCM_SAMPLE_FORMATS:  # only where the body holds the samples as they are
            headers["X-Sample-Format"] = "s16le"
        super().__init__(media_type=self.body_media_type(), headers=headers)

    def body_media_type(self) -> str:
        return self.encoder.media_type

    def tail(self) -> bytes:
        """The bytes after the last chunk: the resampler's remainder, then the container's end."""
        rest = self.resampler(np.zeros(0, np.float32), last=True)
        return (self.encoder.encode(rest) if rest.size else b"") + self.encoder.finish()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[AUDIO_SCOPE_KEY] = self  # for the metrics middleware
        failure: GenerationFailed | None = None
        disconnected = False
        try:
            async with anyio.create_task_group() as group:

                async def watch_disconnect() -> None:
                    nonlocal disconnected
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if not self.sent:
                        disconnected = True
                        logger.info("[%s] client disconnected", self.generation.request_id)
                    await self.generation.aclose()
                    group.cancel_scope.cancel()

                group.start_soon(watch_disconnect)
                try:
                    if self.buffered:
                        await self._send_buffered(send)
                    else:
                        await self._send_streamed(send)
                except GenerationFailed as exc:
                    failure = exc
                finally:
                    await self.generation.aclose()
                    group.cancel_scope.cancel()
        finally:
            if self.in_flight is not None:
                self.in_flight.leave()
            logger.info(
                "[%s] %s %s: %d samples in %.2f s",
                self.generation.request_id,
                self.label,
                "failed" if failure else "cancelled" if disconnected else "done",
                self.generation.samples,
                time.perf_counter() - self.started_at,
            )
        if failure is not None:
            # Headers are gone already: cutting the connection short is the only way left to tell.
            raise failure

    def _start_message(self, content_length: int | None = None) -> Message:
        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        return {"type": "http.response.start", "status": 200, "headers": headers}

    async def _send_streamed(self, send: Send) -> None:
        await send(self._start_message())
        await self._send_body(send, self.encoder.header())
        async for chunk in self.generation:
            await self._send_body(send, self.encoder.encode(self.resampler(chunk)))
        await self._send_body(send, self.tail())
        self.sent = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_buffered(self, send: Send) -> None:
        chunks: list[np.ndarray] = []
        try:
            async for chunk in self.generation:
                chunks.append(chunk)
        except GenerationFailed:
            # Nothing was sent yet, so the failure can still be a proper JSON error.
            response = error_response(
                f"audio generation failed (request {self.generation.request_id}); see the server log",
                "generation_failed",
                500,
            )
            await response({"type": "http"}, _no_receive, send)
            return
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        body = self.encoder.encode_all(self.resampler(audio, last=True))
        await send(self._start_message(len(body)))
        self.sent = True
        await send({"type": "http.response.body", "body": body, "more_body": False})

    @staticmethod
    async def _send_body(send: Send, data: bytes) -> None:
        if data:
            await send({"type": "http.response.body", "body": data, "more_body": True})


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def start_generation(
    request: Request,
    engine: EngineClient,
    label: str,
    synthesis: SynthesisRequest,
    output: OutputFormat,
    *,
    buffered: bool | None = None,
    response_class: type[AudioResponse] = AudioResponse,
) -> AudioResponse:
    """Submit ``synthesis`` to ``engine`` and wrap its audio in a response sent as ``output`` (checked
    by the route, before any work); the engine's validation errors (and ServerBusy) propagate as HTTP
    errors before any byte is sent. ``buffered`` (None: formats with the length in their header, unless
    streaming).
    """
    state = server_state(request)
    if buffered is None:
        buffered = not synthesis.options.stream and output.fmt in LENGTH_IN_HEADER
    stream = await engine.synthesize(synthesis, request_id(request))
    state.in_flight.enter()
    response = response_class(stream, output, engine.info.sample_rate, buffered, in_flight=state.in_flight, label=label)
    if synthesis.ssml is not None and synthesis.ssml.ignored:
        response.headers[SSML_IGNORED_HEADER] = ssml_ignored_header(synthesis.ssml.ignored)
    return response
