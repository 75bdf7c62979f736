"""HTTP layer: ``create_app(model_or_loader, settings)`` builds the FastAPI application.

``create_app`` is imported on first use, so that a light module of this package (``api.errors``, which
the Ray gateway and the CLI's argument parser reach) does not pull in the engine, numpy and torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cosyserve.api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> object:
    if name == "create_app":
        from cosyserve.api.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
