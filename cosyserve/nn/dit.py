"""DiT flow-matching estimator of the v3 flow (spec §12.3).

A diffusion transformer with AdaLN-Zero conditioning on the flow time, a causal convolutional
position embedding and a rotary embedding that, as in the reference, only rotates the first
``dim_head`` features of q/k (i.e. head 0) before the head split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cosyserve.nn.chunk_state import ChunkState, append_kv, left_context, per_step, sees_every_frame
from cosyserve.work_units import unit_boundary


class SinusPositionEmbedding(nn.Module):
    """Sinusoidal embedding of the flow time t (scaled x1000), [sin, cos] halves."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor, scale: float = 1000.0) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        arg = scale * t.unsqueeze(1) * freqs.unsqueeze(0)  # (B, half); same op order as the reference
        return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_embed_dim: int = 256) -> None:
        super().__init__()
        self.time_embed = SinusPositionEmbedding(freq_embed_dim)
        self.time_mlp = nn.Sequential(nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(self.time_embed(t).to(t.dtype))  # (B, dim)


class CausalConvPositionEmbedding(nn.Module):
    """Two left-padded grouped convolutions with Mish: each frame only sees earlier frames."""

    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=0), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=0), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D)
        x = x.transpose(1, 2)
        x = self.conv1(F.pad(x, (self.kernel_size - 1, 0)))
        x = self.conv2(F.pad(x, (self.kernel_size - 1, 0)))
        return x.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, mu_dim: int, spk_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * mel_dim + mu_dim + spk_dim, out_dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor) -> torch.Tensor:
        # x, cond: (B, T, mel_dim); mu: (B, T, mu_dim); spks: (B, spk_dim)
        spks = spks.unsqueeze(1).expand(-1, x.size(1), -1)
        h = self.proj(torch.cat((x, cond, mu, spks), dim=-1))
        return self.conv_pos_embed(h) + h


class RotaryEmbedding(nn.Module):
    """x-transformers ``RotaryEmbedding``: angles duplicated pairwise (interleaved layout)."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: it is in flow.pt

    def forward(self, seq_len: int) -> torch.Tensor:
        t = torch.arange(seq_len, device=self.inv_freq.device).type_as(self.inv_freq)
        freqs = torch.outer(t, self.inv_freq)  # (T, dim/2)
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)  # (T, dim): θ0 θ0 θ1 θ1 ...


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``freqs.shape[-1]`` features of x (B, T, F); the rest pass unchanged."""
    rot_dim = freqs.shape[-1]
    head, tail = x[..., :rot_dim], x[..., rot_dim:]
    head = head * freqs.cos() + _rotate_pairs(head) * freqs.sin()
    return torch.cat((head, tail), dim=-1).type(x.dtype)


