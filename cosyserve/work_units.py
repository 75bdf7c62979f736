"""Long computations cut into bounded units without being rewritten as generators.

A non-streamed request's flow and vocoder take seconds; run as one piece, they would hold up every
stream beside it for as long. :class:`UnitJob` runs such a computation as a greenlet (a coroutine
with its own stack, on the caller's thread): the code inside calls :func:`unit_boundary` where it may
pause (between the flow's Euler steps, between the vocoder's up-sampling stages), and the engine
resumes it one unit at a time, in between its decode steps. Outside a job :func:`unit_boundary` does
nothing, so the networks run as before when nobody asks for units (tests, scripts).

Everything stays on one thread, so the thread-local state of torch (inference mode, the device
stand-in of the tests, OpenMP's thread pool) is the caller's; a job is only resumed by the thread
that made it, from inside the engine's inference mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

import greenlet

T = TypeVar("T")


class _JobLet(greenlet.greenlet):
    """The greenlet of one :class:`UnitJob`; knows how long it has been paused."""

    def __init__(self, run: Callable[[], object]) -> None:
        super().__init__(run)
        self.paused_s = 0.0


def unit_boundary() -> None:
    """A point where the computation running in a :class:`UnitJob` may pause; a no-op elsewhere."""
    current = greenlet.getcurrent()
    if isinstance(current, _JobLet):
        paused = time.perf_counter()
        current.parent.switch()
        current.paused_s += time.perf_counter() - paused


def job_clock() -> float:
    """Seconds of the current job's own running time (``perf_counter`` minus the time it was paused):
    what a stage inside a job takes, whatever ran while it was paused. Outside a job, ``perf_counter``."""
    current = greenlet.getcurrent()
    paused = current.paused_s if isinstance(current, _JobLet) else 0.0
    return time.perf_counter() - paused


class JobCancelled(BaseException):
    """Raised inside a cancelled job at its pause point, so its ``finally`` blocks run."""


class UnitJob(Generic[T]):
    """``work()`` run a unit at a time (see the module doc); the result or the error it ended with."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._work = work
        self._let = _JobLet(self._run)
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None
        self.units = 0  # units run so far
        self.running_s = 0.0  # time spent running them

    def _run(self) -> None:
        try:
            self.result = self._work()
        except JobCancelled:
            pass
        except BaseException as exc:  # handed to the caller of advance(), not raised in the greenlet's parent
            self.error = exc
        finally:
            self.done = True

    def advance(self) -> bool:
        """Run the next unit (to the next pause point or the end); True once the job is over."""
        if self.done:
            return True
        self._let.parent = greenlet.getcurrent()  # pause points return to whoever resumed it
        start = time.perf_counter()
        self._let.switch()
        self.running_s += time.perf_counter() - start
        self.units += 1
        return self.done

    def run_for(self, seconds: float | None) -> bool:
        """Run units until the job is over or, with ``seconds``, until that much time went to it
        (a unit is never cut: the last one may overrun). True once the job is over."""
        start = time.perf_counter()
        while not self.advance():
            if seconds is not None and time.perf_counter() - start >= seconds:
                return False
        return True

    def cancel(self) -> None:
        """Stop a started job at its pause point (its ``finally`` blocks run); a no-op once over."""
        if not self.done and self._let:  # started and not finished
            self._let.parent = greenlet.getcurrent()
            self._let.throw(JobCancelled)
        self.done = True
