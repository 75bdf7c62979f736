"""No stage stalls another, on the tiny golden models: an offline request's audio runs a unit at a time
beside a live stream (and comes out as it does alone); a new request's frontend runs in the frontend
pool while others decode, and its failure touches nobody else; an abort during the frontend, the
decoding or a paused audio job frees everything."""

from __future__ import annotations

import threading
import time
from functools import cache

import numpy as np
import pytest
from golden import TEST_DEVICE, model_dir

from cosyserve.engine.core import EngineCore, Work
from cosyserve.engine.pipeline import TTSModel, load_model
from cosyserve.engine.request import GenerationOptions, SynthesisRequest
from cosyserve.errors import AudioError

pytestmark = pytest.mark.slow

LONG_TEXT = "今天天气真好，我们一起去公园散步吧。" * 3
STREAM_TEXT = "这是一个比较长的句子，用来测试不同长度的请求在同一个批次里面的表现。" * 2


@cache
def _model(name: str) -> TTSModel:
    return load_model(model_dir(name), text_frontend="none", device=TEST_DEVICE)


def _sft(model: TTSModel, text: str, seed: int, stream: bool = False) -> SynthesisRequest:
    options = GenerationOptions(seed=seed, stream=stream, text_frontend=False)
    return SynthesisRequest("sft", text, spk_id=model.list_speakers()[0], options=options)


class Replay:
    """Picks the ids a first run recorded (the same tokens whoever shares the batch), then the stop id."""

    def __init__(self, model: TTSModel, seed: int) -> None:
        self.inner = model.lm.make_sampler(None)
        self.inner.generator.manual_seed(seed)
        self.recorded: list[int] = []
        self.replaying: list[int] | None = None

    def __call__(self, logp, history):
        if self.replaying is not None:
            return self.replaying.pop(0)
        token = self.inner(logp, history)
        self.recorded.append(int(token))
        return token

    def replay(self) -> Replay:
        self.replaying = list(self.recorded)
        return self


@pytest.mark.parametrize("name", ["v1-tiny", "v2-tiny", "v3-tiny"])
def test_offline_audio_runs_in_units_beside_a_stream_and_equals_its_audio_alone(name):
    model = _model(name)
    sampler = Replay(model, seed=5)
    alone = np.concatenate(list(model.synthesize(_sft(model, LONG_TEXT, seed=5), sampler=sampler)))
    loop = model.new_loop()
    offline = model.prepare(_sft(model, LONG_TEXT, seed=5), sampler=sampler.replay())
    # Long enough to stay live well after its first chunk (until which no background work runs).
    stream = model.prepare(_sft(model, STREAM_TEXT * 3, seed=6, stream=True))
    loop.add(offline)
    loop.add(stream)
    chunks: dict[str, list[np.ndarray]] = {"offline": [], "stream": []}
    paused_steps = 0
    while loop.has_work:
        for sequence, chunk in loop.step():
            assert sequence.failed is None, sequence.failed
            if chunk is not None:
                chunks["offline" if sequence is offline else "stream"].append(chunk)
        paused_steps += loop.runner.paused_jobs > 0
    assert paused_steps >= 3, "the offline audio never paused between units"
    assert chunks["stream"] and loop.runner.idle
    np.testing.assert_allclose(np.concatenate(chunks["offline"]), alone, atol=1e-6, rtol=0)


def test_abort_of_a_paused_audio_job_frees_it():
    model = _model("v2-tiny")
    loop = model.new_loop()
    offline = model.prepare(_sft(model, LONG_TEXT, seed=1))
    stream = model.prepare(_sft(model, STREAM_TEXT * 2, seed=2, stream=True))
    loop.add(offline)
    loop.add(stream)
    for _ in range(2000):
        loop.step()
        if loop.runner.paused_jobs:
            break
    assert loop.runner.paused_jobs == 1, "no audio job paused"
    loop.remove(offline)
    assert loop.runner.paused_jobs == 0
    loop.remove(stream)
    assert loop.runner.idle and not loop.has_work


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.done = threading.Event()

    def started(self):
        self.events.append(("started", time.monotonic()))

    def chunk(self, audio):
        self.events.append(("chunk", time.monotonic()))

    def _end(self, kind, value=None):
        self.events.append((kind, value))
        self.done.set()

    def rejected(self, error):
        self._end("rejected", error)

    def failed(self, error):
        self._end("failed", error)

    def finished(self):
        self._end("finished")


