"""What every flow shares: speech tokens -> mel by a conditional flow-matching (CFM) sampler.

Each family's flow embeds the prompt + target tokens, turns them into a mel-rate condition ``mu``
in its own way (:meth:`TokenFlow.encode`), and integrates the CFM from noise conditioned on ``mu``,
the speaker x-vector and the prompt mel. The families differ only in ``encode`` and in where the
starting noise comes from: fresh per call (v1), or the fixed seed-0 buffer of the chunk-causal
flows (v2, v3; :class:`CausalFlow`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.nn.chunk_state import StreamCachePool
from cosyserve.nn.flow_matching import ConditionalCFM, FlowStream


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """The sizes of every flow: token embedding and rate, mel channels, speaker projection, CFM guidance."""

    vocab_size: int
    input_size: int
    output_size: int = 80
    spk_embed_dim: int = 192
    input_frame_rate: int = 25  # speech tokens per second
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10  # Euler steps of the CFM (the models were trained for 10; fewer is an opt-in)

    # The flow node's keys that hold these numbers (the rest of the config comes from its sub-nodes).
    SIZE_KEYS: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "input_size",
        "output_size",
        "spk_embed_dim",
        "input_frame_rate",
    )


@dataclass(frozen=True, kw_only=True)
class CausalFlowConfig(FlowConfig):
    """The chunk-causal flows (v2, v3): a fixed number of mel frames per token, look-ahead tokens."""

    vocab_size: int = 6561
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3

    SIZE_KEYS: ClassVar[tuple[str, ...]] = (*FlowConfig.SIZE_KEYS, "token_mel_ratio", "pre_lookahead_len")


@dataclass
class FlowCondition:
    """What the CFM is conditioned on for one call (batch 1)."""

    mu: Tensor  # (1, 80, T) the tokens at the mel frame rate
    mask: Tensor  # (1, 1, T)
    spks: Tensor  # (1, 80) projected, normalised speaker embedding
    cond: Tensor  # (1, 80, T) prompt mel in the first frames, zeros after
    prompt_frames: int  # frames of the prompt, cut from the output


class TokenFlow(nn.Module):
    """Token embedding, speaker projection and the CFM ``decoder``, under the official parameter names."""

    def __init__(self, config: FlowConfig, estimator: nn.Module) -> None:
        super().__init__()
        self.output_size = config.output_size
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.decoder = ConditionalCFM(
            estimator, inference_cfg_rate=config.inference_cfg_rate, n_timesteps=config.n_timesteps
        )

    def encode(self, emb: Tensor, n_prompt: int, prompt_frames: int, finalize: bool, streaming: bool) -> Tensor:
        """Embedded prompt + target tokens (1, P+N, D) -> the condition at the mel frame rate (1, T, 80)."""
        raise NotImplementedError

    def encode_stream(
        self, emb: Tensor, n_prompt: int, prompt_frames: int, finalize: bool, state: FlowStream
    ) -> Tensor:
        """:meth:`encode` (streaming) for the next call of one streamed request; a flow whose encoder
        can continue from the request's earlier calls keeps what it needs in ``state``."""
        return self.encode(emb, n_prompt, prompt_frames, finalize, streaming=True)

    def condition(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        finalize: bool = True,
        streaming: bool = False,
        stream: FlowStream | None = None,
    ) -> FlowCondition:
        """token (1, N), prompt_token (1, P), prompt_feat (1, Tp, 80), embedding (1, 192) -> the CFM condition.

        ``stream``: a streamed request's state, when this (streaming) call continues its earlier ones."""
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        tokens = torch.cat([prompt_token, token], dim=1)
        emb = self.input_embedding(tokens.clamp(min=0))
        prompt_frames = prompt_feat.size(1)
        if stream is None:
            h = self.encode(emb, prompt_token.size(1), prompt_frames, finalize, streaming)
        else:
            h = self.encode_stream(emb, prompt_token.size(1), prompt_frames, finalize, stream)
        frames = h.size(1)
        cond = torch.zeros(1, frames, self.output_size, dtype=h.dtype, device=h.device)
        cond[:, :prompt_frames] = prompt_feat
        mask = torch.ones(1, 1, frames, dtype=h.dtype, device=h.device)
        return FlowCondition(h.transpose(1, 2).contiguous(), mask, spks, cond.transpose(1, 2), prompt_frames)


