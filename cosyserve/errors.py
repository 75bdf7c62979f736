"""Exceptions shared by every layer. The HTTP layer maps each to a status code and JSON body."""

from __future__ import annotations


class CosyServeError(Exception):
    """Base class. ``param`` names the offending input where there is one."""

    code = "error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelLoadError(CosyServeError):
    """A model directory or hub id cannot be resolved or loaded (bad file, unknown family...)."""

    code = "model_load_error"


class InvalidRequest(CosyServeError):
    """Something a caller sent is wrong: HTTP 400/422."""

    code = "invalid_request"


class AudioError(InvalidRequest):
    """Prompt / source audio that does not decode, is empty, too short, too long or too low-rate."""

    code = "invalid_audio"


class TextError(InvalidRequest):
    """Missing, empty or over-long text."""

    code = "invalid_text"


class UnknownSpeaker(InvalidRequest):
    """A speaker / voice id that the model does not know: HTTP 404."""

    code = "unknown_speaker"


class UnsupportedMode(InvalidRequest):
    """The loaded model cannot serve this mode (e.g. instruct2 on a 1.0 model)."""

    code = "unsupported_mode"


class PayloadTooLarge(InvalidRequest):
    """An upload over the configured size: HTTP 413."""

    code = "payload_too_large"


class ServerBusy(CosyServeError):
    """Every generation slot is taken and the queue is full: HTTP 503 with Retry-After."""

    code = "server_busy"

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationFailed(CosyServeError):
    """Generation broke after audio had started (the stream is cut so the client sees it)."""

    code = "generation_failed"
