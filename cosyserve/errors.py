"""Every error the server answers with, shared by every layer: its ``code`` (the JSON error code) and its
``status`` (the HTTP status the API answers it with; a WebSocket session closes with 1008 for a client
error, 1013 for one worth retrying). Raise the most specific class; the HTTP layer reads both from it.
"""

from __future__ import annotations


class CosyServeError(Exception):
    """Base class: not the client's fault (HTTP 500). ``param`` names the offending input where there is
    one; ``retry_after`` (seconds) says the request may succeed later (HTTP 503 with ``Retry-After``)."""

    code = "error"
    status = 500
    retry_after: int | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(CosyServeError):
    """Something a caller sent is wrong (HTTP 422 on the official routes, 400 on the OpenAI-style ones)."""

    code, status = "invalid_request", 422


class AudioError(InvalidRequest):
    """Prompt / source audio that does not decode, is empty, too short, too long or too low-rate."""

    code = "invalid_audio"


class TextError(InvalidRequest):
    """Missing, empty or over-long text."""

    code = "invalid_text"


class SsmlError(TextError):
    """SSML that does not parse or that the server refuses (a DOCTYPE, an entity, a bad attribute value):
    the message names its ``line`` and ``column`` (1-based)."""

    code = "invalid_ssml"

    def __init__(self, reason: str, line: int, column: int, param: str | None = None) -> None:
        super().__init__(f"invalid SSML at line {line}, column {column}: {reason}", param)
        self.reason = reason
        self.line = line
        self.column = column

    def __reduce__(self) -> tuple[type[SsmlError], tuple[str, int, int, str | None]]:
        return type(self), (self.reason, self.line, self.column, self.param)


class MissingField(InvalidRequest):
    """A required form field or upload is absent or empty."""

    code = "missing_field"


class MalformedBody(InvalidRequest):
    """The request body is not a parseable form or JSON document."""

    code, status = "malformed_body", 400


class PayloadTooLarge(InvalidRequest):
    """An upload over the configured size."""

    code, status = "payload_too_large", 413


class UnknownSpeaker(InvalidRequest):
    """A speaker / voice id that the model does not know."""

    code, status = "unknown_speaker", 404


class PreviousRequestNotFound(InvalidRequest):
    """``previous_request_id`` names no finished request the engine still keeps for this API key."""

    code, status = "previous_request_not_found", 404


class SubtitleError(InvalidRequest):
    """An SRT document that does not parse: the message names the cue and its ``line`` (1-based)."""

    code, status = "invalid_srt", 400

    def __init__(self, reason: str, line: int, cue: int | None = None, param: str | None = "file") -> None:
        where = f"cue {cue}, line {line}" if cue is not None else f"line {line}"
        super().__init__(f"invalid SRT at {where}: {reason}", param)
        self.reason = reason
        self.line = line
        self.cue = cue

    def __reduce__(self) -> tuple[type[SubtitleError], tuple[str, int, int | None, str | None]]:
        return type(self), (self.reason, self.line, self.cue, self.param)


class ModelNotFound(InvalidRequest):
    """A request names a model this server does not serve."""

    code, status = "model_not_found", 404


class UnsupportedMode(InvalidRequest):
    """The loaded model cannot serve this mode (e.g. instruct2 on a 1.0 model)."""

    code, status = "unsupported_mode", 400


class FormatUnavailable(UnsupportedMode):
    """A known output format this server cannot produce (its optional package is missing)."""

    code = "format_unavailable"


class IncompatibleVoice(InvalidRequest):
    """A stored voice made by a model of another family or speech-token rate."""

    code, status = "incompatible_voice", 400


class ReadOnlyVoice(InvalidRequest):
    """A built-in speaker cannot be deleted."""

    code = "read_only_voice"


class VoiceExists(InvalidRequest):
    """A voice (or built-in speaker) already has this id."""

    code, status = "voice_exists", 409


class VoiceLimitReached(InvalidRequest):
    """The library holds the configured maximum number of voices."""

    code, status = "voice_limit_reached", 409


class UnknownPronunciation(InvalidRequest):
    """No stored lexicon entry for this word in this scope."""

    code, status = "unknown_pronunciation", 404


class PronunciationLimitReached(InvalidRequest):
    """A lexicon scope holds the most entries it may."""

    code, status = "pronunciation_limit_reached", 409


class UnknownJob(InvalidRequest):
    """No long-form job with that id (for the caller's API key)."""

    code, status = "job_not_found", 404


class JobNotReady(InvalidRequest):
    """What a job's route asks for does not exist yet or any more (no audio before its first segment)."""

    code, status = "job_not_ready", 409


class JobLimitReached(InvalidRequest):
    """An API key has as many long-form jobs queued or running as it may (``--max_jobs_per_key``)."""

    code, status = "job_limit_reached", 429


class InsufficientStorage(InvalidRequest):
    """An API key's stored job audio reached ``--max_job_storage_mb``, or the data directory's disk is full:
    HTTP 507."""

    code, status = "insufficient_storage", 507


class VoiceLibraryError(CosyServeError):
    """The library database cannot be read or written (disk full, permissions, damaged entry)."""

    code = "voice_library_error"


class ModelLoadError(CosyServeError):
    """A model directory or hub id cannot be resolved or loaded (bad file, unknown family...)."""

    code = "model_load_error"


class Unavailable(CosyServeError):
    """The server cannot take the request now but may soon: HTTP 503 with ``Retry-After``."""

    code, status = "unavailable", 503

    def __init__(self, message: str, retry_after: int | None = 2, param: str | None = None) -> None:
        super().__init__(message, param)
        self.retry_after = retry_after


class ServerBusy(Unavailable):
    """Every generation slot is taken and the queue is full."""

    code = "server_busy"


class ModelNotReady(Unavailable):
    """The model a request needs is still loading (``retry_after`` set) or failed to load (None)."""

    code = "model_not_ready"


class GenerationFailed(CosyServeError):
    """Generation broke after audio had started (the stream is cut so the client sees it)."""

    code = "generation_failed"


# -- what the WebSocket protocols answer besides the above


class InvalidMessage(InvalidRequest):
    """A client frame that is not what the protocol allows."""

    code = "invalid_message"


class InvalidApiKey(InvalidRequest):
    """A WebSocket session without a valid API key (HTTP requests get the 401 of the auth middleware)."""

    code = "invalid_api_key"


class InputTimeout(InvalidRequest):
    """A session that received no text for its inactivity timeout."""

    code = "input_timeout_exceeded"


class InternalError(CosyServeError):
    """A session broke on the server's side (it is logged with its traceback)."""

    code = "internal_error"
