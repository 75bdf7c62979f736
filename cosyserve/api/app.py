"""The HTTP application: assembles the routes, middleware and error handlers around an engine client.

Inference runs in the engine (its own thread per model); the event loop only moves bytes. A
disconnect aborts the request in the engine; an error mid-stream cuts that response only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import cast

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from cosyserve import __version__
from cosyserve.api import (
    captions,
    dubbing,
    health,
    jobs,
    metrics,
    official,
    openai,
    preview,
    pronunciations,
    voices,
    web,
    ws,
)
from cosyserve.api.auth import ApiKeyMiddleware, ApiKeys
from cosyserve.api.deps import ServerState
from cosyserve.api.errors import install_error_handlers
from cosyserve.api.middleware import EXPOSED_HEADERS, CrossOriginWriteGuard, RequestIdMiddleware
from cosyserve.engine.client import AsyncEngine, EngineClient, ServedModel
from cosyserve.engine.registry import ModelRegistry, ModelSlot
from cosyserve.settings import Settings

logger = logging.getLogger("cosyserve.api")

# What create_app serves: an engine client, a loaded model, or a zero-argument callable loading either.
Servable = EngineClient | ServedModel | Callable[[], object]


def engine_client(model: object, settings: Settings) -> EngineClient:
    """``model`` as an engine client: a client as is, a loaded model behind an in-process engine core."""
    if isinstance(model, EngineClient):
        return model
    return AsyncEngine(cast(ServedModel, model), max_running=settings.max_concurrency, max_queue=settings.max_queue)


def _is_loader(obj: object) -> bool:
    return callable(obj) and not isinstance(obj, EngineClient) and not hasattr(obj, "sample_rate")


def _slots(models: Servable | Mapping[str, Servable], settings: Settings) -> list[ModelSlot]:
    """One slot per model given: a single one takes the first ``--model_dir`` entry's name, a mapping
    names its models (matched to the entries by name or source)."""
    specs = settings.models
    given_models = models if isinstance(models, Mapping) else {specs[0].name or specs[0].source: models}
    slots = []
    for key, given in given_models.items():
        spec = next((s for s in specs if key in (s.name, s.source)), None)
        source, named = (spec.source, key != spec.source) if spec else (key, True)
        if _is_loader(given):
            slots.append(ModelSlot(key, source, cast(Callable[[], object], given), named=named))
        else:  # a given client belongs to its maker; a model given ready is wrapped (and closed) here
            engine = engine_client(given, settings)
            slots.append(ModelSlot(key, source, named=named, engine=engine, owned=engine is not given))
    return slots


def create_app(models: Servable | Mapping[str, Servable], settings: Settings | None = None) -> FastAPI:
    """The HTTP app around an engine client, a loaded ``TTSModel``, or a zero-argument callable that
    loads either; or a mapping of model names to any of these (several models, the first the default
    unless ``settings.default_model`` names another).

    Loaders run in a background thread when the app starts up (``settings.lazy_load``: on the model's
    first request); until a model is loaded ``/health`` answers 503 and its routes 503 with ``Retry-After``.
    """
    settings = settings or Settings()
    registry = ModelRegistry(
        _slots(models, settings),
        lambda model: engine_client(model, settings),
        default_model=settings.default_model,
        lazy_load=settings.lazy_load,
    )
    state = ServerState(settings, registry)
    app_metrics = metrics.Metrics(lambda: registry.default.engine, lambda: state.in_flight.value)

    def loaded(slot: ModelSlot) -> None:
        if slot is registry.default and slot.load_seconds is not None:
            app_metrics.model_load.set(slot.load_seconds)

    registry.on_loaded = loaded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.lazy_load:
            registry.start_loading()
        async with jobs.job_service(app):
            yield
        await registry.close()

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
    # The routes in the order the OpenAPI document lists them.
    for module in (
        official,
        health,
        openai,
        voices,
        pronunciations,
        preview,
        captions,
        dubbing,
        jobs,
        metrics,
        web,
        ws,
    ):
        app.include_router(module.router)
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
