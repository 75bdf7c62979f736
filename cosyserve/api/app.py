"""The HTTP application: assembles the routes, middleware and error handlers around an engine client.

Inference runs in the engine (its own thread per model); the event loop only moves bytes. A
disconnect aborts the request in the engine; an error mid-stream cuts that response only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
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


def create_app(model_or_loader: Any, settings: Settings | None = None) -> FastAPI:
    """The HTTP app around an engine client, a loaded ``TTSModel``, or a zero-argument callable that
    loads either.

    With a loader, loading starts in a background thread when the app starts up; until it is done
    ``/health`` answers 503 and the inference routes answer 503 with ``Retry-After``.
    """
    settings = settings or Settings()
    state = ServerState(settings)
    app_metrics = metrics.Metrics(lambda: state.engine, lambda: state.in_flight.value)
    loader: Callable[[], Any] | None = None
    if (
        callable(model_or_loader)
        and not isinstance(model_or_loader, EngineClient)
        and not hasattr(model_or_loader, "sample_rate")
    ):
        loader = model_or_loader
    else:
        state.engine = engine_client(model_or_loader, settings)

    def load() -> None:
        started = time.perf_counter()
        try:
            model = loader()
        except Exception as exc:
            state.load_error = str(exc) or type(exc).__name__
            logger.error("model loading failed: %s", state.load_error)
            logger.debug("model loading traceback", exc_info=exc)
            return
        state.engine = engine = engine_client(model, settings)
        app_metrics.model_load.set(time.perf_counter() - started)
        logger.info(
            "model ready in %.1f s: %s, %d Hz, modes %s",
            time.perf_counter() - started,
            engine.info.family,
            engine.info.sample_rate,
            ", ".join(sorted(engine.modes)),
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is not None and state.engine is None and state.load_error is None:
            threading.Thread(target=load, name="cosyserve-model-loader", daemon=True).start()
        yield
        if state.engine is not None and not isinstance(model_or_loader, EngineClient):
            await state.engine.close()  # the engine this app made (a given client belongs to its maker)

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