class AdaLayerNormZero(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulation(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (B, dim) -> (B, 6 * dim): shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
        return self.linear(self.silu(emb))


class AdaLayerNormZeroFinal(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulation(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (B, dim) -> (B, 2 * dim): scale, shift (this order, unlike the blocks)."""
        return self.linear(self.silu(emb))

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        scale, shift = modulation.chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        inner = dim * mult
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
            nn.Dropout(dropout),
            nn.Linear(inner, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        # x: (B, T, D); mask: (B, 1, T, T) bool, True = attend; rope: (T, dim_head)
        b = x.size(0)
        q = apply_rotary(self.to_q(x), rope)
        k = apply_rotary(self.to_k(x), rope)
        v = self.to_v(x)
        q, k, v = (z.view(b, -1, self.heads, z.size(-1) // self.heads).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, -1, q.size(1) * q.size(-1)).to(q.dtype)
        out = self.to_out[1](self.to_out[0](out))
        # Rows of padded frames are zeroed (the last query row's mask is the key padding mask).
        return out.masked_fill(~mask[:, 0, -1].unsqueeze(-1), 0.0)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, ff_mult, dropout)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        attend: Callable[[Attention, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """x (B, T, dim), ``attn_norm.modulation`` of the time embedding, ``attend(self.attn, normed x)``
        the self-attention (over the frames of this call, or cached ones too) -> (B, T, dim)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        norm = self.attn_norm.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x = x + gate_msa.unsqueeze(1) * attend(self.attn, norm)
        norm = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(norm)


def chunk_attention_mask(pad_mask: torch.Tensor, chunk_size: int, num_left_chunks: int) -> torch.Tensor:
    """(B, 1, T) padding mask -> (B, 1, T, T) boolean mask, True = attend.

    chunk_size <= 0: full attention over valid frames. Otherwise frame i sees the frames of its own
    chunk and of ``num_left_chunks`` earlier chunks (all earlier ones when negative).
    """
    size = pad_mask.size(-1)
    keys = pad_mask.bool()
    if chunk_size <= 0:
        return keys.expand(-1, size, -1).unsqueeze(1)
    pos = torch.arange(size, device=pad_mask.device)
    chunk = pos // chunk_size
    end = (chunk + 1) * chunk_size  # (T,) exclusive end per query
    first = chunk - num_left_chunks if num_left_chunks >= 0 else torch.zeros_like(chunk)  # first visible chunk
    start = (first * chunk_size).clamp(min=0)
    allowed = (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))  # (T, T)
    return (keys & allowed.unsqueeze(0)).unsqueeze(1)


class DiT(nn.Module):
    """DiT estimator: ``forward(x, mask, mu, t, spks, cond, streaming)`` -> velocity (B, out_channels, T)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        ff_mult: int,
        mel_dim: int,
        mu_dim: int,
        spk_dim: int,
        out_channels: int,
        static_chunk_size: int,
        num_decoding_left_chunks: int,
        dropout: float = 0.1,
        long_skip_connection: bool = False,
    ) -> None:
        super().__init__()
        if long_skip_connection:
            raise ValueError("DiT: long_skip_connection=True is not supported")
        self.static_chunk_size = static_chunk_size
        self.num_decoding_left_chunks = num_decoding_left_chunks
        self.time_embed = TimestepEmbedding(dim)
        self.input_embed = InputEmbedding(mel_dim, mu_dim, spk_dim, dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(dim, heads, dim_head, ff_mult, dropout) for _ in range(depth))
        self.norm_out = AdaLayerNormZeroFinal(dim)
        self.proj_out = nn.Linear(dim, out_channels)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        streaming: bool = False,
    ) -> torch.Tensor:
        # x, mu, cond: (B, 80, T); mask: (B, 1, T); t: (B,) or scalar; spks: (B, 80)
        b, _, length = x.shape
        if t.ndim == 0:
            t = t.repeat(b)
        *block_modulations, out_modulation = self._modulations(t)
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)
        rope = self.rotary_embed(length)
        chunk = self.static_chunk_size if streaming else 0
        attn_mask = chunk_attention_mask(mask, chunk, self.num_decoding_left_chunks)
        for block, modulation in zip(self.transformer_blocks, block_modulations, strict=True):
            h = block(h, modulation, lambda attn, x: attn(x, attn_mask, rope))
            unit_boundary()  # a long flow call may pause between blocks (cosyserve.work_units)
        h = self.norm_out(h, out_modulation)
        return self.proj_out(h).transpose(1, 2)

    @property
    def supports_chunks(self) -> bool:
        """Whether :meth:`forward_chunk` applies (a chunk size for the streaming attention)."""
        return self.static_chunk_size > 0

    def forward_chunk(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        state: ChunkState,
        offset: int,
    ) -> torch.Tensor:
        """The streaming forward of the frames from ``offset`` on (see the v2 U-Net's ``forward_chunk``).

        ``state`` holds the earlier frames' keys / values (rotated) of every block, the last 30
        input frames of both position convolutions and the time conditioning of this Euler step
        (the same for every chunk); it is extended in place. ``offset`` must be a
        multiple of the chunk size. x / mu / cond (B, 80, T new), spks (B, 80) -> (B, out_channels, T new).
        """
        chunk = self.static_chunk_size
        if chunk <= 0 or offset % chunk:
            raise ValueError(f"offset {offset} is not on a {chunk}-frame chunk boundary")
        b, _, length = x.shape
        if t.ndim == 0:
            t = t.repeat(b)
        *block_modulations, out_modulation = per_step(state, self.time_embed, t, lambda: self._modulations(t))
        embed = self.input_embed
        spk = spks.unsqueeze(1).expand(-1, length, -1)
        h = embed.proj(torch.cat((x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spk), dim=-1))
        pos = embed.conv_pos_embed
        y = h.transpose(1, 2)
        for conv in (pos.conv1, pos.conv2):
            y = conv(left_context(state, conv[0], y, pos.kernel_size - 1))
        h = y.transpose(1, 2) + h
        rope = self.rotary_embed(offset + length)[offset:]
        mask = None
        if not sees_every_frame(offset, length, chunk, self.num_decoding_left_chunks):
            keys = torch.ones(1, 1, offset + length, dtype=torch.bool, device=x.device)
            mask = chunk_attention_mask(keys, chunk, self.num_decoding_left_chunks)[:, :, offset:]
        for block, modulation in zip(self.transformer_blocks, block_modulations, strict=True):
            h = block(h, modulation, lambda attn, x: _attention_chunk(attn, x, mask, rope, state))
        h = self.norm_out(h, out_modulation)
        return self.proj_out(h).transpose(1, 2)

    def _modulations(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every block's AdaLN modulation of the time embedding, then the output norm's."""
        temb = self.time_embed(t)
        return *(block.attn_norm.modulation(temb) for block in self.transformer_blocks), self.norm_out.modulation(temb)


def _attention_chunk(
    attn: Attention,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    rope: torch.Tensor,
    state: ChunkState,
) -> torch.Tensor:
    """The new frames' attention over the cached (rotated) keys / values and their own."""
    b = x.size(0)
    q = apply_rotary(attn.to_q(x), rope)
    k = apply_rotary(attn.to_k(x), rope)
    v = attn.to_v(x)
    q, k, v = (z.view(b, -1, attn.heads, z.size(-1) // attn.heads).transpose(1, 2) for z in (q, k, v))
    k, v = append_kv(state, attn, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(b, -1, q.size(1) * q.size(-1)).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](out))
