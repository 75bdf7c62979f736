"""API keys: every HTTP request and WebSocket handshake must carry one of the configured keys.

Clients send ``Authorization: Bearer <key>``. Under ``/v1/text-to-speech/`` (the ElevenLabs-style
routes) the ``xi-api-key`` header and the ``api_key`` query parameter are accepted too, as ElevenLabs
clients send them that way (a browser's WebSocket cannot set headers at all). Exempt paths
(``Settings.auth_exempt``: ``/health`` and ``/metrics`` by default) and CORS preflights pass without one.

Keys are compared in constant time and never logged. A refusal is a 401 in the OpenAI error shape
with ``WWW-Authenticate: Bearer``; a refused WebSocket handshake is closed with code 1008 (policy
violation) before it is accepted. WebSocket routes that want to check the key themselves (e.g. on an
exempt path, to answer with a JSON error message first) call :func:`scope_has_valid_key`. The
``api_key`` query parameter is removed from the request once read, so no access log shows it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# Routes whose clients (ElevenLabs SDKs, LiveKit, Pipecat) send the key as xi-api-key or ?api_key=.
ELEVENLABS_PREFIX = "/v1/text-to-speech/"
QUERY_KEY = "api_key"
VALID_KEY_SCOPE = "cosyserve.valid_api_key"  # the middleware's verdict on the key, for routes to read
KEY_ID_SCOPE = "cosyserve.api_key_id"  # the valid key's id (a digest, never the key): its lexicon scope


class ApiKeys:
    """The accepted keys and the paths open without one."""

    def __init__(self, keys: Iterable[str], exempt: Iterable[str] = ()) -> None:
        # Digests, so every comparison is between equal lengths and the key lengths do not leak either.
        self._digests = tuple(_digest(k) for k in keys)
        exempt = tuple(exempt)
        self._exact = frozenset(p for p in exempt if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in exempt if p.endswith("*"))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def exempt(self, path: str) -> bool:
        return path in self._exact or path.startswith(self._prefixes)

    def valid(self, key: str | None) -> bool:
        """Whether ``key`` is one of the keys; the time taken does not depend on where they differ."""
        if not key:
            return False
        candidate = _digest(key)
        found = False
        for known in self._digests:  # no early exit: which key matched does not leak either
            found |= hmac.compare_digest(candidate, known)
        return found

    def open(self, scope: Scope) -> bool:
        """Whether an HTTP request or WebSocket handshake may go on without a key."""
        if not self.enabled or self.exempt(scope.get("path", "")):
            return True
        # CORS preflights never carry credentials; no route answers OPTIONS otherwise.
        return scope["type"] == "http" and scope.get("method") == "OPTIONS"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "replace")).digest()


def key_from_scope(scope: Scope) -> str | None:
    """The key a request or handshake carries: the Bearer token, else (ElevenLabs-style routes only)
    the ``xi-api-key`` header or the ``api_key`` query parameter."""
    headers = dict(scope.get("headers") or ())
    authorization = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if not scope.get("path", "").startswith(ELEVENLABS_PREFIX):
        return None
    if xi := headers.get(b"xi-api-key", b"").decode("latin-1").strip():
        return xi
    query = scope.get("query_string", b"").decode("latin-1")
    return dict(parse_qsl(query)).get(QUERY_KEY) or None


def _drop_query_key(scope: Scope) -> None:
    """Remove ``api_key`` from the query string, so the server's access log never shows it."""
    raw = scope.get("query_string", b"")
    if QUERY_KEY.encode() not in raw:
        return
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != QUERY_KEY]).encode("latin-1")


def scope_has_valid_key(scope: Scope) -> bool:
    """Whether the request or handshake carried a valid key (True when no keys are configured), whatever
    the exemptions: for routes, e.g. WebSocket ones on an exempt path, that check on their own."""
    return scope.get(VALID_KEY_SCOPE, True)


def scope_key_id(scope: Scope) -> str | None:
    """The id of the valid API key the request or handshake carried (the start of its SHA-256, never the key
    itself), None when the server has no keys or the request none: what owns an API key's pronunciations."""
    return scope.get(KEY_ID_SCOPE)


def unauthorized_response(has_key: bool) -> JSONResponse:
    message = (
        "invalid API key"
        if has_key
        else "missing API key: send it as 'Authorization: Bearer <key>' (the server was started with --api_key)"
    )
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    """Refuses requests and WebSocket handshakes without a valid key (when keys are configured)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        key = key_from_scope(scope)
        scope[VALID_KEY_SCOPE] = valid = not self.keys.enabled or self.keys.valid(key)
        if self.keys.enabled and valid and key:
            scope[KEY_ID_SCOPE] = _digest(key).hex()[:32]
        _drop_query_key(scope)  # uvicorn logs the path and query from this scope once the response starts
        if valid or self.keys.open(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await unauthorized_response(key is not None)(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "missing or invalid API key"})
