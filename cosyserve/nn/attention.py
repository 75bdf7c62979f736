"""ESPnet-style relative-position self-attention, its positional table, chunk masks and a KV cache.

Spec §8.2. Masks follow the reference convention: boolean, True = may attend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cosyserve.nn.kv_cache import KVCache


def chunk_mask(size: int, chunk: int, device: torch.device | None = None) -> Tensor:
    """(size, size) bool: query i may see key j iff j < (i // chunk + 1) * chunk; chunk 0 = full."""
    if chunk <= 0:
        return torch.ones(size, size, dtype=torch.bool, device=device)
    pos = torch.arange(size, device=device)
    limit = (torch.div(pos, chunk, rounding_mode="floor") + 1) * chunk
    return pos.unsqueeze(0) < limit.unsqueeze(1)


def padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, 1, max_len) bool, True on the first ``lengths[b]`` positions."""
    pos = torch.arange(max_len, device=lengths.device)
    return (pos.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1)


class RelPositionalEncoding(nn.Module):
    """Input scaling by sqrt(D) plus the sinusoid table of relative distances ('rel_pos_espnet').

    PE(d)[2k] = sin(d w_k), PE(d)[2k+1] = cos(d w_k), w_k = exp(-2k ln(10000) / D). The table is
    computed in float32 exactly as the reference does (float32 position times float32 frequency),
    because at distances of hundreds the float32 rounding of the angle is visible in the output.
    It has no parameters and grows on demand (no 5000-position limit).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        # rows: PE(0), PE(1), ...; sin columns of negative distances are the negated rows.
        self.register_buffer("table", torch.empty(0, d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.xscale

    def _table(self, n: int) -> Tensor:
        """A table of at least ``n`` rows. Concurrent callers may both grow it; the larger one is kept."""
        table = self.table
        if table.size(0) >= n:
            return table
        n = max(n, 2 * table.size(0), 64)
        freq = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device=table.device)
            * -(math.log(10000.0) / self.d_model)
        )
        angle = torch.arange(n, dtype=torch.float32, device=table.device).unsqueeze(1) * freq
        table = torch.zeros(n, self.d_model, device=table.device)
        table[:, 0::2] = torch.sin(angle)
        table[:, 1::2] = torch.cos(angle)
        if self.table.size(0) < n:
            self.table = table
        return table

    def sequence(self, hi: int, lo: int, like: Tensor) -> Tensor:
        """PE(hi), PE(hi - 1), ..., PE(lo) as (1, hi - lo + 1, D) in ``like``'s device and dtype."""
        table = self._table(max(abs(hi), abs(lo)) + 1)
        dist = torch.arange(hi, lo - 1, -1, device=table.device)
        rows = table[dist.abs()]
        sign = torch.where(dist < 0, -1.0, 1.0).unsqueeze(1)
        rows[:, 0::2] *= sign
        return rows.unsqueeze(0).to(device=like.device, dtype=like.dtype)


class LayerCache:
    """One layer's slice of a :class:`KVCache`: what an attention module writes its keys/values to."""

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache = cache
        self.layer = layer

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.write(self.layer, k, v)


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL style self-attention with learned biases u (content) and v (position).

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . p(i - j)] / sqrt(d_k), p = linear_pos(PE).
    Query i is at absolute position ``cache.length + row``; keys are positions 0 .. S-1.
    """

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True) -> None:
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"attention width {n_feat} is not divisible by {n_head} heads")
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    def forward(self, x: Tensor, mask: Tensor | None, pos_seq: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x (B, T, D); mask (B, T|1, S) bool or None (attend everywhere);
        pos_seq (1, S + T - 1, D) = PE(S-1) ... PE(-(T-1)) with S = cached + T keys.

        Rows of a cache with different lengths (a decode batch, T = 1) have S = longest + 1 keys and
        pos_seq = PE(S-1) ... PE(0); each row reads the distances of its own length."""
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.d_k)
        k = self.linear_k(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.d_k).transpose(1, 2)
        ragged = cache is not None and not cache.cache.uniform
        lengths = cache.cache.lengths_tensor(x.device) if ragged else None
        if cache is not None:
            k, v = cache.write(k, v)
        s = k.size(2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, h, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))  # (B, h, T, S)
        position = self._position_scores(q_v, pos_seq, s, lengths)
        scores = (content + position) / math.sqrt(self.d_k)
        if mask is not None:
            blocked = ~mask.unsqueeze(1)  # (B, 1, T|1, S)
            # Fully blocked rows become NaN after softmax; zeroing them afterwards gives 0 output.
            attn = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)

    def _position_scores(self, q_v: Tensor, pos_seq: Tensor, s: int, lengths: Tensor | None = None) -> Tensor:
        """(q_i + v) . p(i - j) for every query row i and key j -> (B, h, T, S).

        ``lengths`` (B,): each batch row's cached length when they differ (T = 1, pos_seq = PE(S-1)..PE(0))."""
        b, h, t, d_k = q_v.shape
        n = pos_seq.size(1)  # S + T - 1 distances, from S-1 down to -(T-1)
        d = pos_seq.size(2)
        # linear_pos has no bias, so (q W_h) . pe == q . (W_h pe): projecting the few queries back
        # to model width is far cheaper than projecting every distance when T is small (decoding).
        if b * t * (d + h * n) < n * (d + b * t):
            w = self.linear_pos.weight.view(h, d_k, d)
            raw = torch.matmul(torch.einsum("bhtk,hkd->bhtd", q_v, w), pos_seq[0].transpose(0, 1))
        else:
            p = self.linear_pos(pos_seq).view(1, n, h, d_k).transpose(1, 2)  # (1, h, n, d_k)
            raw = torch.matmul(q_v, p.transpose(-2, -1))
        raw = raw.contiguous()  # (B, h, T, n)
        if lengths is not None:
            # Row b's query sits at position lengths[b]: key j is at distance lengths[b] - j, column
            # s - 1 - lengths[b] + j. Keys past the row's end are padding (masked), so clamp them.
            column = (s - 1 - lengths)[:, None] + torch.arange(s, device=raw.device)[None, :]
            index = column.clamp(max=n - 1)[:, None, None, :].expand(b, h, t, s)
            return raw.gather(-1, index)
        # Row r holds distances S-1 .. -(T-1); key j of query r (distance (S - T + r) - j) sits at
        # column T - 1 - r + j, i.e. a diagonal walk with row stride n - 1 (Transformer-XL shift).
        return raw.as_strided((b, h, t, s), (h * t * n, t * n, n - 1, 1), raw.storage_offset() + t - 1)