class CausalFlow(TokenFlow):
    """v2 / v3: exactly ``token_mel_ratio`` frames per token, from the fixed seed-0 noise.

    Not final, the last ``pre_lookahead_len`` tokens are right context only: their frames come with
    the next call, so a streamed chunk recomputed with more tokens reproduces the same frames.
    """

    def __init__(self, config: CausalFlowConfig, estimator: nn.Module) -> None:
        super().__init__(config, estimator)
        self.token_mel_ratio = config.token_mel_ratio
        self.pre_lookahead_len = config.pre_lookahead_len

    def split_lookahead(self, emb: Tensor, finalize: bool) -> tuple[Tensor, Tensor | None]:
        """(tokens whose frames are made now, their right context or None when final)."""
        if finalize:
            return emb, None
        return emb[:, : -self.pre_lookahead_len], emb[:, -self.pre_lookahead_len :]

    @torch.inference_mode()
    def tokens_to_mel(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        streaming: bool,
        finalize: bool,
        noise: Tensor | None = None,
    ) -> Tensor:
        """token (1, N), prompt_token (1, P), prompt_feat (1, 2P, 80), embedding (1, 192) -> mel (1, 80, T2).

        T2 = ratio * N when ``finalize``, else ratio * (N - pre_lookahead_len). ``streaming`` selects
        chunk-causal attention. ``noise`` (1, 80, >= T) replaces the fixed seed-0 noise; its first T
        frames are used. Raises ValueError when T exceeds the fixed noise (callers split the text).
        """
        c, noise = self._conditioned(token, prompt_token, prompt_feat, embedding, streaming, finalize, noise)
        mel = self.decoder.solve(c.mu, c.mask, c.spks, c.cond, noise, streaming=streaming)
        return mel[:, :, c.prompt_frames :]

    def _conditioned(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        streaming: bool,
        finalize: bool,
        noise: Tensor | None,
        stream: FlowStream | None = None,
    ) -> tuple[FlowCondition, Tensor]:
        """The estimator's condition and the starting noise of its frames (checked to match)."""
        n_encoded = prompt_token.size(1) + token.size(1) - (0 if finalize else self.pre_lookahead_len)
        frames = n_encoded * self.token_mel_ratio
        # Checked before encoding: an over-long request fails fast.
        if noise is None:
            noise = self.decoder.fixed_noise(frames, token.device)
        elif noise.size(2) < frames:
            raise ValueError(f"flow noise covers {noise.size(2)} frames, {frames} needed")
        c = self.condition(token, prompt_token, prompt_feat, embedding, finalize, streaming, stream)
        if c.mu.size(2) != frames:
            raise RuntimeError(f"flow encoder produced {c.mu.size(2)} frames, expected {frames}")
        return c, noise[:, :, :frames].to(c.mu)

    def stream_state(self, pool: StreamCachePool | None = None) -> FlowStream:
        """A fresh per-request state for :meth:`tokens_to_mel_stream`, its cache within ``pool``'s limit
        (None: a pool of its own, unbounded)."""
        return FlowStream(pool if pool is not None else StreamCachePool(limit_bytes=1 << 62))

    @torch.inference_mode()
    def tokens_to_mel_stream(
        self,
        state: FlowStream,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        streaming: bool,
        finalize: bool,
        noise: Tensor | None = None,
    ) -> Tensor:
        """:meth:`tokens_to_mel` for the next call of one streamed request, whose earlier calls used ``state``.

        Same arguments and result (the tokens so far, the mel of all of them), but a streaming call
        runs the estimator on the frames not computed by an earlier call only; the earlier frames come
        from ``state``, exactly as a full chunk-causal run computes them. A non-streaming call (the
        full-attention last chunk) recomputes everything. A flow whose encoder can continue (v2's)
        encodes only the new tokens too.
        """
        if not streaming or not self.decoder.estimator.supports_chunks:
            state.reset()
            return self.tokens_to_mel(token, prompt_token, prompt_feat, embedding, streaming, finalize, noise)
        c, noise = self._conditioned(token, prompt_token, prompt_feat, embedding, streaming, finalize, noise, state)
        mel = state.advance(self.decoder, c.mu, c.spks, c.cond, noise)
        return mel[:, :, c.prompt_frames :]
