"""Executing a step plan: the networks of one model, where its placement puts them.

A :class:`ModelRunner` owns what a step needs besides the requests' own state: the LLM on its device
with the KV cache of the decode batch (row ``i`` holding ``rows[i]``'s history) and each segment's
cache while it feeds alone or waits outside the batch; the flow and vocoder (an :class:`AudioStage`
on their devices) and the audio jobs paused at a unit boundary. It decides nothing: it feeds, decodes
and advances audio as the plan says, picks each row's id with that row's own rules, and reports what
happened and how long it took (:class:`StepOutput`). Moving a stage to another device (a GPU, a
second GPU for the flow) is a placement setting; another process would hold a runner of its own.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

from cosyserve.models.contracts import BistreamLM, SpeechLM
from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.sampling import TokenRules
from cosyserve.work_units import UnitJob

from .plan import AudioWork, Feed, StepOutput, StepPlan
from .sequence import Segment
from .streaming import AudioStage, Draws, PromptCondition, Synthesizer

logger = logging.getLogger("cosyserve.engine")


@dataclass(eq=False)
class _LLMState:
    """One segment's LLM state on the runner: its prefix (uni-stream) and its one-row cache while it
    is out of the batch (None once the batch holds its row)."""

    prefix: Tensor | None = None
    cache: KVCache | None = None


class DecodeBatch:
    """The rows being decoded: one KV cache, row ``i`` holding ``segments[i]``'s history."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.segments: list[Segment] = []

    def __len__(self) -> int:
        return len(self.segments)

    def __contains__(self, segment: Segment) -> bool:
        return segment in self.segments

    def rows_cache(self) -> KVCache:
        """The cache of the rows (there is one while any row is in the batch)."""
        if self.cache is None:
            raise RuntimeError("the decode batch has no rows")
        return self.cache

    def join(self, segment: Segment, row_cache: KVCache) -> None:
        if self.cache is None:
            self.cache = row_cache  # the first row: adopt its cache as is
        else:
            self.cache.add_row(row_cache)
        self.segments.append(segment)

    def leave(self, segment: Segment, keep_cache: bool = False) -> KVCache | None:
        """Drop the segment's row; with ``keep_cache`` return that row as a one-row cache."""
        row = self.segments.index(segment)
        cache = self.rows_cache()
        own = None
        if keep_cache:
            own, moved = cache.take_row(row)
        else:
            moved = cache.remove_row(row)
        if moved is not None:
            self.segments[row] = self.segments[moved]
        self.segments.pop()
        if not self.segments:
            self.cache = None
        return own


