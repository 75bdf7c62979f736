"""Voice continuity: a segment conditioned on the one spoken before it.

In zero_shot the LLM continues "prompt text + text" after "prompt speech tokens", and the flow continues
the prompt mel. With continuity on, each segment after the first also carries the previous segment: its
text ids are appended to the prompt text, the speech ids the LLM picked for it to the LLM's prompt speech,
and the ids the flow turned into audio with their mel (before any speed change) to the flow's prompt. The
prompt speech stays within what the family allows a prompt (:class:`PromptLimits`' ``max_seconds`` at the
token rate, the speech tokenizer's 30 s): the previous segment is trimmed from its oldest end.

A finished request's last segment is kept in :class:`ContinuityStore` (per owner, the API key's id, for
a bounded time, count and size: :data:`CONTINUITY_LIMITS`) so that a later request can continue it
(``previous_request_id``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cosyserve.errors import PreviousRequestNotFound

from .inputs import SegmentInput


@dataclass(frozen=True)
class ContinuityLimits:
    """How much of the finished requests' last segments the engine keeps (one store per model)."""

    max_entries: int = 512
    max_bytes: int = 64 << 20
    ttl_s: float = 900.0


CONTINUITY_LIMITS = ContinuityLimits()


@dataclass(frozen=True, eq=False)
class SegmentContext:
    """What a segment leaves for the next one: its text ids (without the family's system prompt), the
    speech ids the LLM picked, the ids the flow turned into audio and their mel, all on the CPU."""

    text: Tensor  # (1, L) int32
    speech: Tensor  # (1, P) int32
    flow_speech: Tensor  # (1, Pf) int32
    mel: Tensor  # (1, T, C) float32, before any speed change

    @classmethod
    def of(cls, text: Tensor, speech: list[int], flow_speech: list[int], mel: Tensor | None) -> SegmentContext | None:
        """A finished segment's context (None when it made no speech: nothing to continue)."""
        if not speech or mel is None or not flow_speech:
            return None
        return cls(
            text.detach().to("cpu", torch.int32).reshape(1, -1),
            torch.tensor([speech], dtype=torch.int32),
            torch.tensor([flow_speech], dtype=torch.int32),
            mel.detach().to("cpu", torch.float32).transpose(1, 2).contiguous(),  # (1, C, T) -> (1, T, C)
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.text, self.speech, self.flow_speech, self.mel))

    def trimmed(self, llm_room: int, flow_room: int) -> SegmentContext | None:
        """The newest part that fits ``llm_room`` LLM prompt ids and ``flow_room`` flow prompt ids (its text
        and mel cut in proportion); None when nothing fits."""
        p, pf = self.speech.shape[1], self.flow_speech.shape[1]
        keep, keep_flow = min(p, llm_room), min(pf, flow_room)
        if keep <= 0 or keep_flow <= 0:
            return None
        if keep == p and keep_flow == pf:
            return self
        length, frames = self.text.shape[1], self.mel.shape[1]
        text_keep = math.ceil(length * keep / p)
        frames_keep = round(frames * keep_flow / pf)
        return SegmentContext(
            self.text[:, length - text_keep :],
            self.speech[:, p - keep :],
            self.flow_speech[:, pf - keep_flow :],
            self.mel[:, frames - frames_keep :],
        )


def continued_input(model_input: SegmentInput, lead: int, context: SegmentContext, max_prompt: int) -> SegmentInput:
    """``model_input`` continuing ``context``: the previous text after the prompt text (and after the
    ``lead`` system-prompt ids at the head of the segment's text, which move to the prompt text), the
    previous speech after the prompt speech, the previous mel after the prompt mel; the prompts stay
    within ``max_prompt`` speech ids (the previous segment trimmed from its oldest end)."""
    x = model_input
    ctx = context.trimmed(max_prompt - x.llm_prompt_speech.shape[1], max_prompt - x.flow_prompt_speech.shape[1])
    if ctx is None:
        return x
    mel = ctx.mel.to(x.prompt_mel.dtype)
    return SegmentInput(
        x.text[:, lead:],
        torch.cat([x.prompt_text, x.text[:, :lead], ctx.text.to(x.prompt_text.dtype)], dim=1),
        torch.cat([x.llm_prompt_speech, ctx.speech.to(x.llm_prompt_speech.dtype)], dim=1),
        x.llm_embedding,
        torch.cat([x.flow_prompt_speech, ctx.flow_speech.to(x.flow_prompt_speech.dtype)], dim=1),
        torch.cat([x.prompt_mel, mel], dim=1),
        x.flow_embedding,
        x.source_speech,
    )


class ContinuityStore:
    """Finished requests' last segments by (owner, request id), bounded by :class:`ContinuityLimits`
    (the oldest go first); thread-safe (the engine thread puts, the frontend pool gets)."""

    def __init__(self, limits: ContinuityLimits = CONTINUITY_LIMITS, clock: Callable[[], float] | None = None) -> None:
        self.limits = limits
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], tuple[float, SegmentContext]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, owner: str | None, request_id: str, context: SegmentContext) -> None:
        if not request_id or context.nbytes > self.limits.max_bytes:
            return
        key = (owner or "", request_id)
        with self._lock:
            now = self._clock()
            self._pop(key)
            self._entries[key] = (now, context)
            self._bytes += context.nbytes
            self._expire(now)
            while len(self._entries) > self.limits.max_entries or self._bytes > self.limits.max_bytes:
                self._pop(next(iter(self._entries)))

    def get(self, owner: str | None, request_id: str) -> SegmentContext:
        """The context ``request_id`` left (raises a 404 naming ``previous_request_id`` when it is not kept:
        unknown, another key's, made without continuity, failed, or expired)."""
        with self._lock:
            self._expire(self._clock())
            entry = self._entries.get((owner or "", request_id))
        if entry is None:
            raise PreviousRequestNotFound(
                f"previous_request_id '{request_id}' names no finished request of this API key made with "
                f"continuity in the last {self.limits.ttl_s:g} s on this model",
                param="previous_request_id",
            )
        return entry[1]

    def _pop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1].nbytes

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (at, _) = next(iter(self._entries.items()))
            if now - at <= self.limits.ttl_s:
                break
            self._pop(key)
