"""The one generation loop: each step the scheduler decides, the runner executes, the results update
the requests. The engine core steps it on its own thread for many requests; the Python API steps a
private one in the caller's thread for one request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

from .runner import ModelRunner
from .scheduler import Event, Scheduler
from .sequence import Sequence

logger = logging.getLogger("cosyserve.engine")


class GenerationLoop:
    """A scheduler and the runner of its decisions, stepped together."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner

    def add(self, sequence: Sequence) -> None:
        self.scheduler.add(sequence)

    def remove(self, sequence: Sequence) -> None:
        """Drop a sequence now (aborted): its batch row, caches and paused audio are freed at once."""
        self.scheduler.remove(sequence)
        self.runner.release(self.scheduler.take_dropped())

    def bind_thread(self) -> None:
        """Called by the thread that will step this loop, before its first step."""
        self.runner.bind_thread()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def runnable(self) -> bool:
        return self.scheduler.runnable

    @property
    def sequences(self) -> list[Sequence]:
        return self.scheduler.sequences

    def step(self) -> list[Event]:
        """One step; returns the chunks made, in order per sequence, and ``(seq, None)`` for each
        sequence that finished. A sequence that fails is dropped with ``failed`` set and reported as
        finished; the others go on."""
        plan = self.scheduler.schedule()
        output = self.runner.execute(plan)
        events = self.scheduler.update(plan, output)
        self.runner.release(self.scheduler.take_dropped())
        return events

    def run_alone(self, sequence: Sequence) -> Iterator[np.ndarray]:
        """The chunks of one sequence, stepping this loop in the caller's thread (lazy: closing the
        iterator stops the generation)."""
        self.add(sequence)
        started = time.perf_counter()
        try:
            while True:
                if not self.runnable and sequence.text is not None:
                    sequence.text.feed.wait(timeout=1.0)  # the text's next fragment (or its end)
                    continue
                for seq, chunk in self.step():
                    if isinstance(chunk, np.ndarray):
                        yield chunk
                    elif chunk is not None:
                        continue  # a segment mark (only sequences that ask for them get them)
                    elif seq.failed is not None:
                        raise seq.failed
                    else:
                        return
        finally:
            self.remove(sequence)
            logger.debug("sequence done in %.2f s", time.perf_counter() - started)
