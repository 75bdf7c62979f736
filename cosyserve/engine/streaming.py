"""Token -> waveform for one request, streaming or not (spec §14).

Each text segment of a request gets its own :class:`Synthesizer` holding every piece of streaming
state (hop length, caches, offsets), so concurrent requests never share mutable state (the official
model object keeps the doubled hop length on itself: spec §17.3). Tokens are pushed in as the LLM
picks them (:meth:`Synthesizer.add`); the scheduler asks whether a chunk is due (:meth:`ready`) and
when to make it (:meth:`next_chunk`, :meth:`finish`). Chunk boundaries depend only on token counts,
so the audio is the same however the scheduler interleaves this work with other requests'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from cosyserve.models.base import MAX_SILENT_RUN, FamilyModel, SilenceFilter
from cosyserve.models.contracts import Flow, Networks, StreamingFlow, StreamingVocoder, Vocoder
from cosyserve.nn.chunk_state import StreamCachePool
from cosyserve.precision import DEFAULT_STREAM_LAST_CHUNK
from cosyserve.work_units import job_clock, unit_boundary


class Draws:
    """The random numbers of one request.

    Everything is drawn from the request's own generators; tests override the hooks to feed the
    reference's draws (the v1 flow noise of call ``k``, the HiFT excitation of vocoder call ``k``).
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int.from_bytes(np.random.default_rng().bytes(6), "little")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # The LLM samples from a stream of its own: streaming interleaves flow / vocoder draws with
        # the sampling, and this keeps a seeded request's tokens the same streamed or not.
        self.sampling_generator = torch.Generator().manual_seed(seed ^ 0x5EED5EED)
        self.flow_calls = 0  # counted over the whole request, across text segments
        self.hift_calls = 0

    def next_flow_noise(self) -> torch.Tensor | None:
        self.flow_calls += 1
        return self.flow_noise(self.flow_calls - 1)

    def next_hift_source(self) -> torch.Tensor | None:
        self.hift_calls += 1
        return self.hift_source(self.hift_calls - 1)

    def flow_noise(self, call: int) -> torch.Tensor | None:
        """The v1 flow's fresh noise for flow call ``call`` (None: draw from the generator)."""
        return None

    def hift_source(self, call: int) -> torch.Tensor | None:
        """A complete HiFT excitation for vocoder call ``call`` (None: compute it)."""
        return None


def hamming(length: int) -> torch.Tensor:
    """Symmetric Hamming window (the reference's cross-fade window)."""
    return torch.from_numpy(np.hamming(length).astype(np.float32))


