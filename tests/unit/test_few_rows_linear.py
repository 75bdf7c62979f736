"""The decode step's few-row linear layer: the same results, parameters and state dict as nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cosyserve.nn.linear import FEW_ROWS, FewRowsLinear, use_few_rows_linear


def _few_rows(linear: nn.Linear) -> FewRowsLinear:
    holder = nn.Sequential(linear)
    use_few_rows_linear(holder)
    return holder[0]


@pytest.mark.parametrize("rows", [1, 2, 7, FEW_ROWS, FEW_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_nn_linear(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    fast = _few_rows(linear)
    x = torch.randn(rows, 1, 96)
    y = fast(x)
    assert y.shape == (rows, 1, 40) and y.is_contiguous()
    torch.testing.assert_close(y, linear(x), rtol=1e-6, atol=1e-6)


def test_weight_first_product_is_used_for_a_few_rows_only(monkeypatch):
    """The alternative kernel runs for 2..FEW_ROWS fp32 rows; one row and more rows keep nn.Linear's."""
    calls = []
    original = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(1) or original(*a))
    fast = _few_rows(nn.Linear(16, 8))
    for rows in (1, 2, FEW_ROWS, FEW_ROWS + 1):
        fast(torch.randn(rows, 16))
    assert len(calls) == 2
    fast.to(torch.bfloat16)(torch.randn(4, 16, dtype=torch.bfloat16))
    assert len(calls) == 2


def test_replacement_keeps_parameters_and_state_dict():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2, bias=False)))
    before = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert use_few_rows_linear(model) == 2
    assert isinstance(model[0], FewRowsLinear) and isinstance(model[1][1], FewRowsLinear)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert list(model.state_dict()) == keys
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    assert model(torch.ones(3, 4)).abs().sum() == 0
    assert use_few_rows_linear(model, enabled=False) == 2
    assert type(model[0]) is nn.Linear and type(model[1][1]) is nn.Linear
    assert all(dict(model.named_parameters())[n] is before[n] for n in before)
