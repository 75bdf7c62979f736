"""The contract between deciding and running one engine step.

:meth:`Scheduler.schedule` returns a :class:`StepPlan` (what runs this step and with what budget);
:meth:`ModelRunner.execute` runs it on the runner's devices and returns a :class:`StepOutput` (the ids
picked, the chunks made, how long each kind of work took); :meth:`Scheduler.update` applies it to the
request states. A runner in another process or on another device takes the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cosyserve.models.bistream import Item

from .sequence import Segment, Sequence


@dataclass(frozen=True, eq=False)
class Feed:
    """Several positions fed on one segment's own cache, outside the batch: the next ``positions`` of
    its prefix (chunked prefill), or a bi-streamed row's ``items``. The last position's log-probs
    give the segment's next id."""

    sequence: Sequence
    segment: Segment
    positions: int = 0  # uni-stream: at most this many prefix positions
    items: tuple[Item, ...] = ()  # bistream: exactly these positions
    background: bool = False  # counted against the background budget


@dataclass(frozen=True, eq=False)
class AudioWork:
    """Advance one segment's token-to-audio job: its next streaming chunk, or its last one."""

    sequence: Sequence
    segment: Segment
    last: bool
    budget_s: float | None = None  # None: run until the chunk is out; else about this long, then pause
    background: bool = False


@dataclass(frozen=True, eq=False)
class StepPlan:
    release: tuple[Segment, ...] = ()  # LLM state to free (its decoding is over)
    feeds: tuple[Feed, ...] = ()
    decode: tuple[Segment, ...] = ()  # the batch: one position each, rows at their own lengths
    audio: tuple[AudioWork, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.release or self.feeds or self.decode or self.audio)


@dataclass(eq=False)
class StepOutput:
    """What a step did. ``picked``: the id each fed / decoded segment picked (None: its decoding
    ended; a bistream row may pick its fill marker); ``fed``: per segment, the prefix positions fed and
    the prefix's whole length;
    ``audio``: the work that finished, with its chunk (None or empty: no audio); ``failed``: requests
    whose work raised, by segment (their requests fail; the others go on)."""

    picked: dict[Segment, int | None] = field(default_factory=dict)
    fed: dict[Segment, tuple[int, int]] = field(default_factory=dict)
    audio: list[tuple[AudioWork, np.ndarray | None]] = field(default_factory=list)
    failed: dict[Segment, BaseException] = field(default_factory=dict)
    foreground_s: float = 0.0  # time of the work a live stream waits on (its feeds, decoding, its audio)
    background_s: float = 0.0  # time of the rest (offline requests' prefill and audio)
    prefill_s: float = 0.0  # of which prefix feeds
    prefill_positions: int = 0
    decode_s: float = 0.0  # the batched decode step (forward and picks)
    batch_size: int = 0  # rows in the decode step (0: none ran)
