"""v1 flow ``MaskedDiffWithXvec``: speech tokens -> mel (spec §10).

Token embeddings go through a conformer encoder, are stretched to the mel frame rate by linear
interpolation (``InterpolateRegulator``) and condition a flow-matching U-Net, sampled from fresh
noise on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.models.cosyvoice1.config import V1FlowConfig
from cosyserve.models.flow import TokenFlow
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

    def to_frames(self, x1: Tensor, x2: Tensor, mel_len1: int, mel_len2: int, input_frame_rate: int = 50) -> Tensor:
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


class MaskedDiffWithXvec(TokenFlow):
    """Conformer encoder, then interpolation to the mel length; fresh noise on every call."""

    def __init__(self, config: V1FlowConfig) -> None:
        super().__init__(config, ConditionalDecoder(**config.estimator))
        self.input_frame_rate = config.input_frame_rate
        self.encoder = config.encoder.build()
        self.encoder_proj = nn.Linear(config.encoder.output_size, config.output_size)
        self.length_regulator = InterpolateRegulator(**config.length_regulator)

    def encode(self, emb: Tensor, n_prompt: int, prompt_frames: int, finalize: bool, streaming: bool) -> Tensor:
        """Conformer, then prompt and target interpolated separately to their mel lengths (spec §10.4)."""
        h, _ = self.encoder(emb, torch.tensor([emb.size(1)], device=emb.device))
        h = self.encoder_proj(h)  # (1, P+N, 80)
        target_frames = tokens_to_frames(emb.size(1) - n_prompt, self.input_frame_rate)
        return self.length_regulator.to_frames(
            h[:, :n_prompt], h[:, n_prompt:], prompt_frames, target_frames, self.input_frame_rate
        )

    @torch.no_grad()
    def tokens_to_mel(
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
