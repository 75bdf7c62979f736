"""The bench's weight-read bound counts what a decode step reads, int8 packed weights included."""

from __future__ import annotations

import torch

from cosyserve.bench import decode_weight_bytes


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 128))


def test_fp32_weights_without_the_embedding_table():
    assert decode_weight_bytes(_net()) == 64 * 128 * 4 + 128 * 4


def test_int8_linear_layers_count_their_packed_weights():
    quantized = torch.ao.quantization.quantize_dynamic(_net(), {torch.nn.Linear}, dtype=torch.qint8)
    assert decode_weight_bytes(quantized) == 64 * 128 * 1 + 128 * 4  # int8 weight, fp32 bias


def test_packed_oneDNN_weights_count_like_plain_ones():
    from cosyserve.nn.linear import pack_linears

    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        net = _net().to(dtype)
        pack_linears(net)
        assert decode_weight_bytes(net) == 64 * 128 * size + 128 * size
