"""What a caller asks the engine for: a plain, serialisable description of one synthesis.

The HTTP routes, the Python API and the benchmark all describe their work as a
:class:`SynthesisRequest`; the engine turns it into model inputs (frontend), tokens and audio.
Output format and rate are not here: they are the HTTP layer's business (the engine produces float32
audio at the model's rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cosyserve.errors import InvalidRequest
from cosyserve.text.pronunciation import MAX_REQUEST_ENTRIES, Pronunciation
from cosyserve.text.ssml import SsmlDocument, is_ssml, parse_ssml

MODES = ("sft", "zero_shot", "cross_lingual", "instruct", "instruct2", "vc")
MIN_SPEED = 0.25
MAX_SPEED = 4.0
# previous_request_id: what a request id may be (the HTTP layer's X-Request-ID is at most as long).
MAX_REQUEST_ID_LENGTH = 128
# previous_text: at most this many characters (only its last segment conditions the first one).
MAX_PREVIOUS_TEXT_LENGTH = 2000


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate, whatever the mode."""

    stream: bool = False  # emit audio chunk by chunk as tokens arrive
    speed: float = 1.0  # speaking rate (mel stretched by 1/speed before the vocoder)
    seed: int | None = None  # None: a fresh random seed
    text_frontend: bool = True  # normalise and split the text (False: the text is taken as given)

    def __post_init__(self) -> None:
        speed = float(self.speed)
        if not math.isfinite(speed) or not MIN_SPEED <= speed <= MAX_SPEED:
            raise InvalidRequest(f"speed must be within {MIN_SPEED}..{MAX_SPEED}, got {self.speed}", param="speed")
        object.__setattr__(self, "speed", speed)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidRequest(f"seed must be a non-negative integer, got {self.seed!r}", param="seed")


@dataclass(frozen=True)
class SynthesisRequest:
    """One synthesis. Which fields a mode reads:

    - ``sft``: text, spk_id
    - ``zero_shot``: text, prompt_text + prompt_audio, or spk_id (a stored voice with its transcript)
    - ``cross_lingual``: text, prompt_audio or spk_id
    - ``instruct`` (v1): text, spk_id, instruct_text
    - ``instruct2`` (v2/v3): text, instruct_text, prompt_audio or spk_id
    - ``vc``: source_audio, prompt_audio or spk_id

    Audio is encoded bytes of any common container, a file path, or ``(wave, sample_rate)``.

    A ``text`` starting with ``<speak`` is SSML (:func:`cosyserve.text.ssml.is_ssml`): it is parsed here,
    once, into ``ssml`` (an :class:`SsmlError`, a 4xx, when it does not parse); ``text`` keeps the markup.

    ``pronunciations``: the request's own lexicon entries (they and the SSML ``<phoneme>`` elements win over
    stored ones); the engine adds
    the stored entries of the global scope, of ``spk_id``'s voice and of ``lexicon_owner`` (an API key's
    id, never the key) to every mode with a target text.

    ``continuity``: each segment after the first is conditioned on the previous one (its text, speech
    ids and mel: :mod:`cosyserve.engine.continuity`); the request's last segment is then kept for a later
    request of the same ``lexicon_owner`` to continue with ``previous_request_id`` (the id the request was
    submitted under). ``previous_text`` instead conditions the first segment on that text, spoken by the
    engine first and not sent. Either implies ``continuity``; neither applies to vc.
    """

    mode: str
    text: str | None = None
    spk_id: str | None = None
    prompt_text: str | None = None
    instruct_text: str | None = None
    prompt_audio: Any = None
    source_audio: Any = None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    pronunciations: tuple[Pronunciation, ...] = ()
    lexicon_owner: str | None = None
    continuity: bool = False
    previous_request_id: str | None = None
    previous_text: str | None = None
    # The parsed document when ``text`` is SSML: derived from ``text`` (never given, so a copy made with
    # dataclasses.replace parses its own text).
    ssml: SsmlDocument | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequest(f"unknown mode {self.mode!r}: one of {', '.join(MODES)}", param="mode")
        entries = tuple(self.pronunciations)
        if len(entries) > MAX_REQUEST_ENTRIES or not all(isinstance(e, Pronunciation) for e in entries):
            raise InvalidRequest(
                f"pronunciations must be at most {MAX_REQUEST_ENTRIES} Pronunciation entries", param="pronunciations"
            )
        object.__setattr__(self, "pronunciations", entries)
        self._check_continuity()
        if self.mode != "vc" and is_ssml(self.text):
            object.__setattr__(self, "ssml", parse_ssml(str(self.text)))

    def _check_continuity(self) -> None:
        if not isinstance(self.continuity, bool):
            raise InvalidRequest("continuity must be true or false", param="continuity")
        previous, text = self.previous_request_id, self.previous_text
        if previous is not None and (
            not isinstance(previous, str) or not previous.strip() or len(previous) > MAX_REQUEST_ID_LENGTH
        ):
            raise InvalidRequest(
                f"previous_request_id must be a request id of 1 to {MAX_REQUEST_ID_LENGTH} characters",
                param="previous_request_id",
            )
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise InvalidRequest("previous_text must be a non-empty text", param="previous_text")
        if text is not None and len(text) > MAX_PREVIOUS_TEXT_LENGTH:
            raise InvalidRequest(
                f"previous_text has {len(text)} characters; at most {MAX_PREVIOUS_TEXT_LENGTH} are accepted",
                param="previous_text",
            )
        if previous is not None and text is not None:
            raise InvalidRequest("send previous_request_id or previous_text, not both", param="previous_text")
        if previous is not None or text is not None:
            object.__setattr__(self, "continuity", True)
        if self.continuity and self.mode == "vc":
            raise InvalidRequest("continuity needs text segments: vc has none", param="continuity")

    @property
    def requested_pronunciations(self) -> tuple[Pronunciation, ...]:
        """The request's own lexicon entries: ``pronunciations``, then its SSML ``<phoneme>`` elements (which
        win for their words)."""
        return self.pronunciations + (self.ssml.phonemes if self.ssml is not None else ())
