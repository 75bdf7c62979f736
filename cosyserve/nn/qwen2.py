"""Qwen2 decoder body (the ``Qwen2ForCausalLM`` inside the v2 / v3 LLMs) with an explicit KV cache.

Numerics follow the Hugging Face Qwen2 implementation the reference runs (fp32 RMSNorm, RoPE in the
"rotate_half" layout with positions continuing across cached steps, GQA by repeating the key/value
heads, scaled-dot-product attention). Only the final-normed hidden states are produced: the
151 936-way LM head output is never used by CosyVoice, so it is not computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.nn.kv_cache import KVCache
from cosyserve.nn.linear import FusedProjections


@dataclass(frozen=True)
class Qwen2Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )


class Qwen2RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in at least fp32 whatever the compute dtype, then scale in that dtype (as the reference).
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Qwen2RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (T, head_dim) for integer ``positions`` (T,), computed in at least fp32."""
        work = torch.promote_types(dtype, torch.float32)
        freqs = positions.to(work)[:, None] * self.inv_freq.to(work)[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class Qwen2Attention(FusedProjections):
    FUSIONS: ClassVar[dict[str, tuple[str, ...]]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int
    ) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.split("qkv_proj", x) if self.fused else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, t, hd)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, t, hd)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, Hkv, S, hd), S = longest row after this step
        # Query head h reads key/value head h // (heads / kv heads), without copying the keys (GQA).
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and t > 1,
            scale=self.head_dim**-0.5,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Qwen2MLP(FusedProjections):
    FUSIONS: ClassVar[dict[str, tuple[str, ...]]] = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.split("gate_up_proj", x) if self.fused else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """The decoder stack: ``embed_tokens``, ``layers``, final ``norm``."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def forward(self, inputs_embeds: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, t, D) input embeddings -> (B, t, D) final-normed hidden states.

        With a ``cache`` the new positions continue after each row's cached ones, attend to all of
        them and causally among themselves; the cache is extended in place. Rows of different
        lengths (a decode batch) take one new position each, at their own RoPE position.
        """
        t = inputs_embeds.shape[1]
        device = inputs_embeds.device
        mask = None
        if cache is None or cache.uniform:
            past = cache.lengths[0] if cache is not None and cache.rows else 0
            positions = torch.arange(past, past + t, device=device)
            cos, sin = self.rotary_emb(positions, inputs_embeds.dtype)  # (t, hd), shared by every row
            if past and t > 1:
                # New query i (absolute past + i) sees keys 0 .. past + i.
                mask = torch.ones(t, past + t, dtype=torch.bool, device=device).tril(diagonal=past)
        else:
            cos, sin = self.rotary_emb(cache.lengths_tensor(device), inputs_embeds.dtype)  # (B, hd)
            cos, sin = cos[:, None, None, :], sin[:, None, None, :]
            mask = cache.key_mask(t, device)  # (B, 1, 1, S): each row's own keys only
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)


class TiedLMHead(nn.Module):
    """``lm_head``: the same Parameter as ``embed_tokens.weight`` (Qwen2.5 ties them).

    The key is kept so the official state dict loads strictly, but no second (vocab x D) copy is held
    and loading never overwrites the embedding with it. CosyVoice never uses the LM head output, so
    an untied checkpoint's head is checked for shape and dropped.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight = embedding.weight

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        elif tuple(state_dict[key].shape) != tuple(self.weight.shape):
            error_msgs.append(f"size mismatch for {key}: {tuple(state_dict[key].shape)} vs {tuple(self.weight.shape)}")


class Qwen2ForCausalLM(nn.Module):
    """Container matching the official key layout ``model.*`` / ``lm_head.weight``."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = TiedLMHead(self.model.embed_tokens)
