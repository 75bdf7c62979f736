"""Status routes: ``/health`` (503 until the model is loaded) and the speaker list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cosyserve.api.app import server_state

router = APIRouter(tags=["status"])


@router.get("/health", summary="Readiness: 200 with the model's family, sample rate and modes; 503 while loading.")
async def health(request: Request) -> JSONResponse:
    state = server_state(request)
    model = state.model
    if model is None:
        status = "error" if state.load_error is not None else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
    body: dict[str, Any] = {
        "status": "ok",
        "model": Path(str(getattr(model, "model_dir", ""))).name or None,
        "family": model.family,
        "sample_rate": model.sample_rate,
        "channels": 1,
        "modes": sorted(model.modes),
        "in_flight": state.in_flight.value,
    }
    return JSONResponse(body)


@router.get("/speakers", summary="Built-in speaker ids, for spk_id.")
async def speakers(request: Request) -> dict[str, list[str]]:
    return {"speakers": list(server_state(request).require_model().list_speakers())}