class SlowFrontend:
    """The model, whose frontend takes ``delay`` seconds (it runs in the frontend pool)."""

    def __init__(self, model: TTSModel, delay: float) -> None:
        self._model, self.delay, self.prepared_on = model, delay, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def prepare(self, request, **kwargs):
        self.prepared_on.append(threading.current_thread().name)
        time.sleep(self.delay)
        return self._model.prepare(request, **kwargs)


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_a_frontend_runs_beside_the_decoding_of_the_others():
    model = SlowFrontend(_model("v2-tiny"), delay=0.0)
    core = EngineCore(model, max_running=4, max_queue=4).start()
    try:
        running = _Sink()
        core.submit(Work("running", running, request=_sft(model, STREAM_TEXT * 3, seed=1, stream=True)))
        _wait(lambda: core.scheduler.llm_steps >= 3, 30, "decoding to start")
        model.delay = 1.0
        steps = core.scheduler.llm_steps
        late = _Sink()
        core.submit(Work("late", late, request=_sft(model, "你好。", seed=2)))
        time.sleep(0.8)  # the late request is still in its frontend
        assert not late.events, "the late frontend cannot be done yet"
        assert core.scheduler.llm_steps > steps + 5, "decoding stalled while a frontend ran"
        assert all(name.startswith("cosyserve-") and "frontend" in name for name in model.prepared_on)
        for sink in (running, late):
            assert sink.done.wait(120) and sink.events[-1][0] == "finished"
    finally:
        core.stop()


def test_a_failing_frontend_touches_no_running_request():
    model = _model("v2-tiny")
    core = EngineCore(model, max_running=4, max_queue=4).start()
    try:
        running = _Sink()
        core.submit(Work("running", running, request=_sft(model, STREAM_TEXT, seed=1, stream=True)))
        _wait(lambda: core.scheduler.llm_steps >= 2, 30, "decoding to start")
        bad = _Sink()
        not_audio = SynthesisRequest("zero_shot", "你好。", prompt_text="你好。", prompt_audio=b"not audio at all")
        core.submit(Work("bad", bad, request=not_audio))
        assert bad.done.wait(30)
        kind, error = bad.events[-1]
        assert kind == "rejected" and isinstance(error, AudioError)
        assert running.done.wait(120) and running.events[-1][0] == "finished"
        assert sum(kind == "chunk" for kind, _ in running.events) >= 2
        _wait(lambda: core.loop.runner.idle and core.stats().running == 0, 10, "the engine to go idle")
    finally:
        core.stop()


def test_abort_during_the_frontend_frees_its_slot():
    model = SlowFrontend(_model("v2-tiny"), delay=0.5)
    core = EngineCore(model, max_running=1, max_queue=2).start()
    try:
        sink = _Sink()
        core.submit(Work("gone", sink, request=_sft(model, LONG_TEXT, seed=1)))
        _wait(lambda: model.prepared_on, 10, "its frontend to start")
        core.abort("gone")
        assert sink.done.wait(10) and sink.events == [("finished", None)]
        _wait(lambda: core.stats().running == 0, 10, "its slot to be freed")
        time.sleep(0.7)  # its frontend returns: the sequence never joins
        assert not core.loop.has_work and core.loop.runner.idle
        model.delay = 0.0
        after = _Sink()
        core.submit(Work("after", after, request=_sft(model, "你好。", seed=2)))  # the one slot is free
        assert after.done.wait(60) and after.events[-1][0] == "finished"
    finally:
        core.stop()
