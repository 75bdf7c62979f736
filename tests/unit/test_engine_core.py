"""The engine core on the tiny golden models: batched decoding equals solo decoding, requests join and
leave the batch at any step, aborts free their slot, one failure leaves the others running, and the
golden end-to-end cases come out right while other requests share the batch."""

from __future__ import annotations

import asyncio
import threading
import time
from functools import cache

import numpy as np
import pytest
import torch
from golden import TEST_DEVICE, assert_close, model_dir

from cosyserve.engine.client import AsyncEngine
from cosyserve.engine.core import EngineCore, Work
from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.errors import ServerBusy
from cosyserve.nn.sampling import GreedySampler

LOGP_ATOL = 1e-4  # the golden LLM tolerance (golden README, "llm logp")
FAMILIES = ("v1-tiny", "v2-tiny", "v3-tiny")
TEXTS = (
    "今天天气真好，我们一起去公园散步吧。",
    "Hello there, how are you doing today?",
    "这是一个比较长的句子，用来测试不同长度的请求在同一个批次里面的表现。",
    "Short one.",
)


@cache
def _model(name: str) -> TTSModel:
    return load_model(model_dir(name), text_frontend="none", device=TEST_DEVICE)


def _sft(model: TTSModel, text: str, seed: int = 0, stream: bool = False) -> SynthesisRequest:
    options = GenerationOptions(seed=seed, stream=stream)
    return SynthesisRequest("sft", text, spk_id=model.list_speakers()[0], options=options)


