"""Prometheus metrics at ``GET /metrics``, in a registry of the app's own (several apps, one process).

- ``cosyserve_requests_total{route,method,mode,status}``: every HTTP request, by route template
  (``/v1/audio/voices/{voice_id:path}``, never the raw path; ``unmatched`` for unknown paths);
  ``mode`` is the engine mode of audio requests (sft, zero_shot...), empty otherwise.
- ``cosyserve_request_duration_seconds{route,mode}``: total latency, request in to last byte out.
- ``cosyserve_first_chunk_seconds{route,mode}``: request in to the first audio chunk ready to send.
- ``cosyserve_audio_seconds_total{route,mode}``: seconds of audio generated.
- ``cosyserve_real_time_factor{mode}``: generation wall time / audio duration (below 1: faster than real time).
- ``cosyserve_model_load_seconds``: how long loading the model took (when the server loaded it).
- ``cosyserve_in_flight_requests``: generations running or waiting for a slot.
- Engine gauges, from the default engine's ``stats()`` once its model is loaded, read at each scrape from
  its keys ``queue_depth`` (requests waiting for the engine), ``running`` (requests being generated),
  ``batch_size`` (sequences in the current LLM decoding batch) and ``llm_tokens_per_s`` (recent LLM
  decoding throughput): ``cosyserve_engine_queue_depth``, ``cosyserve_engine_running_requests``,
  ``cosyserve_engine_batch_size``, ``cosyserve_engine_llm_tokens_per_second``. Missing keys are skipped.

Audio responses leave themselves in the request scope (``AUDIO_SCOPE_KEY``); the middleware reads
their generation's label, sample count and first-chunk time once the response is sent.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cosyserve.engine.client import EngineClient

logger = logging.getLogger("cosyserve.api")

AUDIO_SCOPE_KEY = "cosyserve.audio"  # the AudioResponse sending this request's audio
# stats() key -> (metric name, help)
ENGINE_STATS = {
    "queue_depth": ("cosyserve_engine_queue_depth", "Requests waiting for the engine."),
    "running": ("cosyserve_engine_running_requests", "Requests the engine is generating."),
    "batch_size": ("cosyserve_engine_batch_size", "Sequences in the current LLM decoding batch."),
    "llm_tokens_per_s": ("cosyserve_engine_llm_tokens_per_second", "Recent LLM decoding throughput."),
}
# Generation labels are "inference_<mode>" (official routes) or "<route> (<mode>[, <voice>])".
_MODE_IN_LABEL = re.compile(r"^inference_(\w+)|\((\w+)")
_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)


def mode_of(label: str) -> str:
    """The engine mode named in a generation's label ('' when it names none)."""
    match = _MODE_IN_LABEL.search(label)
    return (match.group(1) or match.group(2)) if match else ""


def iter_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes, those of included routers inlined (FastAPI >= 0.16x keeps included routers whole)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from iter_routes(included.routes)
        else:
            yield route


def route_template(scope: Scope) -> str:
    """The path template of the route a request went to, or would have (refused before routing, e.g. 401)."""
    route = scope.get("route")
    if route is None:  # as the router picks: the first full match, else the first partial one (405)
        partial = None
        for candidate in iter_routes(getattr(getattr(scope.get("app"), "router", None), "routes", ())):
            match = candidate.matches(scope)[0]
            if match == Match.FULL:
                route = candidate
                break
            if match == Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    return getattr(route, "path", None) or "unmatched"


class _EngineCollector(Collector):
    """The engine's own gauges, read from its ``stats()`` at scrape time."""

    def __init__(self, engine: Callable[[], EngineClient | None]) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self._engine()
        if engine is None:
            return
        try:
            values = engine.stats()
        except Exception:  # a scrape must not fail because the engine is shutting down
            logger.exception("engine stats() failed")
            return
        for key, (name, help_text) in ENGINE_STATS.items():
            if isinstance(values.get(key), (int, float)):
                yield GaugeMetricFamily(name, help_text, value=float(values[key]))


class Metrics:
    """The app's metrics and registry; ``engine`` (the default model's, once loaded) and ``in_flight``
    are read at scrape time."""

    def __init__(self, engine: Callable[[], EngineClient | None], in_flight: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        by_route = ("route", "mode")
        self.requests = Counter(
            "cosyserve_requests", "HTTP requests.", ("route", "method", "mode", "status"), registry=r
        )
        self.duration = self._histogram("request_duration_seconds", "Total latency: request in to last byte out.")
        self.first_chunk = self._histogram("first_chunk_seconds", "Request in to the first audio chunk ready to send.")
        self.audio_seconds = Counter("cosyserve_audio_seconds", "Seconds of audio generated.", by_route, registry=r)
        self.rtf = self._histogram(
            "real_time_factor", "Generation wall time divided by the audio's duration.", ("mode",), _RTF_BUCKETS
        )
        self.model_load = Gauge("cosyserve_model_load_seconds", "Time taken to load the model.", registry=r)
        in_flight_gauge = Gauge("cosyserve_in_flight_requests", "Generations running or waiting.", registry=r)
        in_flight_gauge.set_function(lambda: float(in_flight()))
        r.register(_EngineCollector(engine))

    def _histogram(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = ("route", "mode"),
        buckets: tuple[float, ...] = _LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(f"cosyserve_{name}", help_text, labels, buckets=buckets, registry=self.registry)

    def observe(self, scope: Scope, method: str, status: int, started: float) -> None:
        route = route_template(scope)
        audio = scope.get(AUDIO_SCOPE_KEY)
        mode = mode_of(audio.label) if audio is not None else ""
        elapsed = time.perf_counter() - started
        self.requests.labels(route, method, mode, str(status)).inc()
        self.duration.labels(route, mode).observe(elapsed)
        if audio is None:
            return
        generation = audio.generation
        first = getattr(generation, "first_chunk_at", None)
        if first is not None:
            self.first_chunk.labels(route, mode).observe(max(0.0, first - started))
        seconds = generation.samples / audio.resampler.orig_sr
        if seconds > 0:
            self.audio_seconds.labels(route, mode).inc(seconds)
            self.rtf.labels(mode).observe(elapsed / seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request once its response is out."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped to the server-error handler

        async def send_watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_watching)
        finally:
            try:
                self.metrics.observe(scope, scope.get("method", ""), status, started)
            except Exception:  # metrics must never break a response
                logger.exception("recording metrics failed")


router = APIRouter(tags=["status"])


@router.get("/metrics", summary="Prometheus metrics (text exposition format).", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
