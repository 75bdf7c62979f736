"""What lives as long as one request: its segments, draws, sampler, and how far each has come.

The scheduler reads and updates these; the runner reads a segment's input and picks its ids with the
segment's own rules, so a seeded request gives the same tokens whoever shares the batch. Nothing
here holds a network or a device buffer of the runner's.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from torch import Tensor

from cosyserve.models.bistream import BistreamInput
from cosyserve.nn.sampling import Sampler, TokenRules

from .continuity import SegmentContext
from .inputs import SegmentInput, SegmentPlan
from .streaming import Draws, Synthesizer
from .text_feed import FeedReader

_arrivals = itertools.count()


@dataclass(frozen=True)
class SegmentMark:
    """Where a segment's audio starts (``end`` False: after the silence before it) or ends (``end`` True:
    before the silence after it) in its request's stream; emitted between chunks when asked for. ``index``
    counts the segments the request speaks, from 0; ``text`` is the segment's text as normalised."""

    index: int
    text: str
    end: bool


@dataclass(eq=False)  # identity: a segment is one object in a batch, not a value
class Segment:
    """One text segment of a sequence: its model input, token rules and token-to-audio state."""

    input: SegmentInput
    synthesizer: Synthesizer
    plan: SegmentPlan = field(default_factory=SegmentPlan)  # its speed and the silence around its audio
    rules: TokenRules | None = None  # uni-stream decoding rules; None for vc (given tokens) and bistream
    bistream: BistreamInput | None = None  # text arriving over time: what to feed, when to wait
    prefix_fed: int = 0  # uni-stream: prefix positions fed so far
    prefix_length: int | None = None  # known once the runner has built the prefix
    next_input: int | None = None  # the id the next decode step feeds (the last one picked)
    decoded: bool = False  # the LLM is done with this segment
    done: bool = False  # its last chunk is out
    audio_started: bool = False  # its first chunk (or the silence before it) is out
    index: int = 0  # its place in the sequence's inputs
    silent: bool = False  # spoken for the next segment's continuity only (previous_text): no audio out
    context_text: Tensor | None = None  # continuity: its text ids as the next segment continues them
    tokens: list[int] = field(default_factory=list)  # continuity: the ids the LLM picked

    @property
    def prefilled(self) -> bool:
        """The whole prefix (uni-stream) is in the segment's cache."""
        return self.prefix_length is not None and self.prefix_fed >= self.prefix_length

    @property
    def decoding(self) -> bool:
        """Its next LLM step is one id in the batch."""
        return not self.decoded and self.next_input is not None


@dataclass(eq=False)
class Sequence:
    """One request's generation state; lives as long as the request."""

    inputs: list[SegmentInput]
    draws: Draws
    sampler: Sampler
    stream: bool
    speed: float
    request_id: str = ""
    text: FeedReader | None = None  # bi-streaming: the text arrives through this feed
    plans: list[SegmentPlan] = field(default_factory=list)  # per input (none: ``speed``, no silence)
    arrival: int = field(default_factory=lambda: next(_arrivals))
    segments: deque[Segment] = field(default_factory=deque)  # started, audio not all out, in order
    next_segment: int = 0  # index in ``inputs`` of the next segment to start
    chunks_out: int = 0
    tokens_out: int = 0
    failed: BaseException | None = None
    # Continuity: each segment continues the previous one (engine/continuity.py); ``context`` is the last
    # finished segment's (or the previous request's), ``leads`` the system-prompt ids at the head of each
    # input's text, ``owner`` whose store entry the request's last segment becomes.
    continuity: bool = False
    context: SegmentContext | None = None
    leads: list[int] = field(default_factory=list)
    owner: str | None = None
    silent_head: int = 0  # the first inputs spoken only for continuity (previous_text): no audio, no marks
    texts: list[str] = field(default_factory=list)  # each input's normalised text (segment marks)
    marks: bool = False  # emit a SegmentMark where each segment's audio starts and ends

    def plan(self, index: int) -> SegmentPlan:
        """The plan of ``inputs[index]``."""
        return self.plans[index] if index < len(self.plans) else SegmentPlan(self.speed)

    @property
    def decoding(self) -> Segment | None:
        """The segment the LLM is working on (at most one at a time)."""
        return next((s for s in self.segments if not s.decoded), None)

    @property
    def finished(self) -> bool:
        return self.next_segment >= len(self.inputs) and not self.segments

    @property
    def live(self) -> bool:
        """Someone listens as audio is made: its chunks are due as soon as their tokens are there."""
        return self.stream or self.text is not None