class ModelRunner:
    """Runs :class:`StepPlan` s for one model (see the module doc)."""

    def __init__(self, lm: SpeechLM, llm_device: torch.device, audio: AudioStage, synthesizer: type[Synthesizer]):
        self.lm = lm
        self.llm_device = llm_device
        self.audio = audio
        self.synthesizer = synthesizer
        self.threads = torch.get_num_threads()  # the process's setting when the model was loaded
        self.batch = DecodeBatch()
        self._llm: dict[Segment, _LLMState] = {}
        self._jobs: dict[Segment, UnitJob[np.ndarray | None]] = {}

    def bind_thread(self) -> None:
        """Make the calling thread (the one that will execute the plans) compute with the runner's
        threads: torch's intra-op setting does not carry over to a new thread's OpenMP team, and the
        engine thread's decode steps ran 16 % slower without it (2-core EPYC, CosyVoice2 fp32)."""
        torch.set_num_threads(self.threads)

    def new_synthesizer(self, condition: PromptCondition, draws: Draws, speed: float, stream: bool) -> Synthesizer:
        """A segment's token-to-audio state on this runner's audio stage."""
        return self.synthesizer(self.audio, condition, draws, speed, stream)

    @property
    def paused_jobs(self) -> int:
        """Audio jobs started and paused at a unit boundary."""
        return len(self._jobs)

    @property
    def idle(self) -> bool:
        """No LLM state and no paused audio job is held."""
        return not self._llm and not self._jobs and self.batch.cache is None

    # -- freeing -------------------------------------------------------------------------------------
    def release(self, segments: list[Segment] | tuple[Segment, ...]) -> None:
        """Free the segments' LLM state (batch row, own cache) and stop their paused audio jobs."""
        with torch.inference_mode():  # the cache's tensors are inference tensors
            for segment in segments:
                if segment in self.batch:
                    self.batch.leave(segment)
                self._llm.pop(segment, None)
                job = self._jobs.pop(segment, None)
                if job is not None:
                    job.cancel()
                segment.synthesizer.close()

    # -- one step ------------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepOutput:
        out = StepOutput()
        with torch.inference_mode():
            for segment in plan.release:
                self._drop_llm(segment)
            for feed in plan.feeds:
                started = time.perf_counter()
                self._guarded(out, feed.segment, functools.partial(self._feed, feed, out))
                self._account(out, time.perf_counter() - started, feed.background)
                out.prefill_s += time.perf_counter() - started
            if plan.decode:
                started = time.perf_counter()
                self._decode(plan.decode, out)
                out.decode_s = time.perf_counter() - started
                self._account(out, out.decode_s, False)
            for work in plan.audio:
                started = time.perf_counter()
                self._guarded(out, work.segment, functools.partial(self._audio, work, out))
                self._account(out, time.perf_counter() - started, work.background)
        return out

    @staticmethod
    def _account(out: StepOutput, seconds: float, background: bool) -> None:
        if background:
            out.background_s += seconds
        else:
            out.foreground_s += seconds

    @staticmethod
    def _guarded(out: StepOutput, segment: Segment, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # one request's failure must not stop the others
            logger.exception("generation failed")
            out.failed[segment] = exc

    def _drop_llm(self, segment: Segment) -> None:
        if segment in self.batch:
            self.batch.leave(segment)
        self._llm.pop(segment, None)

    # -- the LLM -------------------------------------------------------------------------------------
    def _feed(self, feed: Feed, out: StepOutput) -> None:
        """Feed positions on the segment's own cache (its row leaves the batch first); the last one's
        log-probs pick its next id when the prefix is complete (or always, for a bistream row)."""
        segment = feed.segment
        state = self._llm.setdefault(segment, _LLMState())
        if segment in self.batch:
            state.cache = self.batch.leave(segment, keep_cache=True)
        if segment.bistream is not None:
            lm = cast(BistreamLM, self.lm)  # only families whose record says bistream get a text feed
            hidden, state.cache = lm.feed(lm.embed_inputs(feed.items), state.cache)
            out.picked[segment] = segment.bistream.pick(self.lm.logp(hidden))
            return
        if state.prefix is None:
            state.prefix = self._prefix(segment)
        length = state.prefix.shape[1]
        start = segment.prefix_fed
        stop = min(length, start + feed.positions)
        hidden, state.cache = self.lm.feed(state.prefix[:, start:stop], state.cache)
        out.fed[segment] = (stop - start, length)
        out.prefill_positions += stop - start
        if stop == length:
            state.prefix = None  # in the cache now
            out.picked[segment] = _rules(segment).pick(self.lm.logp(hidden))

    def _prefix(self, segment: Segment) -> Tensor:
        x = segment.input
        embedding = x.llm_embedding.to(self.llm_device) if x.llm_embedding.numel() else None
        return self.lm.build_prefix(x.text, x.prompt_text, x.llm_prompt_speech, embedding)

    def _decode(self, rows: tuple[Segment, ...], out: StepOutput) -> None:
        """ONE batched step: the batch becomes exactly ``rows`` (rows not in it wait outside with their
        cache), each fed its last picked id; each row picks its next id with its own rules."""
        wanted = set(rows)
        for segment in list(self.batch.segments):
            if segment not in wanted:
                self._llm.setdefault(segment, _LLMState()).cache = self.batch.leave(segment, keep_cache=True)
        for segment in rows:
            if segment not in self.batch:
                state = self._llm.setdefault(segment, _LLMState())
                if state.cache is None:
                    raise RuntimeError("a segment joins the decode batch before its prefix is fed")
                self.batch.join(segment, state.cache)
                state.cache = None
        ids = torch.tensor([s.next_input for s in self.batch.segments], dtype=torch.long, device=self.llm_device)
        out.batch_size = len(self.batch)
        try:
            logp = self.lm.logp(self.lm.decode_batch(ids, self.batch.rows_cache()))
        except Exception as exc:
            # A failure of the shared step cannot be pinned on one row: every row in it fails.
            logger.exception("batched decode step failed for %d rows", len(self.batch))
            for segment in self.batch.segments:
                out.failed[segment] = exc
            return
        for row, segment in enumerate(self.batch.segments):
            pick = _rules(segment).pick if segment.bistream is None else segment.bistream.pick
            self._guarded(out, segment, functools.partial(_record_pick, out, segment, pick, logp[row]))

    # -- audio ---------------------------------------------------------------------------------------
    def _audio(self, work: AudioWork, out: StepOutput) -> None:
        """Advance the segment's audio job (made now if none is paused) by its budget."""
        job = self._jobs.get(work.segment)
        if job is None:
            synthesizer = work.segment.synthesizer
            job = UnitJob(synthesizer.finish if work.last else synthesizer.next_chunk)
            self._jobs[work.segment] = job
        if not job.run_for(work.budget_s):
            return
        del self._jobs[work.segment]
        if job.error is not None:
            raise job.error
        out.audio.append((work, job.result))


def _rules(segment: Segment) -> TokenRules:
    """A uni-stream segment's token rules (every such segment has them; vc and bistream do not)."""
    if segment.rules is None:
        raise RuntimeError("a uni-stream segment without token rules")
    return segment.rules


def _record_pick(out: StepOutput, segment: Segment, pick: Callable[[Tensor], int | None], logp: Tensor) -> None:
    out.picked[segment] = pick(logp)
