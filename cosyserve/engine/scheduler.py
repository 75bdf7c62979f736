"""Step-driven generation of many requests at once on one model.

A :class:`Sequence` is one request after its frontend: a list of text segments (model inputs), its
random draws and LLM sampler. :meth:`Scheduler.step` advances every sequence it holds:

1. prefill: a sequence whose next segment has not started runs its prefix alone (the prompt
   lengths differ) and joins the decode batch as a new row of the shared :class:`KVCache`;
2. decode: ONE batched LLM step for every row (each row at its own position), then each row's own
   :class:`TokenRules` picks its id with its own generator, so a seeded request gives the same
   tokens whoever shares the batch; a row that stops leaves the batch at once;
3. audio: token-to-audio work that is due (a streaming chunk, or a segment's last chunk) runs for
   at most ``audio_jobs_per_step`` sequences while others are decoding, requests that have no
   audio yet first (their first chunk is what a listener waits for), then in arrival order.

A request whose text arrives over time (bi-streaming, spec §9.4: ``Sequence.text``) is one segment
with a :class:`BistreamInput` of its own. When it must feed several positions at once (text groups,
prompt speech groups, the final text + task id) it does so alone, on its own one-row cache, in step
1; while it feeds one speech id at a time it is a row of the batch like any other; at a fill marker
it leaves the batch with its cache (:meth:`KVCache.take_row`) and waits for text without holding up
the others, then rejoins. :attr:`Scheduler.runnable` is False while every sequence waits for text.

The same scheduler serves one request alone (the Python API iterates it in the caller's thread) and
many (the engine core runs it in its own thread); there is no other generation loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cosyserve.models.base import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO, FamilyModel
from cosyserve.models.cosyvoice2.bistream import BistreamInput
from cosyserve.nn.flow_matching import FIXED_NOISE_FRAMES
from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.sampling import Sampler, TokenRules

from .streaming import Draws, PromptCondition, Synthesizer
from .text_feed import FeedReader

logger = logging.getLogger("cosyserve.engine")

PREFILL_TOKENS_PER_STEP = 2048  # prefix positions prefilled per step, beyond the first sequence's

_arrivals = itertools.count()


@dataclass(eq=False)  # identity: a segment is one object in a batch, not a value
class Segment:
    """One text segment of a sequence: its model input, token rules and token-to-audio state."""

    model_input: dict[str, torch.Tensor]
    synthesizer: Synthesizer
    rules: TokenRules | None = None  # None: the tokens are given (vc)
    next_input: int | None = None  # the id the next decode step feeds (the last one picked)
    decoded: bool = False  # the LLM is done with this segment
    done: bool = False  # its last chunk is out
    bistream: BistreamInput | None = None  # text arriving over time: what to feed, when to wait
    own_cache: KVCache | None = None  # a bistream row's cache while it is out of the batch


@dataclass(eq=False)
class Sequence:
    """One request's generation state; lives as long as the request."""

    inputs: list[dict[str, torch.Tensor]]
    draws: Draws
    sampler: Sampler
    stream: bool
    speed: float
    request_id: str = ""
    arrival: int = field(default_factory=lambda: next(_arrivals))
    segments: deque[Segment] = field(default_factory=deque)  # started, audio not all out, in order
    next_input: int = 0  # index in ``inputs`` of the next segment to start
    chunks_out: int = 0
    tokens_out: int = 0
    failed: BaseException | None = None
    text: FeedReader | None = None  # bi-streaming: the text arrives through this feed

    @property
    def decoding(self) -> Segment | None:
        """The segment the LLM is working on (at most one at a time)."""
        return next((s for s in self.segments if not s.decoded), None)

    @property
    def finished(self) -> bool:
        return self.next_input >= len(self.inputs) and not self.segments


