"""1-D U-Net flow estimators: ``ConditionalDecoder`` (v1) and its causal variant (v2).

Down path, mid blocks and up path of [ResNet block + transformer blocks]; every module keeps the
official attribute names so ``decoder.estimator.*`` checkpoint keys load strictly. The causal
variant swaps zero-padded convolutions for left-padded ones and GroupNorm for LayerNorm, and
in streaming mode restricts attention to the current and earlier chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.nn.chunk_state import ChunkState, append_kv, left_context, sees_every_frame
from cosyserve.work_units import unit_boundary

_MASK_BIAS = -1.0e10  # additive attention bias for disallowed keys, as the reference uses


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of the flow time t in [0, 1], scaled by 1000: [sin, cos] halves."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError("SinusoidalPosEmb needs an even dimension")
        self.dim = dim

    def forward(self, t: Tensor, scale: float = 1000.0) -> Tensor:
        if t.ndim < 1:
            t = t.unsqueeze(0)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        args = scale * t.unsqueeze(1) * freqs.unsqueeze(0)  # (B, half)
        return torch.cat((args.sin(), args.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Stride-1 convolution that only looks left: (k - 1) zeros are prepended, no other padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=0)
        self.causal_padding = kernel_size - 1

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0), value=0.0))


class Transpose(nn.Module):
    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(self.dim0, self.dim1)


class Block1D(nn.Module):
    """Conv(k=3) -> GroupNorm -> Mish on masked input (``block.0``, ``block.1``)."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish())

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.block(x * mask) * mask


