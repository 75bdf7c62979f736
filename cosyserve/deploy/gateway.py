"""The front of a Ray Serve deployment: it takes every client connection and hands it to an engine
replica, so that losing a replica costs no client a bare 500.

Ray Serve's proxy answers a request whose replica died with a plain-text 500. The gateway (the
``cosyserve`` application's ingress, a replica without a model) calls the engine replicas itself,
through a deployment handle (:func:`forward_http` runs the server's app there):

- a replica lost before the response started: the request is sent again, to another replica (the
  request body is kept for that), up to :data:`ATTEMPTS` times (the response says ``X-Attempts: 2``...);
  then a 503 ``replica_unavailable`` with ``Retry-After``;
- a replica lost once the response started: the response is cut, i.e. it ends without the final chunk
  of its chunked body, which every HTTP client reports as an incomplete read (``requests``:
  ``ChunkedEncodingError``; ``curl``: exit 18); an event stream (``stream_format=sse``) gets an
  ``error`` event (code ``replica_lost``) instead, then its end. A finished response always ends with
  that final chunk (and an event stream with ``speech.audio.done``);
- WebSocket sessions are relayed to the engine application's route (:data:`ENGINE_PREFIX`, through the
  proxy of this node); a session whose replica is lost is closed with 1011 and the reason
  ``replica_lost``; one that cannot reach a replica with 1013 (try again later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.types import Message, Receive, Scope, Send

from cosyserve.api.errors import error_body

logger = logging.getLogger("cosyserve.ray")

ENGINE_APP = "cosyserve-engine"  # the Serve application of the engine replicas
ENGINE_PREFIX = "/_engine"  # its route on the proxy, for the WebSocket relay
ATTEMPTS = 3  # replicas a request is sent to before it is answered 503
RETRY_AFTER_S = 5  # what a request no replica could take is told to wait
ATTEMPTS_HEADER = "X-Attempts"  # on a response that a second (or later) replica answered
# The parts of a request's ASGI scope that travel to the engine replica (the rest is the proxy's).
_FORWARDED = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers")
_HOP_BY_HOP = {b"host", b"connection", b"upgrade", b"sec-websocket-key", b"sec-websocket-version"}
_HOP_BY_HOP |= {b"sec-websocket-extensions", b"sec-websocket-protocol", b"content-length", b"transfer-encoding"}


def replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica (or the way to it) went away, not that the request failed there."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError | DeploymentUnavailableError)


async def forward_http(app: Any, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
    """Run one HTTP request through ``app`` (in the engine replica); its ASGI messages, in order. The
    caller closing the iterator (its client went away) is a disconnect for the app."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app({**scope, "client": None, "server": None, "root_path": "", "state": {}}, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await messages.get()) is not None:
            yield message
        await task  # an error the app raised after its last message
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)


def _with_attempts(start: Message, attempt: int) -> Message:
    """A response start naming, past the first, the attempt that answered (``X-Attempts``)."""
    if attempt == 1:
        return start
    return {**start, "headers": [*start.get("headers", []), (ATTEMPTS_HEADER.lower().encode(), str(attempt).encode())]}


class Gateway:
    """The gateway's ASGI app: HTTP forwarded through ``engine`` (a handle to the engine deployment),
    WebSockets relayed to the engine application at ``engine_url`` (``ws://host:port``)."""

    def __init__(self, engine: Any, engine_url: str, max_body_bytes: int) -> None:
        self.engine = engine
        self.engine_url = engine_url
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    # -- HTTP
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._body(receive)
        if body is None:
            return  # the client left during the upload
        forwarded = {key: scope[key] for key in _FORWARDED if key in scope}
        started: Message | None = None
        for attempt in range(1, ATTEMPTS + 1):
            stream = self.engine.options(stream=True).forward_http.remote(forwarded, body)
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._cancel_on_disconnect, receive, stream, group.cancel_scope)
                    async for message in stream:
                        if message["type"] == "http.response.start":
                            started = message = _with_attempts(message, attempt)
                        await send(message)
                    group.cancel_scope.cancel()
                return
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                if started is not None:
                    await self._cut(started, send, exc)
                    return
                logger.warning("replica lost before %s %s started (attempt %d): %s", scope["method"], scope["path"],
                               attempt, type(exc).__name__)  # fmt: skip
        await self._unavailable(send)

    async def _body(self, receive: Receive) -> bytes | None:
        """The request body, up to one byte over the limit (the engine's app answers the 413)."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            if len(body) <= self.max_body_bytes:
                body += message.get("body", b"")
            if not message.get("more_body", False):
                return bytes(body[: self.max_body_bytes + 1])

    @staticmethod
    async def _cancel_on_disconnect(receive: Receive, stream: Any, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        stream.cancel()  # the engine replica aborts the request
        scope.cancel()

    @staticmethod
    async def _cut(started: Message, send: Send, exc: BaseException) -> None:
        """A response whose replica was lost midway: an event stream gets an error event and ends; any
        other body is cut (no final chunk), which its client reads as an incomplete transfer."""
        logger.warning("replica lost during a response: %s", type(exc).__name__)
        headers = dict(started.get("headers", []))
        if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
            event = {
                "type": "error",
                **error_body("the replica generating this stream was lost", "replica_lost", status=500),
            }
            data = f"data: {json.dumps(event)}\n\n".encode()
            await send({"type": "http.response.body", "body": data, "more_body": False})
            return
        raise ConnectionAbortedError("the replica generating this response was lost")

    @staticmethod
    async def _unavailable(send: Send) -> None:
        error = error_body("no replica could take the request; retry shortly", "replica_unavailable", status=503)
        body = json.dumps(error).encode()
        headers = [(b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_S).encode())]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # -- WebSocket
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        query = scope.get("query_string", b"").decode("latin-1")
        url = f"{self.engine_url}{ENGINE_PREFIX}{scope['path']}" + (f"?{query}" if query else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            upstream = await connect(url, additional_headers=headers, open_timeout=30, max_size=None)
        except InvalidStatus as exc:  # refused by the engine's app (a bad key: 1008, as the plain server)
            code = 1008 if exc.response.status_code in (401, 403) else 1013
            await send({"type": "websocket.close", "code": code, "reason": "session refused"})
            return
        except (OSError, TimeoutError) as exc:
            logger.warning("no engine replica for a WebSocket session: %s", exc)
            await send({"type": "websocket.close", "code": 1013, "reason": "replica_unavailable"})
            return
        await send({"type": "websocket.accept"})
        async with upstream, anyio.create_task_group() as group:

            async def client_to_engine() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        await upstream.close()
                        group.cancel_scope.cancel()
                        return
                    data = message.get("bytes") if message.get("bytes") is not None else message.get("text", "")
                    with contextlib.suppress(ConnectionClosed):
                        await upstream.send(data)

            group.start_soon(client_to_engine)
            try:
                async for frame in upstream:
                    key = "bytes" if isinstance(frame, bytes) else "text"
                    await send({"type": "websocket.send", key: frame})
                code, reason = upstream.close_code or 1000, upstream.close_reason or ""
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1011, "replica_lost")
            if code == 1006:
                code, reason = 1011, "replica_lost"
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code, "reason": reason})
            group.cancel_scope.cancel()
