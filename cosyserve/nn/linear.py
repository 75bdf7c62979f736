"""A linear layer for the few rows of a decode step on the CPU.

A batched autoregressive decode step multiplies one row per request by every weight matrix. MKL's
``x @ W.T`` kernel (what ``nn.Linear`` calls) is slow for 2 or more such rows: on a 2-core AVX2
machine, 4 rows through a 896x4864 fp32 weight ran at a quarter of the memory bandwidth, slower than
4 single rows, and a CosyVoice2 decode step took 331 ms for 2 requests against 166 ms for one.
Computing ``(W @ x.T).T`` instead reads the row-major weight in its own order: 174 ms for 2, 288 ms
for 8 (492 before). One row keeps ``nn.Linear``'s matrix-vector kernel, which is faster there.
Only the summation order differs from ``nn.Linear`` (float round-off, ~1e-7 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# From 2 up to this many rows the weight-first product is faster (measured up to 64 on the 2-core
# CPU); beyond it (prefill, the flow's frames) the product is compute-bound and nn.Linear's kernel wins.
FEW_ROWS = 64


class FewRowsLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that computes 2..FEW_ROWS-row fp32 CPU inputs weight-first."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        fp32_cpu = x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
        if not (fp32_cpu and 1 < rows <= FEW_ROWS):
            return F.linear(x, self.weight, self.bias)
        y = torch.mm(self.weight, x.reshape(rows, self.in_features).t()).t()  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous().view(*x.shape[:-1], self.out_features)


def use_few_rows_linear(module: nn.Module, enabled: bool = True) -> int:
    """Replace every plain ``nn.Linear`` inside ``module`` by a :class:`FewRowsLinear` sharing its
    parameters (parameter names and the state dict stay as they are), or, not ``enabled``, back (what
    dynamic quantization needs: it converts plain ``nn.Linear`` only). Returns how many."""
    source, target = (nn.Linear, FewRowsLinear) if enabled else (FewRowsLinear, nn.Linear)
    replaced = 0
    for name, child in module.named_children():
        if type(child) is source:
            setattr(module, name, _sharing(target, child))
            replaced += 1
        else:
            replaced += use_few_rows_linear(child, enabled)
    return replaced


def _sharing(cls: type[nn.Linear], linear: nn.Linear) -> nn.Linear:
    """A ``cls`` holding ``linear``'s own weight and bias Parameters (nothing copied)."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    layer.weight = linear.weight
    layer.bias = linear.bias
    return layer