class RecordingSampler:
    """Greedy picks; records the log-probs it was given (masked as the engine masks them)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, logp: torch.Tensor, history: list[int]) -> int:
        self.rows.append(logp.detach().clone())
        return GreedySampler()(logp, history)


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_logprobs_equal_solo(name):
    """Each request decoded inside a batch of others with different lengths, joining at different
    steps, sees the log-probs it sees alone (within the golden LLM tolerance)."""
    model = _model(name)
    solo = []
    for text in TEXTS:
        sampler = RecordingSampler()
        list(model.synthesize(_sft(model, text), sampler=sampler))
        solo.append(sampler)
    loop = model.new_loop()
    batched = [RecordingSampler() for _ in TEXTS]
    sequences = [model.prepare(_sft(model, t), sampler=s) for t, s in zip(TEXTS, batched, strict=True)]
    join_at = {0: 0, 1: 0, 2: 3, 3: 7}  # requests 2 and 3 arrive while the others decode
    sizes, step = [], 0
    while step == 0 or loop.has_work:
        for i, at in join_at.items():
            if at == step:
                loop.add(sequences[i])
        loop.step()
        sizes.append(loop.scheduler.last_batch_size)
        step += 1
    assert max(sizes) >= 3, f"the batch never held several rows: {sizes}"
    for i, (alone, together) in enumerate(zip(solo, batched, strict=True)):
        assert len(alone.rows) == len(together.rows), (
            f"request {i}: {len(together.rows)} steps, alone {len(alone.rows)}"
        )
        for k, (a, b) in enumerate(zip(alone.rows, together.rows, strict=True)):
            finite = torch.isfinite(a)
            assert torch.equal(finite, torch.isfinite(b))
            assert_close(b[finite], a[finite].numpy(), LOGP_ATOL, f"request {i} step {k} logp")
    assert loop.runner.idle and not loop.sequences, "rows left behind"


@pytest.mark.parametrize("name", FAMILIES)
def test_seeded_tokens_same_solo_and_batched(name):
    """A seeded request picks the same tokens whoever shares its batch, but for rare near-ties: 24 seeds,
    4 per batch, joining at different steps. Batched float32 sums differ from solo ones in the last bits
    (log-probs within 1.5e-5), so a sampled id can flip where two cumulative probabilities nearly tie."""
    model = _model(name)
    llm = model.core.llm
    flips = 0
    seeds = list(range(24))
    for group in range(0, len(seeds), 4):
        batch = seeds[group : group + 4]
        picks: dict[int, list[list[int]]] = {}
        for seed in batch:
            tokens: list[int] = []
            sampler = llm.make_sampler(torch.Generator().manual_seed(seed))
            list(model.synthesize(_sft(model, TEXTS[seed % 3], seed), sampler=_tap(sampler, tokens)))
            picks[seed] = [tokens]
        loop = model.new_loop()
        waiting = []
        for seed in batch:
            tokens = []
            picks[seed].append(tokens)
            sampler = llm.make_sampler(torch.Generator().manual_seed(seed))
            waiting.append(model.prepare(_sft(model, TEXTS[seed % 3], seed), sampler=_tap(sampler, tokens)))
        step = 0
        while waiting or loop.has_work:
            if waiting and step % 2 == 0:  # one joins every other step: rows of different lengths
                loop.add(waiting.pop(0))
            loop.step()
            step += 1
        flips += sum(alone != together for alone, together in picks.values())
    print(f"{name}: {flips} of {len(seeds)} seeded requests picked another token in a batch")
    assert flips <= 2, f"{flips} of {len(seeds)} seeded requests picked other tokens in a batch"


def _tap(sampler, tokens: list[int]):
    def pick(logp, history):
        token = sampler(logp, history)
        tokens.append(int(token))
        return token

    return pick


# -- the core: threads, admission, aborts, failures ------------------------------------------------


class CollectingSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.done = threading.Event()

    def started(self):
        self.events.append(("started", None))

    def rejected(self, error):
        self.events.append(("rejected", error))
        self.done.set()

    def chunk(self, audio):
        self.events.append(("chunk", audio))

    def failed(self, error):
        self.events.append(("failed", error))
        self.done.set()

    def finished(self):
        self.events.append(("finished", None))
        self.done.set()

    def audio(self) -> np.ndarray:
        return np.concatenate([a for kind, a in self.events if kind == "chunk"])


class OrderedSink(CollectingSink):
    def __init__(self, order: list[int], index: int) -> None:
        super().__init__()
        self.order, self.index = order, index

    def finished(self):
        self.order.append(self.index)
        super().finished()


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_requests_join_a_running_batch_and_aborts_free_their_row():
    model = _model("v2-tiny")
    core = EngineCore(model, max_running=4, max_queue=4).start()
    try:
        long_text = "，".join(TEXTS[:3]) * 2
        first = CollectingSink()
        core.submit(Work("first", first, request=_sft(model, long_text, seed=1, stream=True)))
        _wait(lambda: core.scheduler.llm_steps >= 3, 30, "the first request to decode")
        second, victim = CollectingSink(), CollectingSink()
        core.submit(Work("second", second, request=_sft(model, TEXTS[1], seed=2)))
        core.submit(Work("victim", victim, request=_sft(model, long_text, seed=3, stream=True)))
        _wait(lambda: len(core.loop.runner.batch) >= 2 and "victim" in core.running_ids(), 30, "requests to join")
        core.abort("victim")
        _wait(lambda: victim.done.is_set(), 10, "the abort")
        assert victim.events[-1][0] == "finished"
        assert "victim" not in core.running_ids()
        assert all(s.request_id != "victim" for s in core.loop.sequences)
        assert len(core.loop.runner.batch) <= 2, "its batch row was not freed"
        for sink in (first, second):
            assert sink.done.wait(120), "a request did not finish"
            assert sink.events[-1][0] == "finished" and sink.audio().size > 0
        _wait(lambda: not core.scheduler.has_work, 10, "the engine to go idle")
        assert core.loop.runner.idle and core.stats().running == 0
        # The same seeded requests alone give the same audio.
        alone = np.concatenate(list(model.synthesize(_sft(model, TEXTS[1], seed=2))))
        np.testing.assert_allclose(second.audio(), alone, atol=1e-4)
    finally:
        core.stop()


def test_a_failing_request_leaves_the_others_running(monkeypatch):
    model = _model("v2-tiny")
    core = EngineCore(model, max_running=4, max_queue=4).start()
    try:
        original = type(model.core.flow).tokens_to_mel
        calls = {"n": 0}

        def flaky(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected flow failure")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(model.core.flow), "tokens_to_mel", flaky)
        sinks = [CollectingSink() for _ in range(3)]
        for i, sink in enumerate(sinks):
            core.submit(Work(f"r{i}", sink, request=_sft(model, TEXTS[i], seed=i)))
        for sink in sinks:
            assert sink.done.wait(120)
        outcomes = sorted(sink.events[-1][0] for sink in sinks)
        assert outcomes == ["failed", "finished", "finished"], outcomes
        assert core.alive and core.stats().running == 0
    finally:
        core.stop()


def test_admission_is_first_come_first_served_and_bounded():
    model = _model("v2-tiny")
    core = EngineCore(model, max_running=1, max_queue=3).start()
    try:
        order: list[int] = []
        sinks = [OrderedSink(order, i) for i in range(4)]
        for i, sink in enumerate(sinks):
            core.submit(Work(f"r{i}", sink, request=_sft(model, TEXTS[0], seed=i)))
        with pytest.raises(ServerBusy) as busy:
            core.submit(Work("r4", CollectingSink(), request=_sft(model, TEXTS[0])))
        assert busy.value.retry_after > 0
        for sink in sinks:
            assert sink.done.wait(120)
        assert order == [0, 1, 2, 3], f"not served in arrival order: {order}"
    finally:
        core.stop()


def test_voice_creation_waits_in_the_same_queue():
    model = _model("v2-tiny")
    core = EngineCore(model, max_running=1, max_queue=1).start()
    try:
        running, waiting = CollectingSink(), CollectingSink()
        core.submit(Work("a", running, request=_sft(model, TEXTS[2], seed=1)))
        core.submit(Work("b", waiting, request=_sft(model, TEXTS[2], seed=2)))
        with pytest.raises(ServerBusy):
            core.submit(Work("voice", CollectingSink(), task=lambda: None))
        assert running.done.wait(120) and waiting.done.wait(120)
    finally:
        core.stop()


def test_async_client_streams_and_aborts_on_close():
    model = _model("v1-tiny")
    engine = AsyncEngine(model, max_running=2, max_queue=2)

    async def scenario():
        stream = await engine.synthesize(_sft(model, TEXTS[2] * 4, seed=5, stream=True), "s1")
        first = await stream.__anext__()
        await stream.aclose()
        return first

    try:
        first = asyncio.run(scenario())
        assert first.size > 0
        _wait(lambda: engine.core.stats().running == 0, 10, "the closed stream's request to be dropped")
        assert not engine.core.scheduler.has_work
    finally:
        engine.core.stop()


def test_abort_of_a_long_non_streaming_request_takes_effect_within_a_second():
    model = _model("v2-tiny")
    core = EngineCore(model, max_running=2, max_queue=2).start()
    try:
        sink = CollectingSink()
        long_text = "我们一起去公园散步吧" * 100  # one long sentence: minutes of tokens, no audio until the end
        core.submit(Work("long", sink, request=_sft(model, long_text, seed=1)))
        _wait(lambda: core.scheduler.llm_steps >= 5, 60, "decoding to start")
        aborted_at = time.monotonic()
        core.abort("long")
        assert sink.done.wait(5)
        _wait(lambda: core.stats().running == 0 and not core.scheduler.has_work, 5, "the request to leave")
        assert time.monotonic() - aborted_at < 1.0
        assert [kind for kind, _ in sink.events] == ["started", "finished"], "no audio, a clean end"
        assert core.loop.runner.idle
    finally:
        core.stop()


class _BrokenLoop:
    """A generation loop whose interface fails: a bug in the engine loop itself."""

    has_work = False

    def bind_thread(self):
        pass

    @property
    def runnable(self):
        raise RuntimeError("scheduler bug")

    def add(self, sequence):
        pass

    def remove(self, sequence):
        pass


class _BrokenModel:
    def new_loop(self):
        return _BrokenLoop()

    def prepare(self, request, **kwargs):
        return object()


def test_a_failing_engine_loop_fails_its_requests_instead_of_hanging():
    core = EngineCore(_BrokenModel(), max_running=2, max_queue=4).start()
    sink = CollectingSink()
    core.submit(Work("r", sink, request=_sft_request()))
    assert sink.done.wait(10), "the request was left hanging"
    assert sink.events[-1][0] == "failed"
    core._thread.join(5)
    assert not core.alive
    with pytest.raises(ServerBusy):
        core.submit(Work("late", CollectingSink(), request=_sft_request()))


def _sft_request() -> SynthesisRequest:
    return SynthesisRequest("sft", "hello", spk_id="a")
