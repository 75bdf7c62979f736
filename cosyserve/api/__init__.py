"""HTTP layer: ``create_app(model_or_loader, settings)`` builds the FastAPI application."""

from cosyserve.api.app import create_app

__all__ = ["create_app"]
