"""What the engine may ask of each network: the contracts every family's modules fulfil.

The engine holds a family's networks as these Protocols (never as ``Any``); what a family can do
beyond the base contract (bi-streamed text, a streamed flow or vocoder) is a fact of its record in
:mod:`cosyserve.families` and of its synthesizer, not something probed on the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from cosyserve.models.base import FamilyModel
from cosyserve.models.bistream import BistreamInput, Item
from cosyserve.nn.chunk_state import StreamCachePool
from cosyserve.nn.flow_matching import FlowStream
from cosyserve.nn.hift import SourceDraws
from cosyserve.nn.hift_causal import HiFTStream
from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.sampling import Sampler


class SpeechLM(Protocol):
    """Text (and prompt) -> speech token ids, one position or many at a time on a :class:`KVCache`."""

    speech_token_size: int

    @property
    def stop_token_ids(self) -> range: ...

    @property
    def eos_token(self) -> int: ...

    def build_prefix(
        self, text: Tensor, prompt_text: Tensor, prompt_speech_token: Tensor, embedding: Tensor | None = None
    ) -> Tensor:
        """The embedded prefix (1, L0, D) the LM continues with speech tokens."""
        ...

    def feed(self, inputs: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        """Run (1, t, D) inputs after a one-row cache's history (None: a fresh cache): the last hidden
        state (D,) and the extended cache."""
        ...

    def decode_batch(self, token_ids: Tensor, cache: KVCache) -> Tensor:
        """One speech id per cache row (B,) after each row's own history -> hidden states (B, D)."""
        ...

    def logp(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., V) float32 log-probabilities."""
        ...

    def mask_early_stop(self, logp: Tensor) -> Tensor:
        """The scores the sampler sees before ``min_len`` (stop ids at -inf)."""
        ...

    def make_sampler(self, generator: torch.Generator | None = None) -> Sampler: ...


class BistreamLM(SpeechLM, Protocol):
    """A speech LM that takes text arriving while it speaks (``Family.bistream``)."""

    def split_bistream_prompt(self, prompt_text: Tensor) -> tuple[list[int], list[int]]: ...

    def new_bistream(
        self, prompt_text: Tensor, prompt_speech_token: Tensor, sampler: Sampler, max_tokens: int
    ) -> BistreamInput: ...

    def embed_inputs(self, items: Sequence[Item]) -> Tensor: ...


class Flow(Protocol):
    """Speech tokens -> mel, conditioned on a prompt and an x-vector (``decoder``: its CFM)."""

    output_size: int  # mel channels
    spk_embed_affine_layer: nn.Linear  # the x-vector's projection: its in_features is the x-vector size

    def tokens_to_mel(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor, **kw: object):
        """v1: (mel, flow_cache); v2/v3: mel (1, 80, T)."""
        ...


class StreamingFlow(Flow, Protocol):
    """A chunk-causal flow (v2/v3) that continues a streamed request from its own state."""

    token_mel_ratio: int
    pre_lookahead_len: int

    def stream_state(self, pool: StreamCachePool | None = None) -> FlowStream: ...

    def tokens_to_mel_stream(
        self, state: FlowStream, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor, **kw: bool
    ) -> Tensor: ...


class Vocoder(Protocol):
    """Mel -> waveform (HiFT); ``decode`` with a given excitation (the golden draws)."""

    def mel_to_wave(self, mel: Tensor, **kw: object) -> tuple[Tensor, Tensor]: ...

    def decode(self, mel: Tensor, source: Tensor | SourceDraws, **kw: object) -> Tensor: ...


class StreamingVocoder(Vocoder, Protocol):
    """A causal vocoder (v3) that continues a streamed request from its own state."""

    def stream_state(self) -> HiFTStream: ...

    def mel_to_wave_stream(
        self, state: HiFTStream, mel: Tensor, finalize: bool, source: Tensor | None = None
    ) -> Tensor: ...


@dataclass(frozen=True)
class Networks:
    """A loaded family's networks as the engine holds them: as the contracts above."""

    lm: SpeechLM
    flow: Flow
    vocoder: Vocoder

    @classmethod
    def of(cls, model: FamilyModel) -> Networks:
        # Every family's modules fulfil these contracts (the parity and engine tests run each one);
        # nn.Module's attribute typing (Tensor | Module) cannot say so, hence the casts, here only.
        return cls(lm=cast(SpeechLM, model.llm), flow=cast(Flow, model.flow), vocoder=cast(Vocoder, model.hift))
