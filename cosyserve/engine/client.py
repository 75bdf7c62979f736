"""The engine client: the one contract between the HTTP layer and an engine.

:class:`EngineClient` is what every route talks to: submit a :class:`SynthesisRequest` and iterate
its audio asynchronously, abort it, store a voice, and read the model's description, health and
queue/batch state. :class:`AsyncEngine` implements it on an in-process :class:`EngineCore` (one
thread per loaded model); a remote engine (another process, a GPU worker, a Ray replica) would be
another implementation of the same class.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from cosyserve.audio.io import AudioInput
from cosyserve.audio.prompt import PromptLimits
from cosyserve.errors import GenerationFailed, UnsupportedMode

from .core import EngineCore, Overrides, StepModel, Work
from .inputs import TextPreview
from .pronunciations import PronunciationStore
from .request import SynthesisRequest
from .sequence import SegmentMark
from .text_feed import TextFeed
from .voice_library.base import VoiceInfo
from .voices import VoiceCatalog

if TYPE_CHECKING:
    import torch

# What a stats() snapshot holds: counts, and the LLM's recent tokens per second.
EngineStatsDict = dict[str, int | float]


@dataclass(frozen=True)
class ModelInfo:
    """What a client may know of the loaded model."""

    family: str  # cosyvoice1 | cosyvoice2 | cosyvoice3
    sample_rate: int
    model_dir: str
    token_rate: int  # speech tokens per second
    prompt_limits: PromptLimits = field(default_factory=PromptLimits)  # what a prompt recording must be
    precision: Mapping[str, str] = field(default_factory=dict)  # per stage (llm, flow, vocoder): fp32, bf16, int8

    @property
    def name(self) -> str:
        return Path(self.model_dir).name


@dataclass
class SegmentSpan:
    """Where one segment's audio lies in its stream, in samples at the model's rate: ``start`` after the
    silence before it, ``end`` before the silence after it (None until its last chunk came)."""

    index: int
    text: str  # as normalised (what the model read)
    start: int
    end: int | None = None


class AudioStream:
    """One request's audio chunks (float32 at the model's rate), in order.

    Iterating raises :class:`GenerationFailed` if generation breaks midway. :meth:`aclose` (or
    leaving an ``async with``) aborts the request if it is still running. ``segments``: where each text
    segment's audio starts and ends among the samples read so far (the engine's segment marks; the chunks
    are the same with or without them). ``request_id``: what ``previous_request_id`` names it by.
    """

    def __init__(self, request_id: str, queue: asyncio.Queue, abort: Callable[[], None]) -> None:
        self.request_id = request_id
        self._queue = queue
        self._abort = abort
        self.samples = 0
        self.first_chunk_at: float | None = None  # perf_counter() when the first chunk arrived
        self.done = False
        self.segments: list[SegmentSpan] = []

    def __aiter__(self) -> AudioStream:
        return self

    async def __anext__(self) -> np.ndarray:
        if self.done:
            raise StopAsyncIteration
        kind, value = await self._queue.get()
        while kind == "mark":
            self._mark(value)
            kind, value = await self._queue.get()
        if kind == "chunk":
            if self.first_chunk_at is None:
                self.first_chunk_at = time.perf_counter()
            chunk = np.asarray(value, dtype=np.float32)
            self.samples += chunk.shape[0]
            return chunk
        self.done = True
        if kind == "failed":
            raise GenerationFailed(f"generation failed (request {self.request_id}): {value}")
        raise StopAsyncIteration

    def _mark(self, mark: SegmentMark) -> None:
        if not mark.end:
            self.segments.append(SegmentSpan(mark.index, mark.text, self.samples))
        elif self.segments and self.segments[-1].index == mark.index:
            self.segments[-1].end = self.samples

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self._abort()

    async def __aenter__(self) -> AudioStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class TextTokenizer(Protocol):
    def tokenize(self, text: str) -> torch.Tensor:
        """Text ids, shape (1, L)."""
        ...


class ServedModel(StepModel, Protocol):
    """What :class:`AsyncEngine` needs of a loaded model (``TTSModel`` is one): its description, its
    voices, its text tokenizer, and what the engine core steps."""

    @property
    def family(self) -> str: ...

    @property
    def sample_rate(self) -> int: ...

    @property
    def token_rate(self) -> int: ...

    @property
    def model_dir(self) -> Path: ...

    @property
    def prompt_limits(self) -> PromptLimits: ...

    @property
    def modes(self) -> frozenset[str]: ...

    @property
    def bistream_modes(self) -> frozenset[str]: ...

    @property
    def voices(self) -> VoiceCatalog: ...

    @property
    def frontend(self) -> TextTokenizer: ...

    @property
    def pronunciations(self) -> PronunciationStore: ...

    def preview(self, request: SynthesisRequest) -> TextPreview: ...

    @property
    def precision(self) -> Mapping[str, str]:
        """The dtype each stage runs in (llm, flow, vocoder)."""
        ...

    def list_speakers(self) -> list[str]: ...

    def add_speaker(self, spk_id: str, prompt_text: str | None, prompt_audio: AudioInput) -> object: ...


class EngineClient(ABC):
    """The engine as the HTTP layer sees it."""

    @property
    @abstractmethod
    def info(self) -> ModelInfo: ...

    @property
    @abstractmethod
    def modes(self) -> frozenset[str]:
        """The modes it can serve now (sft appears once it has a speaker or a stored voice)."""

    @property
    @abstractmethod
    def voices(self) -> VoiceCatalog:
        """The voices (built-in speakers + the library's) this model can use."""

    @abstractmethod
    async def synthesize(self, request: SynthesisRequest, request_id: str | None = None) -> AudioStream:
        """Queue a request; returns once its frontend ran (raising its validation error, or
        ServerBusy when the queue is full), with the stream of its audio."""

    @property
    def bistream_modes(self) -> frozenset[str]:
        """The modes it serves with streamed text (:meth:`synthesize_bistream`); none by default."""
        return frozenset()

    @property
    def pronunciations(self) -> PronunciationStore:
        """The stored pronunciation lexicon as this model sees it (in the voice library's database)."""
        raise UnsupportedMode("this engine keeps no pronunciation lexicon", param="word")

    async def synthesize_bistream(
        self, request: SynthesisRequest, text: TextFeed, request_id: str | None = None
    ) -> AudioStream:
        """As :meth:`synthesize`, with the text arriving over time (bi-streaming, CosyVoice2/3): the
        caller appends fragments to ``text`` and closes it; ``request.text``, if any, comes first.
        Audio starts before the text is complete. Raises UnsupportedMode where it is not served."""
        raise UnsupportedMode("this engine does not take streamed text input", param="text")

    @abstractmethod
    async def preview(self, request: SynthesisRequest) -> TextPreview:
        """What ``request``'s text becomes (its mode, its segments as they will be synthesised), without
        generating; raises the 4xx the request would."""

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    async def add_voice(
        self, name: str, ref_text: str | None, audio: AudioInput, request_id: str | None = None
    ) -> VoiceInfo:
        """Compute and store a voice (runs on the engine, queued like a synthesis); its metadata."""

    @abstractmethod
    def count_text_tokens(self, text: str) -> int:
        """The text ids ``text`` makes (as the LLM reads it, without normalisation)."""

    @abstractmethod
    def stats(self) -> EngineStatsDict:
        """Queue depth, running requests, batch size, LLM tokens/s."""

    async def close(self) -> None:  # noqa: B027 - optional for implementations without resources
        """Stop the engine (pending requests fail)."""

    def list_speakers(self) -> list[str]:
        return list(self.voices.ids())


class _QueueSink:
    """Carries engine-thread events into the client's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.ready: asyncio.Future = loop.create_future()

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        # RuntimeError: the loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def _resolve(self, error: BaseException | None) -> None:
        if not self.ready.done():
            if error is None:
                self.ready.set_result(None)
            else:
                self.ready.set_exception(error)

    def started(self) -> None:
        self._call(self._resolve, None)

    def rejected(self, error: BaseException) -> None:
        self._call(self._resolve, error)

    def chunk(self, audio: Any) -> None:
        self._call(self._resolve, None)
        self._call(self.queue.put_nowait, ("chunk", audio))

    def mark(self, mark: SegmentMark) -> None:
        self._call(self.queue.put_nowait, ("mark", mark))

    def failed(self, error: BaseException) -> None:
        self._call(self._resolve, None)
        self._call(self.queue.put_nowait, ("failed", error))

    def finished(self) -> None:
        self._call(self._resolve, None)
        self._call(self.queue.put_nowait, ("end", None))


class AsyncEngine(EngineClient):
    """An :class:`EngineCore` in this process, driven from the event loop."""

    def __init__(self, model: ServedModel, max_running: int = 8, max_queue: int = 64) -> None:
        self.model = model
        self.core = EngineCore(model, max_running, max_queue, name=f"engine-{model.family}").start()
        m = model  # what it is does not change once loaded
        self._info = ModelInfo(
            m.family, m.sample_rate, str(m.model_dir), m.token_rate, m.prompt_limits, dict(m.precision)
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def modes(self) -> frozenset[str]:
        return self.model.modes

    @property
    def voices(self) -> VoiceCatalog:
        return self.model.voices

    @property
    def bistream_modes(self) -> frozenset[str]:
        return self.model.bistream_modes

    @property
    def pronunciations(self) -> PronunciationStore:
        return self.model.pronunciations

    def list_speakers(self) -> list[str]:
        return list(self.model.list_speakers())

    async def synthesize(
        self, request: SynthesisRequest, request_id: str | None = None, **overrides: Any
    ) -> AudioStream:
        return await self._submit(request, request_id, None, overrides)

    async def synthesize_bistream(
        self, request: SynthesisRequest, text: TextFeed, request_id: str | None = None, **overrides: Any
    ) -> AudioStream:
        return await self._submit(request, request_id, text, overrides)

    async def _submit(
        self, request: SynthesisRequest, request_id: str | None, text: TextFeed | None, overrides: dict[str, Any]
    ) -> AudioStream:
        request_id = request_id or uuid.uuid4().hex
        sink = _QueueSink(asyncio.get_running_loop())
        work = Work(request_id, sink, request=request, overrides=cast(Overrides, overrides), text_feed=text, marks=True)
        self.core.submit(work)
        try:
            await sink.ready  # the frontend ran; its validation error is raised here
        except asyncio.CancelledError:
            self.core.abort(request_id)
            raise
        return AudioStream(request_id, sink.queue, lambda: self.core.abort(request_id))

    async def preview(self, request: SynthesisRequest) -> TextPreview:
        # Off the event loop: normalisation and a stored lexicon's first read take milliseconds to seconds.
        return await asyncio.to_thread(self.model.preview, request)

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def add_voice(
        self, name: str, ref_text: str | None, audio: AudioInput, request_id: str | None = None
    ) -> VoiceInfo:
        sink = _QueueSink(asyncio.get_running_loop())

        def store() -> VoiceInfo:
            self.model.add_speaker(name, ref_text, audio)
            return self.model.voices.info(name)

        self.core.submit(Work(request_id or uuid.uuid4().hex, sink, task=store))
        await sink.ready
        kind, value = await sink.queue.get()  # a task's result comes as its one chunk
        if kind != "chunk" or not isinstance(value, VoiceInfo):
            raise GenerationFailed(f"storing the voice '{name}' failed: {value}")
        return value

    def count_text_tokens(self, text: str) -> int:
        return int(self.model.frontend.tokenize(text).shape[-1])

    def stats(self) -> EngineStatsDict:
        return asdict(self.core.stats())

    async def close(self) -> None:
        self.core.stop()