class CausalBlock1D(nn.Module):
    """CausalConv(k=3) -> LayerNorm over channels -> Mish (``block.0``, LayerNorm at ``block.2``)."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3), Transpose(1, 2), nn.LayerNorm(dim_out), Transpose(1, 2), nn.Mish()
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    """Two conv blocks with the time embedding added in between, plus a 1x1 residual projection."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, causal: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        if causal:
            self.block1: nn.Module = CausalBlock1D(dim, dim_out)
            self.block2: nn.Module = CausalBlock1D(dim_out, dim_out)
        else:
            self.block1 = Block1D(dim, dim_out)
            self.block2 = Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, temb: Tensor) -> Tensor:
        h = self.block1(x, mask) + self.mlp(temb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class Downsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head self-attention: bias-free q/k/v projections, additive bias mask, ``to_out.0``."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        # x (B, T, dim), bias (B, 1, T, T) broadcast over heads
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GELU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


# Estimator act_fn -> F.gelu approximation.
_GELU_APPROXIMATIONS = {"gelu": "none", "gelu-approximate": "tanh"}


class FeedForward(nn.Module):
    def __init__(self, dim: int, act_fn: str, mult: int = 4) -> None:
        super().__init__()
        if act_fn not in _GELU_APPROXIMATIONS:
            raise ValueError(f"unsupported estimator act_fn {act_fn!r} (supported: {sorted(_GELU_APPROXIMATIONS)})")
        inner = dim * mult
        # Index 1 is the (inference no-op) dropout slot; keeping it preserves the ``net.2`` key.
        self.net = nn.ModuleList([GELU(dim, inner, _GELU_APPROXIMATIONS[act_fn]), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention + feed-forward (no cross-attention; the time embedding is unused)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, act_fn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, act_fn)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


def chunk_attention_mask(size: int, chunk_size: int, num_left_chunks: int = -1, device=None) -> Tensor:
    """(size, size) bool: query i may see keys of its own chunk and of earlier ones.

    ``num_left_chunks`` < 0 keeps every earlier chunk; otherwise only that many.
    """
    idx = torch.arange(size, device=device)
    chunk = idx // chunk_size
    end = (chunk + 1) * chunk_size
    allowed = idx.unsqueeze(0) < end.unsqueeze(1)
    if num_left_chunks >= 0:
        start = ((chunk - num_left_chunks) * chunk_size).clamp(min=0)
        allowed &= idx.unsqueeze(0) >= start.unsqueeze(1)
    return allowed


class ConditionalDecoder(nn.Module):
    """U-Net velocity estimator. ``causal=True`` is the v2 estimator (the reference's CausalConditionalDecoder).

    forward(x, mask, mu, t, spks, cond, streaming): x / mu / cond (B, 80, T), mask (B, 1, T),
    t (B,), spks (B, 80) -> (B, out_channels, T). ``streaming`` matters only for the causal variant
    with ``static_chunk_size`` > 0 (chunk-causal attention); otherwise attention is full.
    ``dropout`` is accepted for yaml compatibility and unused (inference only).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        attention_head_dim: int = 64,
        n_blocks: int = 1,
        num_mid_blocks: int = 2,
        num_heads: int = 4,
        act_fn: str = "gelu",
        causal: bool = False,
        static_chunk_size: int = 0,
        num_decoding_left_chunks: int = -1,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.causal = causal
        self.static_chunk_size = int(static_chunk_size)
        self.num_decoding_left_chunks = int(num_decoding_left_chunks)

        time_embed_dim = channels[0] * 4
        self.time_embeddings = SinusoidalPosEmb(in_channels)
        self.time_mlp = TimestepEmbedding(in_channels, time_embed_dim)

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(
                [BasicTransformerBlock(dim, num_heads, attention_head_dim, act_fn) for _ in range(n_blocks)]
            )

        def same_length_conv(dim: int) -> nn.Module:
            return CausalConv1d(dim, dim, 3) if causal else nn.Conv1d(dim, dim, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        dim_out = in_channels
        for i, width in enumerate(channels):
            dim_in, dim_out = dim_out, width
            last = i == len(channels) - 1
            self.down_blocks.append(
                nn.ModuleList(
                    [
                        ResnetBlock1D(dim_in, dim_out, time_embed_dim, causal),
                        transformers(dim_out),
                        same_length_conv(dim_out) if last else Downsample1D(dim_out),
                    ]
                )
            )

        self.mid_blocks = nn.ModuleList(
            [
                nn.ModuleList(
                    [ResnetBlock1D(channels[-1], channels[-1], time_embed_dim, causal), transformers(channels[-1])]
                )
                for _ in range(num_mid_blocks)
            ]
        )

        up_widths = (*channels[::-1], channels[0])
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_widths) - 1):
            dim_in, dim_out = up_widths[i] * 2, up_widths[i + 1]  # x2: the skip connection is concatenated
            last = i == len(up_widths) - 2
            self.up_blocks.append(
                nn.ModuleList(
                    [
                        ResnetBlock1D(dim_in, dim_out, time_embed_dim, causal),
                        transformers(dim_out),
                        same_length_conv(dim_out) if last else Upsample1D(dim_out),
                    ]
                )
            )

        self.final_block = (
            CausalBlock1D(up_widths[-1], up_widths[-1]) if causal else Block1D(up_widths[-1], up_widths[-1])
        )
        self.final_proj = nn.Conv1d(up_widths[-1], out_channels, 1)

    def _attention_bias(self, mask: Tensor, streaming: bool) -> Tensor | None:
        """(B, 1, T) validity mask -> (B, 1, T, T) additive bias (0 allowed, -1e10 not); None if all allowed."""
        t = mask.size(-1)
        valid = mask.bool()
        if self.causal and streaming and self.static_chunk_size > 0:
            chunks = chunk_attention_mask(t, self.static_chunk_size, self.num_decoding_left_chunks, mask.device)
            allowed = valid & chunks.unsqueeze(0)
        elif bool(valid.all()):
            return None  # adding a zero bias changes nothing; SDPA is faster without one
        else:
            allowed = valid.expand(-1, t, -1)
        return ((1.0 - allowed.to(mask.dtype)) * _MASK_BIAS).unsqueeze(1)

    @staticmethod
    def _run_transformers(blocks: nn.ModuleList, x: Tensor, bias: Tensor | None) -> Tensor:
        x = x.transpose(1, 2)  # (B, T, C)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor | None = None,
        cond: Tensor | None = None,
        streaming: bool = False,
    ) -> Tensor:
        temb = self.time_mlp(self.time_embeddings(t).to(t.dtype))  # (B, 4 * channels[0])

        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        if cond is not None:
            parts.append(cond)
        x = torch.cat(parts, dim=1)  # (B, in_channels, T)

        # Every stage at one resolution shares its mask, hence its attention bias.
        biases: dict[int, Tensor | None] = {}

        def bias_for(m: Tensor) -> Tensor | None:
            if m.size(-1) not in biases:
                b = self._attention_bias(m, streaming)
                biases[m.size(-1)] = None if b is None else b.to(x.dtype)
            return biases[m.size(-1)]

        hiddens: list[Tensor] = []
        masks = [mask]
        for resnet, blocks, downsample in self.down_blocks:
            mask_down = masks[-1]
            x = resnet(x, mask_down, temb)
            x = self._run_transformers(blocks, x, bias_for(mask_down))
            hiddens.append(x)
            x = downsample(x * mask_down)
            masks.append(mask_down[:, :, ::2])
            unit_boundary()  # a long flow call may pause between blocks (cosyserve.work_units)
        masks.pop()  # the last stage does not change the resolution

        mask_mid = masks[-1]
        for resnet, blocks in self.mid_blocks:
            x = resnet(x, mask_mid, temb)
            x = self._run_transformers(blocks, x, bias_for(mask_mid))
            unit_boundary()

        mask_up = mask
        for resnet, blocks, upsample in self.up_blocks:
            mask_up = masks.pop()
            skip = hiddens.pop()
            # The transposed conv may overshoot odd lengths by one frame.
            x = torch.cat([x[:, :, : skip.size(-1)], skip], dim=1)
            x = resnet(x, mask_up, temb)
            x = self._run_transformers(blocks, x, bias_for(mask_up))
            x = upsample(x * mask_up)
            unit_boundary()

        x = self.final_block(x, mask_up)
        return self.final_proj(x * mask_up) * mask

    @property
    def supports_chunks(self) -> bool:
        """Whether :meth:`forward_chunk` applies: causal, chunk-causal attention, one resolution."""
        return self.causal and self.static_chunk_size > 0 and len(self.down_blocks) == 1

    def forward_chunk(
        self, x: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor, state: ChunkState, offset: int
    ) -> Tensor:
        """The streaming (chunk-causal) forward of the frames from ``offset`` on, given ``state``.

        ``state`` holds, for the frames before ``offset``, every attention layer's keys / values and
        every causal convolution's last input frames; it is extended in place. ``offset`` must fall
        on an attention chunk boundary, so the earlier frames never see the new ones and their
        cached values are those a full streaming forward would compute. x / mu / cond (B, 80, T new),
        t (B,), spks (B, 80) -> (B, out_channels, T new); the mask is all ones (one utterance per row).
        """
        if not self.supports_chunks:
            raise ValueError("forward_chunk needs the causal single-resolution decoder with a chunk size")
        if offset % self.static_chunk_size:
            raise ValueError(f"offset {offset} is not on a {self.static_chunk_size}-frame chunk boundary")
        temb = self.time_mlp(self.time_embeddings(t).to(t.dtype))
        x = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(-1)), cond], dim=1)
        bias = _chunk_bias(offset, x.size(-1), self.static_chunk_size, self.num_decoding_left_chunks, x.dtype, x.device)

        def transformers(blocks: nn.ModuleList, h: Tensor) -> Tensor:
            h = h.transpose(1, 2)
            for block in blocks:
                h = h + _attention_chunk(block.attn1, block.norm1(h), bias, state)
                h = h + block.ff(block.norm3(h))
            return h.transpose(1, 2)

        ((resnet, blocks, conv),) = self.down_blocks
        x = transformers(blocks, _resnet_chunk(resnet, x, temb, state))
        skip = x
        x = _conv_chunk(conv, x, state)
        for resnet, blocks in self.mid_blocks:
            x = transformers(blocks, _resnet_chunk(resnet, x, temb, state))
        ((resnet, blocks, conv),) = self.up_blocks
        x = transformers(blocks, _resnet_chunk(resnet, torch.cat([x, skip], dim=1), temb, state))
        x = _conv_chunk(conv, x, state)
        return self.final_proj(_block_chunk(self.final_block, x, state))


def _chunk_bias(offset: int, length: int, chunk: int, left_chunks: int, dtype, device) -> Tensor | None:
    """(1, 1, length, offset + length) additive bias of the streaming mask for queries from ``offset`` on
    (None when they see every frame)."""
    if sees_every_frame(offset, length, chunk, left_chunks):
        return None
    allowed = chunk_attention_mask(offset + length, chunk, left_chunks, device)[offset:]
    return ((1.0 - allowed.to(dtype)) * _MASK_BIAS)[None, None]


def _conv_chunk(conv: nn.Conv1d, x: Tensor, state: ChunkState) -> Tensor:
    """A left-padded stride-1 conv continued from the last (k - 1) input frames of the earlier frames."""
    keep = conv.kernel_size[0] - 1
    if keep == 0:
        return nn.Conv1d.forward(conv, x)
    return nn.Conv1d.forward(conv, left_context(state, conv, x, keep))


def _block_chunk(block: CausalBlock1D, x: Tensor, state: ChunkState) -> Tensor:
    conv, *rest = block.block
    x = _conv_chunk(conv, x, state)
    for layer in rest:
        x = layer(x)
    return x


def _resnet_chunk(resnet: ResnetBlock1D, x: Tensor, temb: Tensor, state: ChunkState) -> Tensor:
    h = _block_chunk(resnet.block1, x, state) + resnet.mlp(temb).unsqueeze(-1)
    return _block_chunk(resnet.block2, h, state) + resnet.res_conv(x)


def _attention_chunk(attn: Attention, x: Tensor, bias: Tensor | None, state: ChunkState) -> Tensor:
    """Self-attention of the new frames over the cached keys / values and their own."""
    b, t, _ = x.shape
    q, k, v = (proj(x).view(b, t, attn.heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
    k, v = append_kv(state, attn, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return attn.to_out[0](out.transpose(1, 2).reshape(b, t, -1))
