"""The app's own ASGI middleware: request ids, and the guard on cross-origin voice-library writes."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cosyserve.api.errors import REQUEST_ID_HEADER, error_response

# Response headers a browser page may read (CORS hides non-standard headers unless exposed).
EXPOSED_HEADERS = (
    "X-Sample-Rate",
    "X-Channels",
    "X-Sample-Format",
    "X-SSML-Ignored-Tags",
    "X-Dubbing-Cues",
    "X-Dubbing-Unfit",
    "X-Seed",
    REQUEST_ID_HEADER,
)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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
