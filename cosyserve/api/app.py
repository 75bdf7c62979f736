"""The HTTP application: assembles the routes, middleware and error handlers around an engine client.

Inference runs in the engine (its own thread per model); the event loop only moves bytes. A
disconnect aborts the request in the engine; an error mid-stream cuts that response only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from cosyserve import __version__
from cosyserve.api import health, metrics, official, openai, streaming_ws, voices, web
from cosyserve.api.auth import ApiKeyMiddleware, ApiKeys
from cosyserve.api.deps import (
    EXPOSED_HEADERS,
    CrossOriginWriteGuard,
    ModelSlot,
    RequestIdMiddleware,
    ServerState,
    install_error_handlers,
)
from cosyserve.engine.client import AsyncEngine, EngineClient
from cosyserve.settings import Settings

logger = logging.getLogger("cosyserve.api")


def engine_client(model: Any, settings: Settings) -> EngineClient:
    """``model`` as an engine client: a client as is, a loaded model behind an in-process engine core."""
    if isinstance(model, EngineClient):
        return model
    return AsyncEngine(model, max_running=settings.max_concurrency, max_queue=settings.max_queue)


def _is_loader(obj: Any) -> bool:
    return callable(obj) and not isinstance(obj, EngineClient) and not hasattr(obj, "sample_rate")


def _slots(models: Any, settings: Settings) -> list[ModelSlot]:
    """One slot per model given: a single one takes the first ``--model_dir`` entry's name, a mapping
    names its models (matched to the entries by name or source)."""
    specs = settings.models
    if not isinstance(models, Mapping):
        models = {specs[0].name or specs[0].source: models}
    slots = []
    for key, given in models.items():
        spec = next((s for s in specs if key in (s.name, s.source)), None)
        named = spec is None or key != spec.source
        slot = ModelSlot(key, spec.source if spec else key, given if _is_loader(given) else None, named=named)
        if slot.loader is None:
            slot.engine = engine_client(given, settings)
        slot.owned = not isinstance(given, EngineClient)  # a given client belongs to its maker
        slots.append(slot)
    return slots


def create_app(models: Any, settings: Settings | None = None) -> FastAPI:
    """The HTTP app around an engine client, a loaded ``TTSModel``, or a zero-argument callable that
    loads either; or a mapping of model names to any of these (several models, the first the default
    unless ``settings.default_model`` names another).

    Loaders run in a background thread when the app starts up (``settings.lazy_load``: on the model's
    first request); until a model is loaded ``/health`` answers 503 and its routes 503 with ``Retry-After``.
    """
    settings = settings or Settings()
    state = ServerState(settings)
    state.slots = _slots(models, settings)
    app_metrics = metrics.Metrics(lambda: state.engine, lambda: state.in_flight.value)

    def load(slot: ModelSlot) -> None:
        started = time.perf_counter()
        try:
            model = slot.loader()
        except Exception as exc:
            slot.load_error = str(exc) or type(exc).__name__
            logger.error("model %s: loading failed: %s", slot.name, slot.load_error)
            logger.debug("model loading traceback", exc_info=exc)
            return
        slot.engine = engine = engine_client(model, settings)
        if slot is state.default:
            app_metrics.model_load.set(time.perf_counter() - started)
        logger.info(
            "model %s ready in %.1f s: %s, %d Hz, modes %s",
            slot.name,
            time.perf_counter() - started,
            engine.info.family,
            engine.info.sample_rate,
            ", ".join(sorted(engine.modes)),
        )

    def load_all() -> None:  # one after the other: peak memory is one model's load at a time
        for slot in state.slots:
            if slot.claim_load():
                load(slot)

    state.start_load = lambda slot: threading.Thread(target=load, args=(slot,), daemon=True).start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.lazy_load and any(slot.loader is not None and not slot.loading for slot in state.slots):
            threading.Thread(target=load_all, name="cosyserve-model-loader", daemon=True).start()
        yield
        for slot in state.slots:
            if slot.engine is not None and slot.owned:
                await slot.engine.close()

    app = FastAPI(
        title="cosyserve",
        version=__version__,
        description="CosyVoice text-to-speech: the official `/inference_*` API (GET and POST, form fields) "
        "and the OpenAI-compatible `/v1/audio/speech`.",
        lifespan=lifespan,
    )
    app.state.cosyserve = state
    app.state.metrics = app_metrics
    install_error_handlers(app)
    app.include_router(official.router)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(voices.router)
    app.include_router(metrics.router)
    app.include_router(web.router)
    app.include_router(streaming_ws.router)
    app.add_middleware(ApiKeyMiddleware, keys=ApiKeys(settings.api_keys, (*settings.auth_exempt, *web.PUBLIC_PATHS)))
    app.add_middleware(metrics.MetricsMiddleware, metrics=app_metrics)
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
