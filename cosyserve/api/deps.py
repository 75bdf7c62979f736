"""What the routes share: the server state (settings, the engine client), request ids, and the
mapping of cosyserve errors to HTTP statuses and JSON bodies."""

from __future__ import annotations

import logging
import re
import threading
import uuid
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


# First match wins: subclasses before their bases.
_STATUS: tuple[tuple[type[CosyServeError], int], ...] = (
    (ServerBusy, 503),
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


class ServerState:
    """What the routes share: settings, the engine client (once loaded) and the open-response count."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: EngineClient | None = None
        self.load_error: str | None = None
        self.in_flight = InFlight()

    def require_engine(self) -> EngineClient:
        if self.engine is not None:
            return self.engine
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
