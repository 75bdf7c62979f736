"""Deciding each engine step for the requests of one model (the runner executes the decision).

:meth:`Scheduler.schedule` looks at every request's state and returns a :class:`StepPlan`:

1. feeds: a segment whose prefix is not all in its cache feeds the next piece of it alone (chunked
   prefill: the prompt lengths differ, and a long prompt must not hold up the batch for long); a
   bi-streamed row feeds its text / prompt-speech groups and the final text + task id alone;
2. decode: ONE batched step for every segment that feeds one id (each row at its own position);
   each row's own :class:`TokenRules` (or bistream state) picks its id with its own generator, so a
   seeded request gives the same tokens whoever shares the batch;
3. audio: token-to-audio work that is due (a streaming chunk, or a segment's last chunk).

:meth:`Scheduler.update` applies the runner's :class:`StepOutput`: ids to their synthesizers, chunks to
their requests, failures to the failed request only.

**No stage stalls another.** A live request (streamed audio or streamed text) has a listener waiting
for its next chunk; an offline one waits for the whole audio anyway. While a live request runs, an
offline request's prefill and audio are *background* work: cut into bounded units (prefix pieces, the
flow's Euler steps and estimator blocks, the vocoder's stages; :mod:`cosyserve.work_units`) and given
at most :attr:`SchedulePolicy.background_share` seconds per second of foreground work, so a stream's
gaps between chunks stretch by about that share and a unit, whatever else runs. Live work runs first,
in full; a request with no audio yet goes first (its first chunk is what its listener waits for),
then arrival order. Until a live request's first chunk is out no background work runs at all, none is
saved up meanwhile, and offline rows sit the decode steps out (a long-form job's segments do not delay an
interactive request's first audio).
With no live request, every request's work runs as soon as it is due, audio in slices so that a stream
that arrives meanwhile waits at most one slice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from cosyserve.models.base import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO
from cosyserve.models.contracts import BistreamLM, SpeechLM
from cosyserve.nn.flow_matching import FIXED_NOISE_FRAMES
from cosyserve.nn.sampling import TokenRules

from .continuity import ContinuityStore, SegmentContext, continued_input
from .inputs import SegmentInput
from .plan import AudioWork, Feed, StepOutput, StepPlan
from .sequence import Segment, SegmentMark, Sequence
from .streaming import Draws, PromptCondition, Synthesizer

logger = logging.getLogger("cosyserve.engine")

# What makes a segment's token-to-audio state: (condition, draws, speed, stream) -> Synthesizer.
SynthesizerFactory = Callable[[PromptCondition, Draws, float, bool], Synthesizer]
# A chunk, a segment mark (sequences that ask for them), or None: the sequence finished (or failed).
Event = tuple[Sequence, np.ndarray | SegmentMark | None]


@dataclass(frozen=True)
class SchedulePolicy:
    """The scheduler's budgets (see the module doc)."""

    prefill_positions_per_step: int = 2048  # prefix positions fed per step, all segments together
    prefill_chunk: int = 512  # at most this many positions of one prefix per step
    audio_jobs_per_step: int = 1  # live audio jobs per step while rows decode (all when none do)
    background_share: float = 0.15  # background seconds per foreground second while a live request runs
    idle_slice_s: float = 0.05  # background time per step when no foreground work is due
    offline_slice_s: float = 0.1  # an audio job's slice per step when no live request runs
    max_credit_s: float = 2.0  # the background budget saved up (or owed) at most


def _silence(samples: int) -> np.ndarray:
    return np.zeros(samples, dtype=np.float32)