class DecodeBatch:
    """The rows being decoded: one KV cache, row ``i`` holding ``segments[i]``'s history."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.llm = llm
        self.cache: KVCache | None = None
        self.segments: list[Segment] = []
        self.owners: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.segments)

    def join(self, sequence: Sequence, segment: Segment, row_cache: KVCache) -> None:
        if self.cache is None:
            self.cache = row_cache  # the first row: adopt its cache as is
        else:
            self.cache.add_row(row_cache)
        self.segments.append(segment)
        self.owners.append(sequence)

    def leave(self, segment: Segment, keep_cache: bool = False) -> KVCache | None:
        """Drop the segment's row; with ``keep_cache`` return that row as a one-row cache."""
        row = self.segments.index(segment)
        own = None
        if keep_cache:
            own, moved = self.cache.take_row(row)
        else:
            moved = self.cache.remove_row(row)
        if moved is not None:
            self.segments[row], self.owners[row] = self.segments[moved], self.owners[moved]
        self.segments.pop()
        self.owners.pop()
        if not self.segments:
            self.cache = None
        return own

    def step(self) -> torch.Tensor:
        """Feed every row its last picked id; (rows, V) log-probs of the next one."""
        device = self.llm.speech_embedding.weight.device
        ids = torch.tensor([s.next_input for s in self.segments], dtype=torch.long, device=device)
        return self.llm.logp(self.llm.decode_batch(ids, self.cache))


