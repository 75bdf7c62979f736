"""v3 flow ``CausalMaskedDiffWithDiT``: speech tokens -> mel (spec §12).

No conformer encoder: the token embeddings (80-d) go through the pre-lookahead layer, are repeated
``token_mel_ratio`` times along time and condition the causal CFM whose estimator is a DiT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cosyserve.config import ConfigError, Node, node_kwargs
from cosyserve.nn.conformer import PreLookaheadLayer
from cosyserve.nn.dit import DiT
from cosyserve.nn.flow_matching import ConditionalCFM, FlowStream


@dataclass
class FlowCondition:
    """What the CFM is conditioned on for one call (all batch 1)."""

    mu: torch.Tensor  # (1, 80, T) look-ahead layer output repeated token_mel_ratio times
    mask: torch.Tensor  # (1, 1, T)
    spks: torch.Tensor  # (1, 80) projected, normalised speaker embedding
    cond: torch.Tensor  # (1, 80, T) prompt mel in the first frames, zeros after
    prompt_frames: int  # mel_len1: frames of the prompt, cut from the output


def _expect(node: object, cls: str, where: str) -> Node:
    if not isinstance(node, Node) or node.cls != cls:
        found = node.target if isinstance(node, Node) else type(node).__name__
        raise ConfigError(f"{where}: expected {cls}, found {found}")
    return node


class CausalMaskedDiffWithDiT(nn.Module):
    def __init__(
        self,
        pre_lookahead_layer: nn.Module,
        decoder: ConditionalCFM,
        input_size: int = 80,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        vocab_size: int = 6561,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.pre_lookahead_layer = pre_lookahead_layer
        self.decoder = decoder

    @classmethod
    def from_config(cls, node: Node) -> CausalMaskedDiffWithDiT:
        """Build from the yaml's ``flow`` node (weights are loaded separately)."""
        node = _expect(node, "CausalMaskedDiffWithDiT", "flow")
        args = node_kwargs(
            node, "input_size", "output_size", "spk_embed_dim", "vocab_size", "token_mel_ratio", "pre_lookahead_len"
        )
        pre = _expect(node.require("pre_lookahead_layer", "flow"), "PreLookaheadLayer", "flow.pre_lookahead_layer")
        dec = _expect(node.require("decoder", "flow"), "CausalConditionalCFM", "flow.decoder")
        est = _expect(dec.require("estimator", "flow.decoder"), "DiT", "flow.decoder.estimator")

        input_size = args.get("input_size", 80)
        output_size = args.get("output_size", 80)
        pre_len = args.get("pre_lookahead_len", 3)
        if pre.get("pre_lookahead_len", 3) != pre_len or pre.get("in_channels", input_size) != input_size:
            raise ConfigError("flow.pre_lookahead_layer does not match the flow's input_size / pre_lookahead_len")
        if input_size != est.get("mu_dim", input_size) or output_size != est.get("out_channels", output_size):
            raise ConfigError("flow.decoder.estimator dimensions do not match the flow's input/output sizes")

        estimator = DiT(
            **node_kwargs(
                est,
                "dim",
                "depth",
                "heads",
                "dim_head",
                "ff_mult",
                "mel_dim",
                "mu_dim",
                "spk_dim",
                "out_channels",
                "static_chunk_size",
                "num_decoding_left_chunks",
                "dropout",
                "long_skip_connection",
            )
        )
        decoder = ConditionalCFM.from_config(dec, estimator)
        pre_layer = PreLookaheadLayer(pre.require("in_channels"), pre.require("channels"), pre_len)
        return cls(pre_layer, decoder, **args)

    def condition(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        finalize: bool,
    ) -> FlowCondition:
        """Everything the CFM needs: mu from the tokens, the prompt-mel condition, the speaker vector."""
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        tokens = torch.cat((prompt_token, token), dim=1)
        emb = self.input_embedding(tokens.clamp(min=0))  # (1, P+N, 80)
        if finalize:
            h = self.pre_lookahead_layer(emb, None)
        else:
            # The last pre_lookahead_len tokens only serve as right context; their frames come later.
            cut = self.pre_lookahead_len
            h = self.pre_lookahead_layer(emb[:, :-cut], emb[:, -cut:])
        mu = h.repeat_interleave(self.token_mel_ratio, dim=1).transpose(1, 2)  # (1, 80, T)
        frames = mu.size(2)
        prompt_frames = prompt_feat.size(1)
        cond = torch.zeros(1, frames, self.output_size, dtype=mu.dtype, device=mu.device)
        cond[:, :prompt_frames] = prompt_feat
        mask = torch.ones(1, 1, frames, dtype=mu.dtype, device=mu.device)
        return FlowCondition(mu.contiguous(), mask, spks, cond.transpose(1, 2), prompt_frames)

    @torch.inference_mode()
    def inference(
        self,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        streaming: bool,
        finalize: bool,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (1, N) + prompt (1, P) / (1, 2P, 80) + x-vector (1, 192) -> mel (1, 80, 2N or 2(N-3)).

        ``noise`` (1, 80, >= T) replaces the fixed seed-0 noise; only its first T frames are used.
        """
        c = self.condition(token, prompt_token, prompt_feat, embedding, finalize)
        frames = c.mu.size(2)
        if noise is None:
            noise = self.decoder.fixed_noise(frames)
        elif noise.size(2) < frames:
            raise ValueError(f"flow noise covers {noise.size(2)} frames, {frames} needed")
        noise = noise[:, :, :frames].to(c.mu)
        mel = self.decoder.solve(c.mu, c.mask, c.spks, c.cond, noise, streaming=streaming)
        return mel[:, :, c.prompt_frames :].float()

    def stream_state(self) -> FlowStream:
        """A fresh per-request state for :meth:`inference_stream`."""
        return FlowStream()

    @torch.inference_mode()
    def inference_stream(
        self,
        state: FlowStream,
        token: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_feat: torch.Tensor,
        embedding: torch.Tensor,
        streaming: bool,
        finalize: bool,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`inference` for the next call of one streamed request (see the v2 flow's
        ``inference_stream``): a streaming call runs the DiT on the new frames only."""
        if not streaming or not self.decoder.estimator.supports_chunks:
            state.reset()
            return self.inference(token, prompt_token, prompt_feat, embedding, streaming, finalize, noise)
        c = self.condition(token, prompt_token, prompt_feat, embedding, finalize)
        frames = c.mu.size(2)
        if noise is None:
            noise = self.decoder.fixed_noise(frames)
        elif noise.size(2) < frames:
            raise ValueError(f"flow noise covers {noise.size(2)} frames, {frames} needed")
        mel = state.advance(self.decoder, c.mu, c.spks, c.cond, noise[:, :, :frames].to(c.mu))
        return mel[:, :, c.prompt_frames :].float()
