"""v1 flow ``MaskedDiffWithXvec``: speech tokens -> mel (spec §10).

Token embeddings go through a conformer encoder, are stretched to the mel frame rate by linear
interpolation (``InterpolateRegulator``) and condition a flow-matching U-Net, sampled from fresh
noise on every call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.config import ConfigError, Node, node_kwargs
from cosyserve.nn.conformer import ConformerEncoder
from cosyserve.nn.flow_matching import ConditionalCFM
from cosyserve.nn.unet import ConditionalDecoder

# The reference converts token counts to mel frames with these numbers for every v1 model,
# including the 25 Hz one (spec §10.4, §17.7): they define the model's output length.
MEL_SAMPLE_RATE = 22050
MEL_HOP = 256
# Frames of the streaming flow cache kept from the end of each call: the mel overlap of the 50 Hz
# model (20 tokens), also used unchanged for the 25 Hz model.
FLOW_CACHE_TAIL_FRAMES = 34
# Targets longer than this many tokens are interpolated as head / middle / tail so that the
# first and last EDGE_TOKENS tokens get a fixed number of frames (clean streaming joins).
_SPLIT_ABOVE_TOKENS = 40
_EDGE_TOKENS = 20


def tokens_to_frames(n_tokens: int, input_frame_rate: int) -> int:
    """Mel frames the reference generates for ``n_tokens`` tokens (same float expression, floored)."""
    return int(n_tokens / input_frame_rate * MEL_SAMPLE_RATE / MEL_HOP)


class FlowCondition(NamedTuple):
    """What the CFM is conditioned on for one call (batch 1)."""

    mu: Tensor  # (1, 80, T) length-regulated encoder output
    mask: Tensor  # (1, 1, T)
    spks: Tensor  # (1, 80) projected, normalised speaker embedding
    cond: Tensor  # (1, 80, T) prompt mel in the first frames, zeros after
    prompt_frames: int  # mel_len1, cut from the output


class InterpolateRegulator(nn.Module):
    """Linear interpolation to the mel length, then a small conv stack (``model.{0..12}``)."""

    def __init__(
        self, channels: int, sampling_ratios: list[int], out_channels: int | None = None, groups: int = 1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in sampling_ratios:
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, out_channels or channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def inference(self, x1: Tensor, x2: Tensor, mel_len1: int, mel_len2: int, input_frame_rate: int = 50) -> Tensor:
        """Prompt part x1 (1, P, C) -> mel_len1 frames, target x2 (1, N, C) -> mel_len2; (1, T, C)."""
        x2 = x2.transpose(1, 2)
        if x2.size(2) > _SPLIT_ABOVE_TOKENS:
            edge = tokens_to_frames(_EDGE_TOKENS, input_frame_rate)
            x2 = torch.cat(
                [
                    F.interpolate(x2[:, :, :_EDGE_TOKENS], size=edge, mode="linear"),
                    F.interpolate(x2[:, :, _EDGE_TOKENS:-_EDGE_TOKENS], size=mel_len2 - 2 * edge, mode="linear"),
                    F.interpolate(x2[:, :, -_EDGE_TOKENS:], size=edge, mode="linear"),
                ],
                dim=2,
            )
        else:
            x2 = F.interpolate(x2, size=mel_len2, mode="linear")
        if x1.size(1) != 0:
            x = torch.cat([F.interpolate(x1.transpose(1, 2), size=mel_len1, mode="linear"), x2], dim=2)
        else:
            x = x2
        return self.model(x).transpose(1, 2)


class MaskedDiffWithXvec(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        length_regulator: InterpolateRegulator,
        decoder: ConditionalCFM,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        encoder_output_size: int = 512,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.input_frame_rate = input_frame_rate
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder_output_size, output_size)
        self.length_regulator = length_regulator
        self.decoder = decoder

    @classmethod
    def from_config(cls, node: Node) -> MaskedDiffWithXvec:
        """Build from the yaml's ``flow`` node (weights are loaded separately)."""
        node = expect_class(node, ("MaskedDiffWithXvec",), "flow")
        args = node_kwargs(node, "input_size", "output_size", "spk_embed_dim", "vocab_size", "input_frame_rate")
        enc = expect_class(node.require("encoder", "flow"), ("ConformerEncoder",), "flow.encoder")
        reg = expect_class(node.require("length_regulator", "flow"), ("InterpolateRegulator",), "flow.length_regulator")
        dec = expect_class(node.require("decoder", "flow"), ("ConditionalCFM",), "flow.decoder")
        est = expect_class(dec.require("estimator", "flow.decoder"), ("ConditionalDecoder",), "flow.decoder.estimator")

        enc_args = dict(enc.args)
        enc_args.setdefault("input_size", args.get("input_size", 512))
        if enc_args["input_size"] != args.get("input_size", 512):
            raise ConfigError("flow.encoder.input_size does not match flow.input_size")
        encoder = ConformerEncoder(**enc_args)
        regulator = InterpolateRegulator(**node_kwargs(reg, "channels", "sampling_ratios", "out_channels", "groups"))
        estimator = ConditionalDecoder(**estimator_kwargs(est))
        decoder = ConditionalCFM.from_config(dec, estimator)
        return cls(encoder, regulator, decoder, encoder_output_size=enc_args.get("output_size", 256), **args)

    def condition(
        self,
        token: Tensor,
        prompt_token: Tensor,
        prompt_feat: Tensor,
        embedding: Tensor,
    ) -> FlowCondition:
        """Encode the tokens and build the CFM condition (spec §10.4 steps 1-5)."""
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        n_prompt, n_target = prompt_token.size(1), token.size(1)
        tokens = torch.cat([prompt_token, token], dim=1)
        emb = self.input_embedding(tokens.clamp(min=0))  # (1, P+N, input_size)
        lens = torch.tensor([tokens.size(1)], device=tokens.device)
        h, _ = self.encoder(emb, lens)
        h = self.encoder_proj(h)  # (1, P+N, 80)

        mel_len1 = prompt_feat.size(1)
        mel_len2 = tokens_to_frames(n_target, self.input_frame_rate)
        h = self.length_regulator.inference(h[:, :n_prompt], h[:, n_prompt:], mel_len1, mel_len2, self.input_frame_rate)
        frames = mel_len1 + mel_len2
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
        flow_cache: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """token (1, N), prompt_token (1, P), prompt_feat (1, Tp, 80), embedding (1, 192) -> mel (1, 80, T2).

        ``flow_cache`` (1, 80, C, 2) is the previous streaming call's cache: its noise and mu replace
        the first C frames (continuity across chunks). ``noise`` (1, 80, Tp + T2) is the starting
        point; None draws it from ``generator`` (a fresh, randomly seeded one when None). Returns
        the mel without the prompt frames and the new cache (1, 80, Tp + 34, 2).
        """
        c = self.condition(token, prompt_token, prompt_feat, embedding)
        mu = c.mu
        if noise is None:
            if generator is None:
                generator = torch.Generator()
                generator.seed()
            noise = torch.randn(mu.shape, generator=generator, device=generator.device)
        elif noise.shape != mu.shape:
            raise ValueError(f"flow noise has shape {tuple(noise.shape)}, expected {tuple(mu.shape)}")
        noise = noise.to(mu).clone()

        if flow_cache is not None and flow_cache.size(2) > 0:
            cached = flow_cache.size(2)
            if cached > mu.size(2):
                raise ValueError(f"flow cache of {cached} frames is longer than the {mu.size(2)}-frame call")
            noise[:, :, :cached] = flow_cache[..., 0]
            mu = mu.clone()
            mu[:, :, :cached] = flow_cache[..., 1]
        p = c.prompt_frames
        new_cache = torch.stack(
            [
                torch.cat([noise[:, :, :p], noise[:, :, -FLOW_CACHE_TAIL_FRAMES:]], dim=2),
                torch.cat([mu[:, :, :p], mu[:, :, -FLOW_CACHE_TAIL_FRAMES:]], dim=2),
            ],
            dim=-1,
        )
        mel = self.decoder.solve(mu, c.mask, c.spks, c.cond, noise)
        return mel[:, :, p:], new_cache


def expect_class(node: object, classes: tuple[str, ...], where: str) -> Node:
    if not isinstance(node, Node) or node.cls not in classes:
        found = node.target if isinstance(node, Node) else type(node).__name__
        raise ConfigError(f"{where}: expected {' or '.join(classes)}, found {found}")
    return node


def estimator_kwargs(node: Node) -> dict:
    """The U-Net arguments of an estimator node (the official parameter names)."""
    return node_kwargs(
        node,
        "in_channels",
        "out_channels",
        "channels",
        "dropout",
        "attention_head_dim",
        "n_blocks",
        "num_mid_blocks",
        "num_heads",
        "act_fn",
        "causal",
        "static_chunk_size",
        "num_decoding_left_chunks",
    )
