"""The engine core: one loaded model, its generation loop on one thread, its frontend beside it.

Requests and other model work (storing a voice) wait in ONE first-come-first-served queue. Each
turn of the loop the core:

1. drops what was aborted (a waiting request leaves the queue; a running one leaves the batch, its
   KV-cache row and audio state freed at once; one in its frontend is dropped when that returns);
2. admits waiting work in arrival order while fewer than ``max_running`` requests run: its frontend
   (text normalisation, prompt audio -> speech tokens, mel, x-vector) or the task runs in the
   frontend pool, a small worker pool beside the loop, so a new request's frontend never stalls the
   decoding of the running ones; validation errors go back to its caller before any audio;
3. takes the requests whose frontend finished into the generation loop, and runs one step of it
   (:class:`GenerationLoop`: the scheduler's plan, executed by the runner), handing each request's
   new chunks to its sink.

Beyond ``max_queue`` waiting, :meth:`submit` refuses with :class:`ServerBusy` (HTTP 503 with
Retry-After): queueing more would only make every caller wait longer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypedDict, cast

import numpy as np

from cosyserve.errors import CosyServeError, ServerBusy
from cosyserve.nn.sampling import Sampler

from .generation import GenerationLoop
from .memory import HeapTrimmer
from .request import SynthesisRequest
from .scheduler import Scheduler
from .sequence import SegmentMark, Sequence
from .streaming import Draws
from .text_feed import TextFeed

logger = logging.getLogger("cosyserve.engine")

RETRY_AFTER_SECONDS = 2  # what a turned-away caller is told to wait
FRONTEND_WORKERS = 1  # frontends run one at a time beside the loop (a 2-core machine is not oversubscribed)


class Sink(Protocol):
    """Where a request's events go (the async client turns them into awaitables)."""

    def started(self) -> None: ...  # the frontend ran: audio follows

    def rejected(self, error: BaseException) -> None: ...  # before any audio (validation, frontend)

    def chunk(self, audio: object) -> None: ...  # float32 audio, or a task's result

    def failed(self, error: BaseException) -> None: ...  # after audio started

    def finished(self) -> None: ...


class MarkSink(Sink, Protocol):
    """A sink that also takes the segment marks (:class:`SegmentMark`) of a request submitted with
    ``marks=True``: where each segment's audio starts and ends among its chunks."""

    def mark(self, mark: SegmentMark) -> None: ...


class Overrides(TypedDict, total=False):
    """What a caller may replace in a request's preparation (tests feed the reference's draws)."""

    draws: Draws
    sampler: Sampler


class StepModel(Protocol):
    """What the core needs of a model: a request's frontend, and a generation loop to step."""

    def prepare(
        self,
        request: SynthesisRequest,
        *,
        draws: Draws | None = None,
        sampler: Sampler | None = None,
        request_id: str = "",
        text_feed: TextFeed | None = None,
    ) -> Sequence: ...

    def new_loop(self) -> GenerationLoop: ...


@dataclass(eq=False)
class Work:
    """One queued item: a synthesis (``request``) or a task run whole in the frontend pool (``task``)."""

    request_id: str
    sink: Sink
    request: SynthesisRequest | None = None
    task: Callable[[], object] | None = None
    overrides: Overrides = field(default_factory=Overrides)
    text_feed: TextFeed | None = None  # the request's text arrives over time through this feed
    marks: bool = False  # send the segment marks to the sink (a MarkSink) between the chunks
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class EngineStats:
    """A snapshot for /health and /metrics."""

    queue_depth: int
    running: int
    batch_size: int
    llm_steps: int
    llm_tokens: int
    llm_tokens_per_s: float
    max_running: int
    max_queue: int