class Scheduler:
    """Advances the sequences it holds, one :meth:`step` at a time (see the module doc)."""

    def __init__(self, model: FamilyModel, synthesizer: type[Synthesizer], audio_jobs_per_step: int = 1) -> None:
        self.model = model
        self.synthesizer = synthesizer
        self.audio_jobs_per_step = audio_jobs_per_step
        self.batch = DecodeBatch(model.llm)
        self.sequences: list[Sequence] = []
        self.llm_steps = 0
        self.llm_tokens = 0
        self.last_batch_size = 0
        # Seconds per stage (prefill, decode, flow, vocoder), accumulated when not None (bench).
        self.timings: dict[str, float] | None = None

    # -- membership --------------------------------------------------------------------------------
    def add(self, sequence: Sequence) -> None:
        self.sequences.append(sequence)

    def remove(self, sequence: Sequence) -> None:
        """Drop a sequence (finished, failed or aborted): its batch row and caches are freed now."""
        with torch.inference_mode():  # the cache's tensors are inference tensors
            for segment in sequence.segments:
                if segment in self.batch.segments:
                    self.batch.leave(segment)
                segment.own_cache = None
        sequence.segments.clear()
        if sequence in self.sequences:
            self.sequences.remove(sequence)

    @property
    def has_work(self) -> bool:
        return bool(self.sequences)

    @property
    def runnable(self) -> bool:
        """A step would make progress: False while every sequence held waits for streamed text."""
        return any(not self._waits_for_text(s) for s in self.sequences)

    def _waits_for_text(self, sequence: Sequence) -> bool:
        """A bistream row out of the batch with nothing to feed until more text comes, and no audio due."""
        if sequence.text is None or sequence.failed is not None or sequence.text.has_news:
            return False
        segment = sequence.decoding
        if segment is None or segment.bistream is None or segment in self.batch.segments:
            return False
        return segment.bistream.waiting and not self._audio_due(sequence)

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, np.ndarray | None]]:
        """Advance every sequence; returns the chunks made, in order per sequence, and ``(seq, None)``
        for each sequence that finished. A sequence that fails is dropped with ``failed`` set and
        reported as finished; the others go on."""
        out: list[tuple[Sequence, np.ndarray | None]] = []
        with torch.inference_mode():
            self._prefill()
            self._decode()
            self._audio(out)
        for sequence in list(self.sequences):
            if sequence.failed is not None or sequence.finished:
                self.remove(sequence)
                out.append((sequence, None))
        return out

    def _timed(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self.timings is None:
            return fn(*args)
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def _guarded(self, sequence: Sequence, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except Exception as exc:  # one request's failure must not stop the others
            logger.exception("[%s] generation failed", sequence.request_id or "-")
            sequence.failed = exc
            self.remove(sequence)
            self.sequences.append(sequence)  # reported (and dropped) at the end of the step
            return None

    def _prefill(self) -> None:
        budget = PREFILL_TOKENS_PER_STEP
        for sequence in list(self.sequences):
            if budget <= 0:
                break
            if sequence.failed:
                continue
            if sequence.decoding is None and sequence.next_input < len(sequence.inputs):
                budget -= self._guarded(sequence, lambda s=sequence: self._start_segment(s)) or 0
            segment = sequence.decoding
            if (
                not sequence.failed
                and segment is not None
                and segment.bistream is not None
                and segment not in self.batch.segments
            ):
                budget -= self._guarded(sequence, lambda s=sequence, g=segment: self._feed_alone(s, g)) or 0

    def _start_segment(self, sequence: Sequence) -> int:
        """Start the sequence's next segment; returns the prefix length prefilled."""
        model_input = sequence.inputs[sequence.next_input]
        sequence.next_input += 1
        condition = PromptCondition(
            token=model_input.get("flow_prompt_speech_token", torch.zeros(1, 0, dtype=torch.int32)),
            feat=model_input.get("prompt_speech_feat", torch.zeros(1, 0, 80)),
            embedding=model_input["flow_embedding"],
        )
        synthesizer = self.synthesizer(self.model, condition, sequence.draws, sequence.speed, sequence.stream)
        synthesizer.timings = self.timings
        segment = Segment(model_input, synthesizer)
        sequence.segments.append(segment)
        if "source_speech_token" in model_input:  # vc: the tokens are given
            for token in model_input["source_speech_token"].reshape(-1).tolist():
                synthesizer.add(int(token))
            segment.decoded = True
            return 0
        llm = self.model.llm
        empty_ids = torch.zeros(1, 0, dtype=torch.int32)
        if sequence.text is not None:
            segment.bistream = llm.new_bistream(
                model_input.get("prompt_text", empty_ids),
                model_input.get("llm_prompt_speech_token", empty_ids),
                sequence.sampler,
                self._noise_bound(model_input),
            )
            return 0
        n_text = int(model_input["text"].shape[1])
        segment.rules = TokenRules(
            sequence.sampler,
            llm.stop_token_ids,
            MIN_TOKEN_TEXT_RATIO * n_text,
            self._max_tokens(model_input),
            llm.mask_early_stop,
        )
        prefix = llm.build_prefix(
            model_input["text"],
            model_input.get("prompt_text", empty_ids),
            model_input.get("llm_prompt_speech_token", empty_ids),
            model_input.get("llm_embedding", torch.zeros(0, 192)),
        )
        if segment.rules.stopped:
            segment.decoded = True
            return 0
        hidden, row_cache = self._timed("prefill", llm.prefill, prefix)
        if self._pick(sequence, segment, llm.logp(hidden)):
            self.batch.join(sequence, segment, row_cache)
        return int(prefix.shape[1])

    def _max_tokens(self, model_input: dict[str, torch.Tensor]) -> int:
        """The LLM's length bound: 20 tokens per text token, and for v2/v3 no more than the flow's
        fixed noise covers (prompt included), so an unsplittable text cannot overrun it."""
        bound = min(MAX_TOKEN_TEXT_RATIO * model_input["text"].shape[1], self._noise_bound(model_input))
        return max(bound, 0)

    def _noise_bound(self, model_input: dict[str, torch.Tensor]) -> int:
        """The speech tokens the flow's fixed noise covers after the prompt (v2/v3; v1: no bound)."""
        if not self.model.token_mel_ratio:
            return 1 << 62
        prompt = model_input.get("flow_prompt_speech_token", torch.zeros(1, 0)).shape[1]
        return max(FIXED_NOISE_FRAMES // self.model.token_mel_ratio - prompt, 0)

    # -- bi-streaming rows ---------------------------------------------------------------------------
    def _feed_alone(self, sequence: Sequence, segment: Segment) -> int:
        """A bistream row out of the batch: take the text that came, feed what it can on its own
        cache (several positions at once) and rejoin the batch once it has one speech id to feed.
        Returns the positions fed."""
        state = segment.bistream
        ids, closed = sequence.text.read()
        if ids:
            state.add_text(ids)
        if closed and not state.text_closed:
            state.close_text()
        items = state.next_input()
        if items is None:
            if state.done:
                segment.decoded, segment.own_cache = True, None
            return 0
        llm = self.model.llm
        hidden, segment.own_cache = self._timed("prefill", llm.feed, llm.embed_inputs(items), segment.own_cache)
        if self._bistream_pick(sequence, segment, llm.logp(hidden)):
            self.batch.join(sequence, segment, segment.own_cache)
            segment.own_cache = None
        elif segment.decoded:
            segment.own_cache = None
        return len(items)

    def _bistream_pick(self, sequence: Sequence, segment: Segment, logp: torch.Tensor) -> bool:
        """The bistream row's id for this step; True when its next input is one speech id (it decodes
        in the batch), False when it waits for text (fill) or is over."""
        state = segment.bistream
        token = state.pick(logp)
        if token is None:
            segment.decoded = True
            return False
        if token == state.fill:
            return False
        segment.synthesizer.add(token)
        sequence.tokens_out += 1
        self.llm_tokens += 1
        if state.done:
            segment.decoded = True
            return False
        (kind, segment.next_input), *more = state.next_input()
        assert kind == "speech" and not more, "after a speech id the next input is that id"
        return True

    def _pick(self, sequence: Sequence, segment: Segment, logp: torch.Tensor) -> bool:
        """Pick the segment's next id from (V,) log-probs; False once its decoding is over."""
        token = segment.rules.pick(logp)
        if token is None:
            segment.decoded = True
            return False
        segment.next_input = token
        segment.synthesizer.add(token)
        sequence.tokens_out += 1
        self.llm_tokens += 1
        if segment.rules.stopped:  # max_len reached: this id is the last
            segment.decoded = True
            return False
        return True

    def _decode(self) -> None:
        if not len(self.batch):
            self.last_batch_size = 0
            return
        self.last_batch_size = len(self.batch)
        try:
            logp = self._timed("decode", self.batch.step)
        except Exception as exc:
            # A failure of the shared step cannot be pinned on one row: every row in it fails.
            logger.exception("batched decode step failed for %d rows", len(self.batch))
            for sequence in set(self.batch.owners):
                sequence.failed = exc
                self.remove(sequence)
                self.sequences.append(sequence)
            return
        self.llm_steps += 1
        for row, (segment, sequence) in enumerate(list(zip(self.batch.segments, self.batch.owners, strict=True))):
            pick = self._pick if segment.bistream is None else self._bistream_pick
            keep = self._guarded(sequence, lambda s=sequence, g=segment, r=row, p=pick: p(s, g, logp[r]))
            if not keep and segment in self.batch.segments:
                # A bistream row waiting for text keeps its history to continue from.
                waits = segment.bistream is not None and not segment.decoded and sequence.failed is None
                segment.own_cache = self.batch.leave(segment, keep_cache=waits)

    def _audio(self, out: list[tuple[Sequence, np.ndarray | None]]) -> None:
        due = [s for s in self.sequences if s.failed is None and self._audio_due(s)]
        # First audio first (what a listener is waiting for), then by arrival.
        due.sort(key=lambda s: (s.chunks_out > 0, s.arrival))
        limit = self.audio_jobs_per_step if len(self.batch) else max(1, len(due))
        for sequence in due[:limit]:
            self._guarded(sequence, lambda s=sequence: self._audio_job(s, out))

    @staticmethod
    def _audio_due(sequence: Sequence) -> bool:
        if not sequence.segments:
            return False
        head = sequence.segments[0]
        return head.synthesizer.ready() or head.decoded

    def _audio_job(self, sequence: Sequence, out: list[tuple[Sequence, np.ndarray | None]]) -> None:
        """Make the sequence's next due chunk (its oldest unfinished segment's)."""
        head = sequence.segments[0]
        if head.synthesizer.ready():
            chunk = head.synthesizer.next_chunk()
        else:
            chunk = head.synthesizer.finish()
            head.done = True
            sequence.segments.popleft()
        if chunk is not None and chunk.size:
            sequence.chunks_out += 1
            out.append((sequence, chunk))


def new_sequence(
    inputs: list[dict[str, torch.Tensor]],
    draws: Draws,
    sampler: Sampler,
    stream: bool,
    speed: float,
    request_id: str = "",
    text: FeedReader | None = None,
) -> Sequence:
    return Sequence(
        inputs=inputs, draws=draws, sampler=sampler, stream=stream, speed=speed, request_id=request_id, text=text
    )


def run_alone(scheduler: Scheduler, sequence: Sequence) -> Iterator[np.ndarray]:
    """The chunks of one sequence, stepping a private scheduler in the caller's thread (lazy:
    closing the iterator stops the generation)."""
    scheduler.add(sequence)
    started = time.perf_counter()
    try:
        while True:
            if not scheduler.runnable and sequence.text is not None:
                sequence.text.feed.wait(timeout=1.0)  # the text's next fragment (or its end)
                continue
            for seq, chunk in scheduler.step():
                if chunk is not None:
                    yield chunk
                elif seq.failed is not None:
                    raise seq.failed
                else:
                    return
    finally:
        scheduler.remove(sequence)
        logger.debug("sequence done in %.2f s", time.perf_counter() - started)
