"""Status routes: ``/health`` (503 until the model is loaded) and the speaker list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cosyserve.api.deps import server_state

router = APIRouter(tags=["status"])


@router.get("/health", summary="Readiness: 200 with the model's family, sample rate and modes; 503 while loading.")
async def health(request: Request) -> JSONResponse:
    state = server_state(request)
    engine = state.engine
    if engine is None:
        status = "error" if state.load_error is not None else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    body: dict[str, Any] = {
        "status": "ok",
        "model": engine.info.name or None,
        "family": engine.info.family,
        "sample_rate": engine.info.sample_rate,
        "channels": 1,
        "modes": sorted(engine.modes),
        "in_flight": state.in_flight.value,
        "engine": engine.stats(),
    }
    return JSONResponse(body)


@router.get("/speakers", summary="Built-in speaker ids, for spk_id.")
async def speakers(request: Request) -> dict[str, list[str]]:
    return {"speakers": list(server_state(request).require_engine().list_speakers())}
