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
from typing import Any

import numpy as np

from cosyserve.audio.prompt import PromptLimits
from cosyserve.errors import GenerationFailed, UnsupportedMode

from .core import EngineCore, Work
from .request import SynthesisRequest
from .text_feed import TextFeed


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


class AudioStream:
    """One request's audio chunks (float32 at the model's rate), in order.

    Iterating raises :class:`GenerationFailed` if generation breaks midway. :meth:`aclose` (or
    leaving an ``async with``) aborts the request if it is still running.
    """

    def __init__(self, request_id: str, queue: asyncio.Queue, abort: Callable[[], None]) -> None:
        self.request_id = request_id
        self._queue = queue
        self._abort = abort
        self.samples = 0
        self.first_chunk_at: float | None = None  # perf_counter() when the first chunk arrived
        self.done = False

    def __aiter__(self) -> AudioStream:
        return self

    async def __anext__(self) -> np.ndarray:
        if self.done:
            raise StopAsyncIteration
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

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self._abort()

    async def __aenter__(self) -> AudioStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


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
    def voices(self) -> Any:
        """The voice store (built-in speakers + the library) this model can use."""

    @abstractmethod
    async def synthesize(self, request: SynthesisRequest, request_id: str | None = None) -> AudioStream:
        """Queue a request; returns once its frontend ran (raising its validation error, or
        ServerBusy when the queue is full), with the stream of its audio."""

    @property
    def bistream_modes(self) -> frozenset[str]:
        """The modes it serves with streamed text (:meth:`synthesize_bistream`); none by default."""
        return frozenset()

    async def synthesize_bistream(
        self, request: SynthesisRequest, text: TextFeed, request_id: str | None = None
    ) -> AudioStream:
        """As :meth:`synthesize`, with the text arriving over time (bi-streaming, CosyVoice2/3): the
        caller appends fragments to ``text`` and closes it; ``request.text``, if any, comes first.
        Audio starts before the text is complete. Raises UnsupportedMode where it is not served."""
        raise UnsupportedMode("this engine does not take streamed text input", param="text")

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abstractmethod
    async def add_voice(self, name: str, ref_text: str | None, audio: Any, request_id: str | None = None) -> Any:
        """Compute and store a voice (runs on the engine, queued like a synthesis); its VoiceInfo."""

    @abstractmethod
    def count_text_tokens(self, text: str) -> int: ...

    @abstractmethod
    def stats(self) -> dict[str, Any]:
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

    def failed(self, error: BaseException) -> None:
        self._call(self._resolve, None)
        self._call(self.queue.put_nowait, ("failed", error))

    def finished(self) -> None:
        self._call(self._resolve, None)
        self._call(self.queue.put_nowait, ("end", None))


class AsyncEngine(EngineClient):
    """An :class:`EngineCore` in this process, driven from the event loop."""

    def __init__(self, model: Any, max_running: int = 8, max_queue: int = 64) -> None:
        self.model = model
        self.core = EngineCore(model, max_running, max_queue, name=f"engine-{model.family}").start()

    @property
    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(
            m.family, m.sample_rate, str(m.model_dir), getattr(m, "token_rate", 25), m.prompt_limits, m.precision
        )

    @property
    def modes(self) -> frozenset[str]:
        return self.model.modes

    @property
    def voices(self) -> Any:
        return self.model.voices

    @property
    def bistream_modes(self) -> frozenset[str]:
        return getattr(self.model, "bistream_modes", frozenset())

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
        work = Work(request_id, sink, request=request, overrides=overrides, text_feed=text)
        self.core.submit(work)
        try:
            await sink.ready  # the frontend ran; its validation error is raised here
        except asyncio.CancelledError:
            self.core.abort(request_id)
            raise
        return AudioStream(request_id, sink.queue, lambda: self.core.abort(request_id))

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    async def add_voice(self, name: str, ref_text: str | None, audio: Any, request_id: str | None = None) -> Any:
        sink = _QueueSink(asyncio.get_running_loop())

        def store() -> Any:
            self.model.add_speaker(name, ref_text, audio)
            return self.model.voices.info(name)

        self.core.submit(Work(request_id or uuid.uuid4().hex, sink, task=store))
        await sink.ready
        _, value = await sink.queue.get()
        return value

    def count_text_tokens(self, text: str) -> int:
        frontend = getattr(self.model, "frontend", None)
        return int(frontend.tokenize(text).shape[-1]) if frontend is not None else 0

    def stats(self) -> dict[str, Any]:
        return asdict(self.core.stats())

    async def close(self) -> None:
        self.core.stop()
