"""FastAPI application factory: model state, error mapping, CORS, request ids, streamed generation.

Inference is blocking torch code. Each request runs its engine call and its chunk loop in a thread
of its own (:class:`Generation`), so the event loop only moves bytes; a disconnect or an error stops
that request's generation between two chunks without touching any other request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cosyserve import __version__
from cosyserve.audio.encode import make_encoder, output_rate
from cosyserve.audio.resample import OutputResampler
from cosyserve.engine.voices import IncompatibleVoice, VoiceExists, VoiceLimitReached
from cosyserve.errors import (
    CosyServeError,
    InvalidRequest,
    PayloadTooLarge,
    UnknownSpeaker,
    UnsupportedMode,
)
from cosyserve.settings import Settings

logger = logging.getLogger("cosyserve.api")

REQUEST_ID_HEADER = "X-Request-ID"
# Routes of the OpenAI-style API: client errors there are 400 (not 422), as OpenAI clients expect.
OPENAI_PREFIX = "/v1/"
# Formats whose header holds the length: sent whole (exact header) unless the client asked to stream.
LENGTH_IN_HEADER = ("wav", "flac")
# Response headers a browser page may read (CORS hides non-standard headers unless exposed).
EXPOSED_HEADERS = ("X-Sample-Rate", "X-Channels", "X-Sample-Format", REQUEST_ID_HEADER)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class MissingField(InvalidRequest):
    """A required form field or upload is absent or empty."""

    code = "missing_field"


class MalformedBody(InvalidRequest):
    """The request body is not a parseable form."""

    code = "malformed_body"


# First match wins: subclasses before their bases.
_STATUS: tuple[tuple[type[CosyServeError], int], ...] = (
    (PayloadTooLarge, 413),
    (VoiceExists, 409),
    (VoiceLimitReached, 409),
    (IncompatibleVoice, 400),
    (UnknownSpeaker, 404),
    (UnsupportedMode, 400),
    (MalformedBody, 400),
    (InvalidRequest, 422),
)


def status_for(exc: CosyServeError) -> int:
    """HTTP status of a cosyserve error; anything that is not the client's fault is a 500."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(message: str, code: str, param: str | None = None, status: int = 400) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    message: str, code: str, status: int, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, code, param, status), status_code=status, headers=headers)


class InFlight:
    """Number of generations currently running (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def enter(self) -> None:
        with self._lock:
            self._value += 1

    def leave(self) -> None:
        with self._lock:
            self._value -= 1

    @property
    def value(self) -> int:
        return self._value


class ServerBusy(HTTPException):
    """Every generation slot is taken and the queue is full: 503 with Retry-After."""

    code = "server_busy"

    def __init__(self, message: str) -> None:
        super().__init__(503, message, headers={"Retry-After": "2"})


class Admission:
    """At most ``limit`` generations run at once; up to ``queue`` more wait for a slot, the rest are
    turned away with 503 (running them all at once would only make every one of them slower)."""

    def __init__(self, limit: int, queue: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._queue = queue
        self._lock = threading.Lock()
        self._waiting = 0

    def enqueue(self) -> None:
        with self._lock:
            if self._waiting >= self._queue:
                raise ServerBusy(f"the server is busy ({self._waiting} requests waiting), retry shortly")
            self._waiting += 1

    def wait_for_slot(self, cancelled: threading.Event) -> bool:
        """Block until a slot is free (True) or the request is cancelled (False); leaves the queue."""
        try:
            while not cancelled.is_set():
                if self._slots.acquire(timeout=0.05):
                    return True
            return False
        finally:
            with self._lock:
                self._waiting -= 1

    def release(self) -> None:
        self._slots.release()


class ServerState:
    """What the routes share: settings, the model (once loaded), admission and the in-flight counter."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model: Any = None
        self.load_error: str | None = None
        self.in_flight = InFlight()
        self.admission = Admission(settings.max_concurrency, settings.max_queue)

    def require_model(self) -> Any:
        if self.model is not None:
            return self.model
        if self.load_error is not None:
            raise HTTPException(503, f"the model failed to load: {self.load_error}")
        raise HTTPException(503, "the model is still loading, retry shortly", headers={"Retry-After": "5"})


def server_state(request: Request) -> ServerState:
    return request.app.state.cosyserve


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or "-"


class RequestIdMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` when sane) and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = incoming if _CLIENT_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class GenerationFailed(RuntimeError):
    """Generation broke after the response had started; the stream is cut so the client sees it."""


class Generation:
    """One request's engine call and chunk loop, run in a dedicated thread.

    ``start`` is the engine call: it validates and runs the frontend (raising cosyserve errors) and
    returns the chunk iterator. The thread checks the cancel flag before every chunk, so a cancelled
    generation stops within one chunk, and it always closes the iterator.
    """

    def __init__(
        self, start: Callable[[], Iterator[np.ndarray]], rid: str, in_flight: InFlight, admission: Admission, label: str
    ) -> None:
        self._start = start
        self.rid = rid
        self.label = label
        self._in_flight = in_flight
        self._admission = admission
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cosyserve-{rid}", daemon=True)
        self.samples = 0

    def start(self) -> None:
        self._admission.enqueue()
        self._in_flight.enter()
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    async def ready(self) -> None:
        """Wait for the engine call; re-raise its validation error, if any."""
        kind, value = await self._queue.get()
        if kind == "error":
            raise value

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """The audio chunks; raises GenerationFailed when generation breaks."""
        while True:
            kind, value = await self._queue.get()
            if kind == "chunk":
                yield value
            elif kind == "failed":
                raise GenerationFailed(f"generation failed (request {self.rid}): {value}")
            else:
                return

    def _put(self, kind: str, value: Any = None) -> None:
        # RuntimeError: the event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def _run(self) -> None:
        started = time.perf_counter()
        if not self._admission.wait_for_slot(self._cancel):
            self._in_flight.leave()
            return
        try:
            try:
                iterator = self._start()
            except Exception as exc:
                self._put("error", exc)
                return
            self._put("ready")
            try:
                while not self._cancel.is_set():
                    try:
                        chunk = np.asarray(next(iterator), dtype=np.float32)
                    except StopIteration:
                        break
                    self.samples += chunk.shape[0]
                    self._put("chunk", chunk)
            except Exception as exc:
                logger.exception("[%s] %s: generation failed", self.rid, self.label)
                self._put("failed", exc)
            finally:
                try:
                    close = getattr(iterator, "close", None)
                    if close is not None:
                        close()
                except Exception:
                    logger.exception("[%s] %s: closing the generator failed", self.rid, self.label)
            state = "cancelled" if self._cancel.is_set() else "done"
            logger.info(
                "[%s] %s %s: %d samples in %.2f s",
                self.rid,
                self.label,
                state,
                self.samples,
                time.perf_counter() - started,
            )
        finally:
            self._admission.release()
            self._in_flight.leave()
            self._put("end")


class AudioResponse(Response):
    """Sends a generation's audio, watching for the client going away.

    ``buffered``: wait for the whole audio so the container header carries exact sizes (and a
    generation failure can still be a JSON 500); otherwise bytes go out as chunks arrive.
    ``output_rate``: the rate sent (default ``sample_rate``, the model's); chunks are resampled.
    """

    def __init__(
        self, generation: Generation, fmt: str, sample_rate: int, buffered: bool, output_rate: int | None = None
    ) -> None:
        self.generation = generation
        self.fmt = fmt
        self.sample_rate = output_rate or sample_rate
        self.buffered = buffered
        self.sent = False  # the whole response is out
        self.resampler = OutputResampler(sample_rate, self.sample_rate)
        self.encoder = make_encoder(fmt, self.sample_rate)
        super().__init__(
            media_type=self.body_media_type(),
            headers={
                "X-Sample-Rate": str(self.sample_rate),
                "X-Channels": "1",
                "X-Sample-Format": "s16le",
                "Cache-Control": "no-store",
            },
        )

    def body_media_type(self) -> str:
        return self.encoder.media_type

    def tail(self) -> bytes:
        """The bytes after the last chunk: the resampler's remainder, then the container's end."""
        rest = self.resampler(np.zeros(0, np.float32), last=True)
        return (self.encoder.encode(rest) if rest.size else b"") + self.encoder.finish()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        failure: GenerationFailed | None = None
        async with anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not self.sent:
                    logger.info("[%s] client disconnected", self.generation.rid)
                self.generation.cancel()
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
                self.generation.cancel()
                group.cancel_scope.cancel()
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
        async for chunk in self.generation.chunks():
            await self._send_body(send, self.encoder.encode(self.resampler(chunk)))
        await self._send_body(send, self.tail())
        self.sent = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_buffered(self, send: Send) -> None:
        chunks: list[np.ndarray] = []
        try:
            async for chunk in self.generation.chunks():
                chunks.append(chunk)
        except GenerationFailed:
            # Nothing was sent yet, so the failure can still be a proper JSON error.
            response = error_response(
                f"audio generation failed (request {self.generation.rid}); see the server log",
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
    label: str,
    start: Callable[[], Iterator[np.ndarray]],
    fmt: str,
    stream: bool,
    sample_rate: int | None = None,
    *,
    buffered: bool | None = None,
    response_class: type[AudioResponse] = AudioResponse,
) -> AudioResponse:
    """Run ``start`` (the engine call) in its own thread; errors it raises propagate as HTTP errors.

    ``sample_rate``: the rate to send (None: the model's, or the nearest the format takes);
    ``buffered`` (None: formats with the length in their header, unless streaming).
    """
    state = server_state(request)
    fmt = fmt.lower()
    rate = output_rate(fmt, sample_rate, state.model.sample_rate)  # a bad format / rate fails before any work
    if buffered is None:
        buffered = not stream and fmt in LENGTH_IN_HEADER
    generation = Generation(start, request_id(request), state.in_flight, state.admission, label)
    generation.start()
    try:
        await generation.ready()
    except BaseException:
        generation.cancel()
        raise
    return response_class(generation, fmt, state.model.sample_rate, buffered, rate)


def _client_status(request: Request, status: int) -> int:
    """OpenAI clients expect 400 where the official API answers 422."""
    return 400 if status == 422 and request.url.path.startswith(OPENAI_PREFIX) else status


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CosyServeError)
    async def cosyserve_error(request: Request, exc: CosyServeError) -> JSONResponse:
        status = _client_status(request, status_for(exc))
        if status >= 500:
            logger.error("[%s] %s: %s", request_id(request), type(exc).__name__, exc.message)
        return error_response(exc.message, exc.code, status, exc.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 503: "model_not_ready"}
        code = getattr(exc, "code", None) or codes.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(str(exc.detail), code, exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(first.get("msg", "invalid request"), "invalid_value", _client_status(request, 422), param)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        if not isinstance(exc, GenerationFailed):  # that one was logged by its generation thread
            logger.error("[%s] unhandled error", rid, exc_info=exc)
        return error_response(
            f"internal server error (request {rid})", "internal_error", 500, headers={REQUEST_ID_HEADER: rid}
        )


def _allowed_methods(request: Request) -> str:
    """Every method some route answers at this path (a path may have one route per method)."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in ("DELETE", "GET", "PATCH", "POST", "PUT")
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )


# Voice-library writes change what every client of the server hears: a cross-origin web page may make
# them only when its origin is listed in cors_origins (the wildcard opens synthesis, not these).
VOICE_LIBRARY_PATH = "/v1/audio/voices"
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CrossOriginWriteGuard:
    """Refuses (403, no CORS headers) browser requests and preflights for voice-library writes from an
    origin that is neither the server's own nor explicitly trusted. Clients without ``Origin`` pass."""

    def __init__(self, app: ASGIApp, trusted: tuple[str, ...]) -> None:
        self.app = app
        self.trusted = frozenset(o for o in trusted if o != "*")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(VOICE_LIBRARY_PATH):
            headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
            origin = headers.get(b"origin", "")
            method = scope["method"]
            if method == "OPTIONS":
                method = headers.get(b"access-control-request-method", "").upper()
            own = origin.split("://", 1)[-1] == headers.get(b"host", "")
            if origin and method in _WRITE_METHODS and origin not in self.trusted and not own:
                message = (
                    f"voice-library changes from the web origin {origin} are not allowed; "
                    "list it in --cors_origins to allow them"
                )
                await error_response(message, "cross_origin_forbidden", 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model_or_loader: Any, settings: Settings | None = None) -> FastAPI:
    """The HTTP app around a loaded ``TTSModel`` or a zero-argument callable that loads one.

    With a loader, loading starts in a background thread when the app starts up; until it is done
    ``/health`` answers 503 and the inference routes answer 503 with ``Retry-After``.
    """
    from cosyserve.api import health, official, openai, voices

    settings = settings or Settings()
    state = ServerState(settings)
    loader: Callable[[], Any] | None = None
    if callable(model_or_loader) and not hasattr(model_or_loader, "sample_rate"):
        loader = model_or_loader
    else:
        state.model = model_or_loader

    def load() -> None:
        started = time.perf_counter()
        try:
            model = loader()
        except Exception as exc:
            state.load_error = str(exc) or type(exc).__name__
            logger.error("model loading failed: %s", state.load_error)
            logger.debug("model loading traceback", exc_info=exc)
            return
        state.model = model
        logger.info(
            "model ready in %.1f s: %s, %d Hz, modes %s",
            time.perf_counter() - started,
            model.family,
            model.sample_rate,
            ", ".join(sorted(model.modes)),
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is not None and state.model is None and state.load_error is None:
            threading.Thread(target=load, name="cosyserve-model-loader", daemon=True).start()
        yield

    app = FastAPI(
        title="cosyserve",
        version=__version__,
        description="CosyVoice text-to-speech: the official `/inference_*` API (GET and POST, form fields) "
        "and the OpenAI-compatible `/v1/audio/speech`.",
        lifespan=lifespan,
    )
    app.state.cosyserve = state
    _install_error_handlers(app)
    app.include_router(official.router)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(voices.router)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=list(EXPOSED_HEADERS),
        )
    app.add_middleware(CrossOriginWriteGuard, trusted=settings.cors_origins)
    return app
