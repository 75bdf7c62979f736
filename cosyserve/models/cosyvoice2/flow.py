"""v2 flow ``CausalMaskedDiffWithXvec``: speech tokens -> mel at exactly 2 frames per token (spec §11).

Token embeddings go through the up-sampling conformer (x2 in time, with 3 look-ahead tokens), and
condition a causal flow-matching U-Net that starts from a fixed noise buffer, so a streamed chunk
recomputed with more tokens reproduces the same frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.config import ConfigError, Node, node_kwargs
from cosyserve.models.cosyvoice1.flow import FlowCondition, estimator_kwargs, expect_class
from cosyserve.nn.conformer import UpsampleConformerEncoder
from cosyserve.nn.flow_matching import ConditionalCFM, FlowStream
from cosyserve.nn.unet import ConditionalDecoder


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        decoder: ConditionalCFM,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        vocab_size: int = 6561,
        input_frame_rate: int = 25,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        encoder_output_size: int = 512,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.input_frame_rate = input_frame_rate
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder_output_size, output_size)
        self.decoder = decoder

    @classmethod
    def from_config(cls, node: Node) -> CausalMaskedDiffWithXvec:
        """Build from the yaml's ``flow`` node (weights are loaded separately).

        The estimator may be spelled ``CausalConditionalDecoder`` (current hub yaml) or
        ``ConditionalDecoder`` with ``causal: True`` (the first release, which has no chunk size:
        it is the encoder's token chunk times ``token_mel_ratio``).
        """
        node = expect_class(node, ("CausalMaskedDiffWithXvec",), "flow")
        args = node_kwargs(
            node,
            "input_size",
            "output_size",
            "spk_embed_dim",
            "vocab_size",
            "input_frame_rate",
            "token_mel_ratio",
            "pre_lookahead_len",
        )
        enc = expect_class(node.require("encoder", "flow"), ("UpsampleConformerEncoder",), "flow.encoder")
        dec = expect_class(node.require("decoder", "flow"), ("CausalConditionalCFM",), "flow.decoder")
        est = expect_class(
            dec.require("estimator", "flow.decoder"),
            ("CausalConditionalDecoder", "ConditionalDecoder"),
            "flow.decoder.estimator",
        )
        est_args = estimator_kwargs(est)
        if est.cls == "ConditionalDecoder" and not est_args.get("causal", False):
            raise ConfigError("flow.decoder.estimator: the v2 flow needs a causal decoder (causal: True)")
        est_args["causal"] = True
        if "static_chunk_size" not in est_args:
            est_args["static_chunk_size"] = int(enc.get("static_chunk_size", 25)) * int(args.get("token_mel_ratio", 2))

        enc_args = dict(enc.args)
        enc_args.setdefault("input_size", args.get("input_size", 512))
        if enc_args["input_size"] != args.get("input_size", 512):
            raise ConfigError("flow.encoder.input_size does not match flow.input_size")
        encoder = UpsampleConformerEncoder(**enc_args)
        decoder = ConditionalCFM.from_config(dec, ConditionalDecoder(**est_args))
        return cls(encoder, decoder, encoder_output_size=enc_args.get("output_size", 512), **args)

    def condition(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
        streaming: bool,
        finalize: bool,
    ) -> FlowCondition:
        """Encode the tokens and build the CFM condition (spec §11.3 steps 1-5)."""
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        tokens = torch.cat([prompt_token, token], dim=1)
        emb = self.input_embedding(tokens.clamp(min=0))  # (1, P+N, 512)
        context = None
        if not finalize:
            # The last look-ahead tokens only serve as right context; their frames come next call.
            emb, context = emb[:, : -self.pre_lookahead_len], emb[:, -self.pre_lookahead_len :]
        lens = torch.tensor([emb.size(1)], device=emb.device)
        h, _ = self.encoder(emb, lens, context=context, streaming=streaming)  # (1, 2 (P+N[-3]), 512)
        h = self.encoder_proj(h)

        frames = h.size(1)
        mel_len1 = prompt_feat.size(1)
        cond = torch.zeros(1, frames, self.output_size, dtype=h.dtype, device=h.device)
        cond[:, :mel_len1] = prompt_feat
        mask = torch.ones(1, 1, frames, dtype=h.dtype, device=h.device)
        return FlowCondition(h.transpose(1, 2).contiguous(), mask, spks, cond.transpose(1, 2), mel_len1)

    @torch.no_grad()
    def inference(
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

        T2 = 2N when ``finalize``, else 2(N - 3) (the last 3 tokens are look-ahead only).
        ``streaming`` selects chunk-causal attention in the encoder and the estimator.
        ``noise`` (1, 80, >= T) replaces the fixed seed-0 noise; its first T frames are used.
        Raises ValueError when T exceeds the fixed noise (callers split the text).
        """
        n_encoded = prompt_token.size(1) + token.size(1) - (0 if finalize else self.pre_lookahead_len)
        frames = n_encoded * self.token_mel_ratio
        # Checked before encoding: an over-long request fails fast.
        if noise is None:
            noise = self.decoder.fixed_noise(frames)
        elif noise.size(2) < frames:
            raise ValueError(f"flow noise covers {noise.size(2)} frames, {frames} needed")
        c = self.condition(token, prompt_token, prompt_feat, embedding, streaming, finalize)
        if c.mu.size(2) != frames:
            raise RuntimeError(f"flow encoder produced {c.mu.size(2)} frames, expected {frames}")
        noise = noise[:, :, :frames].to(c.mu)
        mel = self.decoder.solve(c.mu, c.mask, c.spks, c.cond, noise, streaming=streaming)
        return mel[:, :, c.prompt_frames :]

    def stream_state(self) -> FlowStream:
        """A fresh per-request state for :meth:`inference_stream`."""
        return FlowStream()

    @torch.no_grad()
    def inference_stream(
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
        """:meth:`inference` for the next call of one streamed request, whose earlier calls used ``state``.

        Same arguments and result (the tokens so far, the mel of all of them), but a streaming call
        runs the estimator on the frames not computed by an earlier call only; the earlier frames come
        from ``state``, exactly as a full chunk-causal run computes them. A non-streaming call (the
        full-attention last chunk) recomputes everything. The encoder re-runs on all tokens.
        """
        if not streaming or not self.decoder.estimator.supports_chunks:
            state.reset()
            return self.inference(token, prompt_token, prompt_feat, embedding, streaming, finalize, noise)
        frames = (prompt_token.size(1) + token.size(1) - (0 if finalize else self.pre_lookahead_len)) * (
            self.token_mel_ratio
        )
        if noise is None:
            noise = self.decoder.fixed_noise(frames)
        elif noise.size(2) < frames:
            raise ValueError(f"flow noise covers {noise.size(2)} frames, {frames} needed")
        c = self.condition(token, prompt_token, prompt_feat, embedding, streaming, finalize)
        if c.mu.size(2) != frames:
            raise RuntimeError(f"flow encoder produced {c.mu.size(2)} frames, expected {frames}")
        mel = state.advance(self.decoder, c.mu, c.spks, c.cond, noise[:, :, :frames].to(c.mu))
        return mel[:, :, c.prompt_frames :]
