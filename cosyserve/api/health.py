"""Status routes: ``/health`` (503 until every model is loaded) and the speaker list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cosyserve.api.deps import server_state
from cosyserve.engine.registry import ModelSlot

router = APIRouter(tags=["status"])


def _model_status(slot: ModelSlot) -> dict[str, Any]:
    body: dict[str, Any] = {"name": slot.model_id, "status": slot.status, "error": slot.load_error}
    engine = slot.engine
    if engine is not None:
        body |= {
            "family": engine.info.family,
            "sample_rate": engine.info.sample_rate,
            "modes": sorted(engine.modes),
            "precision": dict(engine.info.precision),
            "engine": engine.stats(),
        }
    return body


@router.get(
    "/health",
    summary="Readiness: 200 with the default model's family, sample rate and modes and each model's status "
    "(ok, loading, error; not_loaded with --lazy_load); 503 while a model loads or after one failed.",
)
async def health(request: Request) -> JSONResponse:
    state = server_state(request)
    slots = state.models.slots
    models = [_model_status(slot) for slot in slots]
    statuses = {slot.status for slot in slots}
    # With --lazy_load a model is loaded by its first request: not being loaded yet is healthy.
    ready = statuses <= ({"ok", "not_loaded"} if state.models.lazy_load else {"ok"})
    engine = state.models.default.engine
    if not ready:
        status = "error" if "error" in statuses else "loading"
        failed = next((slot for slot in slots if slot.load_error is not None), None)
        error = (
            None if failed is None else failed.load_error if len(slots) == 1 else f"{failed.name}: {failed.load_error}"
        )
        return JSONResponse({"status": status, "error": error, "models": models}, status_code=503)
    body: dict[str, Any] = {"status": "ok", "in_flight": state.in_flight.value, "models": models}
    if engine is not None:  # the default model, as the single-model server always described it
        body |= {
            "model": engine.info.name or None,
            "family": engine.info.family,
            "sample_rate": engine.info.sample_rate,
            "channels": 1,
            "modes": sorted(engine.modes),
            "precision": dict(engine.info.precision),
            "engine": engine.stats(),
        }
    return JSONResponse(body)


@router.get(
    "/speakers",
    summary="Built-in speaker ids, for spk_id (the default model's, or ?model=).",
    responses={404: {"description": "?model= names no served model (model_not_found lists them)."}},
)
async def speakers(request: Request, model: str | None = None) -> dict[str, list[str]]:
    return {"speakers": (await server_state(request).models.get(model)).list_speakers()}