def cross_fade(head: torch.Tensor, previous_tail: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Blend the start of ``head`` with ``previous_tail`` over half the window (last axis)."""
    overlap = window.shape[0] // 2
    head = head.clone()
    head[..., :overlap] = head[..., :overlap] * window[:overlap] + previous_tail[..., -overlap:] * window[overlap:]
    return head


def stretch_mel(mel: torch.Tensor, speed: float) -> torch.Tensor:
    """Change duration by 1/speed keeping pitch: linear interpolation of mel frames (spec §14.5)."""
    if speed == 1.0 or mel.shape[2] == 0:
        return mel
    return F.interpolate(mel, size=max(1, int(mel.shape[2] / speed)), mode="linear")


@dataclass(frozen=True)
class StreamingOptions:
    """How streamed v2/v3 requests trade audio for cost (see :mod:`cosyserve.precision`)."""

    last_chunk: str = DEFAULT_STREAM_LAST_CHUNK  # reference: the last chunk re-runs the flow in full context
    cache: StreamCachePool | None = None  # the model's: what the requests' flow caches may hold together


@dataclass(frozen=True, eq=False)
class AudioStage:
    """The token-to-audio networks of one model where they run: the flow on ``flow_device``, the
    vocoder on ``vocoder_device`` (the runner's placement), and the numbers chunking is planned by."""

    flow: Flow
    hift: Vocoder
    flow_device: torch.device
    vocoder_device: torch.device
    sample_rate: int
    hop_size: int  # waveform samples per mel frame
    token_frame_rate: int  # speech tokens per second
    token_mel_ratio: int = 0  # v2/v3: mel frames per token
    chunk_tokens: int = 0  # v2/v3: the first streaming hop
    pre_lookahead_len: int = 0  # v2/v3: right-context tokens of the causal flow
    silent_tokens: frozenset[int] = frozenset()  # v3: ids whose long runs the flow skips
    streaming: StreamingOptions = StreamingOptions()

    @classmethod
    def of(
        cls,
        model: FamilyModel,
        flow_device: torch.device,
        vocoder_device: torch.device,
        streaming: StreamingOptions | None = None,
    ) -> AudioStage:
        """``model``'s flow and vocoder, placed on these devices (where the loader put them)."""
        networks = Networks.of(model)
        return cls(
            flow=networks.flow,
            hift=networks.vocoder,
            flow_device=flow_device,
            vocoder_device=vocoder_device,
            sample_rate=model.sample_rate,
            hop_size=model.hop_size,
            token_frame_rate=model.token_frame_rate,
            token_mel_ratio=model.token_mel_ratio,
            chunk_tokens=model.chunk_tokens,
            pre_lookahead_len=model.pre_lookahead_len,
            silent_tokens=model.silent_tokens,
            streaming=streaming or StreamingOptions(),
        )

    def new_token_filter(self) -> SilenceFilter | None:
        """A fresh filter of the ids one text segment's flow sees (v3 drops long silences), or None."""
        return SilenceFilter(self.silent_tokens, MAX_SILENT_RUN) if self.silent_tokens else None


@dataclass
class PromptCondition:
    """What the flow is conditioned on: prompt tokens (1, P), prompt mel (1, T, 80), x-vector (1, 192)."""

    token: torch.Tensor
    feat: torch.Tensor
    embedding: torch.Tensor

    def to(self, device: torch.device) -> PromptCondition:
        return PromptCondition(self.token.to(device), self.feat.to(device), self.embedding.to(device))


class Synthesizer:
    """Base class: pulls tokens and turns them into float32 audio chunks.

    One text segment's token-to-audio state (the request's, never the model's). Its inputs move to
    the flow's device here, once; the mel moves to the vocoder's device before the vocoder.
    """

    def __init__(
        self, stage: AudioStage, condition: PromptCondition, draws: Draws, speed: float = 1.0, stream: bool = False
    ) -> None:
        self.stage = stage
        self.stream = stream
        self.device = stage.flow_device
        self.vocoder_device = stage.vocoder_device
        self.condition = condition.to(self.device)
        self.draws = draws
        self.speed = speed
        self.hift_cache: dict[str, torch.Tensor] | None = None
        self.mel_cache = 0  # mel frames carried to the next vocoder call
        self.source_cache = 0  # excitation / waveform samples carried likewise
        self.speech_window = torch.zeros(0)
        self.timings: dict[str, float] | None = None  # seconds per stage, accumulated when set (bench)
        # Continuity: keep the mel made (before the speed change) for the next segment's flow prompt.
        self.keep_mel = False
        self.mel_pieces: list[torch.Tensor] = []

    def keep(self, mel: torch.Tensor) -> None:
        """A piece of this segment's mel (1, C, T), in order, kept when :attr:`keep_mel`."""
        if self.keep_mel and mel.shape[2]:
            self.mel_pieces.append(mel.detach().to("cpu", torch.float32))

    def generated_mel(self) -> torch.Tensor | None:
        """The mel of :meth:`flow_ids` (1, C, T), once the segment is finished (when kept)."""
        return torch.cat(self.mel_pieces, dim=2) if self.mel_pieces else None

    def flow_ids(self) -> list[int]:
        """The speech ids the flow turned into audio (those :meth:`generated_mel` is the mel of)."""
        raise NotImplementedError

    def timed(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, its own running time (pauses between units excluded) added to
        ``timings[stage]`` when timings are kept."""
        if self.timings is None:
            return fn(*args, **kwargs)
        start = job_clock()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + job_clock() - start

    def _vocode(self, mel: torch.Tensor, cache_source: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hift = self.stage.hift
        unit_boundary()  # between the flow and the vocoder
        mel = mel.to(self.vocoder_device)
        source = self.draws.next_hift_source()
        if source is not None:
            return self.timed("vocoder", hift.decode, mel, source), source
        return self.timed("vocoder", hift.mel_to_wave, mel, cache_source=cache_source, generator=self.draws.generator)

    def vocode_with_cache(self, mel: torch.Tensor, finalize: bool) -> torch.Tensor:
        """HiFT with the v1/v2 chunk caches: the last mel frames and excitation of the previous
        chunk are prepended, and the waveform seam is cross-faded; a non-final chunk holds back
        its last ``source_cache`` samples for the next fade."""
        cache_source = None
        if self.hift_cache is not None:
            mel = torch.cat([self.hift_cache["mel"], mel], dim=2)
            cache_source = self.hift_cache["source"]
        speech, source = self._vocode(mel, cache_source)
        if self.hift_cache is not None:
            speech = cross_fade(speech, self.hift_cache["speech"], self.speech_window)
        if finalize:
            return speech
        self.hift_cache = {
            "mel": mel[:, :, -self.mel_cache :],
            "source": source[:, :, -self.source_cache :],
            "speech": speech[:, -self.source_cache :],
        }
        return speech[:, : -self.source_cache]

    def add(self, token: int) -> None:
        """One more speech token from the LLM."""
        raise NotImplementedError

    def ready(self) -> bool:
        """A streaming chunk can be made from the tokens added so far."""
        raise NotImplementedError

    def next_chunk(self) -> np.ndarray:
        """The next streaming chunk (only when :meth:`ready`)."""
        raise NotImplementedError

    def finish(self) -> np.ndarray | None:
        """The last chunk, after the last token (None when no token ever came)."""
        raise NotImplementedError

    def close(self) -> None:
        """The segment is over or abandoned: give back what it holds of the model's (its flow cache)."""


class V1Synthesizer(Synthesizer):
    """CosyVoice 1.0: fixed token hop with overlap, mel and waveform cross-fades (spec §14.2)."""

    TOKEN_OVERLAP = 20

    def __init__(
        self, stage: AudioStage, condition: PromptCondition, draws: Draws, speed: float = 1.0, stream: bool = False
    ) -> None:
        super().__init__(stage, condition, draws, speed, stream)
        frame_rate = stage.token_frame_rate
        self.token_hop = 2 * frame_rate
        self.mel_overlap = int(self.TOKEN_OVERLAP / frame_rate * stage.sample_rate / stage.hop_size)
        self.mel_window = hamming(2 * self.mel_overlap).to(self.device)
        self.mel_cache = 20
        self.source_cache = self.mel_cache * stage.hop_size
        self.speech_window = hamming(2 * self.source_cache).to(self.vocoder_device)
        self.flow_cache: torch.Tensor | None = None
        self.mel_tail: torch.Tensor | None = None
        self.pending: list[int] = []
        self.all_ids: list[int] = []

    def flow_ids(self) -> list[int]:
        return self.all_ids

    def token2wav(self, tokens: list[int], finalize: bool) -> torch.Tensor:
        c = self.condition
        mel, self.flow_cache = self.timed(
            "flow",
            self.stage.flow.tokens_to_mel,
            torch.tensor([tokens], dtype=torch.int32, device=self.device),
            c.token,
            c.feat,
            c.embedding,
            flow_cache=self.flow_cache,
            noise=self.draws.next_flow_noise(),
            generator=self.draws.generator,
        )
        if self.mel_tail is not None:
            mel = cross_fade(mel, self.mel_tail, self.mel_window)
        if not finalize:
            self.mel_tail = mel[:, :, -self.mel_overlap :]
            mel = mel[:, :, : -self.mel_overlap]
        self.keep(mel)
        return self.vocode_with_cache(stretch_mel(mel, self.speed), finalize)

    def add(self, token: int) -> None:
        self.pending.append(token)
        self.all_ids.append(token)

    def ready(self) -> bool:
        return self.stream and len(self.pending) >= self.token_hop + self.TOKEN_OVERLAP

    def next_chunk(self) -> np.ndarray:
        chunk = _chunk(self.token2wav(self.pending[: self.token_hop + self.TOKEN_OVERLAP], finalize=False))
        self.pending = self.pending[self.token_hop :]
        return chunk

    def finish(self) -> np.ndarray | None:
        return _chunk(self.token2wav(self.pending, finalize=True)) if self.pending else None


class V2Synthesizer(Synthesizer):
    """CosyVoice2: chunk-causal flow, growing hop, HiFT caches (spec §14.3).

    Streaming, the flow continues from the request's state (each chunk computes its own frames only)
    rather than re-running from the start of the utterance as the reference does; same output.
    """

    MAX_HOP = 100
    HOP_SCALE = 2

    def __init__(
        self, stage: AudioStage, condition: PromptCondition, draws: Draws, speed: float = 1.0, stream: bool = False
    ) -> None:
        super().__init__(stage, condition, draws, speed, stream)
        self.flow = cast(StreamingFlow, stage.flow)
        self.hop = stage.chunk_tokens
        self.lookahead = stage.pre_lookahead_len
        self.mel_ratio = stage.token_mel_ratio
        self.mel_cache = 8
        self.source_cache = self.mel_cache * stage.hop_size
        self.speech_window = hamming(2 * self.source_cache).to(self.vocoder_device)
        self.kept: list[int] = []  # the ids the flow sees
        self.offset = 0  # tokens already turned into audio
        prompt_len = condition.token.shape[1]
        # The first hop also covers the prompt's padding up to a whole flow chunk.
        self.prompt_pad = math.ceil(prompt_len / self.hop) * self.hop - prompt_len
        # Streaming: the flow's per-request incremental state (linear cost over the chunks).
        self.flow_state = self.flow.stream_state(stage.streaming.cache) if stream else None
        # The reference's last chunk attends to the whole utterance (a full re-run of the flow);
        # "causal" keeps the chunk-causal attention, so it costs only its own frames.
        self.full_context_last_chunk = stage.streaming.last_chunk == "reference"

    def flow_mel(self, tokens: list[int], token_offset: int, streaming: bool, finalize: bool) -> torch.Tensor:
        c = self.condition
        args = (torch.tensor([tokens], dtype=torch.int32, device=self.device), c.token, c.feat, c.embedding)
        if self.flow_state is None:
            mel = self.timed("flow", self.flow.tokens_to_mel, *args, streaming=streaming, finalize=finalize)
        else:
            # The estimator runs on the new frames only; the earlier ones come from this request's state.
            mel = self.timed(
                "flow",
                self.flow.tokens_to_mel_stream,
                self.flow_state,
                *args,
                streaming=streaming,
                finalize=finalize,
            )
        mel = mel[:, :, token_offset * self.mel_ratio :]
        self.keep(mel)
        return mel

    def flow_ids(self) -> list[int]:
        return self.kept

    def token2wav(self, tokens: list[int], token_offset: int, streaming: bool, finalize: bool) -> torch.Tensor:
        mel = stretch_mel(self.flow_mel(tokens, token_offset, streaming, finalize), self.speed)
        return self.vocode_with_cache(mel, finalize)

    def add(self, token: int) -> None:
        self.kept.append(token)

    def _this_hop(self) -> int:
        return self.hop + self.prompt_pad if self.offset == 0 else self.hop

    def ready(self) -> bool:
        return self.stream and len(self.kept) - self.offset >= self._this_hop() + self.lookahead

    def next_chunk(self) -> np.ndarray:
        this_hop = self._this_hop()
        chunk = self.kept[: self.offset + this_hop + self.lookahead]
        speech = self.token2wav(chunk, self.offset, streaming=True, finalize=False)
        self.offset += this_hop
        self.hop = min(self.MAX_HOP, self.hop * self.HOP_SCALE)
        return _chunk(speech)

    def finish(self) -> np.ndarray | None:
        if not self.kept:
            return None
        # Chunk-causal only after streamed chunks (else a single full-context call costs as much).
        streaming = self.stream and self.offset > 0 and not self.full_context_last_chunk
        speech = self.token2wav(self.kept, self.offset, streaming=streaming, finalize=True)
        self.close()  # the keys / values of every frame and step: the bulk of the state
        return _chunk(speech)

    def close(self) -> None:
        if self.flow_state is not None:
            self.flow_state.close()


class V3Synthesizer(V2Synthesizer):
    """CosyVoice3: as v2, but the vocoder is the causal HiFT on the accumulated mel (spec §14.4).

    The reference re-runs it on the whole mel each chunk and keeps the new samples; streaming here
    continues it from the request's state, which gives the same samples (every layer is causal).
    """

    def __init__(
        self, stage: AudioStage, condition: PromptCondition, draws: Draws, speed: float = 1.0, stream: bool = False
    ) -> None:
        super().__init__(stage, condition, draws, speed, stream)
        self.hift = cast(StreamingVocoder, stage.hift)
        self.mel = torch.zeros(1, self.condition.feat.shape[-1], 0, device=self.vocoder_device)
        self.samples_out = 0
        self.token_filter = stage.new_token_filter()
        self.hift_state = self.hift.stream_state() if stream else None

    def add(self, token: int) -> None:
        # The LLM conditions on every id; the flow may skip some (v3: long runs of silence, spec §9.5).
        if self.token_filter is None or self.token_filter.keep(token):
            super().add(token)

    def token2wav(self, tokens: list[int], token_offset: int, streaming: bool, finalize: bool) -> torch.Tensor:
        mel = stretch_mel(self.flow_mel(tokens, token_offset, streaming, finalize), self.speed)
        unit_boundary()  # between the flow and the vocoder
        self.mel = torch.cat([self.mel, mel.to(self.vocoder_device)], dim=2)
        source = self.draws.next_hift_source()
        if self.hift_state is not None:
            # The causal vocoder continues from this request's state: only the new frames are computed.
            stream = self.hift.mel_to_wave_stream
            return self.timed("vocoder", stream, self.hift_state, self.mel, finalize, source=source)
        speech, _ = self.timed("vocoder", self.hift.mel_to_wave, self.mel, finalize=finalize, source=source)
        speech = speech[:, self.samples_out :]
        self.samples_out += speech.shape[1]
        return speech


def _chunk(speech: torch.Tensor) -> np.ndarray:
    return speech.detach().reshape(-1).to(torch.float32).cpu().numpy()
