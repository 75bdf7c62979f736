"""Linear layers for the CPU: weights packed once for oneDNN, and projections fused at load.

An autoregressive decode step multiplies one row per request by every weight matrix, so it is
bound by reading the weights. ``nn.Linear`` (MKL) reads fp32 weights at about half the memory
bandwidth for one row and a fifth of it for 8 (measured on a 2-core AVX-512 EPYC: 12.8 GB/s, 2.4
GB/s for 8 rows, over the 1.4 GB of the CosyVoice2 LLM's layers). oneDNN's kernels on a weight laid
out once in their blocked format (:class:`PackedLinear`) read it at 25 GB/s for 1 row and 22 for
8, in fp32, and bf16 weights at 21 GB/s (half the bytes); prefill's many rows are faster too.

Projections that read the same input (q / k / v, gate / up) run as one product
(:class:`FusedProjections`): fewer, larger products are read closer to the bandwidth (7-30 %
faster). The state dict keeps the official names both ways: the fused weight is saved as its parts
and loaded from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

PACK_ROWS = 16  # the rows the weights are laid out for: measured best over 1-8 decode rows (scripts/decode_kernels.py)


@cache
def packable_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN packs on this CPU: fp32 everywhere; bf16 only where its kernels exist
    (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU refuses it, and keeps plain bf16 layers)."""
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), PACK_ROWS)
    except RuntimeError:
        return (torch.float32,)
    return (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight packed for oneDNN's CPU kernels (fp32 or bf16 weights and inputs).

    The packed weight is opaque; the state dict holds it as a plain ``weight`` (and ``bias``)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        if weight.device.type != "cpu" or weight.dtype not in packable_dtypes():
            kinds = ", ".join(str(dtype) for dtype in packable_dtypes())
            raise ValueError(
                f"PackedLinear takes CPU weights of {kinds} on this CPU, not {weight.dtype} on {weight.device}"
            )
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self._pack(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight.detach(), linear.bias)

    def _pack(self, weight: Tensor) -> None:
        # oneDNN chooses the blocked layout for a number of rows; every row count can use it. Laid out for
        # PACK_ROWS, 1 row runs about 6 % slower than laid out for 1, and 8 rows 35 % faster.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @property
    def weight(self) -> Tensor:
        """The weight as a plain (out, in) tensor (a copy)."""
        return self.packed.to_dense()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # torch's hook arguments after the prefix: local_metadata, strict, missing, unexpected, error messages
        missing_keys, error_msgs = args[2], args[4]
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        elif tuple(state_dict[key].shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: {tuple(state_dict[key].shape)}")
        else:
            self._pack(state_dict[key].to(self.dtype))
        if self.bias is not None:
            key = prefix + "bias"
            if key not in state_dict:
                missing_keys.append(key)
            elif tuple(state_dict[key].shape) != tuple(self.bias.shape):
                error_msgs.append(f"size mismatch for {key}: {tuple(state_dict[key].shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[key])

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedLinear:
        # The opaque packed tensor cannot be deep-copied: pack a copy of its plain weight.
        return PackedLinear(self.weight, None if self.bias is None else self.bias.detach().clone())

    def plain(self) -> nn.Linear:
        """The same layer as a plain ``nn.Linear``."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed {self.dtype}"


def dense_weight(linear: nn.Module) -> Tensor:
    """The (out, in) weight of an ``nn.Linear``, a :class:`PackedLinear` or a dynamically quantized linear."""
    weight = linear.weight
    weight = weight() if callable(weight) else weight  # quantized: weight() is the packed int8 tensor
    return weight.dequantize() if weight.is_quantized else weight.detach()


def dense_bias(linear: nn.Module) -> Tensor | None:
    bias = linear.bias
    bias = bias() if callable(bias) else bias
    return None if bias is None else bias.detach()


def pack_linears(module: nn.Module, skip: Sequence[str] = ()) -> int:
    """Replace every ``nn.Linear`` inside ``module`` (CPU) whose dtype this CPU packs by a
    :class:`PackedLinear` (names ending in one of ``skip`` are left alone); returns how many."""
    replaced = 0
    for name, child in module.named_children():
        if type(child) is nn.Linear and child.weight.dtype in packable_dtypes() and not name.endswith(tuple(skip)):
            setattr(module, name, PackedLinear.of(child))
            replaced += 1
        else:
            replaced += pack_linears(child, skip)
    return replaced


def unpack_linears(module: nn.Module) -> int:
    """Turn every :class:`PackedLinear` inside ``module`` back into a plain ``nn.Linear``; returns how many."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, PackedLinear):
            setattr(module, name, child.plain())
            replaced += 1
        else:
            replaced += unpack_linears(child)
    return replaced


class FusedProjections(nn.Module):
    """A base for modules whose projections of the same input may run as one product.

    Subclasses list them in ``FUSIONS`` (the fused name -> the parts, in order); :meth:`fuse` replaces
    the parts by one ``nn.Linear`` of their stacked weights, :meth:`split` turns its output back into
    the parts' outputs. The state dict still holds the parts under their own names.
    """

    FUSIONS: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.fused_sizes: dict[str, list[int]] = {}
        self.register_state_dict_post_hook(_save_parts)
        self.register_load_state_dict_pre_hook(_load_parts)

    @property
    def fused(self) -> bool:
        return bool(self.fused_sizes)

    def fuse(self) -> None:
        """Stack each fusion's parts into one ``nn.Linear`` (same dtype and device)."""
        for fused, parts in self.FUSIONS.items():
            layers = [getattr(self, part) for part in parts]
            weight = torch.cat([layer.weight.detach() for layer in layers])
            biases = [layer.bias for layer in layers]
            has_bias = biases[0] is not None
            if any((b is not None) != has_bias for b in biases):
                raise ValueError(f"{fused}: all or none of {', '.join(parts)} must have a bias")
            out_features, in_features = weight.shape
            linear = nn.Linear(in_features, out_features, has_bias, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if has_bias:
                    linear.bias.copy_(torch.cat([b.detach() for b in biases]))
            linear.requires_grad_(False)
            self.fused_sizes[fused] = [layer.weight.shape[0] for layer in layers]
            for part in parts:
                delattr(self, part)
            setattr(self, fused, linear)

    def split(self, fused: str, x: Tensor) -> tuple[Tensor, ...]:
        """The fused projection of ``x``, cut into its parts' outputs (views)."""
        return getattr(self, fused)(x).split(self.fused_sizes[fused], dim=-1)


def _save_parts(module: FusedProjections, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for fused, sizes in module.fused_sizes.items():
        linear = getattr(module, fused)
        weight, bias = dense_weight(linear), dense_bias(linear)
        for key in [k for k in state_dict if k.startswith(f"{prefix}{fused}.")]:
            del state_dict[key]
        parts = module.FUSIONS[fused]
        for part, w in zip(parts, weight.split(sizes), strict=True):
            state_dict[f"{prefix}{part}.weight"] = w.clone()
        if bias is not None:
            for part, b in zip(parts, bias.split(sizes), strict=True):
                state_dict[f"{prefix}{part}.bias"] = b.clone()


def _load_parts(
    module: FusedProjections, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, *args: Any
) -> None:
    for fused in module.fused_sizes:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{part}.{kind}" for part in module.FUSIONS[fused]]
            if all(key in state_dict for key in keys):
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])