class EngineCore:
    def __init__(self, model: StepModel, max_running: int = 8, max_queue: int = 64, name: str = "engine") -> None:
        if max_running < 1 or max_queue < 0:
            raise ValueError("max_running must be at least 1 and max_queue at least 0")
        self.model = model
        self.max_running = max_running
        self.max_queue = max_queue
        self.loop = model.new_loop()
        self._cond = threading.Condition()
        self._waiting: deque[Work] = deque()
        self._running: dict[str, tuple[Work, Sequence | None]] = {}  # request id -> (work, its sequence)
        self._prepared: deque[tuple[Work, Sequence | None, BaseException | None]] = deque()
        self._aborted: set[str] = set()
        self._stopping = False
        self._tokens_per_s = 0.0
        self.heap = HeapTrimmer()  # freed request memory back to the system as requests finish
        self._frontend = ThreadPoolExecutor(FRONTEND_WORKERS, thread_name_prefix=f"cosyserve-{name}-frontend")
        self._thread = threading.Thread(target=self._main, name=f"cosyserve-{name}", daemon=True)

    @property
    def scheduler(self) -> Scheduler:
        return self.loop.scheduler

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> EngineCore:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._frontend.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- submitting --------------------------------------------------------------------------------
    def submit(self, work: Work) -> None:
        """Queue ``work`` (first come, first served); raises ServerBusy when the queue is full."""
        with self._cond:
            if self._stopping:
                raise ServerBusy("the engine is shutting down", retry_after=RETRY_AFTER_SECONDS)
            free = max(0, self.max_running - len(self._running))
            if len(self._waiting) >= self.max_queue + free:
                raise ServerBusy(
                    f"the server is busy ({len(self._running)} running, {len(self._waiting)} waiting), retry shortly",
                    retry_after=RETRY_AFTER_SECONDS,
                )
            self._waiting.append(work)
            self._cond.notify_all()

    def abort(self, request_id: str) -> None:
        """Stop a request: out of the queue now, or out of the batch at the start of the next step."""
        with self._cond:
            for work in self._waiting:
                if work.request_id == request_id:
                    self._waiting.remove(work)
                    work.sink.finished()
                    return
            if request_id in self._running:
                self._aborted.add(request_id)
                self._cond.notify_all()

    def stats(self) -> EngineStats:
        scheduler = self.loop.scheduler
        with self._cond:
            return EngineStats(
                queue_depth=len(self._waiting),
                running=len(self._running),
                batch_size=scheduler.last_batch_size,
                llm_steps=scheduler.llm_steps,
                llm_tokens=scheduler.llm_tokens,
                llm_tokens_per_s=round(self._tokens_per_s, 2),
                max_running=self.max_running,
                max_queue=self.max_queue,
            )

    def running_ids(self) -> list[str]:
        with self._cond:
            return list(self._running)

    # -- the loop ----------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.loop.bind_thread()
            self._run()
        except Exception:  # a bug in the loop itself: fail every request rather than leave them hanging
            logger.exception("engine loop failed; failing every request and refusing new ones")
            with self._cond:
                self._stopping = True
            self._shutdown()

    def _run(self) -> None:
        while True:
            with self._cond:
                # A request waiting for streamed text wakes the loop through its feed (_wake).
                while not (
                    self._stopping or self._aborted or self._prepared or self.loop.runnable or self._admissible()
                ):
                    self._cond.wait()
                if self._stopping:
                    break
                aborted, self._aborted = self._aborted, set()
                prepared, self._prepared = list(self._prepared), deque()
                while self._admissible():
                    work = self._waiting.popleft()
                    if work.request is not None:
                        self._running[work.request_id] = (work, None)
                    self._frontend.submit(self._prepare, work)
            for request_id in aborted:
                self._drop(request_id)
            for work, sequence, error in prepared:
                self._admit(work, sequence, error)
            if self.loop.runnable:
                self._step()
        self._shutdown()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _admissible(self) -> bool:
        return bool(self._waiting) and len(self._running) < self.max_running

    # -- the frontend pool -------------------------------------------------------------------------
    def _prepare(self, work: Work) -> None:
        """In the frontend pool: a request's frontend (or a task), handed back to the loop."""
        if work.task is not None:
            self._run_task(work, work.task)
            return
        sequence, error = None, None
        try:
            if work.request is None:
                raise RuntimeError("a work item with neither a request nor a task")
            sequence = self.model.prepare(
                work.request, request_id=work.request_id, text_feed=work.text_feed, **work.overrides
            )
        except Exception as exc:
            if not isinstance(exc, CosyServeError):
                logger.exception("[%s] frontend failed", work.request_id)
            error = exc
        with self._cond:
            self._prepared.append((work, sequence, error))
            self._cond.notify_all()

    @staticmethod
    def _run_task(work: Work, task: Callable[[], object]) -> None:
        try:
            result = task()
        except Exception as exc:
            if not isinstance(exc, CosyServeError):
                logger.exception("[%s] task failed", work.request_id)
            work.sink.rejected(exc)
        else:
            work.sink.chunk(result)
            work.sink.finished()

    def _admit(self, work: Work, sequence: Sequence | None, error: BaseException | None) -> None:
        """A request whose frontend finished joins the generation loop (or is answered)."""
        with self._cond:
            admitted = work.request_id in self._running  # not aborted while its frontend ran
            if admitted and sequence is not None:
                self._running[work.request_id] = (work, sequence)
            else:
                self._running.pop(work.request_id, None)
        if error is not None:
            work.sink.rejected(error)
            return
        if not admitted or sequence is None:
            work.sink.finished()
            return
        work.sink.started()
        sequence.marks = work.marks
        self.loop.add(sequence)
        if work.text_feed is not None:
            work.text_feed.listen(self._wake)

    def _drop(self, request_id: str) -> None:
        with self._cond:
            entry = self._running.pop(request_id, None)
        if entry is None:
            return
        work, sequence = entry
        if sequence is not None:
            self.loop.remove(sequence)
            self.heap.request_finished(idle=not self.loop.has_work)
        if work.text_feed is not None:
            work.text_feed.listen(None)
        logger.info("[%s] aborted", request_id)
        work.sink.finished()

    def _step(self) -> None:
        started = time.perf_counter()
        tokens_before = self.loop.scheduler.llm_tokens
        try:
            events = self.loop.step()
        except Exception:  # the loop guards each request; this is a bug in the loop itself
            logger.exception("engine step failed; failing every running request")
            with self._cond:
                entries = [(work, sequence) for work, sequence in self._running.values() if sequence is not None]
                for work, _ in entries:
                    self._running.pop(work.request_id, None)
            for work, sequence in entries:
                self.loop.remove(sequence)
                work.sink.failed(RuntimeError("the engine failed"))
            return
        elapsed = time.perf_counter() - started
        made = self.loop.scheduler.llm_tokens - tokens_before
        if made and elapsed > 0:
            rate = made / elapsed
            self._tokens_per_s = rate if not self._tokens_per_s else 0.9 * self._tokens_per_s + 0.1 * rate
        for sequence, chunk in events:
            self._deliver(sequence, chunk)

    def _deliver(self, sequence: Sequence, chunk: np.ndarray | SegmentMark | None) -> None:
        with self._cond:
            entry = self._running.get(sequence.request_id)
            if chunk is None:
                self._running.pop(sequence.request_id, None)
        if chunk is None:
            self.heap.request_finished(idle=not self.loop.has_work)
        if entry is None:
            return
        work = entry[0]
        if isinstance(chunk, SegmentMark):
            cast(MarkSink, work.sink).mark(chunk)
        elif chunk is not None:
            work.sink.chunk(chunk)
        elif sequence.failed is not None:
            work.sink.failed(sequence.failed)
        else:
            work.sink.finished()

    def _shutdown(self) -> None:
        with self._cond:
            entries = [w for w, _ in self._running.values()] + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
        for work in entries:
            work.sink.failed(RuntimeError("the engine stopped"))
        self._frontend.shutdown(wait=False, cancel_futures=True)
