"""The CPU linear kernels of the LLMs: packed oneDNN weights and fused projections give nn.Linear's
results (fp32 within round-off, bf16 within bf16 round-off) and keep the official state dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cosyserve.nn.linear import PackedLinear, pack_linears, packable_dtypes, unpack_linears
from cosyserve.nn.qwen2 import Qwen2Config, Qwen2Model

FP32_TOL = 1e-5  # oneDNN sums in another order than MKL: round-off only


@pytest.mark.parametrize("rows", [1, 2, 8, 65, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_nn_linear_fp32(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 40, bias=bias).requires_grad_(False)
    packed = PackedLinear.of(linear)
    x = torch.randn(rows, 1, 96)
    torch.testing.assert_close(packed(x), linear(x), rtol=FP32_TOL, atol=FP32_TOL)


def test_packed_linear_bf16_equals_bf16_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    if torch.bfloat16 not in packable_dtypes():  # an AVX2-only CPU: bf16 layers stay plain, and still run
        with pytest.raises(ValueError, match="bfloat16"):
            PackedLinear.of(linear)
        net = nn.Sequential(linear)
        assert pack_linears(net) == 0 and type(net[0]) is nn.Linear
        assert net(torch.randn(5, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
        return
    packed = PackedLinear.of(linear)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    out = packed(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), linear(x).float(), rtol=2e-2, atol=2e-2)


def test_packed_linear_state_dict_round_trips_and_refuses_wrong_shapes():
    linear = nn.Linear(8, 4).requires_grad_(False)
    packed = PackedLinear.of(linear)
    state = packed.state_dict()
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], linear.weight) and torch.equal(state["bias"], linear.bias)
    other = nn.Linear(8, 4)
    packed.load_state_dict(other.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(packed(x), other(x).detach(), rtol=FP32_TOL, atol=FP32_TOL)
    with pytest.raises(RuntimeError, match="size mismatch"):
        packed.load_state_dict(nn.Linear(8, 5).state_dict())
    twin = copy.deepcopy(packed)
    torch.testing.assert_close(twin(x), packed(x))
    assert isinstance(twin.plain(), nn.Linear) and torch.equal(twin.plain().weight, packed.weight)


def _qwen2() -> Qwen2Model:
    torch.manual_seed(0)
    return Qwen2Model(Qwen2Config(64, 2, 4, 2, 128, 100)).eval().requires_grad_(False)


def test_fused_and_packed_projections_keep_the_official_state_dict_and_results():
    model = _qwen2()
    official = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 7, 64)
    expected = model(x)
    for layer in model.layers:
        layer.self_attn.fuse()
        layer.mlp.fuse()
    assert not hasattr(model.layers[0].self_attn, "q_proj") and model.layers[0].self_attn.fused
    assert pack_linears(model) == 2 * 4  # qkv, o, gate_up, down in each of the 2 layers
    for stage in ("fused + packed", "reloaded"):
        state = model.state_dict()
        assert sorted(state) == sorted(official), stage
        for key, value in official.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"{stage}: {key}")
        torch.testing.assert_close(model(x), expected, rtol=FP32_TOL, atol=FP32_TOL)
        model.load_state_dict(official, strict=True)  # official keys load into the fused, packed layers
    assert unpack_linears(model) == 8
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear)))
