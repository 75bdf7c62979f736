"""The scheduler's plan for a given state, asserted directly: which segments feed (and how much of
their prefix), which decode, which audio work runs with what budget; and how a step's output moves
the requests on. No network runs: the runner's output is written by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyserve.engine.inputs import SegmentInput
from cosyserve.engine.plan import StepOutput, StepPlan
from cosyserve.engine.scheduler import SchedulePolicy, Scheduler
from cosyserve.engine.sequence import Segment, Sequence
from cosyserve.engine.streaming import Draws
from cosyserve.nn.sampling import GreedySampler

SPEECH = 100  # speech ids 0..99, then the stop id
STOP = SPEECH


class FakeLM:
    stop_token_ids = range(SPEECH, SPEECH + 1)

    def mask_early_stop(self, logp: torch.Tensor) -> torch.Tensor:
        return logp


class FakeSynthesizer:
    """Ready for a chunk every ``hop`` tokens when streaming."""

    def __init__(self, stream: bool, hop: int = 4) -> None:
        self.stream, self.hop = stream, hop
        self.tokens: list[int] = []
        self.chunked = 0
        self.timings = None

    def add(self, token: int) -> None:
        self.tokens.append(token)

    def ready(self) -> bool:
        return self.stream and len(self.tokens) - self.chunked * self.hop >= self.hop


def _input(text_tokens: int) -> SegmentInput:
    ids = torch.arange(text_tokens, dtype=torch.int32)[None]
    return SegmentInput(
        text=ids,
        prompt_text=torch.zeros(1, 0, dtype=torch.int32),
        llm_prompt_speech=torch.zeros(1, 0, dtype=torch.int32),
        llm_embedding=torch.zeros(0, 192),
        flow_prompt_speech=torch.zeros(1, 0, dtype=torch.int32),
        prompt_mel=torch.zeros(1, 0, 80),
        flow_embedding=torch.zeros(1, 192),
    )


def _scheduler(**policy) -> Scheduler:
    return Scheduler(
        FakeLM(), lambda condition, draws, speed, stream: FakeSynthesizer(stream), policy=SchedulePolicy(**policy)
    )


def _sequence(text_tokens: int = 5, stream: bool = False, name: str = "") -> Sequence:
    return Sequence([_input(text_tokens)], Draws(0), GreedySampler(), stream, 1.0, request_id=name)


def _prefilled(scheduler: Scheduler, plan: StepPlan, first_token: int = 7, length: int = 10) -> StepOutput:
    """The output of a step that fed every planned prefix completely and picked ``first_token``."""
    out = StepOutput(foreground_s=0.1)
    for feed in plan.feeds:
        out.fed[feed.segment] = (length - feed.segment.prefix_fed, length)
        out.picked[feed.segment] = feed.segment.rules.pick(torch.zeros(SPEECH + 1))
        assert out.picked[feed.segment] is not None
    return out


def _decoded(plan: StepPlan, token: int | None = 3, seconds: float = 0.1) -> StepOutput:
    """A decode step in which every row picked ``token`` (None: every row stopped)."""
    out = StepOutput(foreground_s=seconds, batch_size=len(plan.decode))
    for segment in plan.decode:
        out.picked[segment] = token
    return out


def test_new_requests_feed_their_prefix_then_decode_together():
    scheduler = _scheduler()
    a, b = _sequence(name="a"), _sequence(name="b")
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.schedule()
    assert [f.sequence for f in plan.feeds] == [a, b] and not plan.decode and not plan.audio
    assert all(f.positions == 512 and not f.background for f in plan.feeds)
    scheduler.update(plan, _prefilled(scheduler, plan))
    plan = scheduler.schedule()
    assert not plan.feeds and list(plan.decode) == [a.segments[0], b.segments[0]]
    assert [s.next_input for s in plan.decode] == [0, 0]  # the id the prefill picked (greedy: 0)


def test_a_long_prefix_is_fed_in_pieces_within_the_step_budget():
    scheduler = _scheduler(prefill_chunk=512, prefill_positions_per_step=600)
    long, short = _sequence(name="long"), _sequence(name="short")
    scheduler.add(long)
    scheduler.add(short)
    plan = scheduler.schedule()
    assert [(f.sequence, f.positions) for f in plan.feeds] == [(long, 512), (short, 88)]
    out = StepOutput(foreground_s=1.0)
    out.fed[long.segments[0]] = (512, 1300)
    out.fed[short.segments[0]] = (88, 300)
    scheduler.update(plan, out)
    assert long.segments[0].prefix_fed == 512 and not long.segments[0].prefilled
    plan = scheduler.schedule()
    assert [(f.sequence, f.positions) for f in plan.feeds] == [(long, 512), (short, 88)]


def _running(scheduler: Scheduler, *sequences: Sequence) -> None:
    """Add the sequences and prefill them (one step)."""
    for sequence in sequences:
        scheduler.add(sequence)
    plan = scheduler.schedule()
    scheduler.update(plan, _prefilled(scheduler, plan))


def test_a_live_streams_chunk_runs_whole_and_an_offline_request_waits_for_its_budget():
    scheduler = _scheduler(background_share=0.15)
    offline, stream = _sequence(name="offline"), _sequence(stream=True, name="stream")
    stream.chunks_out = 1  # its first chunk is out (until then no background work runs: see below)
    _running(scheduler, offline, stream)
    # The offline request's decoding ends: its whole audio is due, as background work.
    plan = scheduler.schedule()
    out = _decoded(plan)
    out.picked[offline.segments[0]] = None
    scheduler.update(plan, out)
    assert offline.segments[0].decoded and scheduler.credit == pytest.approx(0.15 * 0.2)  # two steps of 0.1 s
    plan = scheduler.schedule()
    assert plan.release == (offline.segments[0],)  # its LLM state is freed
    assert list(plan.decode) == [stream.segments[0]]
    (work,) = plan.audio
    assert work.sequence is offline and work.last and work.background
    assert work.budget_s == pytest.approx(0.03)  # what the foreground earned
    # The offline job overran its budget (a unit is never cut): no background work until it is repaid.
    out = _decoded(plan, seconds=0.1)
    out.background_s = 0.5
    scheduler.update(plan, out)
    assert scheduler.credit < 0
    plan = scheduler.schedule()
    assert not plan.audio and list(plan.decode) == [stream.segments[0]]
    # The stream reaches its hop: its chunk runs in full, before any offline work, even while paid back.
    for _ in range(3):
        scheduler.update(plan, _decoded(plan, seconds=0.1))
        plan = scheduler.schedule()
    (work,) = plan.audio
    assert work.sequence is stream and not work.last and work.budget_s is None and not work.background


def test_offline_work_already_started_goes_on_first_and_a_finished_chunk_reaches_its_request():
    scheduler = _scheduler(background_share=1.0)
    first, second, stream = _sequence(name="first"), _sequence(name="second"), _sequence(stream=True, name="s")
    stream.chunks_out = 1
    _running(scheduler, first, second, stream)
    plan = scheduler.schedule()
    out = _decoded(plan)
    out.picked[first.segments[0]] = out.picked[second.segments[0]] = None
    scheduler.update(plan, out)
    plan = scheduler.schedule()
    (work,) = plan.audio
    assert work.sequence is first  # arrival order
    scheduler.update(plan, _decoded(plan))  # its job paused at a unit boundary (not in the output)
    plan = scheduler.schedule()
    (work,) = plan.audio
    assert work.sequence is first, "the paused job goes on before another starts"
    out = _decoded(plan)
    chunk = np.ones(10, dtype=np.float32)
    out.audio.append((work, chunk))
    events = scheduler.update(plan, out)
    assert [(seq, c is chunk) for seq, c in events] == [(first, True), (first, False)]  # its last chunk, the end
    assert first not in scheduler.sequences and first.chunks_out == 1
    plan = scheduler.schedule()
    assert [w.sequence for w in plan.audio if w.background] == [second]


def test_no_background_work_runs_or_is_saved_up_while_a_stream_waits_for_its_first_chunk():
    scheduler = _scheduler(background_share=1.0)
    offline, stream = _sequence(name="offline"), _sequence(stream=True, name="stream")
    _running(scheduler, offline, stream)
    plan = scheduler.schedule()
    out = _decoded(plan)
    out.picked[offline.segments[0]] = None  # the offline audio is due
    scheduler.update(plan, out)
    for _ in range(3):
        plan = scheduler.schedule()
        assert not [w for w in plan.audio if w.background] and list(plan.decode) == [stream.segments[0]]
        scheduler.update(plan, _decoded(plan, seconds=0.1))
    assert scheduler.credit == 0.0
    stream.chunks_out = 1  # its first chunk is out: the background earns its share again
    scheduler.update(plan, _decoded(plan, seconds=0.1))
    plan = scheduler.schedule()
    (work,) = [w for w in plan.audio if w.background]
    assert work.sequence is offline and work.budget_s == pytest.approx(0.1)


def test_offline_rows_sit_the_decode_steps_out_until_a_streams_first_chunk():
    scheduler = _scheduler()
    offline, stream = _sequence(name="offline"), _sequence(stream=True, name="stream")
    _running(scheduler, offline)  # decoding before the stream arrives
    _running(scheduler, stream)
    assert offline.segments[0].decoding and stream.segments[0].decoding
    plan = scheduler.schedule()
    assert list(plan.decode) == [stream.segments[0]]
    stream.chunks_out = 1
    plan = scheduler.schedule()
    assert set(plan.decode) == {offline.segments[0], stream.segments[0]}


def test_with_no_foreground_work_the_background_gets_an_idle_slice():
    scheduler = _scheduler(idle_slice_s=0.05)
    offline, stream = _sequence(name="offline"), _sequence(stream=True, name="stream")
    _running(scheduler, offline, stream)
    stream.segments[0].next_input = None  # live, but with nothing to feed or decode (as a bistream row waiting)
    offline.segments[0].decoded = True
    plan = scheduler.schedule()
    work = next(w for w in plan.audio if w.sequence is offline)
    assert work.background and work.budget_s == pytest.approx(0.05)


def test_without_a_live_request_audio_runs_in_slices_first_audio_first():
    scheduler = _scheduler(offline_slice_s=0.5)
    early, late = _sequence(name="early"), _sequence(name="late")
    _running(scheduler, early, late)
    early.chunks_out = 1  # it has audio already; late has none
    early.segments[0].decoded = late.segments[0].decoded = True
    plan = scheduler.schedule()
    assert [w.sequence for w in plan.audio] == [late, early]  # no decoding: every due job
    assert all(w.budget_s == 0.5 and not w.background for w in plan.audio)


def test_a_failed_segment_fails_its_request_only():
    scheduler = _scheduler()
    a, b = _sequence(name="a"), _sequence(name="b")
    _running(scheduler, a, b)
    plan = scheduler.schedule()
    out = _decoded(plan)
    del out.picked[a.segments[0]]
    out.failed[a.segments[0]] = RuntimeError("row a broke")
    segment_a = a.segments[0]
    events = scheduler.update(plan, out)
    assert events == [(a, None)] and isinstance(a.failed, RuntimeError)
    assert scheduler.take_dropped() == [segment_a]  # the runner frees its state
    assert scheduler.sequences == [b] and b.segments[0].next_input == 3


def test_max_len_and_the_stop_id_end_decoding():
    scheduler = _scheduler()
    sequence = _sequence(text_tokens=1)  # at most 20 tokens
    _running(scheduler, sequence)
    segment: Segment = sequence.segments[0]
    for _ in range(19):
        plan = scheduler.schedule()
        assert plan.decode == (segment,)
        scheduler.update(plan, _decoded(plan, token=segment.rules.pick(torch.zeros(SPEECH + 1))))
    assert segment.decoded and len(segment.synthesizer.tokens) == 20
    plan = scheduler.schedule()
    assert not plan.decode and plan.release == (segment,) and plan.audio[0].last
