"""What the routes share: the server state (settings, the served models' engine clients), request ids, and the
mapping of cosyserve errors to HTTP statuses and JSON bodies."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cosyserve.engine.client import EngineClient
from cosyserve.engine.voices import IncompatibleVoice, VoiceExists, VoiceLimitReached
from cosyserve.errors import (
    CosyServeError,
    GenerationFailed,
    InvalidRequest,
    PayloadTooLarge,
    ServerBusy,
    UnknownSpeaker,
    UnsupportedMode,
)
from cosyserve.hub import is_hub_id
from cosyserve.settings import Settings

logger = logging.getLogger("cosyserve.api")

REQUEST_ID_HEADER = "X-Request-ID"
# Routes of the OpenAI-style API: client errors there are 400 (not 422), as OpenAI clients expect.
OPENAI_PREFIX = "/v1/"
# Response headers a browser page may read (CORS hides non-standard headers unless exposed).
EXPOSED_HEADERS = ("X-Sample-Rate", "X-Channels", "X-Sample-Format", REQUEST_ID_HEADER)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class MissingField(InvalidRequest):
    """A required form field or upload is absent or empty."""

    code = "missing_field"


class MalformedBody(InvalidRequest):
    """The request body is not a parseable form."""

    code = "malformed_body"


class ModelNotFound(InvalidRequest):
    """A request names a model this server does not serve."""

    code = "model_not_found"


# First match wins: subclasses before their bases.
_STATUS: tuple[tuple[type[CosyServeError], int], ...] = (
    (ServerBusy, 503),
    (PayloadTooLarge, 413),
    (VoiceExists, 409),
    (VoiceLimitReached, 409),
    (IncompatibleVoice, 400),
    (UnknownSpeaker, 404),
    (ModelNotFound, 404),
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


# Names of OpenAI's speech models: they reach the default model.
OPENAI_MODELS = ("tts-1", "tts-1-hd")


def _normalized(name: str) -> str:
    # Hub caches rewrite names (ModelScope stores CosyVoice2-0.5B as CosyVoice2-0___5B): compare loosely.
    return re.sub(r"[^a-z0-9]", "", name.rsplit("/", 1)[-1].lower())


class ModelSlot:
    """One served model: its name, where it comes from, its engine client once loaded."""

    def __init__(self, name: str, source: str, loader: Callable[[], Any] | None = None, named: bool = False) -> None:
        self.name = name  # what clients send as model (an explicit name=, else the source)
        self.source = source  # the --model_dir value
        self.named = named
        self.loader = loader  # None: the engine was given ready
        self.engine: EngineClient | None = None
        self.load_error: str | None = None
        self.loading = False  # a load has started (and may have ended)
        self.owned = True  # its engine is closed with the app
        self._lock = threading.Lock()

    @property
    def status(self) -> str:
        if self.engine is not None:
            return "ok"
        if self.load_error is not None:
            return "error"
        return "loading" if self.loading else "not_loaded"

    @property
    def model_id(self) -> str:
        """The id /v1/models shows: the name given, else the hub id it was started with, else its directory."""
        if self.named or self.engine is None:
            return self.name
        # Never a local path (it tells clients nothing and shows them the server's file system). The hub
        # caches hold the id in the path: .../iic/CosyVoice2-0___5B, .../models--org--name/snapshots/<hash>.
        path = Path(self.engine.info.model_dir)
        names = {_normalized(part.rsplit("--", 1)[-1]) for part in path.parts}
        if is_hub_id(self.source) and _normalized(self.source) in names:
            return self.source
        return path.name

    def answers_to(self, wanted: str) -> bool:
        """Whether ``wanted`` (normalized) is this model's name or id (before it is loaded: its source)."""
        if self.engine is None:
            names = [self.name, self.source]
        else:  # what it really is: an unnamed slot's source may be a default that another model stands in for
            names = [self.model_id, self.engine.info.name] + ([self.name] if self.named else [])
        return wanted in {_normalized(n) for n in names}

    def claim_load(self) -> bool:
        """True once: for the caller who is to run the loader."""
        with self._lock:
            if self.loading or self.loader is None:
                return False
            self.loading = True
            return True


class ServerState:
    """What the routes share: settings, the served models (each an engine client once loaded) and the
    open-response count. The first model (or ``settings.default_model``) is the default one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots: list[ModelSlot] = []
        self.in_flight = InFlight()
        # Runs a slot's loader in a background thread; set by the app (it knows how to make engines).
        self.start_load: Callable[[ModelSlot], None] = lambda slot: None

    @property
    def default(self) -> ModelSlot:
        wanted = self.settings.default_model
        for slot in self.slots:
            if wanted and wanted in (slot.name, slot.source):
                return slot
        return self.slots[0]

    # The default model's, as the single-model server always had them.
    @property
    def engine(self) -> EngineClient | None:
        return self.default.engine if self.slots else None

    @property
    def load_error(self) -> str | None:
        return self.default.load_error if self.slots else None

    def find(self, model: str | None) -> ModelSlot:
        """The slot a request's ``model`` names: its name, id or family; none or an OpenAI name: the
        default. 404 ``model_not_found`` lists the served ones."""
        if model is None or not model.strip():
            return self.default
        lowered = model.strip().lower()
        if lowered in OPENAI_MODELS or lowered.startswith("gpt-4o-mini-tts"):
            return self.default
        wanted = _normalized(lowered)
        for slot in self.slots:
            if slot.answers_to(wanted):
                return slot
        for slot in self.slots:  # a family name: the first model of that family
            if slot.engine is not None and _normalized(slot.engine.info.family) == wanted:
                return slot
        names = ", ".join((*(slot.model_id for slot in self.slots), *OPENAI_MODELS))
        raise ModelNotFound(f"model '{model}' is not served here; use one of: {names}", param="model")

    def require_engine(self, model: str | None = None) -> EngineClient:
        """The engine of the model named (default: the default one); 503 while it loads or after it failed."""
        slot = self.find(model)
        if slot.engine is not None:
            return slot.engine
        if slot.load_error is not None:
            raise HTTPException(503, f"the model {slot.name} failed to load: {slot.load_error}")
        raise HTTPException(503, f"the model {slot.name} is still loading, retry shortly", headers={"Retry-After": "5"})

    async def engine_for(self, model: str | None = None) -> EngineClient:
        """Like :meth:`require_engine`, but a model not loaded yet (``--lazy_load``) is loaded now, the
        request waiting for it."""
        slot = self.find(model)
        if slot.engine is None and slot.load_error is None and self.settings.lazy_load:
            if slot.claim_load():
                self.start_load(slot)
            while slot.engine is None and slot.load_error is None:
                await asyncio.sleep(0.05)
        return self.require_engine(model)


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


def _client_status(request: Request, status: int) -> int:
    """OpenAI clients expect 400 where the official API answers 422."""
    return 400 if status == 422 and request.url.path.startswith(OPENAI_PREFIX) else status


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CosyServeError)
    async def cosyserve_error(request: Request, exc: CosyServeError) -> JSONResponse:
        status = _client_status(request, status_for(exc))
        if status >= 500:
            logger.error("[%s] %s: %s", request_id(request), type(exc).__name__, exc.message)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, ServerBusy) else None
        return error_response(exc.message, exc.code, status, exc.param, headers)

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
        if not isinstance(exc, GenerationFailed):  # that one was logged by the engine
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
