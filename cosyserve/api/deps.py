"""What the routes share: the server state (settings, the served models, the open-response count) and
how a route reaches it."""

from __future__ import annotations

import threading

from fastapi import Request
from starlette.types import Scope

from cosyserve.engine.registry import ModelRegistry
from cosyserve.settings import Settings


class InFlight:
    """Number of generations currently running (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def enter(self) -> None:
        with self._lock:
            self._value += 1

    def leave(self) -> None:
        with self._lock:
            self._value -= 1

    @property
    def value(self) -> int:
        return self._value


class ServerState:
    """What the routes share: settings, the served models (``models``: each an engine client once
    loaded; the first, or ``settings.default_model``, is the default) and the open-response count."""

    def __init__(self, settings: Settings, models: ModelRegistry) -> None:
        self.settings = settings
        self.models = models
        self.in_flight = InFlight()


def server_state(request: Request) -> ServerState:
    return request.app.state.cosyserve


def scope_state(scope: Scope) -> ServerState:
    """The state of the app a WebSocket (or any ASGI scope) belongs to."""
    return scope["app"].state.cosyserve
