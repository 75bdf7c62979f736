"""Qwen2 body: config parsing, KV-cached decoding, GQA layout, tied LM head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cosyserve.config import ConfigError
from cosyserve.models.cosyvoice2.config import read_qwen2_config
from cosyserve.nn.qwen2 import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

CFG = Qwen2Config(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=40,
    vocab_size=50,
    rms_norm_eps=1e-6,
    rope_theta=1e4,
)


def _model(seed: int = 0) -> Qwen2Model:
    gen = torch.Generator().manual_seed(seed)
    model = Qwen2Model(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == 48 else 0.0))
    # float64 so that any disagreement below is a logic error, not rounding.
    return model.double().eval()


def _inputs(t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, t, CFG.hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _naive_forward(model: Qwen2Model, x: torch.Tensor) -> torch.Tensor:
    """Independent reading of the Qwen2 equations: per-head loops, RoPE as complex rotation."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    h_q, h_kv, hd = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    t = x.shape[1]
    x = x[0].double()

    def rms(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps)

    def rope(v: torch.Tensor) -> torch.Tensor:  # (t, hd): pairs (j, j + hd/2) rotate by pos * theta^(-2j/hd)
        half = hd // 2
        # The frequency table is defined in float32 (as the reference's inv_freq buffer).
        freq = (1.0 / CFG.rope_theta ** (torch.arange(half).float() * 2 / hd)).double()
        angle = torch.arange(t, dtype=torch.float64)[:, None] * freq[None]
        z = torch.complex(v[:, :half], v[:, half:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1)

    for i in range(CFG.num_hidden_layers):
        p = f"layers.{i}."
        a = rms(x, sd[p + "input_layernorm.weight"])
        q = a @ sd[p + "self_attn.q_proj.weight"].T + sd[p + "self_attn.q_proj.bias"]
        k = a @ sd[p + "self_attn.k_proj.weight"].T + sd[p + "self_attn.k_proj.bias"]
        v = a @ sd[p + "self_attn.v_proj.weight"].T + sd[p + "self_attn.v_proj.bias"]
        heads = []
        for h in range(h_q):
            g = h // (h_q // h_kv)
            qh = rope(q[:, h * hd : (h + 1) * hd])
            kh = rope(k[:, g * hd : (g + 1) * hd])
            scores = qh @ kh.T / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, g * hd : (g + 1) * hd])
        x = x + torch.cat(heads, dim=-1) @ sd[p + "self_attn.o_proj.weight"].T
        m = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = m @ sd[p + "mlp.gate_proj.weight"].T
        up = m @ sd[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["norm.weight"])[None]


def test_matches_naive_equations() -> None:
    model, x = _model(), _inputs(9)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, _naive_forward(model, x), atol=1e-10, rtol=0)


def test_kv_cached_decoding_equals_full_forward() -> None:
    model, x = _model(), _inputs(80)  # long enough to grow the cache storage past its first size
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        parts = [model(x[:, :5], cache), model(x[:, 5:8], cache)]  # a multi-position step after a prefix
        parts += [model(x[:, i : i + 1], cache) for i in range(8, x.shape[1])]
    assert cache.length == x.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-10, rtol=0)


def test_gqa_shapes() -> None:
    model = _model()
    attn = model.layers[0].self_attn
    hd = CFG.hidden_size // CFG.num_attention_heads
    assert attn.q_proj.weight.shape == (CFG.num_attention_heads * hd, CFG.hidden_size)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (CFG.num_key_value_heads * hd, CFG.hidden_size)
    assert attn.o_proj.bias is None and attn.q_proj.bias is not None
    cache = model.new_cache()
    with torch.no_grad():
        model(_inputs(4), cache)
        model(_inputs(1, seed=2), cache)
    assert cache.lengths == [5]
    for layer in range(CFG.num_hidden_layers):
        k, v = cache.write(
            layer, torch.zeros(1, CFG.num_key_value_heads, 0, hd), torch.zeros(1, CFG.num_key_value_heads, 0, hd)
        )
        assert k.shape == v.shape == (1, CFG.num_key_value_heads, 5, hd)


def test_tied_lm_head_shares_embedding() -> None:
    lm = Qwen2ForCausalLM(CFG)
    sd = lm.state_dict()
    assert "lm_head.weight" in sd
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    state = {k: torch.randn(v.shape) for k, v in sd.items()}
    lm.load_state_dict(state, strict=True)
    # A (stale) lm_head entry never overwrites the embedding it is tied to.
    assert torch.equal(lm.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    del state["lm_head.weight"]
    with pytest.raises(RuntimeError, match=r"lm_head\.weight"):
        lm.load_state_dict(state, strict=True)


def test_config_from_json(tmp_path: Path) -> None:
    raw = {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    cfg = read_qwen2_config(path)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta) == (64, 2, 1e6)
    path.write_text(json.dumps({**raw, "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="hidden_act"):
        read_qwen2_config(path)
    path.write_text(json.dumps({k: v for k, v in raw.items() if k != "hidden_size"}))
    with pytest.raises(ConfigError, match="hidden_size"):
        read_qwen2_config(path)
    with pytest.raises(ConfigError):
        read_qwen2_config(tmp_path / "missing.json")
