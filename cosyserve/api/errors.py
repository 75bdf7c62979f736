"""cosyserve errors as HTTP responses: the status and JSON body of each (``cosyserve.errors`` says both),
and the app's exception handlers. A client error is answered before any audio; anything else is a 500
that names the request id and is logged."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from cosyserve.errors import CosyServeError, GenerationFailed

logger = logging.getLogger("cosyserve.api")

REQUEST_ID_HEADER = "X-Request-ID"
# Routes of the OpenAI-style API: client errors there are 400 (not 422), as OpenAI clients expect.
OPENAI_PREFIX = "/v1/"


ERROR_SHAPE = 'OpenAI error shape: {"error": {"message", "type", "param", "code"}}.'


def error_responses(
    *statuses: int,
    described: Mapping[int, str] | None = None,
    success: Mapping[int | str, dict[str, Any]] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route: its ``success`` ones, then its errors, all in the error shape:
    ``statuses``, and the ``described`` ones with what they mean on the route."""
    found = {status: ERROR_SHAPE for status in statuses}
    found |= {status: f"{meaning} ({ERROR_SHAPE})" for status, meaning in (described or {}).items()}
    errors: dict[int | str, dict[str, Any]] = {status: {"description": found[status]} for status in sorted(found)}
    return {**(success or {}), **errors}


def status_for(exc: CosyServeError) -> int:
    """HTTP status of a cosyserve error (on the official routes; see :func:`client_status`)."""
    return exc.status


def error_body(message: str, code: str, param: str | None = None, status: int = 400) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    message: str, code: str, status: int, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, code, param, status), status_code=status, headers=headers)


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or "-"


def client_status(request: Request, status: int) -> int:
    """OpenAI clients expect 400 where the official API answers 422."""
    return 400 if status == 422 and request.url.path.startswith(OPENAI_PREFIX) else status


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CosyServeError)
    async def cosyserve_error(request: Request, exc: CosyServeError) -> JSONResponse:
        status = client_status(request, status_for(exc))
        if status >= 500 and exc.retry_after is None:
            logger.error("[%s] %s: %s", request_id(request), type(exc).__name__, exc.message)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return error_response(exc.message, exc.code, status, exc.param, headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = getattr(exc, "code", None) or codes.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return error_response(str(exc.detail), code, exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(first.get("msg", "invalid request"), "invalid_value", client_status(request, 422), param)

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