class Scheduler:
    """Decides each step for the sequences it holds (see the module doc)."""

    def __init__(
        self,
        lm: SpeechLM,
        new_synthesizer: SynthesizerFactory,
        token_mel_ratio: int = 0,
        policy: SchedulePolicy | None = None,
        max_prompt_speech: int = 0,
        continuity: ContinuityStore | None = None,
    ) -> None:
        self.lm = lm
        # Continuity: the prompt speech ids a continued segment may have at most (the family's prompt
        # limit), and where finished requests' last segments are kept.
        self.max_prompt_speech = max_prompt_speech
        self.continuity = continuity
        self.new_synthesizer = new_synthesizer
        self.token_mel_ratio = token_mel_ratio  # v2/v3: bounds the tokens by the flow's fixed noise
        self.policy = policy or SchedulePolicy()
        self.sequences: list[Sequence] = []
        self._owner: dict[Segment, Sequence] = {}
        self._release: list[Segment] = []
        self._dropped: list[Segment] = []  # segments of sequences that left, for the runner to free
        self._in_flight: dict[Sequence, AudioWork] = {}  # audio work paused at a unit boundary
        self.credit = 0.0  # background seconds available (negative: owed)
        self.prefill_s_per_position = 2e-3  # measured as it runs; sizes background prefill pieces
        self.llm_steps = 0
        self.llm_tokens = 0
        self.last_batch_size = 0
        # Seconds per stage (prefill, decode, flow, vocoder), accumulated when not None (bench).
        self.timings: dict[str, float] | None = None

    # -- membership --------------------------------------------------------------------------------
    def add(self, sequence: Sequence) -> None:
        self.sequences.append(sequence)

    def remove(self, sequence: Sequence) -> None:
        """Forget a sequence (finished, failed or aborted); its segments go to :meth:`take_dropped`."""
        segments = list(sequence.segments)
        for segment in segments:
            self._owner.pop(segment, None)
        self._release = [s for s in self._release if s not in segments]
        self._dropped += segments
        self._in_flight.pop(sequence, None)
        sequence.segments.clear()
        if sequence in self.sequences:
            self.sequences.remove(sequence)

    def take_dropped(self) -> list[Segment]:
        """The segments of the sequences removed since the last call (their runner state is to free)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    @property
    def has_work(self) -> bool:
        return bool(self.sequences)

    @property
    def live(self) -> bool:
        """A request with a listener waiting for its next chunk is running."""
        return any(s.live and s.failed is None for s in self.sequences)

    @property
    def runnable(self) -> bool:
        """A step would make progress: False while every sequence held waits for streamed text."""
        return any(not self._waits_for_text(s) for s in self.sequences)

    def _waits_for_text(self, sequence: Sequence) -> bool:
        """A bistream row out of the batch with nothing to feed until more text comes, and no audio due."""
        if sequence.text is None or sequence.failed is not None or sequence.text.has_news:
            return False
        segment = sequence.decoding
        if segment is None or segment.bistream is None or segment.next_input is not None:
            return False
        return segment.bistream.waiting and self._audio_due(sequence) is None and sequence not in self._in_flight

    # -- deciding ----------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """The next step's plan (starting segments that are due, reading streamed text)."""
        policy = self.policy
        live = self.live
        release, self._release = tuple(self._release), []
        feeds: list[Feed] = []
        background: list[Sequence] = []  # offline sequences with work, in arrival order (live only)
        positions = policy.prefill_positions_per_step
        for sequence in self.sequences:
            if sequence.failed is not None:
                continue
            segment = self._current_segment(sequence)
            if sequence.failed is not None:
                continue
            if live and not sequence.live:
                background.append(sequence)
                continue
            if segment is not None and positions > 0:
                feed = self._feed(sequence, segment, min(positions, policy.prefill_chunk))
                if feed is not None:
                    feeds.append(feed)
                    positions -= feed.positions or len(feed.items)
        fed = {feed.segment for feed in feeds}
        # While a live request waits for its first chunk, offline rows sit the decode steps out (their KV
        # rows stay): the step is the live rows' alone.
        offline_waits = live and self._first_chunk_due
        decode = tuple(
            segment
            for sequence in self.sequences
            if sequence.failed is None and (sequence.live or not offline_waits)
            for segment in sequence.segments
            if segment.decoding and segment not in fed
        )
        audio = self._foreground_audio(live, decode)
        if live:
            budget = self._background_budget(bool(feeds or decode or audio))
            work = self._background_work(background, budget) if budget > 0 else None
            if isinstance(work, Feed):
                feeds.append(work)
            elif work is not None:
                audio.append(work)
        return StepPlan(release=release, feeds=tuple(feeds), decode=decode, audio=tuple(audio))

    def _current_segment(self, sequence: Sequence) -> Segment | None:
        """The segment the LLM works on, starting the next one when none is (None: all decoded)."""
        segment = sequence.decoding
        if segment is None and sequence.continuity and sequence.segments:
            return None  # continuity: the previous segment's mel (its audio) first, the next one's flow prompt
        if segment is None and sequence.next_segment < len(sequence.inputs):
            try:
                segment = self._start_segment(sequence)
            except Exception as exc:  # one request's failure must not stop the others
                logger.exception("[%s] starting a segment failed", sequence.request_id or "-")
                sequence.failed = exc
                return None
        return segment if segment is not None and not segment.decoded else None

    def _start_segment(self, sequence: Sequence) -> Segment:
        index = sequence.next_segment
        model_input = sequence.inputs[index]
        plan = sequence.plan(index)
        sequence.next_segment += 1
        own_text = None
        if sequence.continuity:
            lead = sequence.leads[index] if index < len(sequence.leads) else 0
            own_text = model_input.text[:, lead:]
            if sequence.context is not None:
                model_input = continued_input(model_input, lead, sequence.context, self.max_prompt_speech)
        condition = PromptCondition(model_input.flow_prompt_speech, model_input.prompt_mel, model_input.flow_embedding)
        synthesizer = self.new_synthesizer(condition, sequence.draws, plan.speed, sequence.stream)
        synthesizer.timings = self.timings
        synthesizer.keep_mel = sequence.continuity
        segment = Segment(model_input, synthesizer, plan=plan, index=index, context_text=own_text)
        segment.silent = index < sequence.silent_head
        sequence.segments.append(segment)
        self._owner[segment] = sequence
        if model_input.source_speech is not None:  # vc: the tokens are given
            for token in model_input.source_speech.reshape(-1).tolist():
                synthesizer.add(int(token))
            segment.decoded = True
            return segment
        if sequence.text is not None:
            lm = cast(BistreamLM, self.lm)  # only families whose record says bistream get a text feed
            segment.bistream = lm.new_bistream(
                model_input.prompt_text, model_input.llm_prompt_speech, sequence.sampler, self._noise_bound(model_input)
            )
            return segment
        segment.rules = TokenRules(
            sequence.sampler,
            self.lm.stop_token_ids,
            MIN_TOKEN_TEXT_RATIO * model_input.text_length,
            self._max_tokens(model_input),
            self.lm.mask_early_stop,
        )
        if segment.rules.stopped:
            segment.decoded = True
        return segment

    def _max_tokens(self, model_input: SegmentInput) -> int:
        """The LLM's length bound: 20 tokens per text token, and for v2/v3 no more than the flow's
        fixed noise covers (prompt included), so an unsplittable text cannot overrun it."""
        return max(min(MAX_TOKEN_TEXT_RATIO * model_input.text_length, self._noise_bound(model_input)), 0)

    def _noise_bound(self, model_input: SegmentInput) -> int:
        """The speech tokens the flow's fixed noise covers after the prompt (v2/v3; v1: no bound)."""
        if not self.token_mel_ratio:
            return 1 << 62
        prompt = model_input.flow_prompt_speech.shape[1]
        return max(FIXED_NOISE_FRAMES // self.token_mel_ratio - prompt, 0)

    def _feed(self, sequence: Sequence, segment: Segment, positions: int, background: bool = False) -> Feed | None:
        """What the segment feeds alone this step, if anything (reads a bistream row's new text)."""
        if segment.bistream is None:
            if segment.prefilled:
                return None
            return Feed(sequence, segment, positions=max(1, positions), background=background)
        if segment.next_input is not None:
            return None  # it decodes in the batch
        state = segment.bistream
        if sequence.text is None:
            raise RuntimeError("a bistream segment's sequence has no text feed")
        ids, closed = sequence.text.read()
        if ids:
            state.add_text(ids)
        if closed and not state.text_closed:
            state.close_text()
        items = state.next_input()
        if items is None:
            if state.done:
                self._decoding_over(segment)
            return None
        return Feed(sequence, segment, items=tuple(items), background=background)

    def _audio_due(self, sequence: Sequence) -> AudioWork | None:
        if sequence in self._in_flight:
            return self._in_flight[sequence]
        if not sequence.segments:
            return None
        head = sequence.segments[0]
        if head.synthesizer.ready():
            return AudioWork(sequence, head, last=False)
        if head.decoded:
            return AudioWork(sequence, head, last=True)
        return None

    def _foreground_audio(self, live: bool, decode: tuple[Segment, ...]) -> list[AudioWork]:
        """Live requests' due audio (all requests' when none is live), in-flight work first, then
        requests with no audio yet, then by arrival."""
        due = []
        for sequence in self.sequences:
            if sequence.failed is None and (sequence.live or not live):
                work = self._audio_due(sequence)
                if work is not None:
                    due.append(work)
        due.sort(key=lambda w: (w.sequence not in self._in_flight, w.sequence.chunks_out > 0, w.sequence.arrival))
        limit = self.policy.audio_jobs_per_step if decode else len(due)
        slice_s = None if live else self.policy.offline_slice_s
        return [AudioWork(w.sequence, w.segment, w.last, budget_s=slice_s) for w in due[:limit]]

    @property
    def _first_chunk_due(self) -> bool:
        """A live request has no audio out yet: what its listener waits for before anything else."""
        return any(s.live and s.failed is None and s.chunks_out == 0 for s in self.sequences)

    def _background_budget(self, foreground: bool) -> float:
        if not foreground:
            return self.policy.idle_slice_s
        if self._first_chunk_due:
            return 0.0
        return max(self.credit, 0.0)

    def _background_work(self, offline: list[Sequence], budget: float) -> Feed | AudioWork | None:
        """One piece of offline work for ``budget`` seconds: work already started first (its memory
        is held), then the earliest request's next prefix piece or due audio."""
        for sequence in offline:
            if sequence in self._in_flight:
                started = self._in_flight[sequence]
                return AudioWork(sequence, started.segment, started.last, budget_s=budget, background=True)
        for sequence in offline:
            segment = sequence.decoding
            if segment is not None and not segment.decoded:
                positions = int(budget / max(self.prefill_s_per_position, 1e-6))
                feed = self._feed(sequence, segment, min(max(positions, 16), self.policy.prefill_chunk), True)
                if feed is not None:
                    return feed
            work = self._audio_due(sequence)
            if work is not None:
                return AudioWork(sequence, work.segment, work.last, budget_s=budget, background=True)
        return None

    # -- applying a step's results ---------------------------------------------------------------------
    def update(self, plan: StepPlan, out: StepOutput) -> list[Event]:
        """Apply what the runner did; returns the chunks made, in order per sequence, and ``(seq, None)``
        for each sequence that finished (or failed: ``failed`` set)."""
        events: list[Event] = []
        self.last_batch_size = out.batch_size
        if out.batch_size:
            self.llm_steps += 1
        self._time("prefill", out.prefill_s)
        self._time("decode", out.decode_s)
        if out.prefill_positions and out.prefill_s > 0:
            rate = out.prefill_s / out.prefill_positions
            self.prefill_s_per_position = 0.7 * self.prefill_s_per_position + 0.3 * rate
        for segment, error in out.failed.items():
            sequence = self._owner.get(segment)
            if sequence is not None and sequence.failed is None:
                sequence.failed = error
        for segment, (n, length) in out.fed.items():
            segment.prefix_fed += n
            segment.prefix_length = length
        for segment, token in out.picked.items():
            sequence = self._owner.get(segment)
            if sequence is not None and sequence.failed is None:
                self._apply_pick(sequence, segment, token)
        finished = set()
        for work, chunk in out.audio:
            finished.add(work.sequence)
            self._in_flight.pop(work.sequence, None)
            if work.sequence.failed is not None:
                continue
            segment = work.segment
            sequence = work.sequence
            if work.last:
                segment.done = True
                sequence.segments.remove(segment)
                self._owner.pop(segment, None)
                if sequence.continuity:
                    self._continue_from(sequence, segment)
            if segment.silent:
                continue
            pieces: list[np.ndarray | SegmentMark | None] = []
            marks = sequence.marks
            if not segment.audio_started and (work.last or (chunk is not None and chunk.size)):
                segment.audio_started = True
                pieces.append(_silence(segment.plan.pause_before))  # exact zeros (SSML <break>)
                if marks:
                    pieces.append(self._mark(sequence, segment, end=False))
            pieces.append(chunk)
            if work.last:
                if marks:
                    pieces.append(self._mark(sequence, segment, end=True))
                pieces.append(_silence(segment.plan.pause_after))
            for piece in pieces:
                if isinstance(piece, SegmentMark):
                    events.append((sequence, piece))
                elif piece is not None and piece.size:
                    sequence.chunks_out += 1
                    events.append((sequence, piece))
        for work in plan.audio:
            if work.sequence not in finished and work.sequence.failed is None:
                self._in_flight[work.sequence] = work
        if self.live:
            if out.foreground_s > 0 and not self._first_chunk_due:  # nothing saved up while it waits
                credit = self.credit + self.policy.background_share * out.foreground_s - out.background_s
                self.credit = min(max(credit, -self.policy.max_credit_s), self.policy.max_credit_s)
        else:
            self.credit = 0.0
        for sequence in list(self.sequences):
            if sequence.failed is not None or sequence.finished:
                if sequence.failed is None and sequence.continuity:
                    self._keep(sequence)
                self.remove(sequence)
                events.append((sequence, None))
        return events

    def _keep(self, sequence: Sequence) -> None:
        """A finished request's last segment, kept for a request that continues it (previous_request_id)."""
        if self.continuity is not None and sequence.context is not None and sequence.request_id:
            self.continuity.put(sequence.owner, sequence.request_id, sequence.context)

    @staticmethod
    def _continue_from(sequence: Sequence, segment: Segment) -> None:
        """A finished segment becomes the context the next one continues (when it made speech)."""
        if segment.context_text is None:
            return
        synth = segment.synthesizer
        context = SegmentContext.of(segment.context_text, segment.tokens, synth.flow_ids(), synth.generated_mel())
        if context is not None:
            sequence.context = context
        synth.mel_pieces = []

    @staticmethod
    def _mark(sequence: Sequence, segment: Segment, end: bool) -> SegmentMark:
        index = segment.index
        text = sequence.texts[index] if index < len(sequence.texts) else ""
        return SegmentMark(index - sequence.silent_head, text, end)

    def _time(self, stage: str, seconds: float) -> None:
        if self.timings is not None and seconds:
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def _decoding_over(self, segment: Segment) -> None:
        segment.decoded = True
        segment.next_input = None
        self._release.append(segment)

    def _apply_pick(self, sequence: Sequence, segment: Segment, token: int | None) -> None:
        """The segment's id of this step: to its synthesizer, and what it feeds next."""
        state = segment.bistream
        if token is None:
            self._decoding_over(segment)
            return
        if state is not None and token == state.fill:
            segment.next_input = None  # it waits for text: fed alone once 5 more text tokens are there
            return
        segment.synthesizer.add(token)
        if sequence.continuity:
            segment.tokens.append(token)
        sequence.tokens_out += 1
        self.llm_tokens += 1
        if state is None:
            segment.next_input = token
            if segment.rules is not None and segment.rules.stopped:  # max_len reached: this id is the last
                self._decoding_over(segment)
            return
        if state.done:
            self._decoding_over(segment)
            return
        items = state.next_input()
        if items is None or len(items) != 1 or items[0][0] != "speech":
            raise RuntimeError(f"after a speech id the next input is that id, not {items}")
        segment.next_input = items[0][1]
